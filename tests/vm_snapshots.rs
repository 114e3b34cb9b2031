//! The `vm` backend's snapshot start paths (SEUSS): every path (`cold`,
//! `base`, `function`, `argument`, `hot`, `reset`) gives the output a cold boot
//! gives; instances restored from one node never see each other's writes;
//! the snapshot files never change however many instances run from them;
//! a corrupt node is refused with the file named; `stats()` shows restored
//! instances' private memory.

mod vm_common;

use microfaas::{Backend, Config, ErrorKind, FunctionId, FunctionSpec, StartPath, StartRequest, VmConfig};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const PATHS: [StartPath; 6] = [
    StartPath::Cold,
    StartPath::Base,
    StartPath::Function,
    StartPath::Argument,
    StartPath::Hot,
    StartPath::Reset,
];

fn config_with_store(dir: &Path) -> Config {
    Config {
        vm: VmConfig {
            store_dir: Some(dir.to_owned()),
            ..VmConfig::default()
        },
        ..vm_common::config()
    }
}

/// Small instances (for the many-instance tests).
fn small_config(dir: &Path) -> Config {
    let mut c = config_with_store(dir);
    c.input_limit_bytes = 64 << 10;
    c.output_limit_bytes = 64 << 10;
    c.stack_bytes = 256 << 10;
    c.heap_limit_bytes = 2 << 20;
    c.vm.image_mib = Some(2);
    c.vm.idle_per_function = Some(4);
    c
}

fn deploy(b: &dyn Backend, name: &str) -> FunctionId {
    b.deploy(&FunctionSpec::new(name, microfaas::builtin(name).unwrap()))
        .unwrap_or_else(|e| panic!("deploying {name}: {e}"))
}

/// Runs `input` on every start path and checks each against a cold boot.
/// `Argument` is checked only for functions that checkpoint.
fn check_every_path(b: &dyn Backend, id: &FunctionId, input: &[u8], checkpoints: bool) {
    let cold = b
        .invoke(id, input, StartRequest::Force(StartPath::Cold))
        .unwrap_or_else(|e| panic!("{id} cold: {e}"));
    assert_eq!(cold.start, StartPath::Cold);
    for path in PATHS {
        let r = b.invoke(id, input, StartRequest::Force(path));
        match r {
            Ok(r) => {
                assert_eq!(r.start, path);
                assert_eq!(r.output, cold.output, "{id} {path} differs from cold for {input:?}");
            }
            Err(e) if path == StartPath::Argument && !checkpoints => {
                assert_eq!(e.kind(), ErrorKind::UnsupportedStart, "{e}");
            }
            Err(e) => panic!("{id} {path}: {e}"),
        }
    }
    let auto = b.invoke(id, input, StartRequest::Auto).unwrap();
    assert_eq!(auto.output, cold.output, "{id} auto ({})", auto.start);
    if checkpoints {
        // The input was seen and the function checkpoints: resume there.
        assert_eq!(auto.start, StartPath::Argument);
    }
}

struct Fixture {
    backend: Box<dyn Backend>,
    echo: FunctionId,
    sha: FunctionId,
    checkpointed: FunctionId,
    checkpoint_echo: FunctionId,
}

