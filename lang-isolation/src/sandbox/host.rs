//! The host's side: one empty network namespace and one IPC namespace per
//! host process, created once (a new network namespace costs milliseconds,
//! far more than a process-backend cold start) and joined by every
//! sandboxed child with `setns` through `/proc/<host>/fd/<n>`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

/// The host's shared namespaces, as paths a (still privileged) child opens.
#[derive(Debug)]
pub struct HostNamespaces {
    /// `/proc/<host pid>/fd/<n>` of the network namespace.
    pub net_path: String,
    /// `/proc/<host pid>/fd/<n>` of the IPC namespace.
    pub ipc_path: String,
    _net: OwnedFd,
    _ipc: OwnedFd,
}

static SHARED: OnceLock<Option<HostNamespaces>> = OnceLock::new();

/// The host's shared namespaces, created on first use; `None` where the
/// kernel refuses them (a host without `CAP_SYS_ADMIN`).
pub fn shared_namespaces() -> Option<&'static HostNamespaces> {
    SHARED.get_or_init(|| create().ok()).as_ref()
}

fn create() -> std::io::Result<HostNamespaces> {
    // A helper thread unshares (namespaces are per thread for net and ipc),
    // opens its two namespace files and exits; the fds keep them alive.
    let (net, ipc) = std::thread::Builder::new()
        .name("microfaas-netns".to_owned())
        .spawn(|| -> std::io::Result<(OwnedFd, OwnedFd)> {
            // SAFETY: unshare has no memory preconditions; it changes only
            // this helper thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let net = std::fs::File::open("/proc/thread-self/ns/net")?;
            let ipc = std::fs::File::open("/proc/thread-self/ns/ipc")?;
            Ok((net.into(), ipc.into()))
        })?
        .join()
        .map_err(|_| std::io::Error::other("namespace helper thread panicked"))??;
    let pid = std::process::id();
    Ok(HostNamespaces {
        net_path: format!("/proc/{pid}/fd/{}", net.as_raw_fd()),
        ipc_path: format!("/proc/{pid}/fd/{}", ipc.as_raw_fd()),
        _net: net,
        _ipc: ipc,
    })
}
