//! `microfaas-runner --warm|--once ARTIFACT`: one function instance of the
//! process backend, driven through the shared region at fd 3.
//!
//! `no_main`: the C `main` below skips the Rust runtime's start-up work
//! (main-thread stack guard discovery through `/proc/self/maps`, its signal
//! stack and handlers, stdio checks), which is most of the runner's own part
//! of a cold start. The function runtime installs the fault handling it
//! needs; argument access still works (glibc hands std `argv` at load).
#![no_main]

/// The process entry point.
// SAFETY: the only `main` symbol in this program: with `no_main` the Rust
// runtime defines none, and the C runtime calls this with the usual
// arguments, which are unused (std reads them itself).
#[unsafe(no_mangle)]
extern "C" fn main(_argc: std::ffi::c_int, _argv: *const *const std::ffi::c_char) -> std::ffi::c_int {
    std::ffi::c_int::from(lang_isolation::process::runner::main())
}
