//! The host's sandbox settings and how they travel to a sandboxed process:
//! one command-line value (`--sandbox SPEC`), parsed here; and which uid
//! each tenant's processes run as ([`TenantUids`]).

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

/// Default uid of sandboxed processes: a dedicated unprivileged uid that no
/// account on a usual system has (Debian's range for dynamically allocated
/// system users ends at 64999; `nobody` is 65534 and shared by others).
pub const DEFAULT_SANDBOX_UID: u32 = 64_901;
/// Default gid of sandboxed processes.
pub const DEFAULT_SANDBOX_GID: u32 = 64_901;
/// Default number of uids (and gids) from the base that tenants use: tenant
/// `k` runs as `base + k`, so 64901..=65412 by default, clear of `nobody`
/// (65534) and of the 65000-65533 some systems hand out.
pub const DEFAULT_TENANT_UIDS: u32 = 512;
/// The tenant that always runs as the base uid itself (offset 0).
pub const DEFAULT_TENANT: &str = "default";

/// Which layers of the sandbox are entered. All on by default; turning any
/// off is for measurements and the hostile tests' control runs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layers {
    /// Own uid/gid, no capabilities.
    pub identity: bool,
    /// Net, ipc and mount namespaces.
    pub namespaces: bool,
    /// Landlock (filesystem, TCP, scopes).
    pub landlock: bool,
    /// The seccomp allowlist.
    pub seccomp: bool,
    /// Language workers: memory protection keys between the runtime and
    /// each function instance (where the CPU has PKU), and, with seccomp,
    /// memory-layout and signal system calls only from the worker's own
    /// text (`super::origin`).
    pub pkeys: bool,
}

impl Layers {
    /// Every layer.
    pub const ALL: Self = Self {
        identity: true,
        namespaces: true,
        landlock: true,
        seccomp: true,
        pkeys: true,
    };
    /// None (no_new_privs and not-dumpable still apply).
    pub const NONE: Self = Self {
        identity: false,
        namespaces: false,
        landlock: false,
        seccomp: false,
        pkeys: false,
    };
}

/// The sandbox a host puts its workers or runners in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxSettings {
    /// Uid to drop to (from a root host); with tenants, the base of their
    /// range (the default tenant's uid).
    pub uid: u32,
    /// Gid to drop to; with tenants, the base of their range.
    pub gid: u32,
    /// Uids (and gids) from the base that tenants may use, at least 1:
    /// tenant `k` of this host process runs as `uid + k`, `gid + k`.
    pub tenant_uids: u32,
    /// Which layers.
    pub layers: Layers,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            uid: DEFAULT_SANDBOX_UID,
            gid: DEFAULT_SANDBOX_GID,
            tenant_uids: DEFAULT_TENANT_UIDS,
            layers: Layers::ALL,
        }
    }
}

impl SandboxSettings {
    /// The settings with every layer off.
    pub fn off() -> Self {
        Self {
            layers: Layers::NONE,
            ..Self::default()
        }
    }

    /// The settings of `tenant`'s processes: the same layers, the uid and
    /// gid its ordinal in this host process gives ([`TenantUids`]; the
    /// default tenant keeps the base). Refused when the range is used up.
    pub fn for_tenant(&self, tenant: &str) -> Result<Self, UidRangeExhausted> {
        let offset = {
            let mut uids = HOST_TENANTS.lock().unwrap_or_else(PoisonError::into_inner);
            uids.offset(tenant, self.tenant_uids)
                .map_err(|e| UidRangeExhausted { base: self.uid, ..e })?
        };
        let (uid, gid) = self
            .uid
            .checked_add(offset)
            .zip(self.gid.checked_add(offset))
            .ok_or_else(|| UidRangeExhausted {
                tenant: tenant.to_owned(),
                base: self.uid,
                count: self.tenant_uids,
            })?;
        Ok(Self { uid, gid, ..*self })
    }

