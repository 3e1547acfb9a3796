//! `adapter_config.json` as PEFT writes it, and target-module selection with PEFT's semantics.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::config::is_linear_module;

/// `target_modules`: one string (a regex matched against the whole module path, or the keywords
/// `all-linear` / `ALL`), or a list of module names matched as path suffixes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Pattern(String),
    Modules(Vec<String>),
}

impl TargetModules {
    /// Every linear layer of the decoder blocks (`all-linear`; ms-swift calls it `ALL`).
    pub fn all_linear() -> Self {
        TargetModules::Pattern("all-linear".into())
    }

    /// Parse a command-line value: `ALL`/`all-linear`, a comma-separated list, or a regex.
    pub fn parse_cli(values: &[String]) -> Self {
        let parts: Vec<String> = values
            .iter()
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if parts.len() == 1 {
            let p = &parts[0];
            if is_all_keyword(p) {
                return Self::all_linear();
            }
            if is_linear_module(p) {
                return TargetModules::Modules(parts);
            }
            return TargetModules::Pattern(p.clone());
        }
        if parts.iter().any(|p| is_all_keyword(p)) {
            return Self::all_linear();
        }
        TargetModules::Modules(parts)
    }

    /// `exclude_modules` from the command line: one value that is not a module name is a regex,
    /// anything else a list of names.
    pub fn parse_exclude(values: &[String]) -> Self {
        match values {
            [one] if !is_linear_module(one) && !one.contains(',') => TargetModules::Pattern(one.clone()),
            _ => TargetModules::Modules(
                values
                    .iter()
                    .flat_map(|v| v.split(','))
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            ),
        }
    }

    /// A compiled matcher; a bad regex is an error naming it.
    pub fn matcher(&self) -> Result<TargetMatcher> {
        Ok(match self {
            TargetModules::Pattern(p) if is_all_keyword(p) => TargetMatcher::All,
            TargetModules::Pattern(p) => {
                let re = regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| Error::TargetRegex {
                    pattern: p.clone(),
                    msg: e.to_string(),
                })?;
                TargetMatcher::Regex(re)
            }
            TargetModules::Modules(list) => {
                if list.iter().any(|m| is_all_keyword(m)) {
                    TargetMatcher::All
                } else {
                    TargetMatcher::Suffix(list.clone())
                }
            }
        })
    }

    /// The short module names (q_proj, ...) that this selection hits in a decoder whose blocks
    /// have the linear layers `modules`.
    pub fn resolved_names(&self, modules: &[&str], num_layers: usize) -> Result<Vec<String>> {
        let m = self.matcher()?;
        Ok(modules
            .iter()
            .filter(|name| (0..num_layers).any(|l| m.matches(&crate::model::config::module_path(l, name))))
            .map(|s| s.to_string())
            .collect())
    }
}

fn is_all_keyword(s: &str) -> bool {
    s.eq_ignore_ascii_case("all-linear") || s.eq_ignore_ascii_case("all_linear") || s == "ALL"
}

pub enum TargetMatcher {
    All,
    Regex(regex::Regex),
    Suffix(Vec<String>),
}

impl TargetMatcher {
    /// Does the module at `path` (e.g. `model.layers.0.self_attn.q_proj`) get an adapter?
    pub fn matches(&self, path: &str) -> bool {
        match self {
            TargetMatcher::All => true,
            TargetMatcher::Regex(re) => re.is_match(path),
            TargetMatcher::Suffix(list) => list.iter().any(|t| path == t || path.ends_with(&format!(".{t}"))),
        }
    }
}

/// The fields of PEFT's LoraConfig that lorafold reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: Option<TargetModules>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// With `modules_to_save` on a tied model: one trained matrix serves as both embedding and
    /// output (PEFT saves it under both names).
    #[serde(default)]
    pub ensure_weight_tying: bool,
    /// Embedding rows trained on their own: a list of token ids, or {"embed_tokens": [ids]}.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<Value>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(default)]
    pub layers_pattern: Option<Value>,
    /// `true`, `false`, `gaussian`, `pissa`, `pissa_niter_N` or `olora`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_lora_weights: Option<Value>,
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    #[serde(default)]
    pub revision: Option<String>,
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_bias() -> String {
    "none".into()
}

