//! Builds what the `microfaas` crate needs at run time, so that no manual
//! step precedes `cargo test` or `cargo run`:
//! * every example function in `functions/` into a verified artifact
//!   (`MICROFAAS_FUNCTIONS_DIR`, names in `MICROFAAS_FUNCTION_NAMES`), and
//!   every interpreted example (`functions/wasm/*.wat`, plus one large
//!   generated module) into a `wasm-*` artifact: the WAT is compiled to
//!   WebAssembly here, on the host, and wrapped in a generated function crate
//!   around the wasmi runtime (`functions/wasm/runtime.rs`);
//! * the `lang-isolation` worker binaries the `process` and `language`
//!   backends exec (`MICROFAAS_RUNNER_BIN`, `MICROFAAS_WORKER_BIN`) and the
//!   VMM host process the `vm` backend execs (`MICROFAAS_VMHOST_BIN`), in
//!   release mode so latency measurements are of optimised code.
//!
//! Both are nested cargo builds with their own target directories under the
//! workspace target directory (the outer build holds the lock of its own).

use std::path::{Path, PathBuf};

#[path = "functions/wasm/generate.rs"]
mod wasm;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_root = out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .unwrap_or(&out_dir)
        .to_owned();
    for watched in [
        "functions",
        "sdk",
        "builder",
        "lang-isolation",
        "vmm",
        "vmhost",
        "ipc",
        "guest",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", manifest_dir.join(watched).display());
    }
    build_functions(&manifest_dir, &target_root);
    build_worker_binaries(&manifest_dir, &target_root);
}

fn build_functions(manifest_dir: &Path, target_root: &Path) {
    let fn_root = target_root.join("microfaas-functions");
    let mut names = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(manifest_dir.join("functions"))
        .expect("functions/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    let wasm_root = target_root.join("microfaas-wasm");
    dirs.extend(wasm::generate_crates(manifest_dir, &wasm_root));
    println!(
        "cargo:rustc-env=MICROFAAS_MODULES_DIR={}",
        wasm::modules_dir(&wasm_root).display()
    );
    for dir in dirs {
        let name = dir.file_name().expect("dir name").to_string_lossy().into_owned();
        let mut opts = microfaas_builder::BuildOptions::new(fn_root.join("cache"));
        opts.out = Some(fn_root.join(format!("{name}.so")));
        if let Err(e) = microfaas_builder::build(&dir, &opts) {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            panic!("building function `{name}` failed: {msg}");
        }
        names.push(name);
    }
    println!("cargo:rustc-env=MICROFAAS_FUNCTIONS_DIR={}", fn_root.display());
    println!("cargo:rustc-env=MICROFAAS_FUNCTION_NAMES={}", names.join(","));
}

fn build_worker_binaries(manifest_dir: &Path, target_root: &Path) {
    let bin_target = target_root.join("microfaas-bins");
    let mut cmd = microfaas_builder::clean_cargo();
    let status = cmd
        .current_dir(manifest_dir)
        .args([
            "build",
            "--release",
            "-p",
            "lang-isolation",
            "-p",
            "microfaas-vmhost",
            "--bins",
            "--target-dir",
        ])
        .arg(&bin_target)
        .status()
        .expect("running cargo for the lang-isolation binaries");
    assert!(status.success(), "building the lang-isolation binaries failed");
    let release = bin_target.join("release");
    println!(
        "cargo:rustc-env=MICROFAAS_RUNNER_BIN={}",
        release.join("microfaas-runner").display()
    );
    println!(
        "cargo:rustc-env=MICROFAAS_WORKER_BIN={}",
        release.join("microfaas-worker").display()
    );
    println!(
        "cargo:rustc-env=MICROFAAS_VMHOST_BIN={}",
        release.join("microfaas-vmhost").display()
    );
}
