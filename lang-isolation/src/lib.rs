//! Worker processes for the process and language backends.
//!
//! * [`runtime`]: loads a function artifact and runs it on its own heap and
//!   guarded stack, catching panics, OOM, stack overflows and faults.
//! * [`process`]: the process baseline: one runner process per function
//!   (warm) or per request (cold), woken through shared memory and a futex.
//! * [`language`]: the language backend: a dispatcher and pinned worker
//!   processes that run preloaded functions as native calls.
//! * [`sandbox`]: the process sandbox both kinds of process enter before
//!   any function code runs.

pub mod language;
pub mod process;
pub mod runtime;
pub mod sandbox;
