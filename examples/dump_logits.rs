//! Writes lorafold's logits on the golden inputs for every test fixture, bare and with its PEFT
//! adapters, as DIR/<arch>_<kind>.safetensors (key "logits"), for
//! `python tests/golden/precision.py --lorafold DIR`.
//!
//!     cargo run --release --example dump_logits -- DIR
use candle_core::{DType, Device};
use lorafold::lora::io::load_adapter;
use lorafold::model::linear::Fwd;
use lorafold::model::{LoadOptions, Model};
fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("usage: dump_logits DIR"))?,
    );
    std::fs::create_dir_all(&dir)?;
    for arch in ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let g = candle_core::safetensors::load(format!("tests/golden/{arch}.safetensors"), &Device::Cpu)?;
        let ids = g["input_ids"].to_dtype(DType::U32)?;
        let mask = g["attention_mask"].to_dtype(DType::F32)?;
        for kind in ["base", "peft", "peft_rslora"] {
            let mut model = Model::load_dir(
                std::path::Path::new(&format!("tests/fixtures/models/{arch}")),
                &LoadOptions::default(),
            )?;
            let fwd = if kind == "base" {
                Fwd::base()
            } else {
                let ad = load_adapter(
                    &mut model,
                    std::path::Path::new(&format!("tests/fixtures/adapters/{arch}_{kind}")),
                    false,
                )?;
                Fwd::eval(ad.slot)
            };
            let logits = model.forward(&ids, Some(&mask), &fwd)?;
            candle_core::safetensors::save(
                &std::collections::HashMap::from([("logits".to_string(), logits)]),
                dir.join(format!("{arch}_{kind}.safetensors")),
            )?;
        }
    }
    Ok(())
}
