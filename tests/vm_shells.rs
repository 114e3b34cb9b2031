//! VM shells made in advance with their memory slots registered over
//! reservations (`Shell::with_memory_for_slots`, what VMM host processes
//! keep): a restore into a given channel-slab slot maps the node's memory
//! and the slot's mailbox page and I/O window there instead of registering
//! memory slots. It answers as a restore that registers them does, and its
//! guest reaches its own slot only: a probe scanning its I/O window never
//! finds what the instance in the neighbouring slot left in its own, while
//! the same probe finds it in the window of the instance that wrote it (so
//! the probe can fail). A shell primed with a node's vCPU state restores
//! that node without setting a register, and another node (all of its
//! registers set) as if it had never been primed. Shells of the wrong
//! kind, or memory that fails to map, are refused with a typed error and
//! the VMM keeps serving.

mod vm_common;

use std::path::Path;
use std::ptr::NonNull;
use std::time::{Duration, Instant};
use vm_common::{cow_copy_at as cow_copy, image};
use vmm::slab::{Slab, SlabSlot};
use vmm::{ExternalMemory, Instance, InstanceConfig, SavedState, Shell, Status, Vmm, VmmError};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// A function node: the saved state and image of a booted guest with
/// `artifact` loaded.
struct Node {
    saved: SavedState,
    file: std::fs::File,
    len: usize,
}

fn node(vmm: &Vmm, config: &InstanceConfig, artifact: &[u8]) -> Node {
    let (mut fresh, _) = Instance::boot(vmm, config).unwrap();
    assert_eq!(fresh.load(artifact, deadline()).unwrap().status, Status::Ok);
    let saved = fresh.save().unwrap();
    // SAFETY: `fresh` is idle (no request in flight) while we copy.
    let file = image(unsafe { fresh.guest_memory() });
    let len = usize::try_from(file.metadata().unwrap().len()).unwrap();
    Node { saved, file, len }
}

/// Slot `index` of `slab`, bound to the layout's window address.
fn slot(slab: &std::sync::Arc<Slab>, config: &InstanceConfig, index: usize) -> SlabSlot {
    let layout = vmm::layout::Layout::new(config.layout).unwrap();
    let mut chan = slab.slot_at(index).unwrap();
    chan.bind(layout.io_addr).unwrap();
    chan
}

/// Restores `node` into `chan` on a shell made for slots (the host
/// process's way).
fn restore_on_shell(vmm: &Vmm, config: &InstanceConfig, node: &Node, chan: SlabSlot) -> Result<Instance, VmmError> {
    let shell = Shell::with_memory_for_slots(vmm, config)?;
    assert!(shell.has_memory());
    Instance::restore_into_slot(
        vmm,
        shell,
        config,
        |at, len| Ok(Box::new(cow_copy(&node.file, at.as_ptr(), len)?) as Box<dyn ExternalMemory>),
        &node.saved,
        chan,
    )
}

/// Restores `node` into `chan`, registering the memory slots (the way
/// without a shell with memory).
fn restore_registering(vmm: &Vmm, config: &InstanceConfig, node: &Node, chan: SlabSlot) -> Instance {
    let memory = cow_copy(&node.file, std::ptr::null_mut(), node.len).unwrap();
    Instance::restore_in_slot(vmm, None, config, Box::new(memory), &node.saved, chan).unwrap()
}

fn small_config() -> InstanceConfig {
    InstanceConfig {
        huge_pages: false,
        vcpu_stats: false,
        ..InstanceConfig::default()
    }
}