    /// The `--sandbox` value for a child of this host. With namespaces on,
    /// names the host's shared namespaces (created on first use; where the
    /// kernel refuses them, the child stays in the host's).
    pub fn to_arg(&self) -> String {
        let l = self.layers;
        let flag = |on: bool, c: char| if on { c } else { '-' };
        let mut s = format!(
            "uid={},gid={},layers={}{}{}{}{}",
            self.uid,
            self.gid,
            flag(l.identity, 'i'),
            flag(l.namespaces, 'n'),
            flag(l.landlock, 'l'),
            flag(l.seccomp, 's'),
            flag(l.pkeys, 'k'),
        );
        if l.namespaces
            && let Some(ns) = super::host::shared_namespaces()
        {
            s.push_str(&format!(",netns={},ipcns={}", ns.net_path, ns.ipc_path));
        }
        s
    }
}

/// Every tenant of this host process gets one stable offset into the uid
/// range, whichever backend deploys it first (so a tenant's language workers
/// and process runners share its uid, and two tenants never share one).
static HOST_TENANTS: Mutex<TenantUids> = Mutex::new(TenantUids::new());

/// The tenants seen so far, in order: tenant `k` (its offset) runs as
/// `base + k`. The default tenant is always offset 0, others take 1, 2, ...
/// in first-seen order. Pure: the decision behind
/// [`SandboxSettings::for_tenant`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TenantUids {
    /// Tenants other than the default one; tenant `named[i]` has offset `i + 1`.
    named: Vec<String>,
}

/// No uid is left in the configured range for a new tenant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no uid left for tenant `{tenant}`: the tenant uid range {base}..{base}+{count} is used up \
     (raise `tenant_uids` in the sandbox config, with uids no account uses)"
)]
pub struct UidRangeExhausted {
    /// The tenant refused.
    pub tenant: String,
    /// The base uid.
    pub base: u32,
    /// The range's size.
    pub count: u32,
}

impl TenantUids {
    /// No tenant yet.
    pub const fn new() -> Self {
        Self { named: Vec::new() }
    }

    /// `tenant`'s offset (assigning the next free one on first sight), if
    /// it is below `count`. A refused tenant is not recorded.
    pub fn offset(&mut self, tenant: &str, count: u32) -> Result<u32, UidRangeExhausted> {
        let refused = || UidRangeExhausted {
            tenant: tenant.to_owned(),
            base: 0,
            count,
        };
        let index = if tenant == DEFAULT_TENANT {
            0
        } else if let Some(i) = self.named.iter().position(|t| t == tenant) {
            i.checked_add(1).ok_or_else(refused)?
        } else {
            self.named.len().checked_add(1).ok_or_else(refused)?
        };
        let offset = u32::try_from(index).map_err(|_| refused())?;
        if offset >= count {
            return Err(refused());
        }
        if offset > 0 && usize::try_from(offset).ok() == self.named.len().checked_add(1) {
            self.named.push(tenant.to_owned());
        }
        Ok(offset)
    }
}

/// What a sandboxed process was told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The settings.
    pub settings: SandboxSettings,
    /// The network namespace to join.
    pub netns: Option<PathBuf>,
    /// The IPC namespace to join.
    pub ipcns: Option<PathBuf>,
}

/// A malformed `--sandbox` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad sandbox specification `{0}`")]
pub struct SpecError(pub String);

