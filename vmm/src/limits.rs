//! The process's open-file limit: every instance holds two fds (its VM and
//! its vCPU), so a process that hosts thousands raises its soft limit to
//! the hard limit at start; when even that binds, KVM's `EMFILE` becomes
//! [`crate::VmmError::FdLimit`], which says so.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The (soft, hard) `RLIMIT_NOFILE`.
pub fn fd_limit() -> Option<(u64, u64)> {
    getrlimit(Resource::RLIMIT_NOFILE).ok()
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new
/// soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    let (soft, hard) = fd_limit()?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    }
    fd_limit().map(|(soft, _)| soft)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let soft = super::raise_fd_limit().unwrap();
        let (now, hard) = super::fd_limit().unwrap();
        assert_eq!((soft, now), (hard, hard));
    }
}
