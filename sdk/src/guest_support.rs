//! The artifact side of the ABI: what [`crate::artifact_entry!`] expands to
//! calls into here. Holds the current host table, the global allocator that
//! forwards to it, and the panic reporting.

use crate::{HandleResult, HostServices, fail_kind, status};
use core::alloc::{GlobalAlloc, Layout};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

/// The table of the entry call in progress (artifacts run single-threaded:
/// a runtime makes one entry call at a time per loaded artifact).
static HOST: AtomicPtr<HostServices> = AtomicPtr::new(core::ptr::null_mut());
/// Set when the host refused the latest allocation, cleared on success: a
/// panic while it is set is reported as out-of-memory.
static ALLOC_REFUSED: AtomicBool = AtomicBool::new(false);

fn host() -> Option<&'static HostServices> {
    let ptr = HOST.load(Ordering::Relaxed);
    // SAFETY: HOST is only ever set by `run_init`/`run_handle` to a table the
    // runtime keeps valid for the duration of that entry call, and all code
    // of the artifact runs inside such a call.
    unsafe { ptr.as_ref() }
}

pub(crate) fn clock_ns() -> u64 {
    match host() {
        // SAFETY: the table's functions are valid while the entry call runs.
        Some(h) => unsafe { (h.clock_ns)(h.ctx) },
        None => 0,
    }
}

pub(crate) fn checkpoint() {
    if let Some(h) = host() {
        // SAFETY: as in `clock_ns`.
        unsafe { (h.checkpoint)(h.ctx) }
    }
}

pub(crate) fn out_of_memory(message: &str) -> ! {
    if let Some(h) = host() {
        // SAFETY: as in `clock_ns`; `message` is valid for the call, and
        // `fail` copies it before leaving the function for good.
        unsafe { (h.fail)(h.ctx, fail_kind::OUT_OF_MEMORY, message.as_ptr(), message.len()) }
    }
    #[allow(clippy::empty_loop)]
    loop {}
}

/// Items the exported macros need; not part of the public API.
pub mod __private {
    use super::*;
    pub use alloc::vec::Vec;

    /// The artifact's global allocator: forwards every request to the host.
    #[derive(Debug)]
    pub struct HostAllocator;

