//! The environment header every report starts with.

use serde::Serialize;
use std::process::Command;

/// What machine the numbers were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    /// CPU model name.
    pub cpu_model: String,
    /// Logical cores.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// Whether the host is itself a virtual machine (the `hypervisor` CPU flag).
    pub virtualised: bool,
    /// Whether `/dev/kvm` can be opened.
    pub kvm_usable: bool,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Git revision of the code measured.
    pub git_revision: String,
    /// When the run started (UTC, RFC 3339).
    pub date: String,
    /// Memory protection keys in `language` workers with the default
    /// configuration (`enabled (15 keys)`, `unavailable (reason)`).
    pub language_pkeys: String,
}

impl Environment {
    /// Reads the environment of this machine.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        };
        let cpu_model = field("model name").unwrap_or_else(|| "unknown".to_owned());
        let virtualised = field("flags").is_some_and(|f| f.split_whitespace().any(|w| w == "hypervisor"));
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
            })
            .map_or(0, |kb| kb / 1024);
        Self {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
            virtualised,
            kvm_usable: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            memory_mib,
            git_revision: command_output("git", &["rev-parse", "--short=12", "HEAD"])
                .map(|rev| {
                    let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"])
                        .is_some_and(|s| !s.is_empty());
                    if dirty { format!("{rev}-dirty") } else { rev }
                })
                .unwrap_or_else(|| "unknown".to_owned()),
            date: command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".to_owned()),
            language_pkeys: microfaas::Config::default().sandbox.pkeys_state().to_string(),
        }
    }

    /// The header as text lines.
    pub fn header(&self) -> String {
        format!(
            "host: {} ({} cores, {} MiB), kernel {}, {}; KVM {}; language pkeys {}; revision {}; {}",
            self.cpu_model,
            self.cores,
            self.memory_mib,
            self.kernel,
            if self.virtualised {
                "itself virtualised"
            } else {
                "bare metal"
            },
            if self.kvm_usable { "usable" } else { "unusable" },
            self.language_pkeys,
            self.git_revision,
            self.date
        )
    }
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
