//! Pre-linked images and post-init snapshots (`runtime::prelinked`, the
//! language worker's cold path): a snapshot-started instance answers like a
//! fresh one (load, relocate, init) for random inputs and artifacts, in
//! any order, with both teardowns; a fault or panic in a snapshot-started
//! call leaves the next one fresh; images stay within their mapping cap;
//! and through a real worker, cold starts from all three paths agree with
//! a fresh in-process instance, and thousands of functions fit one worker.

use lang_isolation::language::{ColdStart, Dispatcher, DispatcherConfig, Start};
use lang_isolation::runtime::pagescan::PageScan;
use lang_isolation::runtime::prelinked::{HeapTeardowns, ImageArena, ImageSpace, PrelinkedImage, StartFrom, Teardown};
use lang_isolation::runtime::{
    ArtifactImage, Failure, Instance, InstanceConfig, InstanceShell, LoadedFunction, SealedArtifact,
};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const NAMES: [&str; 5] = ["snapshot-probe", "init-heavy", "echo", "sha512", "stateful"];

fn artifacts() -> &'static HashMap<&'static str, Vec<u8>> {
    static BUILT: OnceLock<HashMap<&'static str, Vec<u8>>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("prelinked");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        NAMES
            .iter()
            .chain(["noop", "init-fails"].iter())
            .map(|&name| {
                let dir = if matches!(name, "stateful" | "snapshot-probe") {
                    repo.join("tests/fixtures").join(name)
                } else {
                    repo.join("functions").join(name)
                };
                let mut opts = microfaas_builder::BuildOptions::new(root.join("cache"));
                opts.out = Some(root.join(format!("{name}.so")));
                let built = microfaas_builder::build(&dir, &opts).unwrap_or_else(|e| panic!("building {name}: {e}"));
                (name, std::fs::read(built.path).unwrap())
            })
            .collect()
    })
}

fn image(name: &str) -> ArtifactImage {
    ArtifactImage::parse(SealedArtifact::create(name, &artifacts()[name]).unwrap()).unwrap()
}

/// What a call gave: the output, or the failure's kind.
fn outcome(result: Result<Vec<u8>, Failure>) -> Result<Vec<u8>, String> {
    result.map_err(|f| match f {
        Failure::Panicked { .. } => "panicked".to_owned(),
        Failure::StackOverflow { .. } => "stack overflow".to_owned(),
        other => other.to_string(),
    })
}

/// A fresh instance: load, relocate, init, handle (the reference).
fn fresh(image: &ArtifactImage, input: &[u8]) -> Result<Vec<u8>, String> {
    let function = LoadedFunction::load(image).unwrap();
    let mut instance = Instance::new(function, &InstanceConfig::default()).unwrap();
    instance.init().unwrap();
    outcome(instance.handle(input).map(|o| o.bytes().to_vec()))
}

/// The worker's pre-linked cold path, in-process.
struct Cold {
    arena: ImageArena,
    space: ImageSpace,
    images: Vec<(ArtifactImage, PrelinkedImage)>,
    shell: Option<InstanceShell>,
    snapshots: bool,
    /// The worker's way: a snapshot's heap dropped once, by `leave`, only
    /// the pages the call wrote (`PAGEMAP_SCAN`).
    scan: bool,
}

impl Cold {
    fn new(names: &[&str], teardown: Teardown, max_mapped: usize, snapshots: bool) -> Self {
        let mut arena = ImageArena::create(1 << 36).unwrap();
        let mut space = ImageSpace::new(16 << 30, max_mapped, teardown).unwrap();
        let images = names
            .iter()
            .map(|n| {
                let a = image(n);
                let p = PrelinkedImage::build(&a, &mut space, &mut arena).unwrap();
                (a, p)
            })
            .collect();
        Self {
            arena,
            space,
            images,
            shell: Some(InstanceShell::new(&InstanceConfig::default()).unwrap()),
            snapshots,
            scan: false,
        }
    }

    /// Drops a snapshot heap's written pages only (the worker's teardown).
    fn scanning(mut self, scan: bool) -> Self {
        if scan {
            self.space
                .use_page_scan(PageScan::open().expect("PAGEMAP_SCAN (Linux 6.7+)"));
        }
        self.scan = scan;
        self
    }

