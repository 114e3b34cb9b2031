//! The freestanding guest kernel: entered by the VMM directly at CPL3 with
//! the boot info address in `rdi`. It runs the request loop (run the
//! `init()` of the function the host loaded into the image region, call it
//! per request, copy each reply into the I/O window) and provides the
//! function's host services (heap, clock, checkpoint, fail). The only CPL0
//! code is the fault stubs (on a supervisor-only page), which report the
//! vector to the host and stop. Runtime and function share CPL3: the
//! runtime's data is the function's to corrupt (its own instance); nothing
//! at CPL3 can reach CPL0 or change what runs there.
//!
//! Built only by `vmm/build.rs` (feature `kernel`, `link.ld`, static
//! relocation model, panic = abort).
#![no_std]
#![no_main]

mod arch;
mod runtime;

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let mut buf = runtime::MessageBuf::new();
    let _ = core::fmt::Write::write_fmt(&mut buf, format_args!("guest runtime panic: {info}\n"));
    arch::serial_write(buf.as_bytes());
    // A fault the host reports as a crash with this RIP.
    arch::abort()
}

/// The runtime never allocates through `alloc` (the function's heap is
/// handed out through its host services table); the SDK links `alloc`, so a
/// global allocator must exist: this one refuses everything.
struct NoGlobalAlloc;

// SAFETY: returning null is always a valid refusal; `dealloc` is never
// reached because nothing is ever handed out.
unsafe impl core::alloc::GlobalAlloc for NoGlobalAlloc {
    unsafe fn alloc(&self, _layout: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}

#[global_allocator]
static GLOBAL: NoGlobalAlloc = NoGlobalAlloc;

/// The precompiled `alloc` for this target references the unwinding
/// personality routine; with `panic = abort` nothing ever unwinds, so this
/// is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