impl LoraConfig {
    pub fn new(r: usize, lora_alpha: f64, lora_dropout: f64, target_modules: TargetModules) -> Self {
        LoraConfig {
            peft_type: default_peft_type(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha,
            lora_dropout,
            target_modules: Some(target_modules),
            bias: default_bias(),
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            inference_mode: true,
            modules_to_save: None,
            ensure_weight_tying: false,
            trainable_token_indices: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            layers_pattern: None,
            init_lora_weights: None,
            exclude_modules: None,
            revision: None,
        }
    }

    /// Read and check an adapter_config.json; options lorafold cannot honour are errors.
    pub fn from_file(path: &Path) -> Result<LoraConfig> {
        let example = serde_json::to_value(LoraConfig::new(1, 1.0, 0.0, TargetModules::all_linear()))
            .map_err(|e| Error::Msg(e.to_string()))?;
        let cfg: LoraConfig = crate::error::read_json_named(path, &example)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Error::Config {
            path: path.into(),
            key: key.into(),
            msg,
        };
        if self.peft_type != "LORA" {
            return Err(bad(
                "peft_type",
                format!("{:?} is not supported (LORA only)", self.peft_type),
            ));
        }
        if self.r == 0 {
            return Err(bad("r", "must be positive".into()));
        }
        if self.fan_in_fan_out {
            return Err(bad("fan_in_fan_out", "true is not supported (Conv1D models)".into()));
        }
        if self.bias != "none" {
            return Err(bad("bias", format!("{:?} is not supported (\"none\" only)", self.bias)));
        }
        self.saved_modules().map_err(|msg| bad("modules_to_save", msg))?;
        self.token_indices()
            .map_err(|msg| bad("trainable_token_indices", msg))?;
        self.layer_indexes().map_err(|msg| bad("layers_to_transform", msg))?;
        match &self.init_lora_weights {
            None | Some(Value::Bool(_)) => {}
            Some(Value::String(s)) => {
                let init = super::init::LoraInit::parse(s, 0).map_err(|msg| bad("init_lora_weights", msg))?;
                if init.is_principal() && self.use_dora {
                    return Err(bad(
                        "init_lora_weights",
                        format!("{s:?} together with use_dora is not supported (its conversion to plain LoRA has no magnitudes)"),
                    ));
                }
                if init.is_principal()
                    && self.use_rslora
                    && !(self.rank_pattern.is_empty() && self.alpha_pattern.is_empty())
                {
                    return Err(bad(
                        "init_lora_weights",
                        format!("{s:?} with use_rslora and rank/alpha patterns cannot be converted to plain LoRA (PEFT refuses it too)"),
                    ));
                }
            }
            Some(v) => return Err(bad("init_lora_weights", format!("{v} is not a boolean or a name"))),
        }
        self.layer_patterns().map_err(|msg| bad("layers_pattern", msg))?;
        if let Some(t) = &self.exclude_modules {
            t.matcher().map_err(|e| bad("exclude_modules", e.to_string()))?;
        }
        for key in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            regex::Regex::new(key).map_err(|e| bad("rank_pattern", format!("invalid regex {key:?}: {e}")))?;
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(bad("lora_dropout", format!("{} is outside [0, 1)", self.lora_dropout)));
        }
        if let Some(t) = &self.target_modules {
            t.matcher().map_err(|e| bad("target_modules", e.to_string()))?;
        }
        Ok(())
    }