#[test]
fn a_restore_into_a_shell_for_slots_answers_as_one_that_registers_its_slots() {
    let Some(vmm) = vm_common::open_vmm() else {
        return;
    };
    let config = small_config();
    let echo = node(&vmm, &config, microfaas::builtin("echo").unwrap().bytes());
    let layout = vmm::layout::Layout::new(config.layout).unwrap();
    let slab = Slab::with_slots(layout.io_bytes, 3).unwrap();
    let mut registering = restore_registering(&vmm, &config, &echo, slot(&slab, &config, 0));
    let mut on_shell = restore_on_shell(&vmm, &config, &echo, slot(&slab, &config, 1)).unwrap();
    let mut second = restore_on_shell(&vmm, &config, &echo, slot(&slab, &config, 2)).unwrap();
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for input in [&b"a"[..], b"", &big, b"after a big one"] {
        let want = registering.invoke(input, deadline()).unwrap();
        for inst in [&mut on_shell, &mut second] {
            let got = inst.invoke(input, deadline()).unwrap();
            assert_eq!((got.status, &got.data), (want.status, &want.data));
        }
    }
    // Torn down, the slots are free and clear: restored into again, they
    // serve.
    assert!(on_shell.teardown(Duration::from_secs(10)));
    assert!(second.teardown(Duration::from_secs(10)));
    let mut again = restore_on_shell(&vmm, &config, &echo, slot(&slab, &config, 1)).unwrap();
    assert_eq!(again.invoke(b"again", deadline()).unwrap().data, b"again");
}

fn probe_artifact() -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reset-probe");
    let mut opts = microfaas_builder::BuildOptions::new(Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-fixtures"));
    opts.allow_unsafe = true;
    let built = microfaas_builder::build(&dir, &opts).unwrap_or_else(|e| panic!("building reset-probe: {e}"));
    std::fs::read(&built.path).unwrap()
}

const SECRET: &[u8; 16] = b"\x5cslot-secret!!\x01\xee";

/// The probe's `w`: the secret into its static, heap, stack and (its
/// output) I/O window; the heap and stack addresses it used.
fn write_secret(inst: &mut Instance) -> [u8; 16] {
    let mut input = vec![b'w'];
    input.extend_from_slice(SECRET);
    let r = inst.invoke(&input, deadline()).unwrap();
    assert_eq!(r.data.len(), 64 * 16 + 16, "{:?}", r.data);
    let mut addrs = [0u8; 16];
    addrs.copy_from_slice(&r.data[1024..]);
    addrs
}

/// The probe's `s`: where it finds the secret (static, heap, stack, the
/// window after its input).
fn scan(inst: &mut Instance, addrs: &[u8; 16]) -> [u32; 4] {
    let mut input = vec![b's'];
    input.extend_from_slice(SECRET);
    input.extend_from_slice(addrs);
    let r = inst.invoke(&input, deadline()).unwrap();
    assert_eq!(r.data.len(), 16, "{:?}", r.data);
    let mut hits = [0u32; 4];
    for (h, c) in hits.iter_mut().zip(r.data.chunks_exact(4)) {
        *h = u32::from_le_bytes(c.try_into().unwrap());
    }
    hits
}

#[test]
fn an_instance_in_a_shell_for_slots_reaches_only_its_own_slot() {
    let Some(vmm) = vm_common::open_vmm() else {
        return;
    };
    let config = small_config();
    let probe = node(&vmm, &config, &probe_artifact());
    let layout = vmm::layout::Layout::new(config.layout).unwrap();
    let slab = Slab::with_slots(layout.io_bytes, 3).unwrap();
    // Three neighbours: slots 0 (registering), 1 and 2 (shells).
    let mut below = restore_registering(&vmm, &config, &probe, slot(&slab, &config, 0));
    let mut writer = restore_on_shell(&vmm, &config, &probe, slot(&slab, &config, 1)).unwrap();
    let mut above = restore_on_shell(&vmm, &config, &probe, slot(&slab, &config, 2)).unwrap();
    let addrs = write_secret(&mut writer);
    for (name, inst) in [("slot 0", &mut below), ("slot 2", &mut above)] {
        assert_eq!(
            scan(inst, &addrs),
            [0; 4],
            "{name} found slot 1's secret (static, heap, stack, window)"
        );
    }
    // The control: the writer's own window holds it (the probe can fail).
    let own = scan(&mut writer, &addrs);
    assert!(
        own[3] > 0,
        "the probe did not find the secret in its own window: {own:?}"
    );
    // And the other way round: a neighbour's secret stays its own.
    let addrs = write_secret(&mut above);
    assert_eq!(scan(&mut below, &addrs)[3], 0, "slot 0 found slot 2's secret");
    assert!(scan(&mut above, &addrs)[3] > 0);
}

