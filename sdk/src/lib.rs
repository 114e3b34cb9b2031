//! The microfaas function SDK: the versioned, `#[repr(C)]` ABI between a
//! runtime (a `process` runner, a `language` worker, the `vm` guest) and a
//! function artifact, plus the [`export!`] macro function authors use.
//!
//! A function crate is `#![no_std]`, depends on this crate, and says
//!
//! ```ignore
//! #![no_std]
//! #![forbid(unsafe_code)]
//! extern crate alloc;
//! use alloc::vec::Vec;
//!
//! fn handle(input: &[u8]) -> Result<Vec<u8>, microfaas_sdk::Error> {
//!     Ok(input.to_vec())
//! }
//! microfaas_sdk::export!(handle);            // or export!(handle, init = my_init)
//! ```
//!
//! `microfaas build` wraps it in a generated `cdylib` crate that invokes
//! [`artifact_entry!`]; that macro (trusted code, outside the function's own
//! crate) emits the exported entry symbols, the global allocator that forwards
//! to the host table, and the panic handler that reports to the runtime.
//!
//! # The contract
//!
//! * The runtime calls [`INIT_SYMBOL`] once after loading; then, if the
//!   function was deployed with a module (deploy-time data, e.g. the
//!   WebAssembly module an interpreter runs), [`LOAD_SYMBOL`] once with its
//!   bytes; then [`HANDLE_SYMBOL`] once per request. Each call gets a
//!   pointer to a [`HostServices`] table that stays valid for the duration
//!   of the call.
//! * Every byte the function allocates comes from `HostServices::alloc`.
//! * A failure that cannot be returned (panic, allocation refusal that ends in
//!   a panic) is reported through `HostServices::fail`, which never returns.
//! * [`ABI_VERSION_SYMBOL`] is a `u32` holding [`ABI_VERSION`].
#![no_std]

extern crate alloc;

use alloc::string::String;
use core::ffi::c_void;
use core::fmt;

mod guest_support;
mod pkru_scan;

pub use pkru_scan::{PkruInstruction, find_pkru_instruction, pkru_instruction_at};

#[doc(hidden)]
pub use guest_support::__private;
/// A cell set once (typically in `init`) and read by every later call:
/// how a function keeps state such as a precomputed table, in safe code.
/// Set it in `init`, not in `handle`: memory a `handle` call allocates may be
/// discarded with that call (runtimes reclaim per-invocation heaps).
pub use once_cell::race::OnceBox;

/// Version of this ABI. Bumped on any change to a type or symbol below.
pub const ABI_VERSION: u32 = 1;

/// Exported `u32` holding [`ABI_VERSION`].
pub const ABI_VERSION_SYMBOL: &str = "MICROFAAS_ABI_VERSION";
/// `extern "C" fn(*const HostServices) -> InitStatus` (see [`InitFn`]).
pub const INIT_SYMBOL: &str = "microfaas_v1_init";
/// `extern "C" fn(*const HostServices, *const u8, usize) -> LoadStatus` (see
/// [`LoadFn`]): takes the function's module. Optional: a runtime calls it
/// only for a function deployed with a module, and an artifact built before
/// it existed simply lacks it (the ABI version did not change).
pub const LOAD_SYMBOL: &str = "microfaas_v1_load";

/// A function's `load` (see [`export!`]): run once, after `init`, on the
/// module the function was deployed with.
pub type LoadHook = fn(&[u8]) -> Result<(), Error>;
/// `extern "C" fn(*const HostServices, *const u8, usize, *mut HandleResult)` (see [`HandleFn`]).
pub const HANDLE_SYMBOL: &str = "microfaas_v1_handle";

/// Undefined symbols an artifact may import. Each runtime resolves them to its
/// own implementation (libc in the host workers, the guest's own in the VM).
/// `bcmp` is the equality-only `memcmp` LLVM emits on Linux targets.
pub const ALLOWED_IMPORTS: &[&str] = &["memcpy", "memmove", "memset", "memcmp", "bcmp"];

