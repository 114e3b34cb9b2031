//! Entering a [`Policy`], in the fixed order of the module doc. Each step is
//! checked; any failure stops the process from serving (the caller exits).
//! Must run on the process's only thread (Landlock, uid changes and seccomp
//! all apply to the calling thread).

use super::seccomp::FilterError;
use super::{Identity, LandlockPolicy, Namespaces, Policy};
use std::io;
use std::os::fd::AsRawFd;

/// Entering the sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A namespace could not be entered.
    #[error("cannot enter the {what} namespace")]
    Namespace {
        /// Which.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The Landlock ruleset was refused.
    #[error("cannot enforce the Landlock ruleset")]
    Landlock(#[source] landlock::RulesetError),
    /// The kernel enforces no Landlock at all.
    #[error("the kernel does not enforce Landlock")]
    LandlockUnsupported,
    /// Dropping to the sandbox identity failed.
    #[error("cannot {what}")]
    Identity {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A capability survived the drop.
    #[error("capabilities left after the drop: effective {effective:#x}, permitted {permitted:#x}")]
    CapabilitiesLeft {
        /// Effective set (low 64 bits).
        effective: u64,
        /// Permitted set.
        permitted: u64,
    },
    /// A `prctl` failed.
    #[error("cannot {what}")]
    Prctl {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The syscall-origin filter could not be built or installed.
    #[error("syscall-origin filter")]
    Origin(#[source] super::origin::OriginError),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp")]
    Seccomp(#[from] FilterError),
}

/// What [`apply`] ended up doing where the host decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Confined by a user namespace (a non-root host) rather than by a uid.
    pub user_namespace: bool,
    /// Landlock enforced every requested right (else: the kernel's subset).
    pub landlock_complete: bool,
}

fn os_err(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Enters `policy`: namespaces, Landlock, identity, capabilities,
/// no_new_privs + not dumpable, seccomp.
pub fn apply(policy: &Policy) -> Result<Applied, SandboxError> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut applied = Applied {
        user_namespace: false,
        landlock_complete: true,
    };
    // A host without root confines its children with a user namespace of
    // their own (which also owns the other new namespaces).
    if !root && (policy.identity.is_some() || policy.namespaces.is_some()) {
        enter_user_namespace(policy.namespaces.is_some())?;
        applied.user_namespace = true;
    } else if let Some(ns) = &policy.namespaces {
        enter_namespaces(ns)?;
    }
    if let Some(l) = &policy.landlock {
        applied.landlock_complete = enter_landlock(l)?;
    }
    if let Some(id) = &policy.identity {
        drop_identity(id, root)?;
        clear_capabilities()?;
    }
    if policy.no_new_privs {
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")?;
        prctl(libc::PR_SET_DUMPABLE, 0, "clear the dumpable flag")?;
    }
    if let Some(o) = &policy.origin {
        o.install().map_err(SandboxError::Origin)?;
    }
    if let Some(s) = &policy.seccomp {
        s.install()?;
    }
    Ok(applied)
}

fn prctl(option: libc::c_int, value: libc::c_ulong, what: &'static str) -> Result<(), SandboxError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS / PR_SET_DUMPABLE take integer arguments
    // only.
    os_err(unsafe { libc::prctl(option, value, 0, 0, 0) }).map_err(|source| SandboxError::Prctl { what, source })
}

fn enter_namespaces(ns: &Namespaces) -> Result<(), SandboxError> {
    for (path, nstype, what) in [
        (&ns.join_net, libc::CLONE_NEWNET, "network"),
        (&ns.join_ipc, libc::CLONE_NEWIPC, "ipc"),
    ] {
        let Some(path) = path else { continue };
        let file = std::fs::File::open(path).map_err(|source| SandboxError::Namespace { what, source })?;
        // SAFETY: setns on a namespace fd we own; no memory is involved.
        os_err(unsafe { libc::setns(file.as_raw_fd(), nstype) })
            .map_err(|source| SandboxError::Namespace { what, source })?;
    }
    if ns.own_mount {
        // SAFETY: unshare has no memory preconditions (single thread).
        os_err(unsafe { libc::unshare(libc::CLONE_NEWNS) })
            .map_err(|source| SandboxError::Namespace { what: "mount", source })?;
    }
    Ok(())
}

/// A user namespace mapping the host's uid/gid to itself (the only ids),
/// with new network, IPC and mount namespaces owned by it.
fn enter_user_namespace(with_others: bool) -> Result<(), SandboxError> {
    let err = |source| SandboxError::Namespace { what: "user", source };
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut flags = libc::CLONE_NEWUSER;
    if with_others {
        flags |= libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWNS;
    }
    // SAFETY: unshare has no memory preconditions (single thread).
    os_err(unsafe { libc::unshare(flags) }).map_err(err)?;
    std::fs::write("/proc/self/setgroups", "deny").map_err(err)?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1")).map_err(err)?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1")).map_err(err)?;
    Ok(())
}

/// Returns whether every requested right is enforced.
fn enter_landlock(l: &LandlockPolicy) -> Result<bool, SandboxError> {
    use landlock::{ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetStatus, Scope};
    // ABI 6: every filesystem right, TCP bind/connect, both scopes.
    let abi = ABI::V6;
    let build = || -> Result<_, landlock::RulesetError> {
        let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(abi))?;
        if l.deny_tcp {
            ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
        }
        if l.scoped {
            ruleset = ruleset.scope(Scope::from_all(abi))?;
        }
        ruleset.create()?.restrict_self()
    };
    let status = build().map_err(SandboxError::Landlock)?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(true),
        RulesetStatus::PartiallyEnforced => Ok(false),
        RulesetStatus::NotEnforced => Err(SandboxError::LandlockUnsupported),
    }
}