    // SAFETY: every block comes from the host's allocator, which returns
    // blocks of at least the requested size and alignment (or null), and
    // frees only what it handed out with the layout it was given.
    unsafe impl GlobalAlloc for HostAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let Some(h) = host() else {
                return core::ptr::null_mut();
            };
            // SAFETY: the table is valid during the entry call.
            let ptr = unsafe { (h.alloc)(h.ctx, layout.size(), layout.align()) };
            ALLOC_REFUSED.store(ptr.is_null(), Ordering::Relaxed);
            ptr
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if let Some(h) = host() {
                // SAFETY: `ptr` came from this allocator with `layout`.
                unsafe { (h.dealloc)(h.ctx, ptr, layout.size(), layout.align()) }
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let Some(h) = host() else {
                return core::ptr::null_mut();
            };
            // SAFETY: `ptr` came from this allocator with `layout`.
            let new = unsafe { (h.realloc)(h.ctx, ptr, layout.size(), layout.align(), new_size) };
            ALLOC_REFUSED.store(new.is_null(), Ordering::Relaxed);
            new
        }
    }

    /// A fixed buffer for formatting a panic message without allocating.
    struct MessageBuf {
        bytes: [u8; 512],
        len: usize,
    }

    impl Write for MessageBuf {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for &b in s.as_bytes() {
                if self.len == self.bytes.len() {
                    break;
                }
                self.bytes[self.len] = b;
                self.len += 1;
            }
            Ok(())
        }
    }

    /// The artifact's panic handler: reports to the runtime and never returns.
    pub fn report_panic(info: &core::panic::PanicInfo<'_>) -> ! {
        let mut buf = MessageBuf {
            bytes: [0; 512],
            len: 0,
        };
        let _ = write!(buf, "{}", info.message());
        if let Some(loc) = info.location() {
            let _ = write!(buf, " at {}:{}", loc.file(), loc.line());
        }
        let kind = if ALLOC_REFUSED.load(Ordering::Relaxed) {
            fail_kind::OUT_OF_MEMORY
        } else {
            fail_kind::PANIC
        };
        if let Some(h) = host() {
            // SAFETY: the table is valid during the entry call; `buf` outlives
            // the call, which never returns.
            unsafe { (h.fail)(h.ctx, kind, buf.bytes.as_ptr(), buf.len) }
        }
        // No runtime to report to: nothing sane is left to do but spin.
        #[allow(clippy::empty_loop)]
        loop {}
    }

    /// Body of the artifact's `_Unwind_Resume`: never called under
    /// `panic = "abort"`; if it ever is, the call fails as a panic.
    pub fn unwind_resumed() -> ! {
        let message = "unwinding is not supported (artifacts are built with panic = abort)";
        if let Some(h) = host() {
            // SAFETY: the table is valid during the entry call; the message
            // is static.
            unsafe { (h.fail)(h.ctx, fail_kind::PANIC, message.as_ptr(), message.len()) }
        }
        #[allow(clippy::empty_loop)]
        loop {}
    }

    /// Body of the exported init symbol.
    ///
    /// # Safety
    /// `host` must point to a valid `HostServices` for the whole call.
    pub unsafe fn run_init(host: *const HostServices, init: fn() -> Result<(), crate::Error>) -> u32 {
        // SAFETY: caller contract.
        let Some(table) = (unsafe { host.as_ref() }) else {
            return status::BAD_ABI;
        };
        if table.abi_version != crate::ABI_VERSION {
            return status::BAD_ABI;
        }
        HOST.store(host.cast_mut(), Ordering::Relaxed);
        match init() {
            Ok(()) => status::OK,
            Err(e) => {
                let message = e.message();
                // SAFETY: the table is valid during the entry call (checked
                // above); `message` outlives the call, which never returns.
                unsafe { (table.fail)(table.ctx, fail_kind::INIT_ERROR, message.as_ptr(), message.len()) }
            }
        }
    }

    /// Body of the exported load symbol: runs `load` (if the function
    /// declares one) on the module's bytes; an error is reported as an init
    /// error is.
    ///
    /// # Safety
    /// `host` must point to a valid `HostServices` and `module` to `len`
    /// readable bytes (or be anything when `len` is 0), both for the whole
    /// call.
    pub unsafe fn run_load(
        host: *const HostServices,
        module: *const u8,
        len: usize,
        load: Option<crate::LoadHook>,
    ) -> u32 {
        // SAFETY: caller contract.
        let Some(table) = (unsafe { host.as_ref() }) else {
            return status::BAD_ABI;
        };
        if table.abi_version != crate::ABI_VERSION {
            return status::BAD_ABI;
        }
        let Some(load) = load else {
            return status::NO_LOAD;
        };
        HOST.store(host.cast_mut(), Ordering::Relaxed);
        let bytes: &[u8] = if len == 0 || module.is_null() {
            &[]
        } else {
            // SAFETY: caller contract: `len` readable bytes at `module`.
            unsafe { core::slice::from_raw_parts(module, len) }
        };
        match load(bytes) {
            Ok(()) => status::OK,
            Err(e) => {
                let message = e.message();
                // SAFETY: as in `run_init`.
                unsafe { (table.fail)(table.ctx, fail_kind::INIT_ERROR, message.as_ptr(), message.len()) }
            }
        }
    }

    /// Body of the exported handle symbol.
    ///
    /// # Safety
    /// `host` must point to a valid `HostServices`, `input` to `input_len`
    /// readable bytes (or be anything when `input_len` is 0) and `result` to
    /// a writable `HandleResult`, all for the whole call.
    pub unsafe fn run_handle(
        host: *const HostServices,
        input: *const u8,
        input_len: usize,
        result: *mut HandleResult,
        handle: fn(&[u8]) -> Result<Vec<u8>, crate::Error>,
    ) {
        // SAFETY: caller contract.
        let Some(out) = (unsafe { result.as_mut() }) else {
            return;
        };
        *out = HandleResult::empty();
        // SAFETY: caller contract.
        let Some(table) = (unsafe { host.as_ref() }) else {
            out.status = status::BAD_ABI;
            return;
        };
        if table.abi_version != crate::ABI_VERSION {
            out.status = status::BAD_ABI;
            return;
        }
        HOST.store(host.cast_mut(), Ordering::Relaxed);
        ALLOC_REFUSED.store(false, Ordering::Relaxed);
        let input: &[u8] = if input_len == 0 || input.is_null() {
            &[]
        } else {
            // SAFETY: caller contract: `input_len` readable bytes at `input`.
            unsafe { core::slice::from_raw_parts(input, input_len) }
        };
        out.entered_ns = super::clock_ns();
        let returned = handle(input);
        out.returned_ns = super::clock_ns();
        let (code, bytes) = match returned {
            Ok(bytes) => (status::OK, bytes),
            Err(e) => (status::ERROR, Vec::from(e.message().as_bytes())),
        };
        let mut bytes = core::mem::ManuallyDrop::new(bytes);
        out.status = code;
        out.len = bytes.len();
        out.capacity = bytes.capacity();
        out.ptr = if bytes.capacity() == 0 {
            core::ptr::null_mut()
        } else {
            bytes.as_mut_ptr()
        };
    }
}
