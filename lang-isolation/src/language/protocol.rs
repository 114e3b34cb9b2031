//! What travels through the queues: request and reply descriptors, the
//! operation and outcome codes, and the worker's command line. All decoding
//! of values written by the other side is checked here (a worker is not
//! trusted to write sane values into shared memory).

use std::time::Duration;

/// Operation codes of a [`Request`].
pub mod op {
    /// Run a preloaded function (warm).
    pub const INVOKE_WARM: u32 = 1;
    /// A cold start: a fresh instance (by the worker's `ColdStart` path), run, dropped.
    pub const INVOKE_COLD: u32 = 2;
    /// Load and init a function; its catalog message (with the artifact
    /// memfd) was sent on the worker's socket before the request.
    pub const LOAD: u32 = 3;
    /// Unload a function.
    pub const UNLOAD: u32 = 4;
}

/// `Request::reserved` of a [`op::LOAD`]: register (and pre-link) the
/// function only, make no resident instance and run no `init()` (a lazily
/// resident function: `DispatcherConfig::lazy_resident`).
pub const LOAD_REGISTER_ONLY: u32 = 1;

/// One request: dispatcher -> worker.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request {
    /// Dispatcher-wide sequence number, never 0.
    pub seq: u64,
    /// Budget of the function's run in nanoseconds.
    pub budget_ns: u64,
    /// Bytes of input in the slot's input area.
    pub input_len: u64,
    /// One of [`op`].
    pub op: u32,
    /// Function index.
    pub func: u32,
    /// Slot whose data areas this request uses.
    pub slot: u32,
    /// Zero.
    pub reserved: u32,
}

/// One reply: worker -> dispatcher.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reply {
    /// The request's `seq`.
    pub seq: u64,
    /// Bytes in the slot's output area (output or message).
    pub out_len: u64,
    /// Nanoseconds spent making the function ready (cold: map + relocate + init).
    pub start_ns: u64,
    /// The shim's entry timestamp (`CLOCK_MONOTONIC`).
    pub entered_ns: u64,
    /// The shim's return timestamp.
    pub returned_ns: u64,
    /// Outcome-specific number (the forbidden syscall, the output length
    /// that was too large).
    pub detail: u64,
    /// The request's slot.
    pub slot: u32,
    /// One of [`Outcome`] as `u32`.
    pub outcome: u32,
}

/// How a request ended, as the worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Outcome {
    /// Output in the slot's output area.
    Ok = 1,
    /// `handle` returned an error; its message in the output area.
    FunctionError = 2,
    /// The function panicked; the message in the output area.
    Panicked = 3,
    /// The heap limit was reached.
    OutOfMemory = 4,
    /// The guard page was hit.
    StackOverflow = 5,
    /// Stopped at its deadline.
    Preempted = 6,
    /// A forbidden syscall (number in `detail`).
    PolicyViolation = 7,
    /// The output (length in `detail`) exceeds the output area.
    OutputTooLarge = 8,
    /// Loading or `init` failed; the message in the output area.
    InitFailed = 9,
    /// A warm request for a function the worker has not loaded.
    NotLoaded = 10,
    /// The function faulted or broke the ABI; the message in the output area.
    Crashed = 11,
    /// The request itself was malformed (bad slot, length or operation).
    BadRequest = 12,
}

impl Outcome {
    /// Decodes a value read from shared memory.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Ok,
            2 => Self::FunctionError,
            3 => Self::Panicked,
            4 => Self::OutOfMemory,
            5 => Self::StackOverflow,
            6 => Self::Preempted,
            7 => Self::PolicyViolation,
            8 => Self::OutputTooLarge,
            9 => Self::InitFailed,
            10 => Self::NotLoaded,
            11 => Self::Crashed,
            12 => Self::BadRequest,
            _ => return None,
        })
    }
}

/// How over-budget invocations are stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preemption {
    /// Default: no timer; the dispatcher's watchdog signals a worker only when
    /// its current invocation has passed its deadline. Free within budget.
    Watchdog,
    /// The paper's: a per-worker POSIX timer delivers SIGALRM every
    /// `quantum`; the handler stops the function once past its deadline.
    Periodic {
        /// Timer period.
        quantum: Duration,
    },
    /// Budgets are not enforced at all: the baseline of the preemption
    /// experiments. Only for measurements.
    Disabled,
}

