//! Catching faults and preempting a function running on its own stack.
//!
//! While [`super::Instance`] runs an entry call on its [`super::GuardedStack`]
//! it publishes an [`ActiveCall`] in a thread-local. The SIGSEGV/SIGBUS
//! handler (on a `sigaltstack`) checks that the interrupted stack pointer is
//! on that stack, classifies the fault (address in the guard = stack
//! overflow) and redirects the interrupted context, through corosensei's trap
//! handler, so that the call returns to the runtime instead of continuing.
//! [`preempt_from_signal`] does the same for a timer or watchdog signal.
//! Faults that are not ours go to the previously installed handler.
//!
//! Handlers touch only the thread-local, atomics and the interrupted context.

use corosensei::trap::CoroutineTrapHandler;
use std::cell::Cell;
use std::ffi::c_void;
use std::ops::Range;
use std::ptr;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

/// How an entry call running on the function stack ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// The entry function returned.
    Returned,
    /// The function called `fail` (details in the context).
    Failed,
    /// A fault in the stack's guard region.
    StackOverflow,
    /// Another fault while on the function stack.
    Fault {
        /// SIGSEGV or SIGBUS.
        signal: i32,
        /// The faulting address.
        addr: usize,
    },
    /// Stopped by [`preempt_from_signal`] (or a host service noticing a
    /// deferred preemption).
    Preempted,
    /// A memory-protection-key fault (`SEGV_PKUERR`): the function touched
    /// memory of another key (another instance's, or the runtime's).
    KeyViolation {
        /// The faulting address.
        addr: usize,
        /// The key of the page it touched.
        key: u32,
    },
}

/// How the signal handlers leave the entry call in progress.
pub(crate) enum CallTrap {
    /// A corosensei coroutine (no protection keys).
    Coroutine(CoroutineTrapHandler<Exit>),
    /// The protection-key gate (`super::pkeys`): the context resumes at the
    /// gate's bail path; `exit` records why.
    Gate {
        /// The function stack, guard included.
        stack: Range<usize>,
        /// Set by the handler that redirected the call.
        exit: Cell<Option<Exit>>,
    },
}

impl CallTrap {
    fn stack_ptr_in_bounds(&self, rsp: usize) -> bool {
        match self {
            Self::Coroutine(trap) => trap.stack_ptr_in_bounds(rsp),
            Self::Gate { stack, .. } => stack.contains(&rsp),
        }
    }
}

/// What the signal handlers need to know about the entry call in progress.
pub(crate) struct ActiveCall {
    pub trap: CallTrap,
    pub guard: Range<usize>,
    /// Set while a host service runs on the function stack: a preemption is
    /// deferred to its end; a fault then may have left host state torn.
    pub in_host: *const AtomicBool,
    /// A preemption asked for while `in_host` was set.
    pub preempt_pending: *const AtomicBool,
    /// Set when a trap hit while `in_host` was set.
    pub torn: *const AtomicBool,
}

thread_local! {
    static ACTIVE: Cell<*const ActiveCall> = const { Cell::new(ptr::null()) };
}

/// Publishes `call` for this thread's handlers until the guard drops.
pub(crate) fn activate(call: &ActiveCall) -> ActiveGuard {
    ACTIVE.with(|a| a.set(call));
    ActiveGuard(())
}

/// Clears the thread's active call on drop.
pub(crate) struct ActiveGuard(());

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(ptr::null()));
    }
}

const REG_RSP: usize = 15;
const REG_RIP: usize = 16;
const REG_RBP: usize = 10;
const REG_RDI: usize = 8;
const REG_RSI: usize = 9;
const _: () = assert!(
    libc::REG_RSP == 15 && libc::REG_RIP == 16 && libc::REG_RBP == 10 && libc::REG_RDI == 8 && libc::REG_RSI == 9
);

static PREV_SEGV: AtomicPtr<libc::sigaction> = AtomicPtr::new(ptr::null_mut());
static PREV_BUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(ptr::null_mut());
static INSTALL: Once = Once::new();

/// Size of the alternate signal stack the runtime installs on a thread that
/// has none.
const ALT_STACK_BYTES: usize = 64 << 10;

thread_local! {
    static ALT_STACK_READY: Cell<bool> = const { Cell::new(false) };
}

