//! Every flag of ms-swift 2.6.1's `swift dpo` (SftArguments + RLHFArguments, listed by
//! tests/golden/swift_flags.py) is implemented by `lorafold dpo`, or noted, or refused with a
//! reason — never "unknown flag".

use crate::common::root;

#[test]
fn every_ms_swift_2_dpo_flag_is_known_noted_or_refused() {
    let list = std::fs::read_to_string(root().join("tests/fixtures/ms_swift/dpo_flags_v2.6.1.txt")).unwrap();
    let flags: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
    assert!(flags.len() > 200, "{} flags", flags.len());
    let mut args: Vec<String> = vec!["lorafold".into(), "dpo".into()];
    let (mut foreign, mut known) = (0, 0);
    for f in &flags {
        if lorafold::foreign_flags::treatment(f).is_some() {
            foreign += 1;
        } else {
            known += 1;
            args.push(format!("--{f}"));
        }
    }
    let unknown = lorafold::cli::unknown_flags(&args);
    assert!(
        unknown.is_empty(),
        "ms-swift 2.6.1 dpo flags lorafold neither knows nor lists: {unknown:?}"
    );
    eprintln!("{known} implemented, {foreign} noted or refused");
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
    assert!(err.contains("--quantization_bit 0 is ms-swift's default"), "{err}");
}
