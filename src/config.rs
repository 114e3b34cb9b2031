//! The one configuration type for every backend: limits, budgets, and each
//! backend's own knobs.

use std::path::PathBuf;
use std::time::Duration;

/// Default input and output limit: 4 MiB.
pub const DEFAULT_IO_LIMIT_BYTES: usize = 4 << 20;

/// Limits and budgets shared by every backend, plus per-backend sections.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest accepted input in bytes (any byte string up to it is valid).
    pub input_limit_bytes: usize,
    /// Largest accepted output in bytes.
    pub output_limit_bytes: usize,
    /// Wall-clock budget of one invocation unless the function's spec sets
    /// its own. An over-budget invocation is stopped with `BudgetExceeded`.
    pub default_budget: Duration,
    /// Budget of a function's `init()` at deploy time or cold start.
    pub init_budget: Duration,
    /// Heap limit of one function instance in bytes.
    pub heap_limit_bytes: usize,
    /// Stack size a function runs on, in bytes.
    pub stack_bytes: usize,
    /// Knobs of the `language` backend.
    pub language: LanguageConfig,
    /// Knobs of the `vm` backend.
    pub vm: VmConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            input_limit_bytes: DEFAULT_IO_LIMIT_BYTES,
            output_limit_bytes: DEFAULT_IO_LIMIT_BYTES,
            default_budget: Duration::from_secs(2),
            init_budget: Duration::from_secs(10),
            heap_limit_bytes: 64 << 20,
            stack_bytes: 1 << 20,
            language: LanguageConfig::default(),
            vm: VmConfig::default(),
        }
    }
}

/// Knobs of the `language` backend.
#[derive(Debug, Clone, Default)]
pub struct LanguageConfig {
    /// Worker processes; `None` = cores - 1, at least 1.
    pub workers: Option<usize>,
}

/// Knobs of the `vm` backend.
#[derive(Debug, Clone, Default)]
pub struct VmConfig {
    /// Guest memory in MiB; `None` = the VMM's default.
    pub guest_mem_mib: Option<usize>,
    /// Snapshot store directory; `None` = `$MICROFAAS_STORE` or the user's
    /// cache directory.
    pub store_dir: Option<PathBuf>,
}