    /// One cold start of image `i`; whether it started from a snapshot.
    fn call(&mut self, i: usize, input: &[u8]) -> (Result<Vec<u8>, String>, bool) {
        let mut shell = self.shell.take().unwrap();
        let (artifact, pre) = &mut self.images[i];
        let from = if self.snapshots && pre.can_start_from_snapshot(&mut shell) {
            StartFrom::Snapshot
        } else {
            StartFrom::Pristine
        };
        let function = self.space.enter(pre, artifact, &self.arena, &shell, from).unwrap();
        let mut instance = match (from, pre.snapshot_state()) {
            // SAFETY: `enter` mapped the snapshot, which was taken in this
            // shell (`can_start_from_snapshot`).
            (StartFrom::Snapshot, Some(state)) => unsafe {
                Instance::from_shell_initialised(function, shell, state)
                    .unwrap()
                    .unwrap()
            },
            _ => {
                let mut instance = Instance::from_shell(function, shell).unwrap();
                instance.init().unwrap();
                if self.snapshots {
                    pre.capture(&mut instance, &mut self.arena).unwrap();
                }
                instance
            }
        };
        let out = outcome(instance.handle(input).map(|o| o.bytes().to_vec()));
        let shell = if self.scan {
            instance.into_shell_sparing(self.space.snapshot_heap_bytes())
        } else {
            instance.into_shell()
        };
        self.space.leave(&shell, Some(&self.images[i].1)).unwrap();
        self.shell = Some(shell);
        (out, from == StartFrom::Snapshot)
    }
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..48),
        1 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(|mut v| { v.insert(0, b'!'); v }),
        1 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(|mut v| { v.insert(0, b'p'); v }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random artifacts in random order, random inputs (some of which tear
    /// the state and overflow the stack or panic): every cold start, from
    /// the pristine image the first time and from the snapshot after,
    /// answers exactly like a fresh instance.
    #[test]
    fn snapshot_started_instances_answer_like_fresh_ones(
        calls in proptest::collection::vec((0usize..NAMES.len(), input()), 1..24),
        teardown in prop_oneof![Just(Teardown::Restore), Just(Teardown::Discard), Just(Teardown::Remap)],
        max_mapped in 1usize..4,
        scan in any::<bool>(),
    ) {
        let mut cold = Cold::new(&NAMES, teardown, max_mapped, true).scanning(scan);
        let references: Vec<ArtifactImage> = NAMES.iter().map(|n| image(n)).collect();
        let mut expected: HashMap<(usize, Vec<u8>), Result<Vec<u8>, String>> = HashMap::new();
        for (i, input) in calls {
            let want = expected
                .entry((i, input.clone()))
                .or_insert_with(|| fresh(&references[i], &input))
                .clone();
            let (got, _) = cold.call(i, &input);
            prop_assert_eq!(got, want, "{} on {:?}", NAMES[i], input);
        }
    }
}

#[test]
fn the_first_cold_start_snapshots_and_the_next_start_from_it() {
    let mut cold = Cold::new(&["snapshot-probe", "init-heavy"], Teardown::Restore, 8, true);
    for (i, name) in NAMES.iter().take(2).enumerate() {
        let reference = fresh(&image(name), b"abc");
        let (first, from_snapshot) = cold.call(i, b"abc");
        assert!(!from_snapshot, "the first runs init");
        assert!(cold.images[i].1.has_snapshot());
        for _ in 0..3 {
            let (again, from_snapshot) = cold.call(i, b"abc");
            assert!(from_snapshot);
            assert_eq!(again, reference);
        }
        assert_eq!(first, reference);
    }
    // init-heavy's 8 MiB table is in its snapshot's heap.
    assert!(
        cold.images[1].1.arena_bytes() >= 8 << 20,
        "{}",
        cold.images[1].1.arena_bytes()
    );
}

/// A call that tears the function's state (statics, bss, heap) and then
/// overflows its stack or panics leaves nothing behind: the next
/// snapshot-started call sees init's state exactly.
#[test]
fn a_fault_in_a_snapshot_started_call_leaves_the_next_call_fresh() {
    for (teardown, scan) in [
        (Teardown::Restore, false),
        (Teardown::Restore, true),
        (Teardown::Discard, true),
        (Teardown::Discard, false),
        (Teardown::Remap, false),
    ] {
        let mut cold = Cold::new(&["snapshot-probe"], teardown, 8, true).scanning(scan);
        let (good, _) = cold.call(0, b"hello");
        let good = good.unwrap();
        assert_eq!(&good[..9], &[0, 0, 0, 0, 0, 0, 0, 0, 0x11], "calls 0, init's mark");
        for attack in [&b"!x"[..], b"p", b"!"] {
            let (bad, from_snapshot) = cold.call(0, attack);
            assert!(from_snapshot);
            assert!(bad.is_err(), "{bad:?}");
            let (after, _) = cold.call(0, b"hello");
            assert_eq!(after.unwrap(), good, "{teardown:?} (scan {scan}) after {attack:?}");
        }
    }
}

/// Present pages of `range` (from `/proc/self/pagemap`: bit 63).
fn present_pages(range: std::ops::Range<usize>) -> usize {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let pages = range.len() / 4096;
    let mut entries = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut entries, u64::try_from(range.start / 4096 * 8).unwrap())
        .unwrap();
    entries
        .chunks(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
        .count()
}

/// With the page scan, a snapshot's heap pages that a call only read stay
/// mapped after it (the next start does not fault them in again), and a
/// write is still undone; without it, every page is dropped.
#[test]
fn the_page_scan_keeps_pages_only_read_and_drops_pages_written() {
    for scan in [false, true] {
        let mut cold = Cold::new(&["snapshot-probe", "init-heavy"], Teardown::Restore, 8, true).scanning(scan);
        let reference = fresh(&image("init-heavy"), b"abc");
        for _ in 0..3 {
            assert_eq!(cold.call(1, b"abc").0, reference);
        }
        let heap = cold.shell.as_ref().unwrap().heap_memory().persistent_range();
        let present = present_pages(heap.start..heap.start + (8 << 20));
        if scan {
            assert!(present > 0, "pages read stay mapped");
        } else {
            assert_eq!(present, 0, "all dropped");
        }
        // snapshot-probe tears its heap; init-heavy's then maps again.
        let (good, _) = cold.call(0, b"hello");
        let (bad, _) = cold.call(0, b"!x");
        assert!(bad.is_err());
        assert_eq!(cold.call(0, b"hello").0, good);
        assert_eq!(cold.call(1, b"abc").0, reference);
    }
}

/// A snapshot's heap is watched for writes (mapped read-only, the first
/// write faults and is let through): a call that only reads it needs no
/// teardown at all, one that writes it is undone like before, and the
/// space backs off from watching a heap whose calls write (16, then 32,
/// then 64 unwatched, scanned calls between watched ones).
#[test]
fn calls_that_only_read_a_snapshot_heap_leave_nothing_to_undo_and_writes_are_undone() {
    let mut cold = Cold::new(&["init-heavy", "snapshot-probe"], Teardown::Restore, 8, true).scanning(true);
    let reference = fresh(&image("init-heavy"), b"abc");
    assert_eq!(
        cold.call(0, b"abc"),
        (reference.clone(), false),
        "init runs, then the snapshot"
    );
    for _ in 0..50 {
        assert_eq!(cold.call(0, b"abc"), (reference.clone(), true));
    }
    assert_eq!(
        cold.space.heap_teardowns(),
        HeapTeardowns {
            unwritten: 50,
            written: 0,
            unwatched: 0
        },
        "init-heavy's calls only read its table"
    );
    // Nothing of the heap is a private copy: the snapshot's bytes, still.
    let heap = cold.shell.as_ref().unwrap().heap_memory().persistent_range();
    let mut written = Vec::new();
    PageScan::open()
        .unwrap()
        .written(heap.start..heap.start + cold.space.snapshot_heap_bytes(), &mut written)
        .unwrap();
    assert!(written.is_empty(), "{written:?}");

    // snapshot-probe changes its heap table in every call.
    let (first, from_snapshot) = cold.call(1, b"hello");
    assert!(!from_snapshot);
    let (good, from_snapshot) = cold.call(1, b"hello");
    assert!(from_snapshot);
    for i in 0..100 {
        assert_eq!(cold.call(1, b"hello").0, good, "call {i}");
    }
    assert_eq!(first.unwrap()[..8], good.clone().unwrap()[..8], "the same call count");
    // Watched: the first of the 101 snapshot starts, then the 18th, the
    // 51st (after 16 and 32 skipped); 98 scanned between.
    assert_eq!(
        cold.space.heap_teardowns(),
        HeapTeardowns {
            unwritten: 50,
            written: 3,
            unwatched: 98
        }
    );
    // Back to init-heavy: its heap maps again, watched again.
    assert_eq!(cold.call(0, b"abc").0, reference);
    assert_eq!(cold.space.heap_teardowns().unwritten, 51);
}

/// Pre-linked without snapshots: init runs every time, and still answers
/// like a fresh instance.
#[test]
fn prelinked_without_snapshots_runs_init_every_time() {
    let mut cold = Cold::new(&["snapshot-probe", "stateful"], Teardown::Restore, 8, false);
    for i in [0, 1, 0, 0, 1] {
        let (got, from_snapshot) = cold.call(i, b"xyz");
        assert!(!from_snapshot);
        assert_eq!(got, fresh(&image(["snapshot-probe", "stateful"][i]), b"xyz"));
        assert!(!cold.images[i].1.has_snapshot());
    }
}

/// VMAs of this process overlapping `range` (other tests' threads map
/// their own memory meanwhile, elsewhere; one of theirs with the same
/// protection right next to the reservation merges with it, so a VMA may
/// start before `range`).
fn vmas_in(range: std::ops::Range<usize>) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (a, rest) = l.split_once('-')?;
            let b = rest.split(' ').next()?;
            Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))
        })
        .filter(|&(a, b)| a < range.end && b > range.start)
        .count()
}

