//! Resolve `--model` to a folder of files: a local folder, or a Hugging Face hub id through the
//! hf-hub cache (HF_HOME / HF_HUB_CACHE), downloading from HF_ENDPOINT unless HF_HUB_OFFLINE is set.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::model::weights::WeightSource;

/// The files of a model, all in one folder (a local folder or a hub snapshot).
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user named: a path or a hub id.
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    pub fn tokenizer(&self) -> Option<PathBuf> {
        existing(self.dir.join("tokenizer.json"))
    }
    pub fn tokenizer_config(&self) -> Option<PathBuf> {
        existing(self.dir.join("tokenizer_config.json"))
    }
    pub fn generation_config(&self) -> Option<PathBuf> {
        existing(self.dir.join("generation_config.json"))
    }
}

fn existing(p: PathBuf) -> Option<PathBuf> {
    p.exists().then_some(p)
}

/// The hub cache folder: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
pub fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) if !p.is_empty() => Cache::new(PathBuf::from(p)),
        _ => Cache::from_env(),
    }
}

/// Does `spec` look like a hub id (`name` or `org/name`) rather than a path?
pub fn looks_like_hub_id(spec: &str) -> bool {
    !spec.is_empty()
        && !spec.starts_with(['.', '/', '~'])
        && spec.matches('/').count() <= 1
        && !spec.contains('\\')
        && !spec.ends_with('/')
}

/// Resolve a model given as a local folder or a hub id.
pub fn resolve_model(spec: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.is_dir() {
        return local_model(spec, path);
    }
    if path.exists() {
        return Err(Error::ModelIsFile { spec: spec.into() });
    }
    if !looks_like_hub_id(spec) {
        return Err(Error::MissingFile { path: path.into() });
    }
    hub_model(spec, revision)
}

fn local_model(name: &str, dir: &Path) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    if !config.exists() {
        return Err(Error::MissingFile { path: config });
    }
    let weights = WeightSource::files_in(dir)?;
    Ok(ModelFiles {
        name: name.into(),
        dir: dir.into(),
        config,
        weights,
    })
}

/// A hub repository seen through the local cache, with downloads unless offline.
pub struct HubRepo {
    id: String,
    revision: String,
    cache: Cache,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl HubRepo {
    pub fn new(id: &str, revision: Option<&str>, repo_type: RepoType) -> Result<HubRepo> {
        let revision = revision.unwrap_or("main").to_string();
        let cache = hub_cache();
        let api = if crate::util::env_flag("HF_HUB_OFFLINE") {
            None
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_cache_dir(cache.path().clone())
                .build()
                .map_err(|e| Error::Hub {
                    id: id.into(),
                    msg: format!("cannot start the hub client: {e}"),
                })?;
            Some(api.repo(Repo::with_revision(id.into(), repo_type, revision.clone())))
        };
        Ok(HubRepo {
            id: id.into(),
            revision,
            cache,
            api,
        })
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        let repo = self.cache.repo(Repo::with_revision(
            self.id.clone(),
            RepoType::Model,
            self.revision.clone(),
        ));
        if let Some(p) = repo.get(file) {
            return Some(p);
        }
        // A revision given as a commit hash names the snapshot folder directly.
        let snap = self
            .cache
            .path()
            .join(format!("models--{}", self.id.replace('/', "--")))
            .join("snapshots")
            .join(&self.revision)
            .join(file);
        snap.exists().then_some(snap)
    }

    /// The local path of `file`, from the cache or downloaded. `Ok(None)` when the file is not in
    /// the repository (or, offline, not in the cache).
    pub fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached(file) {
            return Ok(Some(p));
        }
        let Some(api) = &self.api else {
            return Ok(None);
        };
        match api.get(file) {
            Ok(p) => Ok(Some(p)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::Hub {
                id: self.id.clone(),
                msg: format!("downloading {file} (revision {}): {e}", self.revision),
            }),
        }
    }

    /// Like [`HubRepo::get`] but the file must exist.
    pub fn require(&self, file: &str) -> Result<PathBuf> {
        self.get(file)?.ok_or_else(|| Error::Hub {
            id: self.id.clone(),
            msg: if self.api.is_none() {
                format!(
                    "{file} (revision {}) is not in the local hub cache {} and HF_HUB_OFFLINE is set",
                    self.revision,
                    self.cache.path().display()
                )
            } else {
                format!("{file} not found at revision {}", self.revision)
            },
        })
    }
}

/// A missing file answers 404; hf-hub only exposes that through the error text.
fn is_not_found(e: &hf_hub::api::sync::ApiError) -> bool {
    let s = e.to_string();
    s.contains("404") || s.contains("Not Found")
}

fn hub_model(id: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let repo = HubRepo::new(id, revision, RepoType::Model)?;
    let config = repo.require("config.json")?;
    let weights = match repo.get("model.safetensors.index.json")? {
        Some(index) => {
            // Fetch each shard named by the index.
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: std::collections::HashMap<String, String>,
            }
            let idx: Index = crate::error::read_json(&index)?;
            let mut shards: Vec<String> = idx.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            shards.iter().map(|s| repo.require(s)).collect::<Result<Vec<_>>>()?
        }
        None => match repo.get("model.safetensors")? {
            Some(p) => vec![p],
            None => {
                return Err(Error::Hub {
                    id: id.into(),
                    msg: "has no model.safetensors or model.safetensors.index.json (pickle-only \
                          repositories are not loaded)"
                        .into(),
                })
            }
        },
    };
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "chat_template.json",
        "special_tokens_map.json",
    ] {
        repo.get(f)?;
    }
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(ModelFiles {
        name: id.into(),
        dir,
        config,
        weights,
    })
}
