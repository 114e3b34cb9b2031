//! The runtime's own ELF loader (no `dlopen`): real artifacts load, run and
//! are never mapped writable and executable; every cold copy starts from
//! the statics as built; truncated, bit-flipped and hand-crafted artifacts
//! are refused with a typed error and never crash the loader; and a worker
//! or runner handed a hand-crafted artifact (which the host's verifier
//! would have refused) refuses it and serves the next function.

use goblin::elf::Elf;
use lang_isolation::language::{Dispatcher, DispatcherConfig, LanguageError, Start};
use lang_isolation::process::{ProcessConfig, ProcessError, ProcessHost, StartMode};
use lang_isolation::runtime::{
    ArtifactImage, ElfError, Failure, Instance, InstanceConfig, LoadError, LoadedFunction, Protection, SealedArtifact,
    plan,
};
use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const EXAMPLES: [&str; 6] = ["echo", "noop", "sha512", "checkpointed", "init-heavy", "stateful"];

/// The artifacts these tests use, built once per test process.
fn artifacts() -> &'static HashMap<&'static str, Vec<u8>> {
    static BUILT: OnceLock<HashMap<&'static str, Vec<u8>>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("loader");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        EXAMPLES
            .iter()
            .map(|&name| {
                let dir = if name == "stateful" {
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

fn bytes(name: &str) -> Vec<u8> {
    artifacts()[name].clone()
}

fn image(bytes: &[u8]) -> Result<ArtifactImage, LoadError> {
    ArtifactImage::parse(SealedArtifact::create("test", bytes)?)
}

fn elf_error(bytes: &[u8]) -> ElfError {
    match image(bytes) {
        Err(LoadError::Elf(e)) => e,
        other => panic!("expected an ELF refusal, got {other:?}"),
    }
}

fn instance(function: LoadedFunction) -> Instance {
    let config = InstanceConfig {
        heap_limit_bytes: 16 << 20,
        stack_bytes: 256 << 10,
    };
    Instance::new(function, &config).expect("instance")
}

/// `/proc/self/maps` lines inside `[base, base + span)`.
fn maps_within(base: usize, span: usize) -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|line| {
            let range = line.split_whitespace().next().unwrap_or("");
            let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
            let lo = usize::from_str_radix(lo, 16).unwrap_or(0);
            let hi = usize::from_str_radix(hi, 16).unwrap_or(0);
            lo >= base && hi <= base + span
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_example_function_loads_runs_and_is_never_writable_and_executable() {
    for name in EXAMPLES {
        let image = image(&artifacts()[name]).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let function = LoadedFunction::load(&image).unwrap();
        let (base, span, bound) = (function.base(), function.span(), function.mappings());
        let maps = maps_within(base, span);
        eprintln!("{name}: {} mappings (bound {bound}), span {span} bytes", maps.len());
        assert!(!maps.is_empty() && maps.len() <= bound, "{name}: {maps:#?}");
        for line in &maps {
            let perms = line.split_whitespace().nth(1).unwrap();
            assert!(!(perms.contains('w') && perms.contains('x')), "{name}: W+X {line}");
            if perms.contains('x') {
                assert!(
                    line.contains("/memfd:microfaas-artifact:"),
                    "{name}: code not from the memfd: {line}"
                );
            }
        }
        let mut instance = instance(function);
        instance.init().unwrap_or_else(|e| panic!("{name}: init: {e}"));
        match instance.handle(b"64") {
            Ok(out) if name == "echo" => assert_eq!(out.bytes(), b"64"),
            Ok(_) | Err(Failure::FunctionError { .. }) => {}
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

#[test]
fn outputs_of_every_size_around_the_context_scratch_arrive_intact() {
    // A call's first 2 KiB of allocations come from its context's scratch,
    // the rest from the invocation arena; echo's output is one block of
    // the input's size. Sizes on both sides of the boundary, interleaved, so
    // that a scratch not reset between calls, or an output read from the
    // wrong place, shows.
    let image = image(&artifacts()["echo"]).unwrap();
    let mut echo = instance(LoadedFunction::load(&image).unwrap());
    echo.init().unwrap();
    let sizes = [
        0usize,
        1,
        7,
        100,
        2047,
        2048,
        2049,
        5000,
        1,
        100_000,
        2048,
        3,
        1 << 20,
        64,
    ];
    for round in 0..3u8 {
        for (i, &len) in (0u8..).zip(sizes.iter()) {
            let input: Vec<u8> = (0u8..=250)
                .cycle()
                .take(len)
                .map(|b| b.wrapping_mul(31).wrapping_add(round ^ i))
                .collect();
            let out = echo.handle(&input).unwrap_or_else(|e| panic!("{len} bytes: {e}"));
            assert_eq!(out.bytes(), &input[..], "{len} bytes, round {round}");
            // A scratch block is not the heap's: the arena holds nothing.
            if len <= 2048 {
                assert_eq!(out.heap_used_bytes(), 0, "{len} bytes");
            } else {
                assert!(out.heap_used_bytes() >= len, "{len} bytes");
            }
            drop(out);
            assert_eq!(echo.heap_used_bytes(), 0, "reset after {len} bytes");
        }
    }
}

/// `(calls before, mark)` as the stateful fixture reports them.
fn stateful_reply(out: &[u8]) -> (u64, u8) {
    assert_eq!(out.len(), 9, "{out:?}");
    (u64::from_le_bytes(out[..8].try_into().unwrap()), out[8])
}

#[test]
fn every_copy_starts_from_the_statics_as_built() {
    let image = image(&artifacts()["stateful"]).unwrap();
    let mut warm = instance(LoadedFunction::load(&image).unwrap());
    let call = |i: &mut Instance| stateful_reply(i.handle(b"").unwrap().bytes());
    assert_eq!(call(&mut warm), (0, 0x5a));
    assert_eq!(call(&mut warm), (1, 0xa5));
    for _ in 0..3 {
        let mut cold = instance(LoadedFunction::load(&image).unwrap());
        assert_eq!(call(&mut cold), (0, 0x5a), "a fresh copy sees the statics as built");
    }
    assert_eq!(call(&mut warm), (2, 0xa5), "the other copy keeps its own");
}

#[test]
fn accepted_plans_keep_their_invariants_and_truncations_are_refused() {
    for name in EXAMPLES {
        let file = bytes(name);
        let p = plan(&file).unwrap();
        check_invariants(&p);
        let elf = Elf::parse(&file).unwrap();
        let needed = elf
            .program_headers
            .iter()
            .filter(|ph| ph.p_type == goblin::elf::program_header::PT_LOAD)
            .map(|ph| ph.p_offset + ph.p_filesz)
            .max()
            .unwrap();
        for len in (0..file.len()).step_by(53) {
            let cut = plan(&file[..len]);
            if u64::try_from(len).unwrap() < needed {
                assert!(
                    cut.is_err(),
                    "{name}: accepted a cut at {len} of {needed} segment bytes"
                );
            }
        }
    }
}

fn check_invariants(p: &lang_isolation::runtime::LoadPlan) {
    let mut end = 0;
    for s in &p.segments {
        assert!(s.start >= end && s.start % 4096 == 0 && s.end() <= p.span, "{p:?}");
        assert!(s.protection == Protection::ReadWrite || s.anon_bytes == 0, "{p:?}");
        end = s.end();
    }
    let in_kind = |off: usize, len: usize, kind: Protection| {
        p.segments
            .iter()
            .any(|s| s.protection == kind && off >= s.start && off + len <= s.end())
    };
    for r in &p.relocations {
        assert!(in_kind(r.offset, 8, Protection::ReadWrite), "{r:?}");
    }
    assert!(in_kind(p.init, 1, Protection::ReadExec) && in_kind(p.handle, 1, Protection::ReadExec));
    if let Some((off, len)) = p.relro {
        assert!(in_kind(off, len, Protection::ReadWrite));
    }
    assert!(p.max_mappings() >= p.segments.len());
}

#[test]
fn bit_flips_never_crash_the_parser_or_the_mapper() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut accepted, mut refused) = (0, 0);
    for name in ["echo", "sha512"] {
        let file = bytes(name);
        for round in 0..1500 {
            let mut f = file.clone();
            for _ in 0..1 + next() % 6 {
                let r = next();
                // Mostly the headers and dynamic tables (the first pages).
                let window = if round % 3 == 0 { f.len() } else { 4096.min(f.len()) };
                let at = usize::try_from(r % u64::try_from(window).unwrap()).unwrap();
                f[at] ^= u8::try_from(r >> 56).unwrap() | 1;
            }
            match plan(&f) {
                Ok(p) => {
                    check_invariants(&p);
                    // Map (never call) what was accepted: the mapper must
                    // cope with whatever the plan allows.
                    let image = image(&f).unwrap();
                    assert!(LoadedFunction::load(&image).is_ok());
                    accepted += 1;
                }
                Err(_) => refused += 1,
            }
        }
    }
    eprintln!("bit flips: {accepted} accepted, {refused} refused");
    assert!(refused > 0);
}

/// File offset of virtual address `vaddr` (inside a segment's file bytes).
fn file_offset(elf: &Elf<'_>, vaddr: u64) -> usize {
    let ph = elf
        .program_headers
        .iter()
        .find(|ph| {
            ph.p_type == goblin::elf::program_header::PT_LOAD && vaddr >= ph.p_vaddr && vaddr < ph.p_vaddr + ph.p_filesz
        })
        .unwrap();
    usize::try_from(vaddr - ph.p_vaddr + ph.p_offset).unwrap()
}

fn section_offset(elf: &Elf<'_>, name: &str) -> usize {
    let sh = elf
        .section_headers
        .iter()
        .find(|sh| elf.shdr_strtab.get_at(sh.sh_name) == Some(name))
        .unwrap_or_else(|| panic!("no section {name}"));
    usize::try_from(sh.sh_offset).unwrap()
}

/// `echo` with its text segment made writable as well (`RWX`).
fn writable_text() -> Vec<u8> {
    let mut f = bytes("echo");
    let elf = Elf::parse(&f).unwrap();
    let phoff = usize::try_from(elf.header.e_phoff).unwrap();
    let text = elf
        .program_headers
        .iter()
        .position(|ph| ph.p_type == goblin::elf::program_header::PT_LOAD && ph.is_executable())
        .unwrap();
    f[phoff + text * 56 + 4] = 7;
    f
}

#[test]
fn hand_crafted_artifacts_are_refused_naming_what() {
    let echo = bytes("echo");
    let elf = Elf::parse(&echo).unwrap();
    assert!(matches!(
        elf_error(&writable_text()),
        ElfError::WritableAndExecutable { .. }
    ));

    let rela = section_offset(&elf, ".rela.dyn");
    let mut f = echo.clone();
    f[rela + 8] = 5; // R_X86_64_COPY
    assert_eq!(elf_error(&f), ElfError::UnsupportedRelocation(5));

    let handle = elf
        .dynsyms
        .iter()
        .find(|s| elf.dynstrtab.get_at(s.st_name) == Some("microfaas_v1_handle"))
        .unwrap()
        .st_value;
    let mut f = echo.clone();
    f[rela..rela + 8].copy_from_slice(&handle.to_le_bytes());
    assert_eq!(elf_error(&f), ElfError::RelocationOutsideWritable { offset: handle });

    let dynstr = section_offset(&elf, ".dynstr");
    let memcpy = (dynstr..echo.len())
        .find(|&i| echo[i..].starts_with(b"memcpy\0"))
        .unwrap();
    let mut f = echo.clone();
    f[memcpy..memcpy + 6].copy_from_slice(b"system");
    assert_eq!(elf_error(&f), ElfError::ForbiddenImport { name: "system".into() });

    let dynamic = section_offset(&elf, ".dynamic");
    let mut f = echo.clone();
    f[dynamic..dynamic + 8].copy_from_slice(&1u64.to_le_bytes()); // DT_NEEDED
    assert_eq!(elf_error(&f), ElfError::NeedsLibrary);

    let version = elf
        .dynsyms
        .iter()
        .find(|s| elf.dynstrtab.get_at(s.st_name) == Some("MICROFAAS_ABI_VERSION"))
        .unwrap()
        .st_value;
    let mut f = echo.clone();
    let at = file_offset(&elf, version);
    f[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(elf_error(&f), ElfError::AbiMismatch { found: 9 });

    assert_eq!(elf_error(b"#!/bin/sh\n"), ElfError::Truncated("ELF header"));
    let mut f = echo.clone();
    f[16] = 2; // ET_EXEC
    assert_eq!(elf_error(&f), ElfError::NotSharedObject);
}

#[test]
fn only_sealed_memfds_are_accepted() {
    // A memfd without seals: its bytes could change under a mapping.
    // SAFETY: a NUL-terminated name and valid flags; the fd is owned below.
    let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0);
    // SAFETY: a fresh fd nothing else owns.
    let unsealed = unsafe { OwnedFd::from_raw_fd(raw) };
    assert!(matches!(
        SealedArtifact::from_fd(unsealed),
        Err(LoadError::NotSealed { seals: 0 })
    ));
    let file = std::fs::File::open("/dev/null").unwrap();
    assert!(matches!(
        SealedArtifact::from_fd(file.into()),
        Err(LoadError::NotMemfd(_))
    ));
    let sealed = SealedArtifact::create("x", b"abc").unwrap();
    assert_eq!(sealed.read_all().unwrap(), b"abc");
}

fn sealed(name: &str) -> Arc<SealedArtifact> {
    Arc::new(SealedArtifact::create(name, &artifacts()[name]).unwrap())
}

fn dispatcher() -> Dispatcher {
    let mut config = DispatcherConfig::new(env!("CARGO_BIN_EXE_microfaas-worker"));
    config.workers = Some(1);
    Dispatcher::start(config).unwrap()
}

fn process_host() -> ProcessHost {
    ProcessHost::new(ProcessConfig::new(env!("CARGO_BIN_EXE_microfaas-runner"))).unwrap()
}

#[test]
fn language_cold_starts_see_fresh_statics() {
    let d = dispatcher();
    let f = d.deploy(sealed("stateful"), Duration::from_millis(500)).unwrap();
    let call = |start| stateful_reply(&d.invoke(f, b"", start).unwrap().output);
    assert_eq!(call(Start::Warm), (0, 0x5a));
    assert_eq!(call(Start::Warm), (1, 0xa5));
    for _ in 0..3 {
        assert_eq!(call(Start::Cold), (0, 0x5a), "a cold start maps a fresh image");
    }
    assert_eq!(call(Start::Warm), (2, 0xa5), "the resident copy is untouched");
}

#[test]
fn process_cold_starts_see_fresh_statics() {
    let host = process_host();
    host.deploy("stateful", sealed("stateful"), Duration::from_millis(500))
        .unwrap();
    let call = |mode| stateful_reply(&host.invoke("stateful", b"", mode).unwrap().output);
    assert_eq!(call(StartMode::Warm), (0, 0x5a));
    assert_eq!(call(StartMode::Warm), (1, 0xa5));
    assert_eq!(call(StartMode::Cold), (0, 0x5a));
    assert_eq!(call(StartMode::Warm), (2, 0xa5));
}

/// The host's verifier is bypassed here on purpose: the runtime must
/// re-check what it relies on.
#[test]
fn a_worker_refuses_a_hand_crafted_artifact_and_serves_on() {
    let d = dispatcher();
    let rwx = Arc::new(SealedArtifact::create("rwx", &writable_text()).unwrap());
    match d.deploy(rwx, Duration::from_millis(100)) {
        Err(LanguageError::InitFailed { message }) => {
            assert!(message.contains("both writable and executable"), "{message}")
        }
        other => panic!("expected InitFailed, got {other:?}"),
    }
    let echo = d.deploy(sealed("echo"), Duration::from_millis(100)).unwrap();
    assert_eq!(d.invoke(echo, b"warm", Start::Warm).unwrap().output, b"warm");
    assert_eq!(d.invoke(echo, b"cold", Start::Cold).unwrap().output, b"cold");
    assert_eq!(d.stats().respawns, 0);
}

#[test]
fn a_runner_refuses_a_hand_crafted_artifact_and_the_host_serves_on() {
    let host = process_host();
    let rwx = Arc::new(SealedArtifact::create("rwx", &writable_text()).unwrap());
    match host.deploy("rwx", rwx, Duration::from_millis(100)) {
        Err(ProcessError::LoadFailed { message, .. }) => {
            assert!(message.contains("both writable and executable"), "{message}")
        }
        other => panic!("expected LoadFailed, got {other:?}"),
    }
    host.deploy("echo", sealed("echo"), Duration::from_millis(100)).unwrap();
    assert_eq!(host.invoke("echo", b"warm", StartMode::Warm).unwrap().output, b"warm");
    assert_eq!(host.invoke("echo", b"cold", StartMode::Cold).unwrap().output, b"cold");
}

/// What `/proc/PID/fd` holds: (fd number, link target, seals if a memfd).
fn fds_of(pid: u32) -> Vec<(i32, String, Option<i32>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        let seals = target.starts_with("/memfd:").then(|| {
            let file = std::fs::File::open(entry.path()).unwrap();
            // SAFETY: F_GET_SEALS on an fd we own reads only its state.
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GET_SEALS) }
        });
        out.push((fd, target, seals));
    }
    out
}

/// Pids of our `microfaas-runner` children.
fn runner_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("microfaas-runner") {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Once started, a worker holds stdio, its catalog socket, sealed artifact
/// memfds, its own image arena and its read-only pagemap only (its shared region's fd is closed
/// once mapped), and a runner that loaded its function holds stdio only:
/// no fd they keep is writable and mappable (the worker's image arena is
/// sealed against new writable mappings and writes: `F_SEAL_FUTURE_WRITE`,
/// see `tests/prelinked.rs`).
#[test]
fn started_workers_and_runners_keep_no_mappable_writable_fd() {
    let d = dispatcher();
    let echo = d.deploy(sealed("echo"), Duration::from_millis(100)).unwrap();
    let _stateful = d.deploy(sealed("stateful"), Duration::from_millis(100)).unwrap();
    assert_eq!(d.invoke(echo, b"x", Start::Cold).unwrap().output, b"x");
    let pid = d.stats().worker_pids[0];
    let fds = fds_of(pid);
    eprintln!("worker fds: {fds:?}");
    let mut artifacts = 0;
    let mut arenas = 0;
    let mut pagemaps = 0;
    for (fd, target, seals) in &fds {
        match fd {
            0..=2 => {}
            4 => assert!(target.starts_with("socket:"), "fd 4: {target}"),
            // Its page scan's pagemap (read-only; a proc file maps nothing).
            _ if *target == format!("/proc/{pid}/pagemap") => {
                let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())
                    .unwrap();
                assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY, "fd {fd}: {info}");
                pagemaps += 1;
            }
            _ if target.starts_with("/memfd:microfaas-images") => {
                assert_ne!(seals.unwrap() & libc::F_SEAL_FUTURE_WRITE, 0, "fd {fd}: {seals:?}");
                arenas += 1;
            }
            _ => {
                assert!(target.starts_with("/memfd:microfaas-artifact:"), "fd {fd}: {target}");
                assert_eq!(
                    seals.unwrap() & lang_isolation::runtime::REQUIRED_SEALS,
                    lang_isolation::runtime::REQUIRED_SEALS
                );
                artifacts += 1;
            }
        }
    }
    assert_eq!(artifacts, 2, "one memfd per deployed artifact: {fds:?}");
    assert_eq!(arenas, 1, "one image arena: {fds:?}");
    assert!(pagemaps <= 1, "at most one pagemap: {fds:?}");

    let host = process_host();
    host.deploy("stateful-fds", sealed("stateful"), Duration::from_millis(100))
        .unwrap();
    assert!(host.invoke("stateful-fds", b"", StartMode::Warm).is_ok());
    let pids = runner_pids();
    assert!(!pids.is_empty());
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue; // exited meanwhile (another test's cold runner)
        };
        if entries.count() == 0 {
            continue;
        }
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if state.is_empty() || !maps.contains("memfd:microfaas-artifact:") {
            continue; // not yet loaded (another test's runner starting)
        }
        let fds = fds_of(pid);
        assert!(
            fds.iter().all(|(fd, _, _)| (0..=2).contains(fd)),
            "runner {pid}: {fds:?}"
        );
    }
}

/// Kernel mappings (VMAs) of process `pid`.
fn mapping_count(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .count()
}

/// vm.max_map_count (65,530 by default) bounds how many functions a worker
/// can hold resident: each costs its image's mappings plus its instance's.
#[test]
fn mappings_per_resident_function_are_bounded() {
    let d = dispatcher();
    let warm_up = d.deploy(sealed("echo"), Duration::from_millis(100)).unwrap();
    assert_eq!(d.invoke(warm_up, b"x", Start::Cold).unwrap().output, b"x");
    let pid = d.stats().worker_pids[0];
    let before = mapping_count(pid);
    const N: usize = 50;
    for _ in 0..N {
        // Distinct memfds of the same bytes: distinct images.
        let f = d.deploy(sealed("echo"), Duration::from_millis(100)).unwrap();
        assert_eq!(d.invoke(f, b"y", Start::Warm).unwrap().output, b"y");
    }
    let per_function = (mapping_count(pid) - before) as f64 / N as f64;
    eprintln!("{per_function:.2} mappings per resident function ({before} before)");
    assert!(per_function <= 7.0, "{per_function}");
}
