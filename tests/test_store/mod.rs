// A snapshot store private to one test process, under cargo's
// `CARGO_TARGET_TMPDIR` for tests (the temp dir for examples; never the
// user's cache). A store
// lives as long as its process, so a `static` holds it and it is never
// dropped: instead, each new test process first removes the stores of test
// processes that are gone (their pid is in the name), so repeated runs do
// not pile up stores (each holds tens of MiB of snapshot images).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The store of this test process for `prefix`, made on first use.
pub fn process_store(prefix: &'static str) -> PathBuf {
    static STORES: OnceLock<std::sync::Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    let mut stores = stores.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = stores.iter().find(|(p, _)| *p == prefix) {
        return path.clone();
    }
    // Examples that share these helpers have no CARGO_TARGET_TMPDIR.
    let root = option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let root = root.as_path();
    std::fs::create_dir_all(root).unwrap();
    remove_stale(root, prefix);
    let path = root.join(format!("{prefix}-{}", std::process::id()));
    // A leftover of an earlier process that had our pid.
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir(&path).unwrap();
    stores.push((prefix, path.clone()));
    path
}

/// Removes `root/{prefix}-{pid}` for every pid that is no longer running.
fn remove_stale(root: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