/// Signature of [`INIT_SYMBOL`].
pub type InitFn = unsafe extern "C" fn(host: *const HostServices) -> u32;
/// Signature of [`LOAD_SYMBOL`]: the module is `len` bytes at `module`, valid
/// for the call only (the function copies what it keeps). Returns a
/// [`status`] value; [`status::NO_LOAD`] if the function declares no `load`.
pub type LoadFn = unsafe extern "C" fn(host: *const HostServices, module: *const u8, len: usize) -> u32;
/// Signature of [`HANDLE_SYMBOL`].
pub type HandleFn =
    unsafe extern "C" fn(host: *const HostServices, input: *const u8, input_len: usize, result: *mut HandleResult);

/// Allocate `size` bytes aligned to `align`; null means refused.
pub type AllocFn = unsafe extern "C" fn(ctx: *mut c_void, size: usize, align: usize) -> *mut u8;
/// Free a block previously returned by `alloc`/`realloc` with the same layout.
pub type DeallocFn = unsafe extern "C" fn(ctx: *mut c_void, ptr: *mut u8, size: usize, align: usize);
/// Grow or shrink a block; null means refused (the old block stays valid).
pub type ReallocFn =
    unsafe extern "C" fn(ctx: *mut c_void, ptr: *mut u8, old_size: usize, align: usize, new_size: usize) -> *mut u8;
/// Monotonic clock in nanoseconds, comparable with the host's `CLOCK_MONOTONIC`.
pub type ClockFn = unsafe extern "C" fn(ctx: *mut c_void) -> u64;
/// Mark the checkpoint: the work before it depends only on the input. Returns
/// normally (a snapshotting runtime may resume a later identical request here).
pub type CheckpointFn = unsafe extern "C" fn(ctx: *mut c_void);
/// Report a failure that cannot be returned and leave the function for good.
pub type FailFn = unsafe extern "C" fn(ctx: *mut c_void, kind: u32, msg: *const u8, msg_len: usize) -> !;

/// The host services table a runtime hands to every entry call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HostServices {
    /// Must equal [`ABI_VERSION`].
    pub abi_version: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Opaque runtime context passed back to every service.
    pub ctx: *mut c_void,
    /// See [`AllocFn`].
    pub alloc: AllocFn,
    /// See [`DeallocFn`].
    pub dealloc: DeallocFn,
    /// See [`ReallocFn`].
    pub realloc: ReallocFn,
    /// See [`ClockFn`].
    pub clock_ns: ClockFn,
    /// See [`CheckpointFn`].
    pub checkpoint: CheckpointFn,
    /// See [`FailFn`].
    pub fail: FailFn,
}

/// `kind` values passed to [`FailFn`].
pub mod fail_kind {
    /// The function panicked; the message is the panic message.
    pub const PANIC: u32 = 1;
    /// An allocation was refused (the heap limit was reached) and the function
    /// could not go on.
    pub const OUT_OF_MEMORY: u32 = 2;
    /// `init` returned an error; the message is the error's. (Reported
    /// through `fail` so that the message reaches the runtime; an `init` that
    /// returns [`crate::status::ERROR`] instead carries none.)
    pub const INIT_ERROR: u32 = 3;
}

/// What [`HANDLE_SYMBOL`] writes into its `result` argument.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HandleResult {
    /// One of [`status`].
    pub status: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Output bytes (on `OK`) or UTF-8 error message (on `ERROR`), allocated
    /// with the host's `alloc`; null when `len` is zero.
    pub ptr: *mut u8,
    /// Length in bytes of the data at `ptr`.
    pub len: usize,
    /// Allocated capacity at `ptr` (what the runtime frees, if it frees).
    pub capacity: usize,
    /// `clock_ns()` read by the entry shim before the function's code ran.
    pub entered_ns: u64,
    /// `clock_ns()` read by the entry shim after the function returned.
    pub returned_ns: u64,
}

