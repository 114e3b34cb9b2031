//! The CPL3 runtime: boot, the request loop, and the host services table
//! the function calls (heap, clock, checkpoint, fail).

use crate::arch;
use core::alloc::Layout;
use core::ffi::c_void;
use core::fmt;
use core::ptr::{self, NonNull};
use core::sync::atomic::{Ordering, compiler_fence, fence};
use guest::clock::Clock;
use guest::request::{self, Request};
use guest_abi::{BootInfo, LoadRequest, Mailbox, reply};
use linked_list_allocator::Heap;
use microfaas_sdk::{ABI_VERSION, HandleFn, HandleResult, HostServices, InitFn, LoadFn, fail_kind, status};

/// A fixed buffer for messages formatted without a heap.
pub struct MessageBuf {
    bytes: [u8; 256],
    len: usize,
}

impl MessageBuf {
    pub const fn new() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Write for MessageBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.bytes.len() - self.len;
        let n = s.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

struct Runtime {
    info: BootInfo,
    mailbox: *mut Mailbox,
    clock: Clock,
    heap: Heap,
    /// The loaded function's entry points (the host loaded its image).
    function: Option<LoadRequest>,
    /// Whether the function took its module (`MODULE`, at most once).
    module_loaded: bool,
    services: HostServices,
    /// The last output's heap block, freed when the next request arrives.
    pending_free: Option<(NonNull<u8>, Layout)>,
    /// The sequence number of the request being handled.
    seq: u32,
}

/// The reply to write for one request.
struct Reply {
    status: u32,
    addr: u64,
    len: u64,
    entered_ns: u64,
    returned_ns: u64,
}

/// The kernel's Rust entry (from `_start`, CPL3).
pub extern "C" fn kernel_main(info: *const BootInfo) -> ! {
    // SAFETY: the VMM passes the address of the boot info page, mapped
    // user-readable for the guest's whole life.
    let info = unsafe { info.read_volatile() };
    if !request::boot_info_valid(&info) {
        arch::serial_write(b"guest: bad boot info\n");
        arch::abort();
    }
    let mut heap = Heap::empty();
    let heap_bytes = usize::try_from(info.heap_bytes).unwrap_or(0);
    // SAFETY: the heap region is mapped user-writable, belongs to nobody
    // else, and `heap_bytes` is its size (boot info, from the VMM).
    unsafe { heap.init(info.heap_addr as *mut u8, heap_bytes) };
    let mut rt = Runtime {
        info,
        mailbox: info.mailbox_addr as *mut Mailbox,
        clock: Clock::new(info.tsc_base, info.mono_base_ns, info.ns_per_tsc_q32),
        heap,
        function: None,
        module_loaded: false,
        services: HostServices {
            abi_version: ABI_VERSION,
            reserved: 0,
            ctx: ptr::null_mut(),
            alloc: svc_alloc,
            dealloc: svc_dealloc,
            realloc: svc_realloc,
            clock_ns: svc_clock_ns,
            checkpoint: svc_checkpoint,
            fail: svc_fail,
        },
        pending_free: None,
        seq: 0,
    };
    // `rt` lives in this frame, which never returns: its address is stable.
    rt.services.ctx = (&raw mut rt).cast::<c_void>();
    arch::serial_write(b"microfaas guest: up at CPL3\n");
    rt.serve()
}

impl Runtime {
    fn serve(&mut self) -> ! {
        loop {
            if !self.spin_for_request() {
                arch::doorbell(self.seq);
            }
            // SAFETY: the mailbox page is mapped user-writable; the host
            // writes the request half before publishing `req_seq` (read
            // first, below, or by the spin), and only then.
            let req_seq = unsafe { (&raw const (*self.mailbox).req_seq).read_volatile() };
            if req_seq == self.seq {
                continue; // resumed without a new request
            }
            compiler_fence(Ordering::Acquire);
            // SAFETY: as above.
            let mailbox = unsafe { self.mailbox.read_volatile() };
            self.seq = mailbox.req_seq;
            self.clock.rebase(mailbox.host_tsc, mailbox.host_ns);
            if let Some((block, layout)) = self.pending_free.take() {
                // SAFETY: allocated from this heap by the function with this
                // layout (the SDK's contract); its bytes were copied into
                // the I/O window and nothing uses it since.
                unsafe { self.heap.deallocate(block, layout) };
            }
            let reply = match request::decode(&mailbox, self.info.io_bytes) {
                Ok(Request::Load { len }) => self.load(len),
                Ok(Request::Invoke { len }) => self.invoke(len),
                Ok(Request::Module { len }) => self.module(len),
                Err(e) => self.message(reply::BAD_REQUEST, e.message().as_bytes()),
            };
            self.write_reply(&reply);
        }
    }

