//! The host's sandbox settings and how they travel to a sandboxed process:
//! one command-line value (`--sandbox SPEC`), parsed here.

use std::path::PathBuf;

/// Default uid of sandboxed processes: a dedicated unprivileged uid that no
/// account on a usual system has (Debian's range for dynamically allocated
/// system users ends at 64999; `nobody` is 65534 and shared by others).
pub const DEFAULT_SANDBOX_UID: u32 = 64_901;
/// Default gid of sandboxed processes.
pub const DEFAULT_SANDBOX_GID: u32 = 64_901;

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
    /// Uid to drop to (from a root host).
    pub uid: u32,
    /// Gid to drop to.
    pub gid: u32,
    /// Which layers.
    pub layers: Layers,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            uid: DEFAULT_SANDBOX_UID,
            gid: DEFAULT_SANDBOX_GID,
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
}
