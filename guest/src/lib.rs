//! Our minimal `no_std` unikernel for the `vm` backend. This library holds
//! the hardware-free logic (the function ELF loader, which `vmm` runs on the
//! host to load an artifact into the guest's image region with W^X page
//! rights; the clock arithmetic; the mailbox request decoding), unit tested
//! on the host; `src/main.rs` is the freestanding CPL3 kernel that `vmm`'s
//! build script compiles.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod clock;
pub mod elf;
pub mod request;

pub use guest_abi as abi;
