//! Hostile tests: vm. The `vm-attacks` fixture runs arbitrary instructions
//! at CPL3 in the guest and tries to reach CPL0 or change what CPL0 runs:
//! stores to (and loads from) the fault stubs, IDT, GDT, TSS, fault stack,
//! fault register and every page-table page; stores into the runtime's and
//! its own code and read-only data; execution from its heap, stack, data,
//! read-only data and the I/O window; privileged instructions; returns to
//! the kernel code selector; `int n` through every vector; `syscall`; and
//! replies it forges itself pointing at supervisor pages or outside the I/O
//! window. Each must end as a typed error (a crash naming the vector, the
//! error code and CPL3 as where it happened, or a malformed reply), and the
//! same backend must then serve `echo` and the fixture itself correctly.
//! Controls: the same primitives on memory the function owns succeed (a
//! store to its heap, a call into its code, a forged reply inside the I/O
//! window), so each refusal is the protection's doing.

#[path = "../vm_common/mod.rs"]
pub(crate) mod vm_common;

use crate::common::attacker;
use microfaas::{Backend, Error, FunctionId, FunctionSpec, StartPath, StartRequest};
use std::sync::OnceLock;
use vmm::abi::{
    BOOT_INFO_ADDR, FAULT_MMIO_ADDR, FAULT_STUB_STRIDE, FAULT_STUBS_ADDR, KERNEL_DATA_ADDR, KERNEL_RODATA_ADDR,
    KERNEL_TEXT_ADDR, MAILBOX_ADDR, PAGE_BYTES, reply,
};
use vmm::layout::{
    FAULT_STACK_TOP, GDT_ADDR, IDT_ADDR, IMAGE_TABLES_ADDR, IMAGE_TABLES_END, Layout, LayoutConfig, PAGE_TABLES_ADDR,
    PAGE_TABLES_END, TSS_ADDR,
};

/// Page-fault error code bits.
const PF_PRESENT: u64 = 1;
const PF_WRITE: u64 = 2;
const PF_USER: u64 = 4;
const PF_FETCH: u64 = 0x10;

/// The fixture, built once per test process.
fn artifact() -> std::sync::Arc<microfaas::Artifact> {
    static BUILT: OnceLock<std::sync::Arc<microfaas::Artifact>> = OnceLock::new();
    BUILT.get_or_init(|| attacker("vm-attacks")).clone()
}

/// A backend with the fixture and `echo` deployed.
fn setup() -> Option<(Box<dyn Backend>, FunctionId, FunctionId)> {
    let b = vm_common::open_vm(vm_common::config())?;
    let attack = b.deploy(&FunctionSpec::new("vm-attacks", artifact())).unwrap();
    let echo = b
        .deploy(&FunctionSpec::new("echo", microfaas::builtin("echo").unwrap()))
        .unwrap();
    Some((b, attack, echo))
}

/// The layout the backend uses with the test configuration.
fn layout() -> Layout {
    let c = vm_common::config();
    let round = |v: usize| u64::try_from(v).unwrap();
    Layout::new(LayoutConfig {
        stack_bytes: round(c.stack_bytes),
        io_bytes: round(c.input_limit_bytes.max(c.output_limit_bytes)),
        image_bytes: 8 << 20,
        heap_bytes: round(c.heap_limit_bytes),
    })
    .unwrap()
}

/// A guest fault as the `Crashed` detail reports it.
#[derive(Debug)]
struct Fault {
    vector: u64,
    error_code: u64,
    address: Option<u64>,
    detail: String,
}

fn hex_after(detail: &str, key: &str) -> Option<u64> {
    let rest = &detail[detail.find(key)? + key.len()..];
    let word = rest.split([',', ';', ' ']).next()?;
    u64::from_str_radix(word.trim_start_matches("0x"), 16).ok()
}

