//! Hostile tests: the vm snapshot store cannot be forged. Someone who can
//! write the store's files but does not hold its key (`STORE/key`, mode
//! 0600) plants a node carrying a function's label and a newer timestamp,
//! swaps another function's merged image into the image cache, or plants
//! a node claiming 64 GiB of sparse memory; the host itself (holding the
//! key, so with valid MACs) is made to write nodes whose saved state lies
//! about the channel (`seq`, at-checkpoint flag) or holds registers KVM
//! refuses. Each is refused and named (the `snapshot_files_refused`
//! counter, a warning on stderr, `snapshots verify`), and the same store
//! then serves the victim's requests correctly.
//!
//! Controls: the planted node, written with the key (a valid MAC), is used
//! and answers `echo` with another function's output: the MAC is what
//! stops it.

use crate::vm::vm_common;
use microfaas::{Backend, FunctionId, FunctionSpec, StartPath, StartRequest};
use snapshots::{Level, Node, NodeSpec, PAGE_SIZE, Store};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// The test configuration on `store`.
fn config(store: &Path) -> microfaas::Config {
    let mut c = vm_common::config();
    c.vm.store_dir = Some(store.to_owned());
    c
}

fn open(store: &Path) -> Option<Box<dyn Backend>> {
    vm_common::open_vm(config(store))
}

fn deploy(b: &dyn Backend, name: &str, builtin: &str) -> FunctionId {
    b.deploy(&FunctionSpec::new(name, microfaas::builtin(builtin).unwrap()))
        .unwrap()
}

fn refused(b: &dyn Backend) -> u64 {
    b.stats().counter("snapshot_files_refused").unwrap()
}

