//! Hostile tests: build. A function crate's author attacks the build host
//! through `microfaas build`: code that would run at build time (a build
//! script, a proc-macro), dependencies named like allowlisted crates but from
//! a path or git, and compile-time reads of host files and environment
//! variables. Each is refused before compiling, naming what was refused, or
//! fails inside the build sandbox with the compiler's own message; through
//! the builder API and the CLI. A normal function still builds and runs.

use microfaas::{Artifact, BackendKind, Config, FunctionSpec, StartRequest};
use microfaas_builder::{BuildError, BuildOptions, Built, DependencyReason, Refusal};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use crate::common::fixture_dir;

/// One cache for these tests (each fixture builds in its own locked work
/// directory inside it).
fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-build-cache")
}

fn build(dir: &Path) -> Result<Built, BuildError> {
    microfaas_builder::build(dir, &BuildOptions::new(cache_dir()))
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk")
}

/// Copies fixture `name` to `into/name`, pointing its SDK dependency at the
/// SDK by absolute path.
fn copy_fixture(name: &str, into: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let to = into.join(name);
    copy(&fixture_dir(name), &to);
    let manifest = to.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("\"../../../../sdk\"", &format!("\"{}\"", sdk_dir().display()));
    std::fs::write(&manifest, text).unwrap();
    to
}

