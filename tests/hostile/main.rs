//! Black-box hostile tests: fixtures that model a function author with
//! arbitrary native code execution (built with the test-only allow-unsafe
//! flag, so they issue raw syscalls and inline asm directly) attack every
//! door of the security model, through the public API and CLI only. Each
//! attack must fail with a typed error, and the backend must then serve the
//! next request correctly. Build-time attacks are fixture crates that
//! `microfaas build` must refuse, naming what it refused.
//!
//! Fixture crates live in `tests/fixtures/hostile/`. KVM cases skip only
//! when `/dev/kvm` is unusable and `MICROFAAS_REQUIRE_KVM` is not `1`.

mod build;
mod common;
mod language;
mod pkeys;
mod process;
mod sandbox;
mod store;
mod tenants;
mod vm;
