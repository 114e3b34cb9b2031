//! The policy of a process-backend runner (`microfaas-runner`): one process
//! per function instance. Entered after the artifact is loaded and before
//! its `init()`; from then on the runner touches nothing but its own memory,
//! the shared region and the futexes in it.

use super::common::{base_allowlist, confined};
use super::seccomp::{FilterError, SeccompPolicy, Violation};
use super::{Policy, SandboxSpec};

/// The runner's policy for `spec`, for the process `pid` (itself).
pub fn policy(spec: &SandboxSpec, pid: u32) -> Result<Policy, FilterError> {
    // Killed by the kernel: the verdict cannot be caught, masked or forged
    // into anything else by code in the runner, and a runner is one
    // instance that is discarded after any failure anyway.
    let seccomp = if spec.settings.layers.seccomp {
        Some(SeccompPolicy {
            allowed: base_allowlist(pid)?,
            violation: Violation::KillProcess,
            refused: Vec::new(),
        })
    } else {
        None
    };
    // No mount namespace of its own: it would cost every cold start, and
    // with no filesystem access it adds nothing.
    Ok(confined("process runner", spec, false, seccomp))
}