fn cli_build(dir: &Path, envs: &[(&str, &str)]) -> Output {
    let out_file = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_microfaas"))
        .args(["build"])
        .arg(dir)
        .arg("--out")
        .arg(out_file.path().join("x.so"))
        .env("MICROFAAS_BUILD_CACHE", cache_dir())
        .envs(envs.iter().copied())
        .output()
        .expect("running microfaas build")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the CLI refuses `dir` (exit 1) with every one of `expect` in
/// its message.
fn cli_refuses(dir: &Path, envs: &[(&str, &str)], expect: &[&str]) -> String {
    let out = cli_build(dir, envs);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for e in expect {
        assert!(err.contains(e), "expected `{e}` in: {err}");
    }
    err
}

fn refused_dependency(result: Result<Built, BuildError>) -> (String, String, DependencyReason, Option<&'static str>) {
    match result {
        Err(BuildError::Refused(Refusal::Dependency {
            krate,
            source_desc,
            reason,
            runs_at_build,
            ..
        })) => (krate, source_desc, reason, runs_at_build),
        other => panic!("expected a refused dependency, got {other:?}"),
    }
}

fn compile_error(result: Result<Built, BuildError>) -> String {
    match result {
        Err(BuildError::Compile { compiler_output, .. }) => compiler_output,
        other => panic!("expected a compile error, got {other:?}"),
    }
}

fn invoke_process(path: &Path, input: &[u8]) -> Vec<u8> {
    let backend = microfaas::open(BackendKind::Process, Config::default()).unwrap();
    let artifact = Arc::new(Artifact::load(path).unwrap());
    let id = backend.deploy(&FunctionSpec::new("hostile-build", artifact)).unwrap();
    backend.invoke(&id, input, StartRequest::Auto).unwrap().output
}

#[test]
fn a_build_script_of_the_function_is_refused_before_it_runs() {
    let marker = Path::new("/tmp/microfaas-hostile-build-script-ran");
    let _ = std::fs::remove_file(marker);
    let dir = fixture_dir("build-build-script");
    match build(&dir) {
        Err(BuildError::Refused(Refusal::BuildScript { krate, script })) => {
            assert_eq!(krate, "build-build-script");
            assert!(script.ends_with("build.rs"), "{script}");
        }
        other => panic!("expected the build script refused, got {other:?}"),
    }
    cli_refuses(
        &dir,
        &[],
        &["function crate `build-build-script` has a build script", "build.rs"],
    );
    assert!(!marker.exists(), "the build script ran");
}

#[test]
fn a_proc_macro_path_dependency_named_like_an_allowlisted_crate_is_refused() {
    let dir = fixture_dir("build-proc-macro-dep");
    let (krate, source, reason, code) = refused_dependency(build(&dir));
    assert_eq!(krate, "cfg-if");
    assert!(
        source.starts_with("path ") && source.ends_with("build-proc-macro-dep/cfg-if"),
        "{source}"
    );
    assert_eq!(reason, DependencyReason::NotCratesIo);
    assert!(code.is_some_and(|c| c.contains("proc-macro")), "{code:?}");
    cli_refuses(
        &dir,
        &[],
        &[
            "dependency `cfg-if`",
            "via build-proc-macro-dep -> cfg-if",
            "proc-macro",
        ],
    );
    assert!(!Path::new("/tmp/microfaas-hostile-proc-macro-passwd").exists());
}

#[test]
fn a_path_dependency_named_once_cell_carrying_unsafe_code_is_refused() {
    let dir = fixture_dir("build-path-dep-unsafe");
    let (krate, source, reason, _) = refused_dependency(build(&dir));
    assert_eq!(krate, "once_cell");
    assert!(source.ends_with("build-path-dep-unsafe/once_cell"), "{source}");
    assert_eq!(reason, DependencyReason::NotCratesIo);
    cli_refuses(
        &dir,
        &[],
        &[
            "dependency `once_cell` (path ",
            "only crates.io crates on the allowlist",
        ],
    );
}

#[test]
fn a_git_dependency_named_cfg_if_is_refused_before_anything_is_fetched() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_name = format!("microfaas-hostile-cfg-if-{}", std::process::id());
    let repo = copy_fixture("build-git-dep-repo", tmp.path());
    let repo = {
        let named = tmp.path().join(&repo_name);
        std::fs::rename(&repo, &named).unwrap();
        named
    };
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t.invalid"])
            .args(args)
            .current_dir(&repo)
            .output()
            .expect("running git");
        assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-qm", "hostile cfg-if"]);
    let url = format!("file://{}", repo.display());
    let dir = copy_fixture("build-git-dep", tmp.path());
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("file:///nonexistent/microfaas-hostile-cfg-if", &url);
    std::fs::write(&manifest, text).unwrap();

    let (krate, source, reason, _) = refused_dependency(build(&dir));
    assert_eq!(krate, "cfg-if");
    assert_eq!(source, format!("git+{url}"));
    assert_eq!(reason, DependencyReason::NotCratesIo);
    cli_refuses(
        &dir,
        &[],
        &["dependency `cfg-if` (git+file://", "via build-git-dep -> cfg-if"],
    );
    // Refused from the declaration: cargo never cloned the repository.
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap();
    let fetched = std::fs::read_dir(cargo_home.join("git/db"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with(&repo_name));
    assert!(!fetched, "the git dependency was fetched");
}

#[test]
fn include_bytes_of_etc_passwd_fails_with_the_compiler_message() {
    let dir = fixture_dir("build-include-bytes");
    let out = compile_error(build(&dir));
    assert!(out.contains("couldn't read `/etc/passwd`"), "{out}");
    let err = cli_refuses(
        &dir,
        &[],
        &["compiling `build-include-bytes` failed", "couldn't read `/etc/passwd`"],
    );
    assert!(!err.contains("root:x:0:0"), "{err}");

    // Control, with the sandbox explicitly off: the same crate builds and
    // hands out the host's file, so the failure above is the sandbox's.
    let mut opts = BuildOptions::new(cache_dir());
    opts.sandboxed = false;
    let built = microfaas_builder::build(&dir, &opts).unwrap_or_else(|e| panic!("control build: {e}"));
    assert_eq!(invoke_process(&built.path, b""), std::fs::read("/etc/passwd").unwrap());
    // Sandboxed and unsandboxed artifacts never share a cache entry.
    let again = compile_error(build(&dir));
    assert!(again.contains("couldn't read `/etc/passwd`"), "{again}");
}

#[test]
fn include_str_of_a_canary_outside_the_crate_fails_but_inside_it_is_embedded() {
    let token = format!(
        "microfaas-canary-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    // Outside: the canary sits next to the crate's directory.
    let tmp = tempfile::tempdir().unwrap();
    let outside = copy_fixture("build-include-str-outside", tmp.path());
    std::fs::write(tmp.path().join("microfaas-canary.txt"), &token).unwrap();
    let out = compile_error(build(&outside));
    assert!(
        out.contains("couldn't read") && out.contains("microfaas-canary.txt"),
        "{out}"
    );
    assert!(!out.contains(&token));
    let err = cli_refuses(&outside, &[], &["couldn't read", "microfaas-canary.txt"]);
    assert!(!err.contains(&token));

    // Control: the same absolute-path read of a canary inside the crate is
    // compiled in and returned, so the read above failed only because of
    // the sandbox.
    let tmp2 = tempfile::tempdir().unwrap();
    let inside = copy_fixture("build-include-str-inside", tmp2.path());
    std::fs::write(inside.join("microfaas-canary.txt"), &token).unwrap();
    let built = build(&inside).unwrap_or_else(|e| panic!("control build: {e}"));
    assert_eq!(invoke_process(&built.path, b""), token.as_bytes());
}

#[test]
fn a_module_at_a_path_in_etc_fails_without_quoting_the_file() {
    let dir = fixture_dir("build-path-attr");
    let out = compile_error(build(&dir));
    assert!(out.contains("couldn't read `/etc/passwd`"), "{out}");
    assert!(!out.contains("root:"), "{out}");
    cli_refuses(&dir, &[], &["couldn't read `/etc/passwd`"]);
}

#[test]
fn env_of_a_canary_variable_in_the_builds_environment_is_not_defined() {
    let dir = fixture_dir("build-env");
    let token = format!("microfaas-env-canary-{}", std::process::id());
    let err = cli_refuses(
        &dir,
        &[("MICROFAAS_CANARY", &token)],
        &["environment variable `MICROFAAS_CANARY` not defined at compile time"],
    );
    assert!(!err.contains(&token), "{err}");
}

#[test]
fn a_normal_function_with_an_allowlisted_crates_io_dependency_builds_and_runs() {
    let sha512 = Path::new(env!("CARGO_MANIFEST_DIR")).join("functions/sha512");
    let built = build(&sha512).unwrap_or_else(|e| panic!("building sha512: {e}"));
    let expected = {
        use sha2::{Digest, Sha512};
        let block = [0u8; 64];
        Sha512::digest(block).to_vec()
    };
    let got = invoke_process(&built.path, b"1");
    assert_eq!(got.len(), 64);
    assert_eq!(got, expected);
    let again = build(&sha512).unwrap();
    assert!(again.cached, "an unchanged function is a cache hit");
    assert_eq!(again.input_hash, built.input_hash);

    let echo = Path::new(env!("CARGO_MANIFEST_DIR")).join("functions/echo");
    let out = cli_build(&echo, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn the_default_output_is_never_written_through_a_link_in_the_crate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("build-include-str-inside", tmp.path());
    std::fs::write(dir.join("microfaas-canary.txt"), "x").unwrap();
    // The author plants `target` -> a directory of the host's.
    let elsewhere = tmp.path().join("host-dir");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("target")).unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_microfaas"))
            .arg("build")
            .arg(&dir)
            .env("MICROFAAS_BUILD_CACHE", cache_dir())
            .output()
            .expect("running microfaas build")
    };
    let out = run();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a directory (a symbolic link?)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "written through the link"
    );
    // Control: without the link the default output lands in the crate.
    std::fs::remove_file(dir.join("target")).unwrap();
    let out = run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.join("target/microfaas/build-include-str-inside.so").is_file());
}