impl SandboxSpec {
    /// Parses a value written by [`SandboxSettings::to_arg`].
    pub fn parse(value: &str) -> Result<Self, SpecError> {
        let bad = || SpecError(value.to_owned());
        let mut uid = None;
        let mut gid = None;
        let mut layers = None;
        let (mut netns, mut ipcns) = (None, None);
        for part in value.split(',') {
            let (key, v) = part.split_once('=').ok_or_else(bad)?;
            match key {
                "uid" => uid = Some(v.parse().map_err(|_| bad())?),
                "gid" => gid = Some(v.parse().map_err(|_| bad())?),
                "layers" => {
                    let b = v.as_bytes();
                    let on = |i: usize, c: u8| match b.get(i) {
                        Some(&x) if x == c => Ok(true),
                        Some(b'-') => Ok(false),
                        _ => Err(bad()),
                    };
                    // Four letters (before protection keys: off) or five.
                    if b.len() != 4 && b.len() != 5 {
                        return Err(bad());
                    }
                    layers = Some(Layers {
                        identity: on(0, b'i')?,
                        namespaces: on(1, b'n')?,
                        landlock: on(2, b'l')?,
                        seccomp: on(3, b's')?,
                        pkeys: b.len() == 5 && on(4, b'k')?,
                    });
                }
                "netns" if !v.is_empty() => netns = Some(PathBuf::from(v)),
                "ipcns" if !v.is_empty() => ipcns = Some(PathBuf::from(v)),
                _ => return Err(bad()),
            }
        }
        Ok(Self {
            settings: SandboxSettings {
                uid: uid.ok_or_else(bad)?,
                gid: gid.ok_or_else(bad)?,
                tenant_uids: 1,
                layers: layers.ok_or_else(bad)?,
            },
            netns,
            ipcns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let mut s = SandboxSettings::default();
        s.layers.namespaces = false;
        s.layers.landlock = false;
        s.tenant_uids = 1;
        let spec = SandboxSpec::parse(&s.to_arg()).unwrap();
        assert_eq!(spec.settings, s);
        assert_eq!(spec.netns, None);
        let spec = SandboxSpec::parse("uid=1,gid=2,layers=i-ls,netns=/proc/9/fd/5,ipcns=/proc/9/fd/6").unwrap();
        assert_eq!(spec.settings.uid, 1);
        assert!(!spec.settings.layers.namespaces && spec.settings.layers.seccomp);
        assert_eq!(spec.netns.as_deref(), Some(std::path::Path::new("/proc/9/fd/5")));
        for bad in [
            "",
            "uid=1,gid=2",
            "uid=1,gid=2,layers=inl",
            "uid=1,gid=2,layers=xnls",
            "uid=x,gid=2,layers=inls",
            "uid=1,gid=2,layers=inls,what=1",
        ] {
            assert!(SandboxSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tenants_get_stable_distinct_offsets_and_the_default_keeps_the_base() {
        let mut t = TenantUids::new();
        assert_eq!(t.offset("alice", 4), Ok(1));
        assert_eq!(t.offset(DEFAULT_TENANT, 4), Ok(0));
        assert_eq!(t.offset("bob", 4), Ok(2));
        assert_eq!(t.offset("alice", 4), Ok(1), "stable");
        assert_eq!(t.offset("carol", 4), Ok(3));
        // The range is used up: refused, and not recorded.
        let refused = t.offset("dave", 4).unwrap_err();
        assert_eq!(refused.tenant, "dave");
        assert_eq!(t.offset("dave", 4).unwrap_err().count, 4);
        // Known tenants still resolve; a bigger range admits the next one.
        assert_eq!(t.offset("bob", 4), Ok(2));
        assert_eq!(t.offset("dave", 5), Ok(4));
        // A range of one uid holds only the default tenant.
        let mut one = TenantUids::new();
        assert_eq!(one.offset(DEFAULT_TENANT, 1), Ok(0));
        assert!(one.offset("x", 1).is_err());
        assert!(one.offset(DEFAULT_TENANT, 0).is_err());
    }

    #[test]
    fn for_tenant_moves_uid_and_gid_together_and_names_the_range_when_refused() {
        let base = SandboxSettings {
            uid: 70_000,
            gid: 80_000,
            tenant_uids: 1,
            layers: Layers::ALL,
        };
        assert_eq!(base.for_tenant(DEFAULT_TENANT), Ok(base));
        let e = base.for_tenant("for-tenant-test-other").unwrap_err();
        assert_eq!((e.base, e.count), (70_000, 1));
        assert!(e.to_string().contains("for-tenant-test-other"), "{e}");
        let wide = SandboxSettings {
            tenant_uids: u32::MAX,
            ..base
        };
        let s = wide.for_tenant("for-tenant-test-other").unwrap();
        assert_eq!(s.uid - 70_000, s.gid - 80_000);
        assert!(s.uid > 70_000);
        assert_eq!(s.layers, Layers::ALL);
        let top = SandboxSettings { uid: u32::MAX, ..wide };
        assert!(top.for_tenant("for-tenant-test-other").is_err(), "no wrap-around");
    }
}