/// Unused ranges cost no kernel mapping; at most `max_mapped` images stay
/// mapped (each its pieces' VMAs), and releasing images gives it all back.
#[test]
fn mapped_images_stay_within_their_cap() {
    let names = vec!["noop"; 300];
    let mut cold = Cold::new(&names, Teardown::Discard, 40, true);
    let range = cold.space.range();
    let pieces = cold.images[0].1.pieces().len();
    assert_eq!(
        vmas_in(range.clone()),
        1,
        "300 deployed, none started: the reservation only"
    );
    for round in 0..2 {
        for i in 0..names.len() {
            assert_eq!(cold.call(i, b"").0.unwrap().len(), 8, "noop returns its timestamp");
        }
        assert_eq!(cold.space.mapped(), 40, "round {round}");
    }
    let during = vmas_in(range.clone());
    // Each mapped image: its pieces, and the PROT_NONE rest of the
    // reservation between mapped images.
    assert!(during <= 40 * (pieces + 1) + 1, "{during} VMAs ({pieces} pieces)");
    assert!(during >= 40 * pieces, "{during} VMAs ({pieces} pieces)");
    let Cold {
        mut arena,
        mut space,
        images,
        ..
    } = cold;
    for (_, p) in images {
        p.release(&mut arena, &mut space);
    }
    assert_eq!(space.mapped(), 0);
    assert_eq!(arena.used_bytes(), 0);
    let after = vmas_in(range);
    eprintln!("image space VMAs: {during} with 40 of 300 images mapped, {after} after releasing all");
    assert!(after <= 3, "released: {after}");
}