/// Builds the `checkpoint-echo` test fixture (reads its input only after
/// `checkpoint()`).
fn checkpoint_echo_artifact() -> std::sync::Arc<microfaas::Artifact> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-echo");
    let opts = microfaas_builder::BuildOptions::new(Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-fixtures"));
    let built = microfaas_builder::build(&dir, &opts).unwrap_or_else(|e| panic!("building checkpoint-echo: {e}"));
    std::sync::Arc::new(microfaas::Artifact::load(&built.path).unwrap())
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let backend = vm_common::open_vm(vm_common::config())?;
        let echo = deploy(backend.as_ref(), "echo");
        let sha = deploy(backend.as_ref(), "sha512");
        let checkpointed = deploy(backend.as_ref(), "checkpointed");
        let checkpoint_echo = backend
            .deploy(&FunctionSpec::new("checkpoint-echo", checkpoint_echo_artifact()))
            .unwrap_or_else(|e| panic!("deploying checkpoint-echo: {e}"));
        Some(Fixture {
            backend,
            echo,
            sha,
            checkpointed,
            checkpoint_echo,
        })
    })
    .as_ref()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn echo_every_path_matches_cold(input in proptest::collection::vec(any::<u8>(), 0..3000)) {
        if let Some(f) = fixture() {
            check_every_path(f.backend.as_ref(), &f.echo, &input, false);
        }
    }

    #[test]
    fn sha512_every_path_matches_cold(rounds in 0u32..64) {
        if let Some(f) = fixture() {
            check_every_path(f.backend.as_ref(), &f.sha, rounds.to_string().as_bytes(), false);
        }
    }

    /// The input lives in the I/O window (the instance's channel slot, not
    /// its snapshot memory): a resumed argument snapshot must find it there.
    #[test]
    fn input_read_after_checkpoint_every_path_matches_cold(input in proptest::collection::vec(any::<u8>(), 1..9000)) {
        if let Some(f) = fixture() {
            check_every_path(f.backend.as_ref(), &f.checkpoint_echo, &input, true);
            let reversed: Vec<u8> = input.iter().rev().copied().collect();
            let again = f.backend.invoke(&f.checkpoint_echo, &input, StartRequest::Auto).unwrap();
            prop_assert_eq!(again.start, StartPath::Argument);
            prop_assert_eq!(again.output, reversed);
        }
    }

    #[test]
    fn checkpointed_every_path_matches_cold(input in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Some(f) = fixture() {
            check_every_path(f.backend.as_ref(), &f.checkpointed, &input, true);
        }
    }
}

fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file of the store's nodes and images, with its hash.
fn store_files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for sub in ["nodes", "images"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            out.push((p.clone(), sha256_file(&p)));
        }
    }
    out.sort();
    out
}

#[test]
fn instances_from_one_node_do_not_see_each_others_writes() {
    let store = vm_common::fresh_store();
    let Some(b) = vm_common::open_vm(config_with_store(store.path())) else {
        return;
    };
    let echo = deploy(b.as_ref(), "echo");
    // Two instances restored from the function node, used alternately: a
    // large input written by one never shows in the other's output.
    let big = vec![0xa5u8; 256 << 10];
    let a = b.invoke(&echo, &big, StartRequest::Force(StartPath::Function)).unwrap();
    assert_eq!(a.output, big);
    for input in [&b""[..], b"x", b"small"] {
        let r = b
            .invoke(&echo, input, StartRequest::Force(StartPath::Function))
            .unwrap();
        assert_eq!(r.output, input);
    }
    // Same through the snapshot store directly: two mappings of one image.
    let s = snapshots::Store::open(store.path()).unwrap();
    let node = s
        .nodes()
        .into_iter()
        .find(|n| n.level() == snapshots::Level::Function)
        .unwrap();
    let image = s.image(node.id()).unwrap();
    let mut one = image.map(snapshots::MapOptions::default()).unwrap();
    let two = image.map(snapshots::MapOptions::default()).unwrap();
    let mut before = vec![0u8; 4096];
    assert!(two.read_at(0x2000, &mut before));
    assert!(one.write_at(0x2000, &[0xee; 4096]));
    let mut after = vec![0u8; 4096];
    assert!(two.read_at(0x2000, &mut after));
    assert_eq!(before, after);
}

