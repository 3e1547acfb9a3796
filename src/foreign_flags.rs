//! ms-swift 2.x `dpo` and 3.x `rlhf` flags that lorafold does not implement, so that a pasted command still
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
const ONLINE_RL: &str =
    "a setting of ms-swift's GRPO/PPO/GKD rollouts (generation, rewards, vLLM); it has no effect on DPO";
const TRACKER: &str =
    "an experiment tracker lorafold does not report to (--report_to tensorboard writes TensorBoard files)";
const MULTIMODAL: &str = "a vision/multimodal setting; lorafold loads text-only models";
const EVAL_LOOP: &str =
    "a setting of transformers' evaluation loop; lorafold evaluates TRL's DPO metrics every --eval_steps";

/// ms-swift tuner families whose settings have no effect with LoRA.
const TUNER_PREFIXES: [&str; 12] = [
    "lora_ga_",
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

/// Other families of flags with no effect here, by prefix.
const FAMILY_PREFIXES: [(&str, &str); 10] = [
    ("vllm_", ONLINE_RL),
    ("chord_", ONLINE_RL),
    ("cosine_", ONLINE_RL),
    ("rollout_", ONLINE_RL),
    ("reward_", ONLINE_RL),
    ("teacher_", ONLINE_RL),
    ("swanlab_", TRACKER),
    ("trackio_", TRACKER),
    (
        "torch_compile",
        "torch.compile has no counterpart; lorafold's kernels are compiled Rust",
    ),
    ("dataloader_", PYTHON_RUNTIME),
];

/// ms-swift 3's GRPO/PPO/GKD settings (no prefix in common).
const ONLINE_RL_FLAGS: &[&str] = &[
    "advantage_estimator",
    "async_generate",
    "center_rewards_coefficient",
    "completion_length_limit_scope",
    "delta",
    "ds3_gather_for_generation",
    "dynamic_sample",
    "enable_flattened_weight_sync",
    "epsilon",
    "epsilon_high",
    "generation_batch_size",
    "importance_sampling_level",
    "kl_in_reward",
    "lmbda",
    "log_completions",
    "log_entropy",
    "log_rollout_offpolicy_metrics",
    "max_completion_length",
    "max_resample_times",
    "max_turns",
    "missing_eos_penalty",
    "move_model_batches",
    "multi_turn_scheduler",
    "num_generations",
    "num_generations_eval",
    "num_iterations",
    "num_mini_batches",
    "num_ppo_epochs",
    "off_policy_sequence_mask_delta",
    "offload_model",
    "offload_teacher_model",
    "overlong_filter",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "repetition_max_penalty",
    "repetition_n_grams",
    "response_length",
    "scale_rewards",
    "seq_kd",
    "sleep_level",
    "soft_cache_length",
    "soft_max_length",
    "steps_per_generation",
    "sync_ref_model",
    "tau_neg",
    "tau_pos",
    "top_entropy_quantile",
    "use_vllm",
    "wandb_log_unique_prompts",
    "structured_outputs_regex",
    "logprobs",
    "top_logprobs",
    "stop_words",
    "max_model_len",
    "external_plugins",
    "use_ray",
    "ray_exp_name",
    "device_groups",
    "ld_alpha",
    "sft_alpha",
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
    // ms-swift 3.x and transformers' TrainingArguments.
    ("accelerator_config", Noted(PLACEMENT)),
    ("activation_checkpointing", Refused("use --gradient_checkpointing", &["false"])),
    ("activation_checkpointing_kwargs", Noted("--gradient_checkpointing recomputes each decoder block; it takes no options")),
    ("add_non_thinking_prefix", Noted("thinking-mode prefixes come from the model's chat template")),
    ("agent_template", Noted("tool-call prompts are not built (preference rows only)")),
    ("aligner_lr", Noted(MULTIMODAL)),
    ("attn_impl", Noted("attention kernels are chosen by lorafold (results equal to eager attention)")),
    ("average_tokens_across_devices", Noted("DPO losses are means over pairs; data-parallel ranks sum gradients of equal shares")),
    ("batch_eval_metrics", Noted(EVAL_LOOP)),
    ("bf16", Noted("precision follows --torch_dtype (bf16 base weights with --torch_dtype bfloat16); there is no autocast")),
    ("bf16_full_eval", Noted("precision follows --torch_dtype")),
    ("cached_dataset", Refused("ms-swift's pre-tokenised dataset caches are not read; pass the data files to --dataset", &["", "[]"])),
    ("cached_val_dataset", Refused("ms-swift's pre-tokenised dataset caches are not read; pass the data files to --val_dataset", &["", "[]"])),
    ("check_model", Noted("lorafold uses the model files it finds")),
    ("ckpt_dir", Refused("use --adapters (continue an adapter) or --resume_from_checkpoint", &["none"])),
    ("columns", Refused("renaming dataset columns is not implemented; the common layouts are detected by their keys", &["none", "{}"])),
    ("create_checkpoint_symlink", Noted("checkpoint-N folders are written as they are; --resume_from_checkpoint latest finds the newest")),
    ("data_seed", Refused("the data order is seeded by --seed", &["none"])),
    ("dataset_shuffle", Refused("the data order follows --seed; turning it off is not implemented", &["true"])),
    ("ddp_bucket_cap_mb", Noted(PLACEMENT)),
    ("ddp_static_graph", Noted(PLACEMENT)),
    ("debug", Noted(PYTHON_RUNTIME)),
    ("deepspeed_autotp_size", Noted(PLACEMENT)),
    ("device_map", Noted(PLACEMENT)),
    ("do_eval", Noted("evaluation runs when there is evaluation data (see --eval_strategy)")),
    ("do_predict", Noted(GENERATION)),
    ("do_train", Noted("lorafold dpo always trains")),
    ("download_mode", Noted("hub files are reused from the cache when present")),
    ("early_stop_interval", Refused("early stopping is not implemented", &["none"])),
    ("enable_channel_loss", Refused("per-channel losses are not implemented", &["false"])),
    ("enable_dft_loss", Refused("the DFT loss is not implemented", &["false"])),
    ("enable_jit_checkpoint", Noted(PYTHON_RUNTIME)),
    ("enable_thinking", Refused("passing enable_thinking to the chat template is not implemented", &["none"])),
    ("eval_accumulation_steps", Noted(EVAL_LOOP)),
    ("eval_dataset", Noted("ms-swift's evalscope benchmarks are not run")),
    ("eval_dataset_args", Noted("ms-swift's evalscope benchmarks are not run")),
    ("eval_delay", Refused("evaluation starts at the first --eval_steps", &["0", "0.0"])),
    ("eval_do_concat_batches", Noted(EVAL_LOOP)),
    ("eval_generation_config", Noted(GENERATION)),
    ("eval_limit", Noted("ms-swift's evalscope benchmarks are not run")),
    ("eval_on_start", Refused("evaluation before the first step is not implemented (run lorafold eval)", &["false"])),
    ("eval_use_evalscope", Noted("ms-swift's evalscope benchmarks are not run")),
    ("eval_use_gather_object", Noted(EVAL_LOOP)),
    ("extra_eval_args", Noted("ms-swift's evalscope benchmarks are not run")),
    ("fp16", Noted("precision follows --torch_dtype (f16 base weights with --torch_dtype float16); there is no autocast")),
    ("fp16_full_eval", Noted("precision follows --torch_dtype")),
    ("freeze_aligner", Noted(MULTIMODAL)),
    ("freeze_llm", Refused("the base is always frozen and only the adapters train; freeze_llm false (full training) is not implemented", &["true"])),
    ("freeze_parameters_regex", Refused("freezing parts of the base is not needed: only the adapters train", &["none"])),
    ("generation_config", Noted(GENERATION)),
    ("generation_max_length", Noted(GENERATION)),
    ("generation_num_beams", Noted(GENERATION)),
    ("gradient_checkpointing_kwargs", Noted("--gradient_checkpointing recomputes each decoder block; it takes no options")),
    ("greater_is_better", Noted("best-checkpoint selection is not done")),
    ("hub_always_push", Noted(HUB)),
    ("hub_revision", Noted(HUB)),
    ("include_for_metrics", Noted(EVAL_LOOP)),
    ("init_strategy", Refused("re-initialising base weights is not implemented", &["none"])),
    ("interleave_prob", Refused("interleaving datasets is not implemented: files given to --dataset are concatenated", &["none"])),
    ("label_names", Noted(EVAL_LOOP)),
    ("label_smoothing_factor", Refused("use --label_smoothing (TRL's robust/cDPO smoothing of the DPO loss)", &["0", "0.0"])),
    ("length_column_name", Noted("lengths are counted from the tokenised pairs")),
    ("liger_kernel_config", Noted("lorafold's fused kernels are built in")),
    ("load_args", Noted("settings are read from --recipe, not from a previous run's args.json")),
    ("load_best_model_at_end", Refused("keeping the best checkpoint by an eval metric is not implemented", &["false"])),
    ("load_data_args", Noted("settings are read from --recipe, not from a previous run's args.json")),
    ("load_from_cache_file", Noted("datasets are tokenised once per run")),
    ("local_rank", Noted("ranks come from the MPI launcher")),
    ("log_level", Noted(PYTHON_RUNTIME)),
    ("log_level_replica", Noted(PYTHON_RUNTIME)),
    ("log_on_each_node", Noted("rank 0 writes the logs")),
    ("logging_first_step", Noted("lorafold logs every --logging_steps and the last step")),
    ("logging_nan_inf_filter", Noted("steps with a NaN/Inf loss are skipped and counted (--max_nonfinite_steps)")),
    ("logging_strategy", Refused("logging is every --logging_steps", &["steps"])),
    ("lora_bias", Refused("LoRA biases are not trained (PEFT's bias='none')", &["none"])),
    ("lora_modules", Refused("use --adapters to continue an adapter, or --ref_adapters for the reference", &["", "[]"])),
    ("loss_scale", Refused("per-token loss scales are not implemented", &["default", "last_round", "none"])),
    ("max_epochs", Refused("use --num_train_epochs", &["none"])),
    ("max_memory", Noted(PLACEMENT)),
    ("max_pixels", Noted(MULTIMODAL)),
    ("metric", Noted(EVAL_LOOP)),
    ("metric_for_best_model", Noted("best-checkpoint selection is not done")),
    ("new_special_tokens", Refused("adding tokens is not implemented (trainable_token_indices trains existing ones)", &["", "[]"])),
    ("norm_bbox", Noted(MULTIMODAL)),
    ("num_labels", Noted("sequence classification heads are not trained")),
    ("offload_optimizer", Noted(PLACEMENT)),
    ("optim_args", Refused("optimizer arguments come from --adam_beta1/--adam_beta2/--adam_epsilon/--weight_decay", &["none"])),
    ("optim_target_modules", Refused("GaLore/APOLLO-style optimizer targets are not implemented", &["none"])),
    ("optimizer", Refused("ms-swift's optimizer plugins are not implemented; LoRA+ is --lorap_lr_ratio", &["none"])),
    ("packing_length", Noted("packing is off (--packing is refused)")),
    ("packing_num_proc", Noted("packing is off (--packing is refused)")),
    ("padding_free", Refused("padding-free batches are not implemented; pairs are padded per batch with the prompt shared", &["false"])),
    ("padding_side", Refused("batches are right-padded, as TRL pads", &["right"])),
    ("parallelism_config", Noted(PLACEMENT)),
    ("prediction_loss_only", Noted(EVAL_LOOP)),
    ("problem_type", Noted("sequence classification heads are not trained")),
    ("project", Noted(TRACKER)),
    ("quant_bits", Refused(QUANT, &["none", "0"])),
    ("ref_model", Refused("the reference is the base model with the adapters off (or --ref_adapters); a separate reference model is not loaded", &["none"])),
    ("remove_unused_columns", Noted("unused keys are reported when the data is read")),
    ("response_prefix", Refused("a response prefix is not implemented", &["none"])),
    ("restore_callback_states_from_checkpoint", Noted("there are no callbacks")),
    ("router_aux_loss_coef", Refused("mixture-of-experts models are not supported", &["0", "0.0"])),
    ("run_name", Noted("the output folder names the run")),
    ("shuffle_buffer_size", Noted("datasets are read whole")),
    ("skip_memory_metrics", Noted("metrics.jsonl logs peak_rss_mib")),
    ("sortish_sampler", Refused("use --group_by_length", &["false"])),
    ("stopping_strategy", Refused("interleaving datasets is not implemented: files given to --dataset are concatenated", &["first_exhausted"])),
    ("stream", Noted(GENERATION)),
    ("strict", Refused("rows that fail to convert are errors; --skip_bad_rows skips them", &["false"])),
    ("target_parameters", Refused("LoRA on raw parameters (PEFT's target_parameters) is not implemented", &["none", "", "[]"])),
    ("task_type", Refused("only causal language modelling (causal_lm) is trained", &["causal_lm", "none"])),
    ("template_backend", Noted("the model's own chat template is rendered (minijinja)")),
    ("tf32", Noted("CPU products are f32; TF32 only applies to NVIDIA GPUs")),
    ("torch_empty_cache_steps", Noted(PYTHON_RUNTIME)),
    ("train_dataloader_shuffle", Refused("the data order follows --seed and --shuffle", &["true"])),
    ("train_sampling_strategy", Refused("the data order follows --seed, --shuffle and --group_by_length", &["random"])),
    ("trainable_parameters", Refused("training extra tensors by name is not implemented; --modules_to_save trains embed_tokens or lm_head in full", &["", "[]"])),
    ("trainable_parameters_regex", Refused("training extra tensors by name is not implemented; --modules_to_save trains embed_tokens or lm_head in full", &["none"])),
    ("use_cache", Noted("training never uses the KV cache; inference always does")),
    ("use_chat_template", Refused("rows are rendered with a chat template; --template raw trains on the text as it is", &["true"])),
    ("use_cpu", Noted("lorafold runs on the CPU unless built with cuda or metal")),
    ("use_flash_ckpt", Noted("checkpoints are written atomically")),
    ("use_hf", Noted("models and datasets are fetched from the Hugging Face hub")),
    ("use_liger_kernel", Noted("lorafold's fused kernels are built in")),
    ("use_logits_to_keep", Noted("the lm_head is applied at scored positions only")),
    ("use_swift_lora", Noted("lorafold writes PEFT adapters, which peft and ms-swift both load")),
    ("val_dataset_shuffle", Noted("evaluation scores every pair, in any order")),
    ("vit_gradient_checkpointing", Noted(MULTIMODAL)),
    ("vit_lr", Noted(MULTIMODAL)),
    ("zero_hpz_partition_size", Noted(PLACEMENT)),
];

/// The treatment of `name` (underscore or dash spelling), if it is a foreign flag.
pub fn treatment(name: &str) -> Option<Treatment> {
    let name = name.replace('-', "_");
    if let Some((_, t)) = FLAGS.iter().find(|(n, _)| *n == name) {
        return Some(*t);
    }
    if ONLINE_RL_FLAGS.contains(&name.as_str()) {
        return Some(Noted(ONLINE_RL));
    }
    if let Some((_, why)) = FAMILY_PREFIXES.iter().find(|(p, _)| name.starts_with(p)) {
        return Some(Noted(why));
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
/// `args` (`lorafold <command> …`), with a note or a refusal for each. Flags for which `own`
/// is true are lorafold's and stay.
pub fn strip(args: &[String], own: impl Fn(&str) -> bool) -> Stripped {
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
        let Some(t) = treatment(name).filter(|_| !own(name)) else {
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
                "note: --{name} {shown} is accepted: at this value it changes nothing here"
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
        ), |_| false);
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
        let s = strip(&args("lorafold dpo --use-galore --disable-tqdm"), |_| false);
        assert_eq!(s.args, args("lorafold dpo"));
        assert_eq!(s.refused.len(), 1);
        assert_eq!(s.notes.len(), 1);
    }
}
