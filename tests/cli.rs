//! The `microfaas` command line: build refusals, verification, exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn microfaas(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_microfaas"))
        .args(args)
        .env("MICROFAAS_BUILD_CACHE", cache)
        .output()
        .expect("running microfaas")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn build_refuses_unsafe_code_with_the_compiler_message() {
    let cache = tempfile::tempdir().unwrap();
    let out_file = cache.path().join("x.so");
    let out = microfaas(
        &[
            "build",
            fixture("uses-unsafe").to_str().unwrap(),
            "--out",
            out_file.to_str().unwrap(),
        ],
        cache.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("uses unsafe code"), "{err}");
    assert!(
        err.contains("usage of an `unsafe` block"),
        "compiler message missing: {err}"
    );
    assert!(!out_file.exists());
}

#[test]
fn build_refuses_a_dependency_outside_the_allowlist_by_name() {
    let cache = tempfile::tempdir().unwrap();
    let out = microfaas(&["build", fixture("bad-dep").to_str().unwrap()], cache.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("dependency `not-allowed-helper`"), "{err}");
    assert!(err.contains("bad-dep -> not-allowed-helper"), "{err}");
}

#[test]
fn build_caches_by_content_hash() {
    let cache = tempfile::tempdir().unwrap();
    let echo = Path::new(env!("CARGO_MANIFEST_DIR")).join("functions/echo");
    let first_out = cache.path().join("first.so");
    let first = microfaas(
        &["build", echo.to_str().unwrap(), "--out", first_out.to_str().unwrap()],
        cache.path(),
    );
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("(compiled;"), "{}", stderr(&first));
    let second_out = cache.path().join("second.so");
    let second = microfaas(
        &["build", echo.to_str().unwrap(), "--out", second_out.to_str().unwrap()],
        cache.path(),
    );
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stderr(&second).contains("(cached;"), "{}", stderr(&second));
    assert_eq!(std::fs::read(&first_out).unwrap(), std::fs::read(&second_out).unwrap());
    let verified = microfaas(&["verify", second_out.to_str().unwrap()], cache.path());
    assert!(verified.status.success(), "{}", stderr(&verified));
}

/// Writes the `panics` example (whose panic location names its source
/// file) as a function crate of its own under `root`, depending on the
/// builder's SDK by absolute path.
fn source_tree_at(root: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let func = root.join("panics");
    std::fs::create_dir_all(func.join("src")).unwrap();
    std::fs::write(
        func.join("Cargo.toml"),
        format!(
            "[package]\nname = \"panics\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
             [dependencies]\nmicrofaas-sdk = {{ path = \"{}\" }}\n\n[workspace]\n",
            repo.join("sdk").display()
        ),
    )
    .unwrap();
    std::fs::copy(repo.join("functions/panics/src/lib.rs"), func.join("src/lib.rs")).unwrap();
    let lock = std::fs::read_to_string(fixture("stateful").join("Cargo.lock")).unwrap();
    std::fs::write(func.join("Cargo.lock"), lock.replace("\"stateful\"", "\"panics\"")).unwrap();
    func
}

/// Writes the `echo` and `sha512` examples (the SDK, a crates.io
/// dependency, workspace-inherited fields) as the members of a workspace of
/// their own under `root`, depending on the builder's SDK by absolute path;
/// returns their directories.
fn example_tree_at(root: &Path) -> Vec<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ws = root.join("fns");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(
        ws.join("Cargo.toml"),
        "[workspace]\nresolver = \"3\"\nmembers = [\"echo\", \"sha512\"]\n\n\
         [workspace.package]\nedition = \"2024\"\nlicense = \"Apache-2.0\"\n\n\
         [workspace.dependencies]\nsha2 = { version = \"0.10\", default-features = false }\n\n\
         [workspace.lints.rust]\nunsafe_op_in_unsafe_fn = \"deny\"\n",
    )
    .unwrap();
    std::fs::copy(repo.join("Cargo.lock"), ws.join("Cargo.lock")).unwrap();
    let sdk = format!("path = \"{}\"", repo.join("sdk").display());
    ["echo", "sha512"]
        .iter()
        .map(|name| {
            let from = repo.join("functions").join(name);
            let func = ws.join(name);
            std::fs::create_dir_all(func.join("src")).unwrap();
            let manifest = std::fs::read_to_string(from.join("Cargo.toml")).unwrap();
            assert!(manifest.contains("path = \"../../sdk\""), "{manifest}");
            std::fs::write(func.join("Cargo.toml"), manifest.replace("path = \"../../sdk\"", &sdk)).unwrap();
            for entry in std::fs::read_dir(from.join("src")).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), func.join("src").join(entry.file_name())).unwrap();
            }
            func
        })
        .collect()
}