/// The fault `result` must be: a crash of the guest at CPL3.
fn fault(command: &str, result: Result<microfaas::Invocation, Error>) -> Fault {
    match result {
        Err(Error::Crashed { detail, .. }) => {
            assert!(
                detail.contains("at CPL3"),
                "{command}: the fault must be taken at CPL3: {detail}"
            );
            let vector = detail
                .strip_prefix("guest exception ")
                .and_then(|r| r.split(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{command}: not a guest exception: {detail}"));
            Fault {
                vector,
                error_code: hex_after(&detail, "error code ").unwrap_or(0),
                address: hex_after(&detail, "address "),
                detail,
            }
        }
        other => panic!("{command}: expected a guest crash, got {other:?}"),
    }
}

/// After an attack: the same backend serves `echo`, and the attacker's own
/// harmless request.
fn still_serves(b: &dyn Backend, attack: &FunctionId, echo: &FunctionId) {
    assert_eq!(
        b.invoke(echo, b"still here", StartRequest::Auto).unwrap().output,
        b"still here"
    );
    assert_eq!(b.invoke(attack, b"ok", StartRequest::Auto).unwrap().output, b"ok");
}

fn run(b: &dyn Backend, attack: &FunctionId, command: &str) -> Result<microfaas::Invocation, Error> {
    b.invoke(attack, command.as_bytes(), StartRequest::Auto)
}

/// A page fault at `addr` with exactly `error_code`.
fn assert_page_fault(b: &dyn Backend, attack: &FunctionId, command: &str, addr: u64, error_code: u64) {
    let f = fault(command, run(b, attack, command));
    assert_eq!(f.vector, 14, "{command}: {}", f.detail);
    assert_eq!(f.error_code, error_code, "{command}: {}", f.detail);
    assert_eq!(f.address, Some(addr), "{command}: {}", f.detail);
}

#[test]
fn cpl0_structures_are_out_of_reach() {
    let Some((b, attack, echo)) = setup() else { return };
    let b = b.as_ref();
    // Control: the same store and load on the function's own memory work.
    let heap_addr = layout().heap_addr + (1 << 20);
    assert_eq!(
        run(b, &attack, &format!("write {heap_addr:x}")).unwrap().output,
        b"wrote"
    );
    let log_area = MAILBOX_ADDR + 0x800;
    assert_eq!(
        run(b, &attack, &format!("write {log_area:x}")).unwrap().output,
        b"wrote"
    );

    // Supervisor-only pages: present, but a user access faults.
    let supervisor = [
        ("the #PF fault stub", FAULT_STUBS_ADDR + 14 * FAULT_STUB_STRIDE),
        ("the first fault stub", FAULT_STUBS_ADDR),
        ("the IDT", IDT_ADDR),
        ("the #PF gate", IDT_ADDR + 14 * 16),
        ("the GDT", GDT_ADDR),
        ("the TSS (RSP0)", TSS_ADDR + 4),
        ("the fault stack", FAULT_STACK_TOP - 8),
        ("the fault register", FAULT_MMIO_ADDR),
    ];
    for (what, addr) in supervisor {
        eprintln!("write/read {what} at {addr:#x}");
        assert_page_fault(
            b,
            &attack,
            &format!("write {addr:x}"),
            addr,
            PF_PRESENT | PF_WRITE | PF_USER,
        );
        assert_page_fault(b, &attack, &format!("read {addr:x}"), addr, PF_PRESENT | PF_USER);
    }
    // The page tables (boot and image) are not mapped at all: a store to any
    // entry (e.g. to set the U bit of the stub page) finds nothing there.
    let tables = (PAGE_TABLES_ADDR..PAGE_TABLES_END)
        .step_by(usize::try_from(PAGE_BYTES).unwrap())
        .chain([IMAGE_TABLES_ADDR, IMAGE_TABLES_END - 8]);
    for addr in tables {
        assert_page_fault(b, &attack, &format!("write {addr:x}"), addr, PF_WRITE | PF_USER);
        assert_page_fault(b, &attack, &format!("read {addr:x}"), addr, PF_USER);
    }
    // The boot info is user read-only.
    assert_page_fault(
        b,
        &attack,
        &format!("write {BOOT_INFO_ADDR:x}"),
        BOOT_INFO_ADDR,
        PF_PRESENT | PF_WRITE | PF_USER,
    );
    still_serves(b, &attack, &echo);
}

#[test]
fn kernel_and_function_images_are_w_xor_x() {
    let Some((b, attack, echo)) = setup() else { return };
    let b = b.as_ref();
    // Controls: its own code runs, its own data is writable.
    assert_eq!(run(b, &attack, "exec-text").unwrap().output, b"returned");
    assert_eq!(run(b, &attack, "write-data").unwrap().output, b"wrote");

    let write = PF_PRESENT | PF_WRITE | PF_USER;
    for command in ["write-code", "write-relro", "write-rodata", "write-kernel-code"] {
        let f = fault(command, run(b, &attack, command));
        assert_eq!((f.vector, f.error_code), (14, write), "{command}: {}", f.detail);
    }
    for addr in [KERNEL_TEXT_ADDR, KERNEL_TEXT_ADDR + 0x1000, KERNEL_RODATA_ADDR] {
        assert_page_fault(b, &attack, &format!("write {addr:x}"), addr, write);
    }
    // Data is never executable: NX faults (present, user, instruction fetch).
    let fetch = PF_PRESENT | PF_USER | PF_FETCH;
    for command in ["exec-heap", "exec-stack", "exec-data", "exec-rodata", "exec-input"] {
        let f = fault(command, run(b, &attack, command));
        assert_eq!((f.vector, f.error_code), (14, fetch), "{command}: {}", f.detail);
    }
    for addr in [
        KERNEL_RODATA_ADDR,
        KERNEL_DATA_ADDR,
        MAILBOX_ADDR,
        layout().stack_top - 64,
    ] {
        assert_page_fault(b, &attack, &format!("exec {addr:x}"), addr, fetch);
    }
    // The fault stubs are not user-executable either.
    assert_page_fault(
        b,
        &attack,
        &format!("exec {FAULT_STUBS_ADDR:x}"),
        FAULT_STUBS_ADDR,
        fetch,
    );
    still_serves(b, &attack, &echo);
}

#[test]
fn images_loaded_on_cold_and_base_starts_are_w_xor_x_too() {
    // These instances loaded the image themselves (no snapshot in between):
    // their translations must already have the final rights.
    let Some((b, attack, echo)) = setup() else { return };
    let b = b.as_ref();
    for path in [StartPath::Cold, StartPath::Base] {
        for (command, error_code) in [
            ("write-code", PF_PRESENT | PF_WRITE | PF_USER),
            ("write-relro", PF_PRESENT | PF_WRITE | PF_USER),
            ("exec-data", PF_PRESENT | PF_USER | PF_FETCH),
            ("exec-heap", PF_PRESENT | PF_USER | PF_FETCH),
        ] {
            let f = fault(
                command,
                b.invoke(&attack, command.as_bytes(), StartRequest::Force(path)),
            );
            assert_eq!(
                (f.vector, f.error_code),
                (14, error_code),
                "{path} {command}: {}",
                f.detail
            );
        }
        let ok = b.invoke(&attack, b"ok", StartRequest::Force(path)).unwrap();
        assert_eq!((ok.output.as_slice(), ok.start), (&b"ok"[..], path));
    }
    still_serves(b, &attack, &echo);
}

#[test]
fn privileged_instructions_and_returns_to_cpl0_fault() {
    let Some((b, attack, echo)) = setup() else { return };
    let b = b.as_ref();
    let general_protection = [
        "lidt",
        "lgdt",
        "ltr",
        "lldt",
        "mov-cr0",
        "read-cr0",
        "mov-cr3",
        "mov-cr4",
        "mov-dr7",
        "wrmsr",
        "rdmsr",
        "xsetbv",
        "invlpg",
        "wbinvd",
        "clts",
        "cli",
        "sti",
        "swapgs",
        "sysexit",
        "rdpmc",
        "mov-ss-kernel",
    ];
    for name in general_protection {
        let command = format!("priv {name}");
        let f = fault(&command, run(b, &attack, &command));
        assert_eq!(f.vector, 13, "{command}: {}", f.detail);
    }
    // Port I/O: a #GP here (no I/O bitmap), or an exit the host refuses.
    for name in ["in", "out"] {
        let command = format!("priv {name}");
        match run(b, &attack, &command) {
            Err(Error::Crashed { detail, .. }) => {
                assert!(
                    detail.contains("exception 13") || detail.contains("port I/O"),
                    "{command}: {detail}"
                )
            }
            other => panic!("{command}: expected a crash, got {other:?}"),
        }
    }
    // `sysret` without EFER.SCE is #UD (or #GP).
    let f = fault("priv sysret", run(b, &attack, "priv sysret"));
    assert!(matches!(f.vector, 6 | 13), "{}", f.detail);
    // `hlt` at CPL3: a #GP, or (this host's PVM) a shutdown the host reports.
    match run(b, &attack, "priv hlt") {
        Err(Error::Crashed { detail, .. }) => {
            eprintln!("hlt: {detail}");
            assert!(
                detail.contains("exception 13") || detail.contains("triple fault"),
                "{detail}"
            );
        }
        other => panic!("priv hlt: expected a crash, got {other:?}"),
    }
    // Returns to the kernel code selector: #GP naming the selector.
    for command in ["iretq-cpl0", "lret-cpl0"] {
        let f = fault(command, run(b, &attack, command));
        assert_eq!((f.vector, f.error_code), (13, 0x08), "{command}: {}", f.detail);
    }
    still_serves(b, &attack, &echo);
}

#[test]
fn software_interrupts_through_every_vector_and_syscall_fault() {
    let Some((b, attack, echo)) = setup() else { return };
    let b = b.as_ref();
    // Every gate is DPL0, and vectors past 31 lie beyond the IDT limit:
    // `int n` from CPL3 is a #GP whose error code names the IDT entry (this
    // host's PVM raises #UD or #GP(0) instead, or delivers vector n to our
    // own stub for it, which reports it and stops). Either way the fault names the
    // `int` in the function's code, at CPL3, and only our stub ran.
    let image = layout().image_addr..layout().image_addr + layout().image_bytes;
    let mut outcomes = std::collections::BTreeMap::<(u64, bool), Vec<u64>>::new();
    for n in 0..=255u64 {
        let command = format!("int {n}");
        let r = run(b, &attack, &command);
        // This host's PVM lets one vector (26) return to the next
        // instruction with no effect: still at CPL3, and no CPL0 entry (any
        // gate, LSTAR or SYSENTER_EIP lands in a stub that reports or on an
        // unmapped page that faults).
        if let Ok(inv) = &r {
            assert_eq!(inv.output, format!("int {n} returned at CPL3").as_bytes(), "{command}");
            outcomes.entry((u64::MAX, false)).or_default().push(n);
            continue;
        }
        let f = fault(&command, r);
        let gp = (f.vector, f.error_code) == (13, (n << 3) | 2);
        assert!(
            matches!(f.vector, 6 | 13) || (f.vector == n && n < 32),
            "{command}: {}",
            f.detail
        );
        let rip = hex_after(&f.detail, "rip ").unwrap();
        assert!(
            image.contains(&rip),
            "{command}: faulted outside the function: {}",
            f.detail
        );
        outcomes.entry((f.vector, gp)).or_default().push(n);
    }
    eprintln!("int n outcomes ((vector or MAX = returned at CPL3, #GP naming the gate): vectors): {outcomes:?}");
    let returned = outcomes.get(&(u64::MAX, false)).map_or(0, Vec::len);
    assert!(returned <= 1, "more than one `int n` returned: {outcomes:?}");
    let f = fault("int3", run(b, &attack, "int3"));
    assert!(matches!(f.vector, 3 | 6 | 13), "{}", f.detail);
    let f = fault("into", run(b, &attack, "into"));
    assert_eq!(f.vector, 6, "`into` is invalid in 64-bit mode: {}", f.detail);
    // `int1` is delivered like a hardware #DB (no gate DPL check): to our
    // own stub, which reports it (or #UD here).
    let f = fault("int1", run(b, &attack, "int1"));
    assert!(matches!(f.vector, 1 | 6), "{}", f.detail);
    // `syscall`: #UD (EFER.SCE clear), or on this host's PVM a jump to
    // LSTAR (0: the unmapped null page) still at CPL3.
    let f = fault("syscall", run(b, &attack, "syscall"));
    eprintln!("syscall: {}", f.detail);
    assert!(
        f.vector == 6 || (f.vector == 14 && f.address == Some(0) && f.error_code == PF_USER | PF_FETCH),
        "{}",
        f.detail
    );
    // `sysenter`: no SYSENTER_CS, #GP (or #UD).
    let f = fault("sysenter", run(b, &attack, "sysenter"));
    eprintln!("sysenter: {}", f.detail);
    assert!(matches!(f.vector, 6 | 13), "{}", f.detail);
    still_serves(b, &attack, &echo);
}

#[test]
fn forged_replies_outside_the_io_window_are_refused() {
    let Some((b, attack, echo)) = setup() else { return };
    let b = b.as_ref();
    let l = layout();
    // Control: a reply the function forges itself, inside the I/O window,
    // is taken like the runtime's (so the refusals below are the window
    // check's doing).
    assert_eq!(run(b, &attack, "forge-window").unwrap().output, b"forged!");
    // That instance is still the function's (and resumes inside it on its
    // next request): drop it.
    b.evict(&attack).unwrap();

    let targets = [
        ("the page tables", PAGE_TABLES_ADDR, PAGE_BYTES),
        ("the image page tables", IMAGE_TABLES_ADDR, PAGE_BYTES),
        ("the IDT", IDT_ADDR, 512),
        ("the GDT and TSS", GDT_ADDR, PAGE_BYTES),
        ("the fault stack", FAULT_STACK_TOP - 56, 56),
        ("the fault stubs", FAULT_STUBS_ADDR, 512),
        ("the kernel", KERNEL_TEXT_ADDR, 4096),
        ("the mailbox", MAILBOX_ADDR, 64),
        ("the stack", l.stack_top - 4096, 4096),
        ("the heap", l.heap_addr, 64),
        ("the image", l.image_addr, 64),
        ("across the window's end", l.io_addr + l.io_bytes - 8, 16),
        ("just below the window", l.io_addr - 8, 16),
        ("past guest memory", l.mem_bytes, 8),
        ("a wrapping range", u64::MAX - 7, 16),
    ];
    for status in [reply::OK, reply::PANICKED, reply::FUNCTION_ERROR] {
        for (what, addr, len) in targets {
            let command = format!("forge {status:x} {addr:x} {len:x}");
            match run(b, &attack, &command) {
                Err(Error::MalformedReply { detail, .. }) => {
                    assert!(detail.contains("outside the I/O window"), "{what}: {detail}")
                }
                other => panic!("{what} (status {status}): expected MalformedReply, got {other:?}"),
            }
        }
    }
    still_serves(b, &attack, &echo);
}

#[test]
fn every_artifact_is_mapped_w_xor_x() {
    // The mapping the host writes for each example function and for the
    // attacker (no KVM needed): every loaded page is user, readable, and
    // writable or executable but never both; code is executable.
    let l = layout();
    let mut artifacts: Vec<(String, Vec<u8>)> = [
        "noop",
        "echo",
        "sha512",
        "init-heavy",
        "checkpointed",
        "spin",
        "panics",
        "alloc-hog",
        "stack-overflow",
        "init-fails",
    ]
    .iter()
    .map(|n| (n.to_string(), microfaas::builtin(n).unwrap().bytes().to_vec()))
    .collect();
    artifacts.push(("vm-attacks".into(), artifact().bytes().to_vec()));
    for (name, bytes) in artifacts {
        let image = vmm::image::prepare(&bytes, &l).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!image.regions.is_empty(), "{name}");
        for r in &image.regions {
            assert!(r.access.user, "{name}: {r:?}");
            assert!(!(r.access.write && r.access.exec), "{name}: W+X {r:?}");
            assert!(
                r.start >= l.image_addr && r.start + r.len <= l.image_addr + l.image_bytes,
                "{name}: {r:?}"
            );
        }
        let exec = |addr: u64| {
            image
                .regions
                .iter()
                .any(|r| r.access.exec && (r.start..r.start + r.len).contains(&addr))
        };
        assert!(
            exec(image.entry.init_addr) && exec(image.entry.handle_addr),
            "{name}: entry points not executable"
        );
        assert!(
            image.regions.iter().any(|r| !r.access.write && !r.access.exec),
            "{name}: no read-only pages"
        );
        let (tables, pdes) = vmm::image::mapping(&image, &l).unwrap();
        assert_eq!(pdes.len(), usize::try_from(l.image_bytes >> 21).unwrap(), "{name}");
        assert!(
            tables.pages.len() <= 2,
            "{name}: {} image page tables",
            tables.pages.len()
        );
    }
}

#[test]
fn the_host_maps_an_image_only_into_a_fresh_guest() {
    // Rewriting the page tables of a guest that already ran code would
    // leave translations stale: the VMM refuses a second load (before
    // writing anything), and the guest keeps serving its function.
    let Some(vmm) = vm_common::open_vmm() else { return };
    let deadline = || std::time::Instant::now() + std::time::Duration::from_secs(10);
    let echo = microfaas::builtin("echo").unwrap();
    let (mut instance, _) = vmm::Instance::boot(&vmm, &vmm::InstanceConfig::default()).unwrap();
    assert_eq!(instance.load(echo.bytes(), deadline()).unwrap().status, vmm::Status::Ok);
    assert!(matches!(
        instance.load(artifact().bytes(), deadline()),
        Err(vmm::RunError::AlreadyLoaded)
    ));
    assert_eq!(instance.invoke(b"same echo", deadline()).unwrap().data, b"same echo");
}