impl Preemption {
    /// The `--preemption` value.
    fn to_arg(self) -> String {
        match self {
            Preemption::Watchdog => "watchdog".into(),
            Preemption::Disabled => "off".into(),
            Preemption::Periodic { quantum } => format!("periodic:{}", nanos(quantum).max(1)),
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value {
            "watchdog" => Some(Preemption::Watchdog),
            "off" => Some(Preemption::Disabled),
            _ => {
                let ns: u64 = value.strip_prefix("periodic:")?.parse().ok()?;
                (ns > 0).then(|| Preemption::Periodic {
                    quantum: Duration::from_nanos(ns),
                })
            }
        }
    }
}

/// Everything a worker process needs, passed on its command line (its
/// shared region and catalog socket are inherited fds, see
/// [`crate::runtime::fds`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// Worker index (for messages).
    pub index: usize,
    /// CPU to pin to, if any.
    pub cpu: Option<usize>,
    /// Slots (= ring capacity), a power of two.
    pub depth: u32,
    /// Input area per slot, bytes.
    pub input_limit: usize,
    /// Output area per slot, bytes.
    pub output_limit: usize,
    /// Heap limit per function instance, bytes.
    pub heap_limit: usize,
    /// Function stack, bytes.
    pub stack_bytes: usize,
    /// Poll this long before parking when idle.
    pub idle_spin: Duration,
    /// Budget of `init()`.
    pub init_budget: Duration,
    /// Preemption mode.
    pub preemption: Preemption,
    /// The sandbox to enter (a [`crate::sandbox::SandboxSettings::to_arg`]
    /// value) before any function is loaded.
    pub sandbox: String,
    /// How a cold start gets its instance.
    pub cold_start: ColdStart,
}

/// How a worker's cold start gets its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColdStart {
    /// Map and relocate a fresh private copy of the artifact, run `init()`
    /// (the loader's path, before pre-linked images).
    Load,
    /// Map the artifact's pre-linked image copy-on-write into the cold
    /// window (no relocation), run `init()`.
    Prelinked,
    /// Like `Prelinked`, but from the image's post-init snapshot once it has
    /// one: `init()` runs only at the first cold start.
    #[default]
    Snapshot,
}

impl ColdStart {
    /// Its command-line value.
    pub fn to_arg(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Prelinked => "prelinked",
            Self::Snapshot => "snapshot",
        }
    }

    /// Parses [`ColdStart::to_arg`]'s value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "load" => Some(Self::Load),
            "prelinked" => Some(Self::Prelinked),
            "snapshot" => Some(Self::Snapshot),
            _ => None,
        }
    }
}