/// Clears the bounding and ambient capability sets, then (from root) drops
/// every group and switches to `id` for real, effective and saved ids.
fn drop_identity(id: &Identity, root: bool) -> Result<(), SandboxError> {
    let err = |what| move |source| SandboxError::Identity { what, source };
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integer arguments only.
    os_err(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) })
        .map_err(err("clear the ambient capabilities"))?;
    for cap in 0..=63 {
        // SAFETY: PR_CAPBSET_DROP takes an integer; EINVAL past the last
        // capability the kernel knows ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err("drop the capability bounding set")(e));
        }
    }
    if !root {
        return Ok(());
    }
    // SAFETY: setgroups with an empty list reads no memory.
    os_err(unsafe { libc::setgroups(0, std::ptr::null()) }).map_err(err("drop the supplementary groups"))?;
    // SAFETY: integer arguments only. The process is single-threaded, so
    // glibc's all-threads set*id broadcast is not involved.
    os_err(unsafe { libc::setresgid(id.gid, id.gid, id.gid) }).map_err(err("switch to the sandbox gid"))?;
    // SAFETY: as above.
    os_err(unsafe { libc::setresuid(id.uid, id.uid, id.uid) }).map_err(err("switch to the sandbox uid"))?;
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three out-pointers are valid locals.
    os_err(unsafe { libc::getresuid(&mut r, &mut e, &mut s) }).map_err(err("read back the uid"))?;
    if [r, e, s] != [id.uid; 3] {
        return Err(err("switch to the sandbox uid")(io::Error::other("ids did not change")));
    }
    Ok(())
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties the effective, permitted and inheritable sets and checks that
/// they are empty.
fn clear_capabilities() -> Result<(), SandboxError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a version-3 header and the two data structs capset reads.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    os_err(rc.try_into().unwrap_or(-1)).map_err(|source| SandboxError::Identity {
        what: "clear the capabilities",
        source,
    })?;
    // SAFETY: as above; capget writes the two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    os_err(rc.try_into().unwrap_or(-1)).map_err(|source| SandboxError::Identity {
        what: "read back the capabilities",
        source,
    })?;
    let wide = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    let effective = wide(data[0].effective, data[1].effective);
    let permitted = wide(data[0].permitted, data[1].permitted);
    let inheritable = wide(data[0].inheritable, data[1].inheritable);
    if effective != 0 || permitted != 0 || inheritable != 0 {
        return Err(SandboxError::CapabilitiesLeft { effective, permitted });
    }
    Ok(())
}