/// The arena's fd cannot be mapped writable-shared (or written) once
/// created: only the arena's own view, made before the seal, writes it.
#[test]
fn the_image_arena_fd_is_never_writable_again() {
    use std::os::fd::{AsFd, AsRawFd};
    let arena = ImageArena::create(1 << 20).unwrap();
    let fd = arena.as_fd().as_raw_fd();
    let map = |prot, flags| {
        // SAFETY: a fresh mapping at an address the kernel picks, unmapped
        // right away.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, flags, fd, 0) };
        if p != libc::MAP_FAILED {
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(p, 4096) };
        }
        p != libc::MAP_FAILED
    };
    assert!(map(libc::PROT_READ, libc::MAP_PRIVATE), "private mappings work");
    assert!(map(libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE));
    assert!(
        !map(libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED),
        "no new writer"
    );
    // SAFETY: a write of one byte from a live local.
    let wrote = unsafe { libc::pwrite(fd, b"x".as_ptr().cast(), 1, 0) };
    assert_eq!(wrote, -1, "no write");
    // SAFETY: F_GET_SEALS only reads the fd's state.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    assert_ne!(seals & libc::F_SEAL_FUTURE_WRITE, 0, "seals {seals:#x}");
}

fn dispatcher(cold_start: ColdStart) -> Dispatcher {
    let mut config = DispatcherConfig::new(env!("CARGO_BIN_EXE_microfaas-worker"));
    config.workers = Some(1);
    config.cold_start = cold_start;
    Dispatcher::start(config).unwrap()
}

