//! The policy of a process-backend runner (`microfaas-runner`): one process
//! per function instance. Entered after the artifact is loaded and before
//! its `init()`; from then on the runner touches nothing but its own memory,
//! the shared region and the futexes in it.

use super::common::base_allowlist;
use super::seccomp::{FilterError, SeccompPolicy, Violation};
use super::{Identity, LandlockPolicy, Namespaces, Policy, SandboxSpec};

/// The runner's policy for `spec`, for the process `pid` (itself).
pub fn policy(spec: &SandboxSpec, pid: u32) -> Result<Policy, FilterError> {
    let layers = spec.settings.layers;
    Ok(Policy {
        kind: "process runner",
        namespaces: layers.namespaces.then(|| Namespaces {
            join_net: spec.netns.clone(),
            join_ipc: spec.ipcns.clone(),
            own_mount: false,
        }),
        landlock: layers.landlock.then_some(LandlockPolicy {
            deny_tcp: true,
            scoped: true,
        }),
        identity: layers.identity.then_some(Identity {
            uid: spec.settings.uid,
            gid: spec.settings.gid,
        }),
        no_new_privs: true,
        // Killed by the kernel: the verdict cannot be caught, masked or
        // forged into anything else by code in the runner, and a runner is
        // one instance that is discarded after any failure anyway.
        seccomp: layers.seccomp.then_some(SeccompPolicy {
            allowed: base_allowlist(pid)?,
            violation: Violation::KillProcess,
        }),
    })
}