impl HandleResult {
    /// An all-zero result for a runtime to pass in.
    pub const fn empty() -> Self {
        Self {
            status: status::NOT_RUN,
            reserved: 0,
            ptr: core::ptr::null_mut(),
            len: 0,
            capacity: 0,
            entered_ns: 0,
            returned_ns: 0,
        }
    }
}

/// `HandleResult::status` values and the return values of [`InitFn`] and
/// [`LoadFn`].
pub mod status {
    /// The shim did not finish (the runtime's initial value).
    pub const NOT_RUN: u32 = 0;
    /// Success: `ptr/len` is the output.
    pub const OK: u32 = 1;
    /// The function returned an error: `ptr/len` is its message.
    pub const ERROR: u32 = 2;
    /// The host table had the wrong ABI version; nothing ran.
    pub const BAD_ABI: u32 = 3;
    /// ([`crate::LoadFn`] only) the function declares no `load`: it takes
    /// no module.
    pub const NO_LOAD: u32 = 4;
}

/// An error a function returns from `handle` (or `init`): a message the
/// caller sees as `FunctionFailed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error carrying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Self { message }
    }
}

/// The monotonic clock of the runtime, in nanoseconds (comparable with the
/// host's `CLOCK_MONOTONIC`). Only meaningful while `init` or `handle` runs.
pub fn clock_ns() -> u64 {
    guest_support::clock_ns()
}

/// Marks the checkpoint: everything the function computed so far depends
/// only on its input. A snapshotting runtime (`vm`) may record the instance
/// here and resume later invocations with the same input from this point.
pub fn checkpoint() {
    guest_support::checkpoint()
}

/// Leaves the function for good, reporting that memory ran out (the caller
/// sees `OutOfMemory`, as when an allocation the heap limit refused ends a
/// native function). For runtimes inside a function that manage memory of
/// their own (an interpreter's linear memory) and see the refusal as an
/// error rather than a failed allocation.
pub fn out_of_memory(message: &str) -> ! {
    guest_support::out_of_memory(message)
}

/// Declares a function crate's entry points. `handle` is a
/// `fn(&[u8]) -> Result<Vec<u8>, Error>`; `init`, if given, a
/// `fn() -> Result<(), Error>` run once after load; `load`, if given, a
/// `fn(&[u8]) -> Result<(), Error>` run once after `init` with the module
/// the function was deployed with (an interpreter's program: the runtime
/// artifact is one, its modules many). An error from `load` fails the
/// deploy as an `init` error does. Order: `handle`, then `init = ...`,
/// then `load = ...`.
///
/// Expands to safe code only, so it works in a crate with
/// `#![forbid(unsafe_code)]`.
#[macro_export]
macro_rules! export {
    ($handle:path) => {
        $crate::export!(@init);
        $crate::export!(@load);
        $crate::export!(@handle $handle);
    };
    ($handle:path, init = $init:path) => {
        $crate::export!(@init $init);
        $crate::export!(@load);
        $crate::export!(@handle $handle);
    };
    ($handle:path, load = $load:path) => {
        $crate::export!(@init);
        $crate::export!(@load $load);
        $crate::export!(@handle $handle);
    };
    ($handle:path, init = $init:path, load = $load:path) => {
        $crate::export!(@init $init);
        $crate::export!(@load $load);
        $crate::export!(@handle $handle);
    };
    (@init) => {
        #[doc(hidden)]
        pub fn __microfaas_init() -> ::core::result::Result<(), $crate::Error> {
            Ok(())
        }
    };
    (@init $init:path) => {
        #[doc(hidden)]
        pub fn __microfaas_init() -> ::core::result::Result<(), $crate::Error> {
            $init()
        }
    };
    (@load) => {
        #[doc(hidden)]
        pub const __MICROFAAS_LOAD: ::core::option::Option<
            $crate::LoadHook,
        > = None;
    };
    (@load $load:path) => {
        #[doc(hidden)]
        pub const __MICROFAAS_LOAD: ::core::option::Option<
            $crate::LoadHook,
        > = Some($load);
    };
    (@handle $handle:path) => {
        #[doc(hidden)]
        pub fn __microfaas_handle(
            input: &[u8],
        ) -> ::core::result::Result<$crate::__private::Vec<u8>, $crate::Error> {
            $handle(input)
        }
    };
}