/// Through a sandboxed worker: cold starts by every path (load, pre-linked,
/// snapshot) answer like a fresh in-process instance, a stack overflow in
/// a snapshot-started call is typed and the next cold call is fresh, and
/// warm calls keep their own resident state.
#[test]
fn worker_cold_starts_by_every_path_answer_like_fresh_instances() {
    let reference = image("snapshot-probe");
    for cold_start in [ColdStart::Load, ColdStart::Prelinked, ColdStart::Snapshot] {
        let d = dispatcher(cold_start);
        let probe = d
            .deploy(
                Arc::new(SealedArtifact::create("probe", &artifacts()["snapshot-probe"]).unwrap()),
                Duration::from_secs(2),
            )
            .unwrap();
        let heavy = d
            .deploy(
                Arc::new(SealedArtifact::create("heavy", &artifacts()["init-heavy"]).unwrap()),
                Duration::from_secs(2),
            )
            .unwrap();
        let heavy_ref = image("init-heavy");
        for input in [&b"one"[..], b"two", b"", b"one", b"\xff\x00\x10"] {
            for _ in 0..2 {
                let got = d.invoke(probe, input, Start::Cold).unwrap();
                assert!(got.cold);
                assert_eq!(Ok(got.output), fresh(&reference, input), "{cold_start:?} {input:?}");
                let got = d.invoke(heavy, input, Start::Cold).unwrap();
                assert_eq!(Ok(got.output), fresh(&heavy_ref, input), "{cold_start:?} {input:?}");
            }
        }
        let err = d.invoke(probe, b"!z", Start::Cold).unwrap_err();
        assert!(err.to_string().contains("stack"), "{cold_start:?}: {err}");
        let got = d.invoke(probe, b"one", Start::Cold).unwrap();
        assert_eq!(
            Ok(got.output),
            fresh(&reference, b"one"),
            "{cold_start:?} after the overflow"
        );
        // Warm: the resident instance's own state moves on (calls 0, 1, ..).
        let w0 = d.invoke(probe, b"w", Start::Warm).unwrap().output;
        let w1 = d.invoke(probe, b"w", Start::Warm).unwrap().output;
        assert_eq!(w0[0], 0);
        assert_eq!(w1[0], 1);
        assert_eq!(
            Ok(d.invoke(probe, b"w", Start::Cold).unwrap().output),
            fresh(&reference, b"w")
        );
    }
}