/// Installs the process-wide SIGSEGV/SIGBUS handlers (once) and makes sure
/// the calling thread has an alternate signal stack.
pub(crate) fn prepare_thread() -> std::io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = install(libc::SIGSEGV, &PREV_SEGV).and_then(|()| install(libc::SIGBUS, &PREV_BUS));
    });
    result?;
    if ALT_STACK_READY.with(Cell::get) {
        return Ok(());
    }
    let mut old = std::mem::MaybeUninit::<libc::stack_t>::zeroed();
    // SAFETY: querying only; `old` is writable.
    if unsafe { libc::sigaltstack(ptr::null(), old.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and filled by the kernel.
    let old = unsafe { old.assume_init() };
    if old.ss_flags & libc::SS_DISABLE != 0 || old.ss_size < ALT_STACK_BYTES / 2 {
        // Leaked on purpose: a thread's signal stack must outlive every
        // signal it may take, i.e. the thread.
        let mapping = super::mmap::Mapping::anonymous(ALT_STACK_BYTES, libc::PROT_READ | libc::PROT_WRITE)?;
        let stack = libc::stack_t {
            ss_sp: mapping.start().cast(),
            ss_flags: 0,
            ss_size: mapping.len(),
        };
        // SAFETY: `stack` describes a live read-write mapping that is never
        // unmapped (leaked below).
        if unsafe { libc::sigaltstack(&stack, ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::mem::forget(mapping);
    }
    ALT_STACK_READY.with(|r| r.set(true));
    Ok(())
}

fn install(signal: libc::c_int, prev_slot: &AtomicPtr<libc::sigaction>) -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_fault as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `action.sa_mask` is a valid sigset to initialise.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    let prev = Box::into_raw(Box::new(
        // SAFETY: as above.
        unsafe { std::mem::zeroed::<libc::sigaction>() },
    ));
    // SAFETY: `action` is fully initialised and `on_fault` has the SA_SIGINFO
    // signature; `prev` is a valid, leaked sigaction to write the old one to.
    if unsafe { libc::sigaction(signal, &action, prev) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    prev_slot.store(prev, Ordering::Release);
    Ok(())
}

/// `si_code` of a write to a page mapped without write permission.
const SEGV_ACCERR: i32 = 2;
/// `si_code` of a protection-key fault.
const SEGV_PKUERR: i32 = 4;
/// Offset of `si_pkey` in the kernel's `siginfo_t` on x86-64: the
/// `_sigfault` union member at 16 holds `si_addr` (8 bytes), `si_addr_lsb`
/// (2, padded to 8), then the union holding `_pkey`.
const SI_PKEY_OFFSET: usize = 32;

extern "C" fn on_fault(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // The kernel runs handlers with its default PKRU (key 0 only): open the
    // instance's keys before reading its state (sigreturn restores the
    // interrupted PKRU; a redirected call resumes in the gate, which sets
    // its own).
    super::pkeys::open_all_keys();
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr().addr()) };
    if code <= 0 {
        // Sent by kill/tgkill/sigqueue, not raised by a faulting access: not
        // the function's fault. Take the default action (termination): the
        // signal is blocked while we run and is delivered when we return.
        reset_default(signal);
        // SAFETY: raise is async-signal-safe.
        unsafe { libc::raise(signal) };
        return;
    }
    if signal == libc::SIGSEGV && code == SEGV_ACCERR && super::watch::on_write_fault(addr) {
        // A write to a watched (read-only) range, now writable again: the
        // write runs again when we return. Whoever wrote (function or host
        // service), nothing ends.
        return;
    }
    // SAFETY: `context` is this signal's ucontext, as the handler contract
    // requires.
    let handled = unsafe {
        redirect(context, |active| {
            if active.guard.contains(&addr) {
                Exit::StackOverflow
            } else if signal == libc::SIGSEGV && code == SEGV_PKUERR {
                // For SEGV_PKUERR the kernel fills `_pkey` (the enclosing
                // unsafe block's SAFETY: the siginfo is 128 bytes, so the
                // u32 at offset 32 is inside it).
                let key = info.cast::<u8>().add(SI_PKEY_OFFSET).cast::<u32>().read_unaligned();
                Exit::KeyViolation { addr, key }
            } else {
                Exit::Fault { signal, addr }
            }
        })
    };
    if handled != Redirect::Done {
        // SAFETY: forwarding this signal's own arguments.
        unsafe { chain(signal, info, context) }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Redirect {
    /// No call active on this thread, or the context is not on its stack.
    NotOurs,
    /// A host service is running: the caller decides.
    InHost,
    /// The context now returns `exit` to the runtime.
    Done,
}

/// Redirects the interrupted `context` so that the active call ends with
/// `exit(active)`. Faults inside a host service are redirected too (the call
/// is marked torn); see [`preempt_from_signal`] for preemption.
///
/// # Safety
/// Only from a signal handler on the thread that took the signal, with that
/// signal's ucontext.
unsafe fn redirect(context: *mut c_void, exit: impl FnOnce(&ActiveCall) -> Exit) -> Redirect {
    // Every handler comes here before it reads an instance's (keyed)
    // context; the kernel ran it with key 0 only (sigreturn restores the
    // interrupted PKRU).
    super::pkeys::open_all_keys();
    let active = ACTIVE.with(Cell::get);
    if active.is_null() || context.is_null() {
        return Redirect::NotOurs;
    }
    // SAFETY: ACTIVE points at the live ActiveCall of the call in progress on
    // this thread (set by `activate`, cleared before it goes away).
    let active = unsafe { &*active };
    let uc = context.cast::<libc::ucontext_t>();
    // SAFETY: `uc` is this signal's ucontext (caller contract).
    let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
    let rsp = u64::from_ne_bytes(gregs[REG_RSP].to_ne_bytes());
    let Ok(rsp) = usize::try_from(rsp) else {
        return Redirect::NotOurs;
    };
    if !active.trap.stack_ptr_in_bounds(rsp) {
        return Redirect::NotOurs;
    }
    let exit = exit(active);
    // SAFETY: the pointers in ActiveCall point into the live Context.
    if unsafe { &*active.in_host }.load(Ordering::Relaxed) {
        if exit == Exit::Preempted {
            // SAFETY: as above.
            unsafe { &*active.preempt_pending }.store(true, Ordering::Relaxed);
            return Redirect::InHost;
        }
        // SAFETY: as above.
        unsafe { &*active.torn }.store(true, Ordering::Relaxed);
    }
    let trap = match &active.trap {
        CallTrap::Gate { exit: slot, .. } => {
            // Resume at the gate's bail path, which writes PKRU 0 and takes
            // the runtime's stack from its own static: nothing else of the
            // interrupted context matters.
            slot.set(Some(exit));
            let bail = u64::try_from(super::pkeys::bail_address()).unwrap_or(0);
            gregs[REG_RIP] = i64::from_ne_bytes(bail.to_ne_bytes());
            return Redirect::Done;
        }
        CallTrap::Coroutine(trap) => trap,
    };
    // SAFETY: the interrupted stack pointer is on the coroutine's stack
    // (checked above); the function reaches the world outside its stack only
    // through calls corosensei cannot see into (the FFI boundary), and we
    // update exactly the registers the returned TrapHandlerRegs name.
    let regs = unsafe { trap.setup_trap_handler(move || exit) };
    let set = |v: u64| i64::from_ne_bytes(v.to_ne_bytes());
    gregs[REG_RIP] = set(regs.rip);
    gregs[REG_RSP] = set(regs.rsp);
    gregs[REG_RBP] = set(regs.rbp);
    gregs[REG_RDI] = set(regs.rdi);
    gregs[REG_RSI] = set(regs.rsi);
    Redirect::Done
}

/// Hands a fault that is not ours to the handler installed before ours.
///
/// # Safety
/// Only from `on_fault`, with its arguments.
unsafe fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let slot = if signal == libc::SIGBUS { &PREV_BUS } else { &PREV_SEGV };
    let prev = slot.load(Ordering::Acquire);
    // SAFETY: `prev` is null or the leaked sigaction saved by `install`.
    let Some(prev) = (unsafe { prev.as_ref() }) else {
        reset_default(signal);
        return;
    };
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Returning re-executes the faulting instruction, which now takes the
        // default action (termination with a core).
        reset_default(signal);
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the saved handler has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
            unsafe { std::mem::transmute::<usize, _>(handler) };
        f(signal, info, context);
    } else {
        // SAFETY: without SA_SIGINFO the saved handler is a plain one.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute::<usize, _>(handler) };
        f(signal);
    }
}

fn reset_default(signal: libc::c_int) {
    // SAFETY: an all-zero sigaction with SIG_DFL (0) is valid; sigaction is
    // async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(signal, &action, ptr::null_mut());
    }
}

/// What [`preempt_from_signal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preemption {
    /// No function was running on this thread's function stack.
    NotRunning,
    /// A host service was running; the call ends as preempted when the
    /// service returns.
    Deferred,
    /// The interrupted context now leaves the function: the entry call
    /// returns [`crate::runtime::Failure::Preempted`].
    Preempted,
}

/// Ends the function call running on this thread, from inside a signal
/// handler (a timer tick or a watchdog's signal): its stack is abandoned and
/// the call returns `Failure::Preempted`.
///
/// # Safety
/// Call only from a signal handler (installed with `SA_SIGINFO`) running on
/// the thread that executes the function, passing that signal's `ucontext`.
pub unsafe fn preempt_from_signal(ucontext: *mut c_void) -> Preemption {
    // SAFETY: forwarded caller contract.
    match unsafe { redirect(ucontext, |_| Exit::Preempted) } {
        Redirect::NotOurs => Preemption::NotRunning,
        Redirect::InHost => Preemption::Deferred,
        Redirect::Done => Preemption::Preempted,
    }
}