#[test]
fn snapshot_files_unchanged_after_1000_restored_instances() {
    let store = vm_common::fresh_store();
    let Some(b) = vm_common::open_vm(small_config(store.path())) else {
        return;
    };
    let echo = deploy(b.as_ref(), "echo");
    let cp = deploy(b.as_ref(), "checkpointed");
    b.invoke(&cp, b"seed", StartRequest::Force(StartPath::Argument))
        .unwrap();
    let before = store_files(store.path());
    assert!(before.len() >= 4, "{before:?}");
    for i in 0..1000u32 {
        let input = i.to_le_bytes();
        let r = b
            .invoke(&echo, &input, StartRequest::Force(StartPath::Function))
            .unwrap();
        assert_eq!(r.output, input);
    }
    for _ in 0..10 {
        let r = b
            .invoke(&cp, b"seed", StartRequest::Force(StartPath::Argument))
            .unwrap();
        assert_eq!(r.start, StartPath::Argument);
    }
    assert_eq!(store_files(store.path()), before);
    let report = snapshots::verify(&snapshots::Store::open(store.path()).unwrap()).unwrap();
    assert!(report.ok(), "{report:?}");
}

#[test]
fn corrupt_function_node_is_refused_named_and_remade() {
    let store = vm_common::fresh_store();
    {
        let Some(b) = vm_common::open_vm(small_config(store.path())) else {
            return;
        };
        deploy(b.as_ref(), "echo");
    }
    let s = snapshots::Store::open(store.path()).unwrap();
    let node = s
        .nodes()
        .into_iter()
        .find(|n| n.level() == snapshots::Level::Function)
        .unwrap();
    let node_path = node.path().to_owned();
    // Drop the cached images so the next start must read the node's pages,
    // then flip a bit in its first page.
    for e in std::fs::read_dir(s.images_dir()).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    drop(s);
    let mut bytes = std::fs::read(&node_path).unwrap();
    bytes[4096 + 100] ^= 0x10;
    std::fs::write(&node_path, &bytes).unwrap();
    // The node is refused (a page fails its keyed tag when the image is
    // re-merged), counted and named on stderr; the backend makes a new
    // function node from the base and keeps serving.
    let b = vm_common::open_vm(small_config(store.path())).unwrap();
    let echo = b
        .deploy(&FunctionSpec::new("echo", microfaas::builtin("echo").unwrap()))
        .unwrap();
    assert_eq!(b.stats().counter("snapshot_files_refused"), Some(1), "{:?}", b.stats());
    for start in [StartPath::Function, StartPath::Hot] {
        let r = b.invoke(&echo, b"still here", StartRequest::Force(start)).unwrap();
        assert_eq!(r.output, b"still here");
    }
    let s = snapshots::Store::open(store.path()).unwrap();
    let functions = s
        .nodes()
        .into_iter()
        .filter(|n| n.level() == snapshots::Level::Function)
        .count();
    assert_eq!(functions, 2);
    // `verify` names the bad file.
    let report = snapshots::verify(&s).unwrap();
    assert!(report.bad.iter().any(|f| f.path == node_path), "{report:?}");
}

#[test]
fn stats_show_restored_instances_private_memory() {
    let store = vm_common::fresh_store();
    let Some(b) = vm_common::open_vm(small_config(store.path())) else {
        return;
    };
    let noop = deploy(b.as_ref(), "noop");
    b.invoke(&noop, b"", StartRequest::Auto).unwrap();
    let stats = b.stats();
    let get = |k: &str| stats.counter(k).unwrap();
    assert_eq!(get("restored_idle_instances"), 1, "{stats:?}");
    let private = get("restored_idle_private_bytes");
    assert!(private > 0 && private < (4 << 20), "{stats:?}");
    assert_eq!(stats.memory_bytes, private);
}

