//! Every failure of a `vm` guest gives the trait's typed error, the broken
//! instance is discarded, and the backend keeps serving: guest exceptions
//! (with vector, error code and RIP), panics, heap exhaustion, stack
//! overflow (guard-page #PF), a guest that never answers (host watchdog).

mod vm_common;

use microfaas::{Artifact, Backend, Error, ErrorKind, FunctionSpec, StartPath, StartRequest};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn serves(b: &dyn Backend) {
    let echo = b
        .deploy(&FunctionSpec::new("echo", microfaas::builtin("echo").unwrap()))
        .unwrap();
    assert_eq!(
        b.invoke(&echo, b"still here", StartRequest::Auto).unwrap().output,
        b"still here"
    );
}

fn discarded(b: &dyn Backend) -> u64 {
    b.stats().counter("instances_discarded").unwrap_or(0)
}

#[test]
fn panics_oom_and_stack_overflow_are_typed() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let b = b.as_ref();

    let panics = b
        .deploy(&FunctionSpec::new("panics", microfaas::builtin("panics").unwrap()))
        .unwrap();
    let before = discarded(b);
    match b.invoke(&panics, b"abcd", StartRequest::Auto) {
        Err(Error::Panicked { message, .. }) => {
            assert!(message.contains("deliberate panic"), "{message}")
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(discarded(b), before + 1, "a panicked instance is never reused");
    serves(b);

    let hog = b
        .deploy(&FunctionSpec::new(
            "alloc-hog",
            microfaas::builtin("alloc-hog").unwrap(),
        ))
        .unwrap();
    match b.invoke(&hog, b"", StartRequest::Auto) {
        Err(Error::OutOfMemory { limit_bytes, .. }) => assert_eq!(limit_bytes, 32 << 20),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    serves(b);

    let deep = b
        .deploy(&FunctionSpec::new(
            "stack-overflow",
            microfaas::builtin("stack-overflow").unwrap(),
        ))
        .unwrap();
    for _ in 0..2 {
        match b.invoke(&deep, b"x", StartRequest::Auto) {
            Err(Error::StackOverflow { stack_bytes, .. }) => assert_eq!(stack_bytes, 1 << 20),
            other => panic!("expected StackOverflow, got {other:?}"),
        }
    }
    serves(b);
}

#[test]
fn runaway_guest_is_stopped_by_the_watchdog() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let b = b.as_ref();
    let budget = Duration::from_millis(100);
    let spin = b
        .deploy(&FunctionSpec::new("spin", microfaas::builtin("spin").unwrap()).with_budget(budget))
        .unwrap();
    for start in [StartRequest::Auto, StartRequest::Force(StartPath::Cold)] {
        let t = Instant::now();
        let e = b.invoke(&spin, b"", start).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BudgetExceeded, "{e}");
        // Cold adds the boot; either way it stops promptly after the budget.
        assert!(
            t.elapsed() < budget + Duration::from_millis(200),
            "stopped after {:?}",
            t.elapsed()
        );
    }
    serves(b);
    // The function still works the same way afterwards (fresh instances).
    assert_eq!(
        b.invoke(&spin, b"", StartRequest::Auto).unwrap_err().kind(),
        ErrorKind::BudgetExceeded
    );
}

/// Finds the file offset of a defined dynamic symbol (test-only ELF walk).
fn symbol_offset(elf: &[u8], name: &str) -> usize {
    let u16_at = |o: usize| usize::from(u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()));
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| usize::try_from(u64::from_le_bytes(elf[o..o + 8].try_into().unwrap())).unwrap();
    let (shoff, shnum) = (u64_at(40), u16_at(60));
    let sh = |i: usize| shoff + i * 64;
    let dynsym = (0..shnum).find(|&i| u32_at(sh(i) + 4) == 11).expect(".dynsym");
    let (symoff, symsize, link) = (
        u64_at(sh(dynsym) + 24),
        u64_at(sh(dynsym) + 32),
        u32_at(sh(dynsym) + 40),
    );
    let stroff = u64_at(sh(link) + 24);
    let vaddr = (0..symsize / 24)
        .map(|i| symoff + i * 24)
        .find(|&s| {
            let n = stroff + u32_at(s);
            elf[n..].split(|&c| c == 0).next() == Some(name.as_bytes())
        })
        .map(|s| u64_at(s + 8))
        .expect("symbol");
    // vaddr -> file offset through the PT_LOAD that holds it.
    let (phoff, phnum) = (u64_at(32), u16_at(56));
    (0..phnum)
        .map(|i| phoff + i * 56)
        .filter(|&p| u32_at(p) == 1)
        .find_map(|p| {
            let (off, va, filesz) = (u64_at(p + 8), u64_at(p + 16), u64_at(p + 32));
            (vaddr >= va && vaddr < va + filesz).then(|| vaddr - va + off)
        })
        .expect("symbol in a PT_LOAD")
}

/// `echo` with the first bytes of its handle entry replaced by `code`.
fn patched_echo(code: &[u8]) -> Arc<Artifact> {
    let echo = microfaas::builtin("echo").unwrap();
    let mut bytes = echo.bytes().to_vec();
    let at = symbol_offset(&bytes, "microfaas_v1_handle");
    bytes[at..at + code.len()].copy_from_slice(code);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("patched.so");
    std::fs::write(&path, &bytes).unwrap();
    let artifact = Arc::new(Artifact::load(&path).expect("still a valid artifact"));
    std::mem::forget(dir); // keep the file for the artifact's path
    artifact
}

#[test]
fn guest_exceptions_report_vector_error_code_and_rip() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let b = b.as_ref();
    // ud2 -> #UD (vector 6); a write to address 0 -> #PF (14) at 0, not a
    // stack overflow; int3 -> #BP (3), reported after the instruction.
    let cases: [(&str, &[u8], &str); 3] = [
        ("ud2", &[0x0f, 0x0b], "guest exception 6 (#UD invalid opcode)"),
        (
            "null-write",
            &[0x48, 0xc7, 0x04, 0x25, 0, 0, 0, 0, 1, 0, 0, 0],
            "guest exception 14 (#PF page fault), error code 0x6",
        ),
        ("int3", &[0xcc], "guest exception 3 (#BP breakpoint)"),
    ];
    for (name, code, expect) in cases {
        let id = b.deploy(&FunctionSpec::new(name, patched_echo(code))).unwrap();
        match b.invoke(&id, b"boom", StartRequest::Auto) {
            Err(Error::Crashed { detail, .. }) => {
                eprintln!("{name}: {detail}");
                assert!(detail.contains(expect), "{name}: {detail}");
                assert!(detail.contains("rip 0x"), "{name}: {detail}");
            }
            other => panic!("{name}: expected Crashed, got {other:?}"),
        }
    }
    serves(b);
}

#[test]
fn unsupported_start_paths_are_refused() {
    let Some(b) = vm_common::open_vm(vm_common::config()) else {
        return;
    };
    let echo = b
        .deploy(&FunctionSpec::new("echo", microfaas::builtin("echo").unwrap()))
        .unwrap();
    // `warm` is another backend's path; `argument` needs a function that
    // calls `checkpoint()` (echo does not).
    for path in [StartPath::Warm, StartPath::Argument] {
        let e = b.invoke(&echo, b"x", StartRequest::Force(path)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedStart, "{path}: {e}");
    }
    for path in [StartPath::Base, StartPath::Function] {
        let r = b.invoke(&echo, b"x", StartRequest::Force(path)).unwrap();
        assert_eq!((r.output.as_slice(), r.start), (&b"x"[..], path));
    }
}