#[test]
fn a_compile_that_never_ends_is_killed_at_the_time_limit() {
    let dir = fixture_dir("build-hangs");
    let mut opts = BuildOptions::new(cache_dir());
    opts.timeout = std::time::Duration::from_secs(15);
    let start = std::time::Instant::now();
    match microfaas_builder::build(&dir, &opts) {
        Err(BuildError::Sandbox { name, source }) => {
            assert_eq!(name, "build-hangs");
            assert!(source.to_string().contains("did not finish within 15 s"), "{source}");
        }
        other => panic!("expected the time limit, got {other:?}"),
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(120));
    // Nothing of that compile is left running.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("build_hangs") && c.contains("rustc"))
        .collect();
    assert!(survivors.is_empty(), "left running: {survivors:?}");
}

#[test]
fn a_rust_toolchain_file_in_the_crate_never_picks_the_compiler() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("build-toolchain-file", tmp.path());
    let marker = dir.join("evil-toolchain/ran");
    let marker = marker.as_path();
    let toolchain_file = dir.join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&toolchain_file).unwrap().replace(
        "/nonexistent/microfaas-evil-toolchain",
        &dir.join("evil-toolchain").display().to_string(),
    );
    std::fs::write(&toolchain_file, text).unwrap();
    // As from a shell inside the crate: no CARGO/RUSTC naming a toolchain.
    let shell = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(&dir)
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("MICROFAAS_BUILD_CACHE", cache_dir())
            .output()
            .expect("running from the crate's directory")
    };
    let out = shell(env!("CARGO_BIN_EXE_microfaas"), &["build", ".", "--out", "x.so"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!marker.exists(), "the crate's toolchain ran");
    // Control: the rustup proxy itself, started there, runs the crate's
    // "cargo"; so the builder must not start it there.
    if Command::new("rustup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let proxy = shell("cargo", &["--version"]);
        assert!(
            marker.exists(),
            "control: the proxy did not pick the crate's toolchain: {}",
            stderr(&proxy)
        );
    } else {
        println!("control not run: no rustup proxy on PATH");
    }
}