/// A malformed worker command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// A flag the worker does not know.
    #[error("unknown argument `{0}`")]
    Unknown(String),
    /// A flag without its value.
    #[error("`{0}` needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("bad value `{value}` for `{flag}`")]
    BadValue {
        /// The flag.
        flag: String,
        /// Its value.
        value: String,
    },
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl WorkerArgs {
    /// The command line that [`WorkerArgs::parse`] reads back.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--index".into(),
            self.index.to_string(),
            "--depth".into(),
            self.depth.to_string(),
            "--input-limit".into(),
            self.input_limit.to_string(),
            "--output-limit".into(),
            self.output_limit.to_string(),
            "--heap-limit".into(),
            self.heap_limit.to_string(),
            "--stack".into(),
            self.stack_bytes.to_string(),
            "--idle-spin-ns".into(),
            nanos(self.idle_spin).to_string(),
            "--init-budget-ns".into(),
            nanos(self.init_budget).to_string(),
            "--preemption".into(),
            self.preemption.to_arg(),
            "--sandbox".into(),
            self.sandbox.clone(),
            "--cold-start".into(),
            self.cold_start.to_arg().into(),
        ];
        if let Some(cpu) = self.cpu {
            v.push("--cpu".into());
            v.push(cpu.to_string());
        }
        v
    }

    /// Parses a worker command line (without the program name).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ArgsError> {
        fn num<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, ArgsError> {
            value.parse().map_err(|_| ArgsError::BadValue {
                flag: flag.to_owned(),
                value: value.to_owned(),
            })
        }
        let mut a = WorkerArgs {
            index: 0,
            cpu: None,
            depth: 0,
            input_limit: 0,
            output_limit: 0,
            heap_limit: 0,
            stack_bytes: 0,
            idle_spin: Duration::ZERO,
            init_budget: Duration::ZERO,
            preemption: Preemption::Watchdog,
            sandbox: String::new(),
            cold_start: ColdStart::default(),
        };
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| ArgsError::MissingValue(flag.clone()))?;
            let f = flag.as_str();
            match f {
                "--index" => a.index = num(f, &value)?,
                "--cpu" => a.cpu = Some(num(f, &value)?),
                "--depth" => a.depth = num(f, &value)?,
                "--input-limit" => a.input_limit = num(f, &value)?,
                "--output-limit" => a.output_limit = num(f, &value)?,
                "--heap-limit" => a.heap_limit = num(f, &value)?,
                "--stack" => a.stack_bytes = num(f, &value)?,
                "--idle-spin-ns" => a.idle_spin = Duration::from_nanos(num(f, &value)?),
                "--init-budget-ns" => a.init_budget = Duration::from_nanos(num(f, &value)?),
                "--preemption" => {
                    a.preemption = Preemption::parse(&value).ok_or_else(|| ArgsError::BadValue {
                        flag: flag.clone(),
                        value: value.clone(),
                    })?;
                }
                "--sandbox" => a.sandbox = value,
                "--cold-start" => {
                    a.cold_start = ColdStart::parse(&value).ok_or_else(|| ArgsError::BadValue {
                        flag: flag.clone(),
                        value: value.clone(),
                    })?;
                }
                _ => return Err(ArgsError::Unknown(flag)),
            }
        }
        if !crate::language::ring::valid_capacity(a.depth) {
            return Err(ArgsError::BadValue {
                flag: "--depth".into(),
                value: a.depth.to_string(),
            });
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkerArgs {
        WorkerArgs {
            index: 3,
            cpu: Some(1),
            depth: 8,
            input_limit: 4 << 20,
            output_limit: 1 << 20,
            heap_limit: 64 << 20,
            stack_bytes: 1 << 20,
            idle_spin: Duration::from_micros(200),
            init_budget: Duration::from_secs(10),
            preemption: Preemption::Periodic {
                quantum: Duration::from_micros(20),
            },
            sandbox: "uid=1,gid=1,layers=inls".into(),
            cold_start: ColdStart::Prelinked,
        }
    }

    #[test]
    fn args_round_trip() {
        let a = sample();
        assert_eq!(WorkerArgs::parse(a.to_args()).unwrap(), a);
        for preemption in [Preemption::Watchdog, Preemption::Disabled] {
            let b = WorkerArgs {
                cpu: None,
                preemption,
                sandbox: "uid=1,gid=1,layers=----".into(),
                ..sample()
            };
            assert_eq!(WorkerArgs::parse(b.to_args()).unwrap(), b);
        }
        assert!(Preemption::parse("periodic:0").is_none());
        assert!(Preemption::parse("sometimes").is_none());
        for cold_start in [ColdStart::Load, ColdStart::Prelinked, ColdStart::Snapshot] {
            let c = WorkerArgs { cold_start, ..sample() };
            assert_eq!(WorkerArgs::parse(c.to_args()).unwrap(), c);
        }
        assert!(ColdStart::parse("eager").is_none());
    }

    #[test]
    fn args_errors() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            WorkerArgs::parse(s(&["--depth", "6"])),
            Err(ArgsError::BadValue { .. })
        ));
        assert!(matches!(
            WorkerArgs::parse(s(&["--depth"])),
            Err(ArgsError::MissingValue(_))
        ));
        assert!(matches!(
            WorkerArgs::parse(s(&["--bogus", "1"])),
            Err(ArgsError::Unknown(_))
        ));
    }

    #[test]
    fn outcome_codes() {
        for v in 1..=12 {
            assert_eq!(Outcome::from_u32(v).map(|o| o as u32), Some(v));
        }
        assert_eq!(Outcome::from_u32(0), None);
        assert_eq!(Outcome::from_u32(13), None);
    }
}