/// `prestart` restores idle instances beyond the idle cap (4 here), each
/// then serves a hot invocation and stays idle until `evict`; an unknown
/// function is a clear error.
#[test]
fn prestart_makes_idle_instances_beyond_the_cap_that_serve_hot() {
    let store = vm_common::fresh_store();
    let Some(b) = vm_common::open_vm(small_config(store.path())) else {
        return;
    };
    let echo = deploy(b.as_ref(), "echo");
    let before = b.stats().instances;
    let took = b.prestart(&echo, 40).unwrap();
    assert_eq!(took.len(), 40);
    assert!(took.iter().all(|d| !d.is_zero()), "{took:?}");
    let stats = b.stats();
    assert_eq!(stats.instances, before + 40, "{stats:?}");
    let get = |k: &str| stats.counter(k).unwrap();
    assert_eq!(get("instances_prestarted"), 40, "{stats:?}");
    assert_eq!(get("restored_idle_instances"), u64::try_from(before + 40).unwrap());
    for i in 0..(before + 40) {
        let input = format!("instance {i}");
        let r = b.invoke(&echo, input.as_bytes(), StartRequest::Auto).unwrap();
        assert_eq!(r.start, StartPath::Hot, "invocation {i}");
        assert_eq!(r.output, input.as_bytes());
    }
    // Used instances go back to the pool: the prestarted count is kept.
    assert_eq!(b.stats().instances, before + 40);
    let unknown = b.prestart(&FunctionId::new("nope"), 1).unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::UnknownFunction, "{unknown}");
    b.evict(&echo).unwrap();
    assert_eq!(b.stats().instances, 0);
}

fn function_nodes(dir: &Path, name: &str) -> usize {
    snapshots::Store::open(dir)
        .unwrap()
        .nodes()
        .iter()
        .filter(|n| n.level() == snapshots::Level::Function && n.label().function.as_deref() == Some(name))
        .count()
}

#[test]
fn redeploying_a_changed_artifact_makes_a_new_function_node() {
    let store = vm_common::fresh_store();
    let Some(b) = vm_common::open_vm(small_config(store.path())) else {
        return;
    };
    let id = b
        .deploy(&FunctionSpec::new("f", microfaas::builtin("echo").unwrap()))
        .unwrap();
    assert_eq!(b.invoke(&id, b"abc", StartRequest::Auto).unwrap().output, b"abc");
    assert_eq!(function_nodes(store.path(), "f"), 1);
    // The same artifact again: the same node.
    b.deploy(&FunctionSpec::new("f", microfaas::builtin("echo").unwrap()))
        .unwrap();
    assert_eq!(function_nodes(store.path(), "f"), 1);
    // A changed artifact under the same name: a new node, new behaviour.
    let id = b
        .deploy(&FunctionSpec::new("f", microfaas::builtin("sha512").unwrap()))
        .unwrap();
    assert_eq!(function_nodes(store.path(), "f"), 2);
    for path in [StartPath::Hot, StartPath::Function, StartPath::Base] {
        let r = b.invoke(&id, b"0", StartRequest::Force(path)).unwrap();
        assert_eq!(r.output, vec![0u8; 64], "{path}");
    }
}

#[test]
fn argument_nodes_are_bounded_per_function() {
    let store = vm_common::fresh_store();
    let mut config = small_config(store.path());
    config.vm.arguments_per_function = Some(2);
    let Some(b) = vm_common::open_vm(config) else {
        return;
    };
    let cp = deploy(b.as_ref(), "checkpointed");
    for input in [&b"a"[..], b"b", b"c", b"d"] {
        let first = b.invoke(&cp, input, StartRequest::Auto).unwrap();
        let again = b.invoke(&cp, input, StartRequest::Auto).unwrap();
        assert_eq!(again.start, StartPath::Argument, "{input:?}");
        assert_eq!(first.output, again.output);
    }
    let arguments = snapshots::Store::open(store.path())
        .unwrap()
        .nodes()
        .iter()
        .filter(|n| n.level() == snapshots::Level::Argument)
        .count();
    assert_eq!(arguments, 2);
    // The most recent inputs still resume; an evicted one is made again.
    assert_eq!(
        b.invoke(&cp, b"d", StartRequest::Auto).unwrap().start,
        StartPath::Argument
    );
    let redo = b.invoke(&cp, b"a", StartRequest::Auto).unwrap();
    assert_ne!(redo.start, StartPath::Argument);
}
