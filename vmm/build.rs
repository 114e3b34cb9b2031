//! Builds the guest kernel (`guest`'s `guest-kernel` binary, feature
//! `kernel`) as a freestanding static ELF with the installed stable
//! toolchain and the host's `x86_64-unknown-linux-gnu` target, in its own
//! target directory under `OUT_DIR`, and points `GUEST_KERNEL_PATH` at it
//! for `include_bytes!`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("vmm/ lives in the workspace").to_owned();
    let guest_dir = workspace.join("guest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("guest-target");
    let linker_script = guest_dir.join("link.ld");

    for path in [
        "guest/src",
        "guest/abi/src",
        "guest/Cargo.toml",
        "guest/abi/Cargo.toml",
        "guest/link.ld",
        "sdk/src",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustflags = [
        "-Crelocation-model=static",
        "-Ccode-model=small",
        "-Cpanic=abort",
        "-Ctarget-feature=+crt-static",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-static",
        "-Clink-arg=-Wl,--build-id=none",
        &format!("-Clink-arg=-T{}", linker_script.display()),
    ]
    .join("\x1f");

    let mut cmd = Command::new(cargo);
    // A clean environment: drop what cargo sets for build scripts (and any
    // wrapper or flags meant for the outer build), keep PATH/HOME/CARGO_HOME.
    cmd.env_clear();
    for key in [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "TMPDIR",
    ] {
        if let Some(v) = env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--offline",
            "-p",
            "guest",
            "--bin",
            "guest-kernel",
            "--features",
            "kernel",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .arg("--target-dir")
        .arg(&target_dir);
    let status = cmd.status().expect("running cargo to build the guest kernel");
    if !status.success() {
        panic!("building the guest kernel failed ({status})");
    }
    let kernel = target_dir.join("x86_64-unknown-linux-gnu/release/guest-kernel");
    println!("cargo:rustc-env=GUEST_KERNEL_PATH={}", kernel.display());
}