    /// Spins up to `idle_spin_us` for a new request; true if one came.
    fn spin_for_request(&mut self) -> bool {
        // Never at boot (seq 0): the host waits for that doorbell anyway.
        if self.info.idle_spin_us == 0 || self.seq == 0 {
            return false;
        }
        let mb = self.mailbox;
        let new_request = || {
            // SAFETY: the mailbox page is ours; `req_seq` is written by the
            // host with a single aligned store.
            unsafe { (&raw const (*mb).req_seq).read_volatile() != self.seq }
        };
        let set_spinning = |v: u32| {
            // SAFETY: as above; this field is the guest's.
            unsafe { (&raw mut (*mb).guest_spinning).write_volatile(v) };
            fence(Ordering::SeqCst);
        };
        set_spinning(1);
        let start = self.clock.ns_at(arch::rdtsc());
        let spin_ns = u64::from(self.info.idle_spin_us) * 1000;
        loop {
            if new_request() {
                set_spinning(0);
                return true;
            }
            if self.clock.ns_at(arch::rdtsc()).saturating_sub(start) >= spin_ns {
                break;
            }
            core::hint::spin_loop();
        }
        // Clear, fence, re-check: a request published before the host saw
        // the flag clear is seen here (see `Mailbox::guest_spinning`).
        set_spinning(0);
        new_request()
    }

    fn write_reply(&mut self, reply: &Reply) {
        let heap_used = self.heap.used() as u64;
        // SAFETY: as in `serve`: our mailbox page, the host is stopped.
        unsafe {
            let mb = &raw mut *self.mailbox;
            (&raw mut (*mb).status).write_volatile(reply.status);
            (&raw mut (*mb).out_addr).write_volatile(reply.addr);
            (&raw mut (*mb).out_len).write_volatile(reply.len);
            (&raw mut (*mb).entered_ns).write_volatile(reply.entered_ns);
            (&raw mut (*mb).returned_ns).write_volatile(reply.returned_ns);
            (&raw mut (*mb).heap_used).write_volatile(heap_used);
            compiler_fence(Ordering::Release);
            (&raw mut (*mb).resp_seq).write_volatile(self.seq);
        }
    }

    /// A reply of `bytes` (an output or a message) copied to the start of
    /// the I/O window, the only range the host accepts a reply from. A
    /// message longer than the window is cut; an output longer than the
    /// window is not copied but reported at its full length, which the host
    /// refuses as too large (the window is at least the output limit).
    ///
    /// # Safety
    /// `bytes` must be valid for reads of `len` bytes (it may overlap the
    /// window).
    unsafe fn reply_in_window(
        &self,
        status: u32,
        bytes: *const u8,
        len: usize,
        entered_ns: u64,
        returned_ns: u64,
    ) -> Reply {
        let window = usize::try_from(self.info.io_bytes).unwrap_or(0);
        let copied = if len <= window {
            len
        } else if status == reply::OK {
            0
        } else {
            window
        };
        let window = self.info.io_addr as *mut u8;
        let overlaps = (bytes as usize) < (window as usize).wrapping_add(copied)
            && (window as usize) < (bytes as usize).wrapping_add(copied);
        if overlaps {
            // SAFETY: the caller's contract for `bytes`; the I/O window is
            // mapped user-writable and `copied <= io_bytes`; `copy` allows
            // overlap.
            unsafe { ptr::copy(bytes, window, copied) };
        } else {
            // Inline rather than a call to `memcpy`, whose page a restored
            // instance may not have touched yet (each first touch is a
            // shadow-paging fault here).
            // SAFETY: as above, and the ranges are disjoint; `rep movsb`
            // copies exactly `copied` bytes forward (DF is clear).
            unsafe {
                core::arch::asm!(
                    "rep movsb",
                    inout("rdi") window => _, inout("rsi") bytes => _, inout("rcx") copied => _,
                    options(nostack, preserves_flags)
                );
            }
        }
        let len = if copied == 0 { len } else { copied };
        Reply {
            status,
            addr: self.info.io_addr,
            len: len as u64,
            entered_ns,
            returned_ns,
        }
    }

    /// A reply with message `msg` (copied into the I/O window).
    fn message(&self, status: u32, msg: &[u8]) -> Reply {
        // SAFETY: a slice is valid for its length.
        unsafe { self.reply_in_window(status, msg.as_ptr(), msg.len(), 0, 0) }
    }