#[test]
fn restore_into_slot_refuses_other_shells_and_failed_mappings_and_the_vmm_serves_on() {
    let Some(vmm) = vm_common::open_vmm() else {
        return;
    };
    let config = small_config();
    let echo = node(&vmm, &config, microfaas::builtin("echo").unwrap().bytes());
    let layout = vmm::layout::Layout::new(config.layout).unwrap();
    let slab = Slab::with_slots(layout.io_bytes, 2).unwrap();
    let map =
        |at: NonNull<u8>, len: usize| Ok(Box::new(cow_copy(&echo.file, at.as_ptr(), len)?) as Box<dyn ExternalMemory>);
    // A shell without memory slots, and one whose channel slots point at
    // the VMM's own slab: both refused (neither can take a given slot).
    let plain = Shell::new(&vmm, false).unwrap();
    assert!(!plain.has_memory());
    let refused = Instance::restore_into_slot(&vmm, plain, &config, map, &echo.saved, slot(&slab, &config, 0));
    assert!(matches!(refused, Err(VmmError::Shell(_))), "{refused:?}");
    let own_slot = Shell::with_memory(&vmm, &config).unwrap();
    let refused = Instance::restore_into_slot(&vmm, own_slot, &config, map, &echo.saved, slot(&slab, &config, 0));
    assert!(matches!(refused, Err(VmmError::Shell(_))), "{refused:?}");
    // Memory that fails to map: the caller's error, as a typed one.
    let failing = Instance::restore_into_slot(
        &vmm,
        Shell::with_memory_for_slots(&vmm, &config).unwrap(),
        &config,
        |_, _| Err("no memory today".into()),
        &echo.saved,
        slot(&slab, &config, 0),
    );
    assert!(matches!(failing, Err(VmmError::MapMemory(_))), "{failing:?}");
    // The same slot, restored into properly, serves.
    let mut inst = restore_on_shell(&vmm, &config, &echo, slot(&slab, &config, 0)).unwrap();
    assert_eq!(
        inst.invoke(b"still serving", deadline()).unwrap().data,
        b"still serving"
    );
}

#[test]
fn a_primed_shell_sets_no_register_for_its_node_and_all_of_them_for_another() {
    let Some(vmm) = vm_common::open_vmm() else {
        return;
    };
    let config = small_config();
    let echo = node(&vmm, &config, microfaas::builtin("echo").unwrap().bytes());
    let sha = node(&vmm, &config, microfaas::builtin("sha512").unwrap().bytes());
    let layout = vmm::layout::Layout::new(config.layout).unwrap();
    let slab = Slab::with_slots(layout.io_bytes, 4).unwrap();
    let restore_primed = |primed_for: &Node, node: &Node, index: usize| {
        let mut shell = Shell::with_memory_for_slots(&vmm, &config).unwrap();
        shell.prime(&primed_for.saved.vcpu).unwrap();
        Instance::restore_into_slot(
            &vmm,
            shell,
            &config,
            |at, len| Ok(Box::new(cow_copy(&node.file, at.as_ptr(), len)?) as Box<dyn ExternalMemory>),
            &node.saved,
            slot(&slab, &config, index),
        )
        .unwrap()
    };
    let mut want_echo = restore_registering(&vmm, &config, &echo, slot(&slab, &config, 0));
    let mut want_sha = restore_registering(&vmm, &config, &sha, slot(&slab, &config, 1));
    // Primed for its own node: no register set, the same replies.
    let mut same = restore_primed(&echo, &echo, 2);
    assert!(
        !same.restore_timings().unwrap().vcpu_set,
        "a shell primed for the node set registers"
    );
    // Primed for echo, restored as sha512: every register set, and it is
    // sha512 that answers.
    let mut other = restore_primed(&echo, &sha, 3);
    assert!(other.restore_timings().unwrap().vcpu_set);
    for input in [&b"abc"[..], b"", &[7u8; 3000][..]] {
        let e = want_echo.invoke(input, deadline()).unwrap().data;
        let h = want_sha.invoke(input, deadline()).unwrap().data;
        assert_ne!(e, h);
        assert_eq!(same.invoke(input, deadline()).unwrap().data, e);
        assert_eq!(other.invoke(input, deadline()).unwrap().data, h);
    }
}