/// The function node of `name` (newest), read through the store's API.
fn function_node(store: &Store, name: &str) -> Arc<Node> {
    store
        .nodes()
        .into_iter()
        .filter(|n| n.level() == Level::Function && n.label().function.as_deref() == Some(name))
        .max_by_key(|n| n.created_unix_ms())
        .unwrap_or_else(|| panic!("no function node of {name}"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Rewrites a node file's bytes as the attacker would without the key:
/// new id, new metadata (label, timestamp), and every checksum recomputed
/// (section CRCs, header CRC). The MAC bytes stay what they were.
fn replant(bytes: &[u8], id: snapshots::NodeId, meta: &serde_json::Value) -> Vec<u8> {
    let meta_offset = usize::try_from(u64_at(bytes, 104)).unwrap();
    let meta_bytes = serde_json::to_vec(meta).unwrap();
    let mut out = bytes[..meta_offset].to_vec();
    out.extend_from_slice(&meta_bytes);
    out[24..40].copy_from_slice(id.as_bytes());
    let meta_len = meta_bytes.len() as u64;
    out[112..120].copy_from_slice(&meta_len.to_le_bytes());
    out[120..128].copy_from_slice(&(meta_offset as u64 + meta_len).to_le_bytes());
    out[144..152].copy_from_slice(&snapshots::crc64(&meta_bytes).to_le_bytes());
    let header_crc = snapshots::crc64(&out[..152]);
    out[152..160].copy_from_slice(&header_crc.to_le_bytes());
    out
}

/// The metadata of `node` relabelled as function `name` at `digest`,
/// created a minute later than `than`.
fn relabelled(node: &Node, name: &str, digest: &str, than: &Node) -> serde_json::Value {
    serde_json::json!({
        "label": { "function": name, "digest": digest, "input_hash": null },
        "created_unix_ms": than.created_unix_ms() + 60_000,
        "state_summary": node.state_summary(),
    })
}

/// Writes, with the store's key (as only the host can), a sibling of
/// `node` holding its pages and label but the state `mutate` makes of its
/// state, created after it: the node the backend will pick next.
fn forge_with_key(store: &Store, node: &Node, mutate: impl FnOnce(&mut vmm::SavedState)) -> PathBuf {
    let mut state = vmm::SavedState::decode(&node.read_state().unwrap()).unwrap();
    mutate(&mut state);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let mut w = store
        .create_node(NodeSpec {
            level: node.level(),
            parent: node.parent(),
            label: node.label().clone(),
            guest_mem_bytes: node.guest_mem_bytes(),
        })
        .unwrap();
    for page in node.own_pages().collect::<Vec<_>>() {
        let data = node.read_page(page).unwrap().unwrap();
        let data: &[u8; PAGE_SIZE] = data.as_slice().try_into().unwrap();
        w.write_page(page, data).unwrap();
    }
    w.commit(&state.encode(), state.summary()).unwrap().path().to_owned()
}

fn verify_cli(store: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_microfaas"))
        .args(["snapshots", "verify", "--store"])
        .arg(store)
        .env_remove("MICROFAAS_STORE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A store with `echo` and `sha512` deployed (their function nodes made).
fn seeded() -> Option<tempfile::TempDir> {
    let dir = vm_common::fresh_store();
    let b = open(dir.path())?;
    let echo = deploy(b.as_ref(), "echo", "echo");
    deploy(b.as_ref(), "sha512", "sha512");
    assert_eq!(b.invoke(&echo, b"hi", StartRequest::Auto).unwrap().output, b"hi");
    Some(dir)
}

/// Copies a store directory (nodes, images, key) to a new temp dir.
fn copy_store(from: &Path) -> tempfile::TempDir {
    let to = vm_common::fresh_store();
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to.path())
        .status()
        .unwrap();
    assert!(status.success());
    to
}

#[test]
fn planted_node_with_a_functions_label_is_refused_at_deploy() {
    let Some(dir) = seeded() else { return };
    let echo_digest = microfaas::builtin("echo").unwrap().digest().to_owned();
    let (victim_path, planted_path) = {
        let store = Store::open(dir.path()).unwrap();
        let (echo, evil) = (function_node(&store, "echo"), function_node(&store, "sha512"));
        // Control first, on a copy of the store: the same planted node
        // written with the key is taken and answers `echo` with sha512.
        let control = copy_store(dir.path());
        let cstore = Store::open(control.path()).unwrap();
        let cevil = function_node(&cstore, "sha512");
        let mut w = cstore
            .create_node(NodeSpec {
                level: Level::Function,
                parent: cevil.parent(),
                label: snapshots::Label::function("echo", &echo_digest),
                guest_mem_bytes: cevil.guest_mem_bytes(),
            })
            .unwrap();
        for page in cevil.own_pages().collect::<Vec<_>>() {
            let data = cevil.read_page(page).unwrap().unwrap();
            w.write_page(page, data.as_slice().try_into().unwrap()).unwrap();
        }
        w.commit(&cevil.read_state().unwrap(), Default::default()).unwrap();
        drop(cstore);
        if let Some(b) = open(control.path()) {
            let id = deploy(b.as_ref(), "echo", "echo");
            // sha512 takes a round count and answers with a digest.
            let out = b.invoke(&id, b"1", StartRequest::Auto).unwrap().output;
            assert_ne!(out, b"1", "control: a node with a valid MAC and echo's label is used");
            assert_eq!(out.len(), 64, "control: sha512's answer");
        }
        // The attack: the same relabelled node, checksums recomputed, no
        // key (so its MAC is sha512's node's, which no longer holds).
        let id = snapshots::NodeId::random().unwrap();
        let bytes = std::fs::read(evil.path()).unwrap();
        let planted = replant(&bytes, id, &relabelled(&evil, "echo", &echo_digest, &echo));
        let path = store.node_path(id);
        std::fs::write(&path, planted).unwrap();
        (echo.path().to_owned(), path)
    };
    let (ok, text) = verify_cli(dir.path());
    assert!(!ok, "{text}");
    assert!(
        text.contains(&planted_path.display().to_string()) && text.contains("not authenticated"),
        "{text}"
    );
    let Some(b) = open(dir.path()) else { return };
    let echo = deploy(b.as_ref(), "echo", "echo");
    assert!(refused(b.as_ref()) >= 1, "{:?}", b.stats());
    for start in [StartPath::Hot, StartPath::Function, StartPath::Base, StartPath::Cold] {
        let r = b.invoke(&echo, b"hi", StartRequest::Force(start)).unwrap();
        assert_eq!(r.output, b"hi", "{start:?}");
    }
    // The real node is still the one in use.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(function_node(&store, "echo").path(), victim_path);
    assert!(store.nodes().iter().all(|n| n.path() != planted_path));
}

#[test]
fn swapped_merged_image_is_refused_at_start() {
    let Some(dir) = seeded() else { return };
    let (echo_img, evil_img) = {
        let store = Store::open(dir.path()).unwrap();
        let (echo, evil) = (function_node(&store, "echo"), function_node(&store, "sha512"));
        (store.image_path(echo.id()), store.image_path(evil.id()))
    };
    let evil_bytes = std::fs::read(&evil_img).unwrap();
    // sha512's merged image in echo's place (its metadata untouched).
    std::fs::remove_file(&echo_img).unwrap();
    std::fs::write(&echo_img, &evil_bytes).unwrap();
    let (ok, text) = verify_cli(dir.path());
    assert!(!ok && text.contains(&echo_img.display().to_string()), "{text}");
    let Some(b) = open(dir.path()) else { return };
    let echo = deploy(b.as_ref(), "echo", "echo");
    assert!(refused(b.as_ref()) >= 1, "{:?}", b.stats());
    for start in [StartPath::Hot, StartPath::Function] {
        let r = b.invoke(&echo, b"hi", StartRequest::Force(start)).unwrap();
        assert_eq!(r.output, b"hi", "{start:?}");
    }
    // Re-merged from the lineage.
    assert_ne!(std::fs::read(&echo_img).unwrap(), evil_bytes);
    let (ok, text) = verify_cli(dir.path());
    assert!(ok, "{text}");
}

#[test]
fn forged_state_with_a_valid_mac_is_refused() {
    type Mutation = fn(&mut vmm::SavedState);
    let cases: [(&str, Mutation); 3] = [
        ("seq lowered (the stale reply would answer)", |s| s.seq -= 1),
        ("seq raised", |s| s.seq += 1),
        ("at-checkpoint flag set", |s| s.at_checkpoint = true),
    ];
    for (what, mutate) in cases {
        let Some(dir) = seeded() else { return };
        let forged = {
            let store = Store::open(dir.path()).unwrap();
            forge_with_key(&store, &function_node(&store, "echo"), mutate)
        };
        let Some(b) = open(dir.path()) else { return };
        let echo = deploy(b.as_ref(), "echo", "echo");
        assert!(refused(b.as_ref()) >= 1, "{what}: {:?}", b.stats());
        for input in [&b"hi"[..], b"", b"again"] {
            for start in [StartPath::Hot, StartPath::Function] {
                let r = b.invoke(&echo, input, StartRequest::Force(start)).unwrap();
                assert_eq!(r.output, input, "{what}: {start:?}");
            }
        }
        // A new function node was made; the forged one is not in use.
        let store = Store::open(dir.path()).unwrap();
        assert_ne!(function_node(&store, "echo").path(), forged, "{what}");
    }
}

/// `checkpointed` with an argument node for `input` (made by a first
/// backend), in a fresh store.
fn with_argument_node(input: &[u8]) -> Option<(tempfile::TempDir, Vec<u8>)> {
    let dir = vm_common::fresh_store();
    let b = open(dir.path())?;
    let cp = deploy(b.as_ref(), "checkpointed", "checkpointed");
    let cold = b
        .invoke(&cp, input, StartRequest::Force(StartPath::Cold))
        .unwrap()
        .output;
    let r = b.invoke(&cp, input, StartRequest::Force(StartPath::Argument)).unwrap();
    assert_eq!(r.output, cold);
    Some((dir, cold))
}

fn argument_node(store: &Store) -> Arc<Node> {
    store
        .nodes()
        .into_iter()
        .filter(|n| n.level() == Level::Argument)
        .max_by_key(|n| n.created_unix_ms())
        .unwrap()
}

#[test]
fn argument_node_not_at_a_checkpoint_is_refused() {
    let Some((dir, cold)) = with_argument_node(b"seed") else {
        return;
    };
    {
        let store = Store::open(dir.path()).unwrap();
        forge_with_key(&store, &argument_node(&store), |s| s.at_checkpoint = false);
    }
    let Some(b) = open(dir.path()) else { return };
    let cp = deploy(b.as_ref(), "checkpointed", "checkpointed");
    for start in [
        StartRequest::Auto,
        StartRequest::Force(StartPath::Argument),
        StartRequest::Auto,
    ] {
        let r = b.invoke(&cp, b"seed", start).unwrap();
        assert_eq!(r.output, cold, "{start:?}");
    }
    assert!(refused(b.as_ref()) >= 1, "{:?}", b.stats());
}

#[test]
fn kvm_rejection_of_restored_state_names_the_node() {
    let Some((dir, cold)) = with_argument_node(b"seed") else {
        return;
    };
    let forged = {
        let store = Store::open(dir.path()).unwrap();
        // CR0.PG without CR0.PE, and a reserved CR4 bit: KVM_SET_SREGS
        // refuses both.
        forge_with_key(&store, &argument_node(&store), |s| {
            s.vcpu.sregs.cr0 = (s.vcpu.sregs.cr0 | 1 << 31) & !1;
            s.vcpu.sregs.cr4 |= 1 << 31;
        })
    };
    let Some(b) = open(dir.path()) else { return };
    let cp = deploy(b.as_ref(), "checkpointed", "checkpointed");
    let err = b
        .invoke(&cp, b"seed", StartRequest::Force(StartPath::Argument))
        .unwrap_err();
    assert_eq!(err.kind(), microfaas::ErrorKind::SnapshotCorrupt, "{err}");
    let name = forged.file_name().unwrap().to_string_lossy().into_owned();
    let text = err.to_string();
    assert!(text.contains(&name) && text.contains("KVM"), "{text}");
    // The node is refused from then on; the backend keeps serving.
    for start in [
        StartRequest::Auto,
        StartRequest::Auto,
        StartRequest::Force(StartPath::Argument),
    ] {
        let r = b.invoke(&cp, b"seed", start).unwrap();
        assert_eq!(r.output, cold, "{start:?}");
    }
}

#[test]
fn giant_sparse_node_is_refused_at_open() {
    let Some(dir) = seeded() else { return };
    let giant = {
        let store = Store::open(dir.path()).unwrap();
        let echo = function_node(&store, "echo");
        // A function node under the real base claiming 64 GiB, every page
        // stored: a sparse file of 64 GiB + a 256 MiB index, with a valid
        // header checksum.
        let mem: u64 = 64 << 30;
        let pages = mem / 4096;
        let index_offset = 4096 + pages * 4096;
        let state_offset = index_offset + pages * 16;
        let (state_len, meta_len) = (16u64, 16u64);
        let meta_offset = state_offset + state_len;
        let file_len = meta_offset + meta_len;
        let id = snapshots::NodeId::random().unwrap();
        let mut h = Vec::new();
        h.extend_from_slice(b"MFAASNOD");
        h.extend_from_slice(&snapshots::FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&4096u32.to_le_bytes());
        h.extend_from_slice(&4096u32.to_le_bytes());
        h.extend_from_slice(&[2, 0, 0, 0]);
        h.extend_from_slice(id.as_bytes());
        h.extend_from_slice(echo.parent().unwrap().as_bytes());
        for v in [
            0,
            mem,
            pages,
            index_offset,
            state_offset,
            state_len,
            meta_offset,
            meta_len,
            file_len,
            0,
            0,
            0,
        ] {
            h.extend_from_slice(&u64::to_le_bytes(v));
        }
        let crc = snapshots::crc64(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        let path = store.node_path(id);
        let f = std::fs::File::create(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &h, 0).unwrap();
        f.set_len(file_len).unwrap();
        path
    };
    let started = std::time::Instant::now();
    let Some(b) = open(dir.path()) else { return };
    let echo = deploy(b.as_ref(), "echo", "echo");
    eprintln!("open + deploy with the giant node present: {:?}", started.elapsed());
    assert!(refused(b.as_ref()) >= 1, "{:?}", b.stats());
    for start in [StartPath::Hot, StartPath::Function] {
        assert_eq!(
            b.invoke(&echo, b"hi", StartRequest::Force(start)).unwrap().output,
            b"hi"
        );
    }
    // Refused by name, at the configured memory cap, before its index is
    // read.
    let capped = Store::open_with(
        dir.path(),
        snapshots::StoreOptions {
            max_guest_mem_bytes: Some(function_node(&Store::open(dir.path()).unwrap(), "echo").guest_mem_bytes()),
            ..Default::default()
        },
    )
    .unwrap();
    let refusals = capped.take_refusals();
    let r = refusals
        .iter()
        .find(|r| r.path == giant)
        .expect("the giant node is refused");
    assert!(r.reason.contains("configured guest memory"), "{r:?}");
}

#[test]
fn key_file_readable_by_others_is_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = vm_common::fresh_store();
    {
        let Some(b) = open(dir.path()) else { return };
        deploy(b.as_ref(), "echo", "echo");
    }
    let key = dir.path().join(snapshots::KEY_FILE);
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = microfaas::open(microfaas::BackendKind::Vm, config(dir.path())).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.kind(), microfaas::ErrorKind::SnapshotCorrupt, "{text}");
    assert!(
        text.contains(&key.display().to_string()) && text.contains("mode 0644"),
        "{text}"
    );
    let (ok, cli) = verify_cli(dir.path());
    assert!(!ok && cli.contains("mode 0644"), "{cli}");
    // Put right, the store serves again.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let b = open(dir.path()).unwrap();
    let echo = deploy(b.as_ref(), "echo", "echo");
    assert_eq!(b.invoke(&echo, b"hi", StartRequest::Auto).unwrap().output, b"hi");
    assert_eq!(refused(b.as_ref()), 0);
}