    fn load(&mut self, len: usize) -> Reply {
        if self.function.is_some() {
            return self.message(reply::BAD_REQUEST, b"a function is already loaded");
        }
        // SAFETY: the I/O window holds `len <= io_bytes` bytes the host wrote
        // (checked by `decode`).
        let payload = unsafe { core::slice::from_raw_parts(self.info.io_addr as *const u8, len) };
        let entry = match request::decode_load(payload, self.info.image_addr, self.info.image_bytes) {
            Ok(entry) => entry,
            Err(e) => return self.message(reply::LOAD_FAILED, e.message().as_bytes()),
        };
        // SAFETY: `init_addr` is the relocated `microfaas_v1_init` of the
        // artifact the host loaded and checked (ABI version included) in the
        // image region (the ABI's InitFn).
        let init: InitFn = unsafe { core::mem::transmute::<u64, InitFn>(entry.init_addr) };
        self.function = Some(entry);
        // SAFETY: the services table lives as long as the runtime.
        let code = unsafe { init(&raw const self.services) };
        match code {
            status::OK => self.message(reply::OK, b""),
            status::BAD_ABI => self.message(reply::LOAD_FAILED, b"artifact refused the host table (ABI)"),
            // The SDK reports init errors through `fail` (with the
            // message); this is an artifact that returned ERROR bare.
            _ => self.message(reply::INIT_FAILED, b"(no message)"),
        }
    }

    /// `MODULE`: hands the module the host wrote into the image region
    /// (read-only) to the function's `load()`.
    fn module(&mut self, len: usize) -> Reply {
        let Some(function) = self.function else {
            return self.message(reply::BAD_REQUEST, b"no function loaded");
        };
        if self.module_loaded {
            return self.message(reply::BAD_REQUEST, b"a module is already loaded");
        }
        if function.load_addr == 0 {
            return self.message(
                reply::INIT_FAILED,
                b"the function takes no module (its artifact has no load entry)",
            );
        }
        // SAFETY: as in `load`.
        let payload = unsafe { core::slice::from_raw_parts(self.info.io_addr as *const u8, len) };
        let module = match request::decode_module(payload, self.info.image_addr, self.info.image_bytes) {
            Ok(module) => module,
            Err(e) => return self.message(reply::LOAD_FAILED, e.message().as_bytes()),
        };
        let Ok(module_len) = usize::try_from(module.len) else {
            return self.message(reply::LOAD_FAILED, b"module length out of range");
        };
        self.module_loaded = true;
        // SAFETY: `load_addr` is the relocated `microfaas_v1_load` of the
        // loaded artifact (checked inside the image region by
        // `decode_load`), of the ABI's LoadFn type.
        let load: LoadFn = unsafe { core::mem::transmute::<u64, LoadFn>(function.load_addr) };
        // SAFETY: the services table lives as long as the runtime; the
        // module's bytes lie in the image region (checked above), which the
        // host mapped readable before sending the request.
        let code = unsafe { load(&raw const self.services, module.addr as *const u8, module_len) };
        match code {
            status::OK => self.message(reply::OK, b""),
            status::BAD_ABI => self.message(reply::LOAD_FAILED, b"artifact refused the host table (ABI)"),
            status::NO_LOAD => self.message(
                reply::INIT_FAILED,
                b"the function takes no module (it declares no load)",
            ),
            _ => self.message(reply::INIT_FAILED, b"(no message)"),
        }
    }