/// Lazily resident functions (`DispatcherConfig::lazy_resident`): a deploy
/// makes no instance (no resident function, fewer worker mappings than an
/// eager deploy), cold starts answer like fresh instances, the first warm
/// request makes the function resident (then its own state moves on), and a
/// failing `init()` shows at the first start, typed, with the worker
/// serving on.
#[test]
fn lazily_resident_functions_keep_no_instance_until_their_first_warm_request() {
    let deploy_all = |lazy: bool| {
        let mut config = DispatcherConfig::new(env!("CARGO_BIN_EXE_microfaas-worker"));
        config.workers = Some(1);
        config.lazy_resident = lazy;
        let d = Dispatcher::start(config).unwrap();
        let ids: Vec<_> = (0..20)
            .map(|i| {
                let a = SealedArtifact::create(&format!("noop-{i}"), &artifacts()["noop"]).unwrap();
                d.deploy(Arc::new(a), Duration::from_secs(2)).unwrap()
            })
            .collect();
        let vmas = worker_vmas(d.stats().worker_pids[0]);
        (d, ids, vmas)
    };
    let (eager, _, eager_vmas) = deploy_all(false);
    assert_eq!(eager.stats().resident, 20);
    let (d, ids, lazy_vmas) = deploy_all(true);
    assert_eq!(d.stats().resident, 0, "no instance at deploy");
    assert!(lazy_vmas < eager_vmas, "lazy {lazy_vmas} VMAs, eager {eager_vmas}");
    for id in &ids {
        let got = d.invoke(*id, b"", Start::Cold).unwrap();
        assert!(got.cold);
        assert_eq!(got.output.len(), 8, "noop returns its timestamp");
    }
    assert_eq!(d.stats().resident, 0, "cold starts make no resident instance");

    let reference = image("snapshot-probe");
    let probe = d
        .deploy(
            Arc::new(SealedArtifact::create("probe", &artifacts()["snapshot-probe"]).unwrap()),
            Duration::from_secs(2),
        )
        .unwrap();
    for input in [&b"one"[..], b"two", b"one"] {
        let got = d.invoke(probe, input, Start::Cold).unwrap();
        assert_eq!(Ok(got.output), fresh(&reference, input), "{input:?}");
    }
    let w0 = d.invoke(probe, b"w", Start::Warm).unwrap();
    assert!(!w0.cold);
    assert_eq!(d.stats().resident, 1, "made resident by its first warm request");
    let w1 = d.invoke(probe, b"w", Start::Warm).unwrap();
    assert_eq!(
        (w0.output[0], w1.output[0]),
        (0, 1),
        "the resident instance's own state"
    );

    let fails = d
        .deploy(
            Arc::new(SealedArtifact::create("fails", &artifacts()["init-fails"]).unwrap()),
            Duration::from_secs(2),
        )
        .expect("a lazy deploy runs no init()");
    let err = d.invoke(fails, b"", Start::Cold).unwrap_err();
    assert!(err.to_string().contains("init"), "{err}");
    let err = d.invoke(fails, b"", Start::Warm).unwrap_err();
    assert!(err.to_string().contains("init"), "{err}");
    assert_eq!(
        Ok(d.invoke(probe, b"one", Start::Cold).unwrap().output),
        fresh(&reference, b"one"),
        "the worker serves on"
    );
}

fn worker_vmas(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .count()
}

/// The paper's scale on one worker: 5,000 distinct functions (each its own
/// artifact memfd, image and snapshot) deployed resident, a sample started
/// cold (all answer), the worker's mappings far from `vm.max_map_count`.
#[test]
fn five_thousand_functions_on_one_worker() {
    let d = dispatcher(ColdStart::Snapshot);
    let bytes = &artifacts()["noop"];
    let ids: Vec<_> = (0..5000)
        .map(|i| {
            let sealed = Arc::new(SealedArtifact::create(&format!("noop-{i}"), bytes).unwrap());
            d.deploy(sealed, Duration::from_millis(500)).unwrap()
        })
        .collect();
    let pid = d.stats().worker_pids[0];
    let deployed = worker_vmas(pid);
    for (n, id) in ids.iter().enumerate().step_by(17) {
        for _ in 0..2 {
            let got = d.invoke(*id, b"", Start::Cold).unwrap();
            assert!(got.cold);
            assert_eq!(got.output.len(), 8, "function {n}");
        }
        assert_eq!(d.invoke(*id, b"", Start::Warm).unwrap().output.len(), 8, "function {n}");
    }
    let after = worker_vmas(pid);
    eprintln!("worker VMAs: {deployed} with 5,000 deployed, {after} after cold starts of 295");
    assert!(after < 60_000, "{after} mappings");
}