/// Emits an artifact's exported symbols, global allocator and panic handler
/// for the function crate `$krate`. Used only by the `cdylib` wrapper crate
/// that `microfaas build` generates; never by a function crate itself.
#[macro_export]
macro_rules! artifact_entry {
    ($krate:ident) => {
        #[global_allocator]
        static MICROFAAS_ALLOCATOR: $crate::__private::HostAllocator = $crate::__private::HostAllocator;

        #[panic_handler]
        fn microfaas_panic(info: &::core::panic::PanicInfo<'_>) -> ! {
            $crate::__private::report_panic(info)
        }

        /// The precompiled `alloc` library (built to unwind) refers to the
        /// unwinder and the personality routine from its cleanup pads, e.g.
        /// in `format!`. The artifact is built with `panic = "abort"`: no
        /// unwind ever starts, so neither is ever called. Defined here so
        /// the artifact imports no unwinder.
        // SAFETY: the unwinder's entry point name; no unwinder is linked into
        // the artifact, so nothing else defines it.
        #[unsafe(no_mangle)]
        #[allow(non_snake_case)]
        pub extern "C" fn _Unwind_Resume(_exception: *mut ::core::ffi::c_void) -> ! {
            $crate::__private::unwind_resumed()
        }

        /// See `_Unwind_Resume`: only an unwinder would call it.
        // SAFETY: the personality routine's name; with `panic = "abort"`
        // nothing else in the artifact defines it.
        #[unsafe(no_mangle)]
        pub extern "C" fn rust_eh_personality() -> ! {
            $crate::__private::unwind_resumed()
        }

        /// The ABI version this artifact was built against.
        // SAFETY: a unique, versioned symbol name that nothing else defines.
        #[unsafe(no_mangle)]
        pub static MICROFAAS_ABI_VERSION: u32 = $crate::ABI_VERSION;

        /// # Safety
        /// `host` must point to a valid `HostServices` for the whole call.
        // SAFETY: a unique, versioned symbol name that nothing else defines.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn microfaas_v1_init(host: *const $crate::HostServices) -> u32 {
            // SAFETY: forwarded caller contract.
            unsafe { $crate::__private::run_init(host, $krate::__microfaas_init) }
        }

        /// # Safety
        /// `host` must point to a valid `HostServices` and `module` to `len`
        /// readable bytes, both for the whole call.
        // SAFETY: a unique, versioned symbol name that nothing else defines.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn microfaas_v1_load(
            host: *const $crate::HostServices,
            module: *const u8,
            len: usize,
        ) -> u32 {
            // SAFETY: forwarded caller contract.
            unsafe { $crate::__private::run_load(host, module, len, $krate::__MICROFAAS_LOAD) }
        }

        /// # Safety
        /// `host` must point to a valid `HostServices`, `input` to `input_len`
        /// readable bytes and `result` to a writable `HandleResult`, all for
        /// the whole call.
        // SAFETY: a unique, versioned symbol name that nothing else defines.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn microfaas_v1_handle(
            host: *const $crate::HostServices,
            input: *const u8,
            input_len: usize,
            result: *mut $crate::HandleResult,
        ) {
            // SAFETY: forwarded caller contract.
            unsafe { $crate::__private::run_handle(host, input, input_len, result, $krate::__microfaas_handle) }
        }
    };
}
