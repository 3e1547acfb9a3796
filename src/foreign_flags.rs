//! ms-swift 2.x `dpo` flags that lorafold does not implement, so that a pasted command still
//! runs or says exactly why it cannot. A flag that does nothing in a LoRA DPO run here (another
//! tuner's setting, PPO's coefficients, hub and DeepSpeed plumbing) is accepted and noted. A flag
//! that would change the training, and that lorafold does not do, is refused with the reason.
//! At ms-swift's default value (`quantization_bit 0`, `packing false`) it changes nothing and is
//! only noted. Every flag of ms-swift 2.6.1's `SftArguments` and `RLHFArguments` is either a
//! lorafold flag or listed here (checked by a test against the committed list).

/// What lorafold does with a foreign flag.
#[derive(Debug, Clone, Copy)]
pub enum Treatment {
    /// Accepted; it has no effect here, for this reason.
    Noted(&'static str),
    /// Refused for this reason, unless its value is one of these (lower case; an empty value
    /// list means every value is refused).
    Refused(&'static str, &'static [&'static str]),
}

use Treatment::{Noted, Refused};

const OTHER_TUNER: &str = "a setting of another ms-swift tuner; lorafold trains LoRA (and DoRA), so it has no effect";
const OTHER_RLHF: &str = "a setting of ms-swift's PPO, KTO or CPO trainers; it has no effect on DPO";
const PLACEMENT: &str =
    "device placement and sharding; lorafold runs each rank's step itself (data-parallel under mpirun)";
const GENERATION: &str = "a generation setting; DPO evaluation scores pairs and does not generate";
const PYTHON_RUNTIME: &str = "a setting of the Python data pipeline or logging; it has no counterpart here";
const HUB: &str =
    "hub uploads are not done by lorafold (no network at training time); upload the output folder yourself";
const QUANT: &str = "quantized base weights are not implemented; lorafold trains on f32, bf16 or f16 weights";

/// ms-swift tuner families whose settings have no effect with LoRA.
const TUNER_PREFIXES: [&str; 11] = [
    "adalora_",
    "adapter_",
    "boft_",
    "fourier_",
    "galore_",
    "ia3_",
    "lisa_",
    "llamapro_",
    "reft_",
    "vera_",
    "bnb_4bit_",
];

/// The flag table, by ms-swift's underscore spelling.
pub const FLAGS: &[(&str, Treatment)] = &[
    ("acc_steps", Noted("ms-swift's token-accuracy logging interval; lorafold logs TRL's DPO metrics")),
    ("acc_strategy", Noted("ms-swift's token-accuracy logging; lorafold logs TRL's DPO metrics")),
    ("add_output_dir_suffix", Noted("lorafold names version folders v<N>-<date>-<time> (see --add_version)")),
    ("additional_trainable_parameters", Refused("training extra tensors by name is not implemented; --modules_to_save trains embed_tokens or lm_head in full", &["", "[]"])),
    ("auto_find_batch_size", Refused("batch sizes are taken as given", &["false"])),
    ("cliprange", Noted(OTHER_RLHF)),
    ("cliprange_value", Noted(OTHER_RLHF)),
    ("cpo_alpha", Noted(OTHER_RLHF)),
    ("custom_dataset_info", Refused("ms-swift's dataset registry is not read; pass the data files to --dataset", &["none"])),
    ("custom_register_path", Refused("ms-swift's Python registration hooks cannot run here", &["none"])),
    ("custom_train_dataset_path", Refused("pass these files to --dataset", &["", "[]"])),
    ("custom_val_dataset_path", Refused("pass these files to --val_dataset", &["", "[]"])),
    ("dataloader_drop_last", Refused("the last, smaller batch of an epoch is always trained", &["false"])),
    ("dataloader_pin_memory", Noted(PYTHON_RUNTIME)),
    ("dataset_seed", Refused("dataset sampling (`file#N`) is seeded by --seed", &["none"])),
    ("ddp_backend", Noted(PLACEMENT)),
    ("ddp_broadcast_buffers", Noted(PLACEMENT)),
    ("ddp_find_unused_parameters", Noted(PLACEMENT)),
    ("ddp_timeout", Noted(PLACEMENT)),
    ("deepspeed", Refused("a DeepSpeed config file may set the optimizer or scheduler, which lorafold does not read; ZeRO's sharding itself (default-zero2/zero3) changes no result and is accepted", &["none", "default-zero2", "default-zero3", "zero2", "zero3", "zero2_offload", "zero3_offload"])),
    ("deepspeed_config_path", Refused("a DeepSpeed config file may set the optimizer or scheduler, which lorafold does not read", &["none"])),
    ("desirable_weight", Noted(OTHER_RLHF)),
    ("device_map_config", Noted(PLACEMENT)),
    ("device_map_config_path", Noted(PLACEMENT)),
    ("device_max_memory", Noted(PLACEMENT)),
    ("disable_tqdm", Noted("lorafold draws a progress bar on a terminal and writes progress lines otherwise")),
    ("do_sample", Noted(GENERATION)),
    ("freeze_parameters", Refused("freezing parts of the base is not needed: only the adapters train", &["", "[]"])),
    ("freeze_parameters_ratio", Refused("freezing parts of the base is not needed: only the adapters train", &["0", "0.0"])),
    ("freeze_vit", Noted("vision towers are not loaded (text-only models)")),
    ("fsdp", Noted(PLACEMENT)),
    ("fsdp_config", Noted(PLACEMENT)),
    ("fsdp_num", Noted(PLACEMENT)),
    ("full_determinism", Noted("lorafold's runs are deterministic for a given machine and thread count")),
    ("gamma", Noted(OTHER_RLHF)),
    ("gpu_memory_fraction", Noted(PLACEMENT)),
    ("hqq_axis", Noted(QUANT)),
    ("hqq_dynamic_config_path", Noted(QUANT)),
    ("hub_model_id", Noted(HUB)),
    ("hub_private_repo", Noted(HUB)),
    ("hub_strategy", Noted(HUB)),
    ("hub_token", Noted(HUB)),
    ("ignore_args_error", Noted(PYTHON_RUNTIME)),
    ("ignore_data_skip", Refused("a resume always continues from the checkpoint's data position", &["false"])),
    ("include_num_input_tokens_seen", Noted("metrics.jsonl logs tokens_per_second")),
    ("kl_coef", Noted(OTHER_RLHF)),
    ("lam", Noted(OTHER_RLHF)),
    ("lazy_tokenize", Noted(PYTHON_RUNTIME)),
    ("local_repo_path", Noted(PYTHON_RUNTIME)),
    ("local_rollout_forward_batch_size", Noted(OTHER_RLHF)),
    ("logging_dir", Refused("TensorBoard event files are written to <output_dir>/runs", &["none"])),
    ("lora_bias_trainable", Refused("LoRA biases are not trained (PEFT's bias='none')", &["none"])),
    ("lora_dtype", Refused("adapters are kept in f32", &["auto", "fp32", "none"])),
    ("loss_name", Refused("ms-swift's SFT loss functions do not apply; pick a DPO loss with --loss_type", &["none"])),
    ("loss_scale_config_path", Refused("per-token loss scales are not implemented", &["default"])),
    ("lr_scheduler_kwargs", Refused("scheduler arguments are not implemented (--lr_scheduler_type, --warmup_*)", &["none", "{}"])),
    ("max_new_tokens", Noted(GENERATION)),
    ("metric_warmup_step", Noted("ms-swift's throughput-metric warm-up; lorafold's tokens_per_second covers each logging window")),
    ("min_lr", Refused("a floor on the learning rate (cosine_with_min_lr) is not implemented", &["none"])),
    ("model_author", Noted("only used by ms-swift's self-cognition data, which lorafold does not add")),
    ("model_cache_dir", Refused("hub files are cached where HF_HOME / HF_HUB_CACHE say; set those instead", &["none"])),
    ("model_kwargs", Refused("extra model constructor arguments are not read", &["none", "{}"])),
    ("model_layer_cls_name", Noted("lorafold knows its decoder blocks (for --gradient_checkpointing)")),
    ("model_name", Noted("only used by ms-swift's self-cognition data, which lorafold does not add")),
    ("neftune_alpha", Refused("NEFTune noise is not implemented", &["none", "0", "0.0"])),
    ("neftune_backend", Noted("NEFTune is off (--neftune_noise_alpha is not implemented)")),
    ("neftune_noise_alpha", Refused("NEFTune noise is not implemented", &["none", "0", "0.0"])),
    ("num_beams", Noted(GENERATION)),
    ("num_sample_generations", Noted(OTHER_RLHF)),
    ("only_save_model", Noted("checkpoints always hold the optimizer state, for an exact resume")),
    ("optim", Refused("the optimizer is AdamW (torch's adamw semantics)", &["adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw"])),
    ("packing", Refused("packing several pairs into one row is not implemented; each pair's prompt is already computed once for chosen and rejected", &["false"])),
    ("pp", Noted(PLACEMENT)),
    ("predict_with_generate", Noted(GENERATION)),
    ("preprocess_num_proc", Noted(PYTHON_RUNTIME)),
    ("push_hub_strategy", Noted(HUB)),
    ("push_to_hub", Refused(HUB, &["false"])),
    ("quant_method", Refused(QUANT, &["none"])),
    ("quantization_bit", Refused(QUANT, &["0"])),
    ("ref_model_id_or_path", Refused("the reference is the base model with the adapters off (or --ref_adapters); a separate reference model is not loaded", &["none"])),
    ("ref_model_revision", Noted("a separate reference model is not loaded (the reference is the base with adapters off)")),
    ("repetition_penalty", Noted(GENERATION)),
    ("rescale_image", Noted("images are not read (text-only models)")),
    ("resume_only_model", Refused("a resume restores the optimizer and data position too", &["false"])),
    ("reward_model_id_or_path", Noted(OTHER_RLHF)),
    ("reward_model_revision", Noted(OTHER_RLHF)),
    ("reward_model_type", Noted(OTHER_RLHF)),
    ("rope_scaling", Refused("rope scaling comes from the model's config.json", &["none"])),
    ("safe_serialization", Refused("lorafold writes safetensors only", &["true", "none"])),
    ("save_on_each_node", Noted("rank 0 writes the output folder")),
    ("save_only_model", Noted("checkpoints always hold the optimizer state, for an exact resume")),
    ("save_safetensors", Refused("lorafold writes safetensors only", &["true"])),
    ("self_cognition_sample", Refused("ms-swift's self-cognition data is not added", &["0"])),
    ("sequence_parallel", Noted(PLACEMENT)),
    ("sequence_parallel_size", Noted(PLACEMENT)),
    ("streaming", Refused("datasets are read whole (they are tokenised once up front)", &["false"])),
    ("streaming_buffer_size", Noted("datasets are read whole")),
    ("streaming_val_size", Noted("datasets are read whole")),
    ("system", Refused("a default system prompt for every row is not implemented for training; give rows a `system` key", &["none"])),
    ("temperature", Noted(GENERATION)),
    ("template_type", Refused("ms-swift's template names are not mapped; the model's own chat template is used, or --template chatml|llama3|mistral|raw|<file.jinja>", &["auto"])),
    ("test_oom_error", Noted(PYTHON_RUNTIME)),
    ("tools_prompt", Noted("tool-call prompts are not built (preference rows only)")),
    ("top_k", Noted(GENERATION)),
    ("top_p", Noted(GENERATION)),
    ("tp", Noted(PLACEMENT)),
    ("train_backend", Refused("only lorafold's own trainer runs", &["transformers"])),
    ("train_dataset_mix_ds", Noted("mixing in general data is off (--train_dataset_mix_ratio 0)")),
    ("train_dataset_mix_ratio", Refused("mixing in general data is not implemented", &["0", "0.0"])),
    ("train_dataset_sample", Refused("sample rows with ms-swift 3's syntax instead: --dataset file#N", &["-1"])),
    ("truncation_strategy", Refused("rows are truncated as TRL does (the prompt from the left to --max_prompt_length, then the responses to --max_length); ms-swift's delete/truncation_left are not implemented", &[])),
    ("undesirable_weight", Noted(OTHER_RLHF)),
    ("use_flash_attn", Noted("attention kernels are chosen by lorafold (results equal to eager attention)")),
    ("use_galore", Refused("GaLore is not implemented", &["false"])),
    ("use_liger", Noted("lorafold's fused kernels are built in")),
    ("use_loss_scale", Refused("per-token loss scales are not implemented", &["false"])),
    ("val_dataset_sample", Refused("sample rows with ms-swift 3's syntax instead: --val_dataset file#N", &["none", "-1"])),
    ("vf_coef", Noted(OTHER_RLHF)),
    ("vit_use_gc", Noted("vision towers are not loaded (text-only models)")),
    ("whiten_rewards", Noted(OTHER_RLHF)),
];

/// The treatment of `name` (underscore or dash spelling), if it is a foreign flag.
pub fn treatment(name: &str) -> Option<Treatment> {
    let name = name.replace('-', "_");
    if let Some((_, t)) = FLAGS.iter().find(|(n, _)| *n == name) {
        return Some(*t);
    }
    TUNER_PREFIXES
        .iter()
        .any(|p| name.starts_with(p))
        .then_some(Noted(OTHER_TUNER))
}

/// What [`strip`] found.
#[derive(Debug, Default)]
pub struct Stripped {
    /// The arguments without the foreign flags and their values.
    pub args: Vec<String>,
    /// One line per noted flag.
    pub notes: Vec<String>,
    /// One line per refused flag.
    pub refused: Vec<String>,
}

/// Take the foreign flags (and their values: every argument up to the next `--flag`) out of
/// `args` (`lorafold <command> …`), with a note or a refusal for each.
pub fn strip(args: &[String]) -> Stripped {
    let mut out = Stripped::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let flag = (i >= 2).then(|| a.strip_prefix("--")).flatten();
        let Some((name, inline)) = flag.map(|f| f.split_once('=').map_or((f, None), |(n, v)| (n, Some(v)))) else {
            out.args.push(a.clone());
            i += 1;
            continue;
        };
        let Some(t) = treatment(name) else {
            out.args.push(a.clone());
            i += 1;
            continue;
        };
        let mut values: Vec<String> = inline.map(str::to_string).into_iter().collect();
        i += 1;
        while inline.is_none() && i < args.len() && !args[i].starts_with("--") {
            values.push(args[i].clone());
            i += 1;
        }
        let shown = if values.is_empty() {
            "true".to_string()
        } else {
            values.join(" ")
        };
        let value = shown.to_lowercase();
        match t {
            Noted(why) => out
                .notes
                .push(format!("note: --{name} {shown} is accepted and has no effect: {why}")),
            Refused(_, harmless) if harmless.contains(&value.as_str()) => out.notes.push(format!(
                "note: --{name} {shown} is ms-swift's default and changes nothing here"
            )),
            Refused(why, _) => out.refused.push(format!("--{name} {shown}: {why}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn notes_refuses_and_keeps_the_rest() {
        let s = strip(&args(
            "lorafold dpo --model m --kl_coef 0.1 --quantization_bit 4 --packing false --adalora_init_r 4 --dataset a b --push_to_hub=true",
        ));
        assert_eq!(s.args, args("lorafold dpo --model m --dataset a b"));
        assert_eq!(s.notes.len(), 3, "{:?}", s.notes);
        assert_eq!(s.refused.len(), 2, "{:?}", s.refused);
        assert!(
            s.refused[0].starts_with("--quantization_bit 4: quantized"),
            "{:?}",
            s.refused
        );
        assert!(s.refused[1].starts_with("--push_to_hub true"), "{:?}", s.refused);
    }

    #[test]
    fn dash_spelling_and_bare_flags() {
        let s = strip(&args("lorafold dpo --use-galore --disable-tqdm"));
        assert_eq!(s.args, args("lorafold dpo"));
        assert_eq!(s.refused.len(), 1);
        assert_eq!(s.notes.len(), 1);
    }
}