/// Covers the host paths an artifact's bytes used to carry (panic
/// locations, the static symbol table's hashed names) and cargo's
/// path-derived crate hashes (`-C metadata`), which moved the code of
/// larger LTO builds: the build sandbox shows cargo every path at a fixed
/// place.
#[test]
fn an_artifact_does_not_depend_on_where_its_sources_and_cache_live() {
    let scratch = tempfile::tempdir().unwrap();
    let mut artifacts: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
    for (tree, cache) in [
        ("a", "c"),
        ("a-much-longer-directory-name/for-the-same/sources", "another-cache-dir"),
    ] {
        let root = scratch.path().join(tree);
        let cache = scratch.path().join(cache);
        let mut built = Vec::new();
        for func in std::iter::once(source_tree_at(&root)).chain(example_tree_at(&root)) {
            let name = func.file_name().unwrap().to_string_lossy().into_owned();
            let out_file = cache.join(format!("{name}.so"));
            let out = microfaas(
                &["build", func.to_str().unwrap(), "--out", out_file.to_str().unwrap()],
                &cache,
            );
            assert!(out.status.success(), "{name}: {}", stderr(&out));
            let bytes = std::fs::read(&out_file).unwrap();
            for host_path in [&root, &cache] {
                let needle = host_path.as_os_str().as_encoded_bytes();
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "the artifact of {name} names the host path {}",
                    host_path.display()
                );
            }
            built.push((name, bytes));
        }
        artifacts.push(built);
    }
    let differing: Vec<&str> = artifacts[0]
        .iter()
        .zip(&artifacts[1])
        .filter(|((_, a), (_, b))| a != b)
        .map(|((name, _), _)| name.as_str())
        .collect();
    assert!(
        differing.is_empty(),
        "the same sources built in two places gave different artifacts: {differing:?}"
    );
}

#[test]
fn verify_refuses_malformed_elf_files_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let echo = std::fs::read(microfaas::builtin_dir().join("echo.so")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage.so",
            b"this is not an ELF file at all".to_vec(),
            "not a valid ELF file",
        ),
        ("truncated.so", echo[..200].to_vec(), "invalid artifact"),
        (
            "exec.so",
            {
                let mut b = echo.clone();
                b[16] = 2;
                b
            },
            "is not ET_DYN",
        ),
        (
            "arm.so",
            {
                let mut b = echo.clone();
                b[18] = 183;
                b
            },
            "is not x86-64",
        ),
    ];
    for (name, bytes, expect) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = microfaas(&["verify", path.to_str().unwrap()], dir.path());
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("invalid artifact") && err.contains(name), "{name}: {err}");
        assert!(err.contains(expect), "{name}: expected `{expect}` in {err}");
    }
}

#[test]
fn unknown_function_and_bad_flags_exit_with_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = microfaas(&["invoke", "--backend", "process", "no-such-function"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown function `no-such-function`"),
        "{}",
        stderr(&out)
    );
    let out = microfaas(&["invoke", "--backend", "warp", "echo"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let out = microfaas(&["invoke", "--backend", "process", "echo", "--frobnicate"], dir.path());
    assert_eq!(out.status.code(), Some(2));
}

/// Runs `microfaas ARGS` with its stdout a pipe whose reader is already
/// gone, as `microfaas ... | head` ends up.
fn with_closed_stdout(args: &[&str], store: &Path) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_microfaas"))
        .args(args)
        .env("MICROFAAS_STORE", store)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("running microfaas")
}

#[test]
fn commands_exit_quietly_when_stdout_is_closed() {
    let store = tempfile::tempdir().unwrap();
    let store_arg = store.path().to_str().unwrap();
    for args in [
        &["functions"][..],
        &["snapshots", "--store", store_arg, "tree", "--json"],
        &["snapshots", "--store", store_arg, "verify"],
        &["invoke", "--backend", "process", "echo", "--input", "hi"],
        &["invoke", "--backend", "process", "echo", "--input", "hi", "--json"],
    ] {
        let out = with_closed_stdout(args, store.path());
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
    }
}

/// `invoke --module`: the wasm runtime runs an example module given by
/// name or as a file, on `process` and `language`; a file that is not
/// WebAssembly fails the function (exit 1, named); an unknown module name
/// exits with 2; `functions --modules` lists the example modules.
#[test]
fn invoke_takes_a_module_by_name_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let listed = microfaas(&["functions", "--modules"], dir.path());
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    let names = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(names.lines().any(|l| l == "echo"), "{names}");

    let file = dir.path().join("echo.wasm");
    std::fs::write(&file, &*microfaas::builtin_module("echo").unwrap()).unwrap();
    let file = file.to_str().unwrap();
    for (backend, module) in [("process", "echo"), ("language", file)] {
        let out = microfaas(
            &[
                "invoke",
                "--backend",
                backend,
                "wasm-runtime",
                "--module",
                module,
                "--input",
                "hi",
            ],
            dir.path(),
        );
        assert_eq!(out.status.code(), Some(0), "{backend}: {}", stderr(&out));
        assert_eq!(out.stdout, b"hi", "{backend}");
    }

    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"not webassembly").unwrap();
    let out = microfaas(
        &[
            "invoke",
            "--backend",
            "process",
            "wasm-runtime",
            "--module",
            garbage.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("invalid wasm module"), "{}", stderr(&out));

    let out = microfaas(
        &[
            "invoke",
            "--backend",
            "process",
            "wasm-runtime",
            "--module",
            "no-such-module",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
