//! Helpers shared by the hostile tests.
#![allow(dead_code)]

use microfaas::Artifact;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The directory of hostile fixture crate `name`.
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hostile")
        .join(name)
}

/// Builds hostile fixture `name` with the test-only allow-unsafe flag (the
/// attacker at full strength: raw syscalls and inline asm).
pub fn attacker(name: &str) -> Arc<Artifact> {
    let mut opts =
        microfaas_builder::BuildOptions::new(Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-fixtures"));
    opts.allow_unsafe = true;
    let built = microfaas_builder::build(&fixture_dir(name), &opts)
        .unwrap_or_else(|e| panic!("building hostile fixture {name}: {e}"));
    Arc::new(Artifact::load(&built.path).unwrap())
}
