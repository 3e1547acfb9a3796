//! Models given as hub ids resolve through a hub cache laid out on disk (offline).

use std::path::Path;

use lorafold::hub::looks_like_hub_id;

use crate::common::*;

/// Lay out `HF_HOME/hub/models--org--name/{refs/main, snapshots/<rev>/...}` like huggingface_hub.
fn make_cache(home: &Path, id: &str, arch: &str, rev: &str) {
    let repo = home.join("hub").join(format!("models--{}", id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    copy_dir(&model_dir(arch), &repo.join("snapshots").join(rev));
}

#[test]
fn hub_id_resolves_from_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    make_cache(home.path(), "lorafold-test/tiny-llama", "llama", rev);
    let env = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    let out = lorafold(&["inspect", "--model", "lorafold-test/tiny-llama"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Llama") && stdout.contains(rev), "{stdout}");

    // An explicit commit revision names the snapshot folder.
    let out = lorafold(
        &["inspect", "--model", "lorafold-test/tiny-llama", "--revision", rev],
        &env,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // With an adapter, checked against the model.
    let ad = adapter_dir("llama_peft");
    let out = lorafold(
        &[
            "inspect",
            "--model",
            "lorafold-test/tiny-llama",
            "--adapters",
            ad.to_str().unwrap(),
        ],
        &env,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("28 tensors"));
}

#[test]
fn offline_cache_miss_says_what_is_missing() {
    let home = tempfile::tempdir().unwrap();
    let env = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    let out = lorafold(&["inspect", "--model", "nobody/absent"], &env);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nobody/absent") && stderr.contains("config.json") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
}

#[test]
fn hub_ids_and_paths_are_told_apart() {
    assert!(looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct"));
    assert!(looks_like_hub_id("gpt2"));
    assert!(!looks_like_hub_id("./models/x"));
    assert!(!looks_like_hub_id("/abs/path"));
    assert!(!looks_like_hub_id("a/b/c"));
}
