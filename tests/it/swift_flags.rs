//! Every flag of ms-swift 2.6.1's `swift dpo` and 3.12.6's `swift rlhf` (listed by
//! tests/golden/swift_flags.py) is implemented by lorafold, or noted, or refused with a reason —
//! never "unknown flag".

use crate::common::root;

#[test]
fn every_ms_swift_2_dpo_flag_is_known_noted_or_refused() {
    every_flag_is_known_noted_or_refused("dpo_flags_v2.6.1.txt", "dpo", 200);
}

/// The same for ms-swift 3.12.6's `swift rlhf` (RLHFArguments, its bases and transformers'
/// Seq2SeqTrainingArguments).
#[test]
fn every_ms_swift_3_rlhf_flag_is_known_noted_or_refused() {
    every_flag_is_known_noted_or_refused("rlhf_flags_v3.12.6.txt", "rlhf", 400);
}

fn every_flag_is_known_noted_or_refused(file: &str, command: &str, at_least: usize) {
    let list = std::fs::read_to_string(root().join("tests/fixtures/ms_swift").join(file)).unwrap();
    let flags: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
    assert!(flags.len() > at_least, "{} flags", flags.len());
    let mut args: Vec<String> = vec!["lorafold".into(), command.into()];
    let (mut foreign, mut known) = (0, 0);
    for f in &flags {
        if lorafold::cli::is_known_flag(command, f) {
            known += 1;
        } else if lorafold::foreign_flags::treatment(f).is_some() {
            foreign += 1;
        } else {
            args.push(format!("--{f}"));
        }
    }
    let unknown = lorafold::cli::unknown_flags(&args);
    assert!(
        unknown.is_empty(),
        "{file}: flags lorafold neither knows nor lists: {unknown:?}"
    );
    eprintln!("{file}: {known} implemented, {foreign} noted or refused");
}

/// A pasted command with a refused flag lists every refusal and exits 2 before loading
/// anything; noted flags are said once each.
#[test]
fn refused_ms_swift_flags_are_all_reported_with_reasons() {
    let out = crate::common::lorafold(
        &[
            "dpo",
            "--model",
            "no/such-model",
            "--quantization_bit",
            "4",
            "--packing",
            "true",
            "--kl_coef",
            "0.1",
            "--deepspeed",
            "default-zero2",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--quantization_bit 4: quantized base weights are not implemented"),
        "{err}"
    );
    assert!(err.contains("--packing true: packing several pairs"), "{err}");
    assert!(err.contains("2 ms-swift flags cannot be honoured"), "{err}");
    assert!(!err.contains("kl_coef"), "a note printed before the refusal: {err}");
    let out = crate::common::lorafold(
        &[
            "dpo",
            "--recipe",
            "recipes/quickstart.yaml",
            "--kl_coef",
            "0.1",
            "--quantization_bit",
            "0",
            "--print_settings",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("--kl_coef 0.1 is accepted and has no effect"), "{err}");
    assert!(
        err.contains("--quantization_bit 0 is accepted: at this value it changes nothing here"),
        "{err}"
    );
}