    fn invoke(&mut self, len: usize) -> Reply {
        let Some(function) = self.function else {
            return self.message(reply::BAD_REQUEST, b"no function loaded");
        };
        // SAFETY: `handle_addr` is the relocated `microfaas_v1_handle`.
        let handle: HandleFn = unsafe { core::mem::transmute::<u64, HandleFn>(function.handle_addr) };
        let mut result = HandleResult::empty();
        // SAFETY: the services table outlives the call; the input is `len`
        // bytes in the I/O window (checked by `decode`); `result` is ours.
        unsafe {
            handle(
                &raw const self.services,
                self.info.io_addr as *const u8,
                len,
                &raw mut result,
            );
        }
        let code = match result.status {
            status::OK => reply::OK,
            status::ERROR => reply::FUNCTION_ERROR,
            _ => return self.message(reply::BAD_REQUEST, b"function refused the call (ABI)"),
        };
        let reply = if result.ptr.is_null() || result.len == 0 {
            self.message(code, b"")
        } else {
            // SAFETY: the SDK's contract: the output (or message) is `len`
            // initialised bytes at `ptr`, in a block of `capacity` bytes.
            unsafe { self.reply_in_window(code, result.ptr, result.len, result.entered_ns, result.returned_ns) }
        };
        let reply = Reply {
            entered_ns: result.entered_ns,
            returned_ns: result.returned_ns,
            ..reply
        };
        // The block (a `Vec<u8>`, align 1, of `capacity`) is copied out; it
        // is freed at the next request, off this one's reply path (the
        // allocator's free path may lie on a page a restored instance has
        // not touched yet).
        if let (Some(block), Ok(layout), true) = (
            NonNull::new(result.ptr),
            Layout::from_size_align(result.capacity, 1),
            result.capacity > 0,
        ) {
            self.pending_free = Some((block, layout));
        }
        reply
    }
}

fn runtime<'a>(ctx: *mut c_void) -> &'a mut Runtime {
    // SAFETY: `ctx` is the pointer `kernel_main` put in the table: its
    // never-returning frame's `Runtime`. The function calls services only
    // from inside an entry call, while the runtime holds no other borrow of
    // the fields the services touch (heap, clock, mailbox).
    unsafe { &mut *ctx.cast::<Runtime>() }
}

unsafe extern "C" fn svc_alloc(ctx: *mut c_void, size: usize, align: usize) -> *mut u8 {
    let Ok(layout) = Layout::from_size_align(size, align) else {
        return ptr::null_mut();
    };
    if size == 0 {
        return ptr::null_mut();
    }
    match runtime(ctx).heap.allocate_first_fit(layout) {
        Ok(p) => p.as_ptr(),
        Err(()) => ptr::null_mut(),
    }
}

unsafe extern "C" fn svc_dealloc(ctx: *mut c_void, ptr: *mut u8, size: usize, align: usize) {
    let (Some(block), Ok(layout)) = (NonNull::new(ptr), Layout::from_size_align(size, align)) else {
        return;
    };
    if size == 0 {
        return;
    }
    // SAFETY: the SDK's contract: `ptr` came from `alloc`/`realloc` with
    // this layout.
    unsafe { runtime(ctx).heap.deallocate(block, layout) }
}

unsafe extern "C" fn svc_realloc(
    ctx: *mut c_void,
    ptr: *mut u8,
    old_size: usize,
    align: usize,
    new_size: usize,
) -> *mut u8 {
    // SAFETY: forwarded allocator contract.
    let new = unsafe { svc_alloc(ctx, new_size, align) };
    if !new.is_null() && !ptr.is_null() {
        // SAFETY: both blocks are valid for the smaller size and distinct.
        unsafe {
            ptr::copy_nonoverlapping(ptr, new, old_size.min(new_size));
            svc_dealloc(ctx, ptr, old_size, align);
        }
    }
    new
}

unsafe extern "C" fn svc_clock_ns(ctx: *mut c_void) -> u64 {
    runtime(ctx).clock.ns_at(arch::rdtsc())
}

unsafe extern "C" fn svc_checkpoint(ctx: *mut c_void) {
    let rt = runtime(ctx);
    // SAFETY: the mailbox page is ours; `checkpoint_seq` is written by the
    // host (a single aligned store) only while the vCPU is stopped.
    let wanted = unsafe { (&raw const (*rt.mailbox).checkpoint_seq).read_volatile() };
    if wanted != 0 && wanted == rt.seq {
        // The host snapshots the guest stopped here, clears the field, and
        // resumes it (or an instance restored from the snapshot) right after.
        arch::checkpoint(rt.seq);
    }
}

unsafe extern "C" fn svc_fail(ctx: *mut c_void, kind: u32, msg: *const u8, msg_len: usize) -> ! {
    let rt = runtime(ctx);
    let status = match kind {
        fail_kind::OUT_OF_MEMORY => reply::OUT_OF_MEMORY,
        fail_kind::INIT_ERROR => reply::INIT_FAILED,
        _ => reply::PANICKED,
    };
    // The message (on the function's stack, or its heap for an init error)
    // is copied into the I/O window, where the host reads it from.
    // SAFETY: the services contract: `msg` is valid for `msg_len` bytes (a
    // function that lies faults here, at CPL3, in its own instance).
    let reply = unsafe { rt.reply_in_window(status, msg, msg_len, 0, 0) };
    rt.write_reply(&reply);
    loop {
        arch::doorbell(rt.seq);
    }
}