    /// The LoRA scale for a module of rank `r` (alpha/r, or alpha/sqrt(r) with rsLoRA), honouring
    /// `alpha_pattern` the way PEFT does (a key matches the module path or a dotted suffix of it).
    pub fn scale_for(&self, module_path: &str, r: usize) -> f64 {
        let alpha = pattern_lookup(&self.alpha_pattern, module_path).unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The rank for a module, honouring `rank_pattern`.
    pub fn rank_for(&self, module_path: &str) -> usize {
        pattern_lookup(&self.rank_pattern, module_path).unwrap_or(self.r)
    }

    /// `modules_to_save` as (embedding, output): lorafold trains `embed_tokens` and `lm_head`
    /// in full; anything else is refused.
    pub fn saved_modules(&self) -> std::result::Result<(bool, bool), String> {
        let (mut embed, mut head) = (false, false);
        for m in self.modules_to_save.iter().flatten() {
            match m.trim_start_matches("model.") {
                "embed_tokens" => embed = true,
                "lm_head" => head = true,
                other => {
                    return Err(format!(
                        "{other:?} is not supported (embed_tokens and lm_head are the modules lorafold trains in full)"
                    ))
                }
            }
        }
        Ok((embed, head))
    }

    /// `trainable_token_indices` as token ids of the embedding (empty when unset).
    pub fn token_indices(&self) -> std::result::Result<Vec<u32>, String> {
        let list = match &self.trainable_token_indices {
            None | Some(Value::Null) => return Ok(vec![]),
            Some(Value::Array(a)) => a.clone(),
            Some(Value::Object(o)) => {
                let mut out = vec![];
                for (k, v) in o {
                    if k.trim_start_matches("model.") != "embed_tokens" {
                        return Err(format!("{k:?}: only embed_tokens can have trainable tokens"));
                    }
                    out.extend(v.as_array().cloned().unwrap_or_default());
                }
                out
            }
            Some(v) => return Err(format!("{v} is not a list of token ids")),
        };
        list.iter()
            .map(|v| {
                v.as_u64()
                    .map(|i| i as u32)
                    .ok_or_else(|| format!("{v} is not a token id"))
            })
            .collect()
    }

    /// `layers_to_transform`: one index or a list of them (`None` when unset or empty).
    fn layer_indexes(&self) -> std::result::Result<Option<Vec<usize>>, String> {
        let bad = |v: &Value| format!("{v} is not a layer index or a list of them");
        match &self.layers_to_transform {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|i| Some(vec![i as usize]))
                .ok_or_else(|| bad(&Value::Number(n.clone()))),
            Some(Value::Array(a)) if a.is_empty() => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|i| i as usize).ok_or_else(|| bad(v)))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(bad(v)),
        }
    }

    /// `layers_pattern`: the names of the layer lists (`layers`), compiled into PEFT's
    /// "first index after that name" regexes; empty when unset.
    fn layer_patterns(&self) -> std::result::Result<Vec<regex::Regex>, String> {
        let names: Vec<String> = match &self.layers_pattern {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) if s.is_empty() => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("{v} is not a string"))
                })
                .collect::<std::result::Result<_, _>>()?,
            Some(v) => return Err(format!("{v} is not a string or a list of strings")),
        };
        let sources: Vec<String> = if names.is_empty() {
            vec![r"^.*?\.[^.]*\.(\d+)\.".into()]
        } else {
            names.iter().map(|n| format!(r"^(?:|.*?\.){n}\.(\d+)\.")).collect()
        };
        sources
            .iter()
            .map(|src| regex::Regex::new(src).map_err(|e| format!("invalid pattern: {e}")))
            .collect()
    }

    /// Which linear layers this config puts an adapter on, by PEFT's rules.
    pub fn selector(&self) -> Result<ModuleSelector> {
        let target = self.target_modules.clone().unwrap_or_else(TargetModules::all_linear);
        let msg = |e: String| Error::Msg(e);
        Ok(ModuleSelector {
            target: target.matcher()?,
            by_list: !matches!(&target, TargetModules::Pattern(p) if !is_all_keyword(p)),
            exact: match &target {
                TargetModules::Modules(list) => list.clone(),
                TargetModules::Pattern(_) => vec![],
            },
            exclude: self.exclude_modules.as_ref().map(TargetModules::matcher).transpose()?,
            layers: self.layer_indexes().map_err(msg)?,
            layer_patterns: self.layer_patterns().map_err(msg)?,
        })
    }

    /// Every `rank_pattern` and `alpha_pattern` key must match one of `paths` (the adapted
    /// modules): a key that matches nothing is a typo PEFT would silently ignore.
    pub fn check_patterns_match<'a>(&self, paths: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
        for (field, keys) in [
            ("rank_pattern", self.rank_pattern.keys().collect::<Vec<_>>()),
            ("alpha_pattern", self.alpha_pattern.keys().collect()),
        ] {
            for key in keys {
                let one = BTreeMap::from([(key.clone(), 0usize)]);
                if !paths.clone().any(|p| pattern_lookup(&one, p).is_some()) {
                    return Err(Error::PatternUnmatched {
                        field,
                        pattern: key.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// PEFT's `check_target_module_exists`: excluded modules first, then the targets; with a list
/// of targets (or `all-linear`), `layers_to_transform` keeps only the layers it names, the layer
/// index being the first number after `layers_pattern` (or after the first dotted name).
pub struct ModuleSelector {
    target: TargetMatcher,
    /// Targets given as names (not one regex): the layer filter applies.
    by_list: bool,
    /// Targets given as names: a module named exactly is taken whatever its layer.
    exact: Vec<String>,
    exclude: Option<TargetMatcher>,
    layers: Option<Vec<usize>>,
    layer_patterns: Vec<regex::Regex>,
}

impl ModuleSelector {
    pub fn selects(&self, path: &str) -> bool {
        if let Some(ex) = &self.exclude {
            if !matches!(ex, TargetMatcher::All) && ex.matches(path) {
                return false;
            }
        }
        if !self.target.matches(path) {
            return false;
        }
        let Some(layers) = self.layers.as_ref().filter(|_| self.by_list) else {
            return true;
        };
        if self.exact.iter().any(|t| t == path) {
            return true;
        }
        let index = self
            .layer_patterns
            .iter()
            .find_map(|re| re.captures(path))
            .and_then(|c| c.get(1)?.as_str().parse::<usize>().ok());
        index.is_some_and(|i| layers.contains(&i))
    }

    /// Whether `exclude_modules` is set and matches one of `paths`.
    pub fn exclude_matches<'a>(&self, mut paths: impl Iterator<Item = &'a str>) -> bool {
        match &self.exclude {
            None => true,
            Some(ex) => paths.any(|p| ex.matches(p)),
        }
    }
}

fn pattern_lookup<V: Copy>(patterns: &BTreeMap<String, V>, module_path: &str) -> Option<V> {
    patterns.iter().find_map(|(pat, v)| {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pat})$")).ok()?;
        re.is_match(module_path).then_some(*v)
    })
}
