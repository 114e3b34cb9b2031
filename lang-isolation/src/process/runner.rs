//! The runner process's side of the protocol: map the region the host
//! passed at fd 3 (and close that fd), load the sealed artifact memfd at
//! fd 4 with [`crate::runtime`]'s loader (and close it), read the module
//! memfd at fd 5 if started with `--module` (and close it), `init()` it (and
//! `load(module)`), serve requests (warm) or the one posted request (once).

use super::protocol::{MAX_MESSAGE_BYTES, kind, phase, state};
use super::shm::SharedRegion;
use super::spawn::{RUNNER_ARTIFACT_FD, RUNNER_MODULE_FD, SHM_FD};
use crate::runtime::{
    ArtifactImage, Failure, Instance, InstanceConfig, LoadError, LoadedFunction, SealedArtifact, monotonic_ns,
};
use crate::sandbox::{self, SandboxError, SandboxSettings, SandboxSpec};
use ipc::futex::{self, Woken};
use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often an idle runner checks that its host is still alive.
const PARENT_CHECK: Duration = Duration::from_secs(1);

/// Runner exit code after serving (host gone, or `--once` done).
const EXIT_OK: u8 = 0;
/// Runner exit code after a failure that ended the instance.
const EXIT_AFTER_FAILURE: u8 = 3;
/// Runner exit code for unusable arguments or region.
const EXIT_USAGE: u8 = 2;

/// What a runner was asked to do (its command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerArgs {
    /// Exit after the first reply.
    pub once: bool,
    /// The function takes a module, at fd [`RUNNER_MODULE_FD`].
    pub module: bool,
    /// The sandbox to enter before `init()`; without `--sandbox`, every
    /// layer with the default uid/gid (fail closed).
    pub sandbox: SandboxSpec,
}

/// Parses `[--sandbox SPEC] [--module] --warm|--once`.
pub fn parse_args(args: &[OsString]) -> Option<RunnerArgs> {
    let (sandbox, args) = match args {
        [flag, spec, rest @ ..] if flag == "--sandbox" => (SandboxSpec::parse(spec.to_str()?).ok()?, rest),
        _ => (
            SandboxSpec {
                settings: SandboxSettings::default(),
                netns: None,
                ipcns: None,
            },
            args,
        ),
    };
    let (module, args) = match args {
        [flag, rest @ ..] if flag == "--module" => (true, rest),
        _ => (false, args),
    };
    let once = match args {
        [mode] => match mode.to_str()? {
            "--once" => true,
            "--warm" => false,
            _ => return None,
        },
        _ => return None,
    };
    Some(RunnerArgs { once, module, sandbox })
}

/// Takes an inherited fd, if it is open.
fn inherited(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the host hands this process `fd` for it to own; checked open.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Checks, parses and maps the artifact memfd (with its module, read from
/// `module`), and closes both: a runner loads once, so it keeps no
/// mappable fd at all.
fn load(fd: OwnedFd, module: Option<OwnedFd>) -> Result<LoadedFunction, LoadError> {
    let mut image = ArtifactImage::parse(SealedArtifact::from_fd(fd)?)?;
    if let Some(module) = module {
        image = image.with_module(SealedArtifact::from_fd(module)?)?;
    }
    LoadedFunction::load(&image)
}

/// The runner's `main`: returns the process exit code (and never returns
/// while serving).
pub fn main() -> u8 {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let Some(args) = parse_args(&args) else {
        eprintln!(
            "usage: microfaas-runner [--sandbox SPEC] [--module] --warm|--once (with the shared region at fd {SHM_FD}, the artifact memfd at fd {RUNNER_ARTIFACT_FD} and, with --module, the module memfd at fd {RUNNER_MODULE_FD})"
        );
        return EXIT_USAGE;
    };
    let (Some(shm), Some(artifact)) = (inherited(SHM_FD), inherited(RUNNER_ARTIFACT_FD)) else {
        eprintln!("microfaas-runner: no shared region at fd {SHM_FD} or no artifact at fd {RUNNER_ARTIFACT_FD}");
        return EXIT_USAGE;
    };
    let module = match (args.module, inherited(RUNNER_MODULE_FD)) {
        (false, _) => None,
        (true, Some(module)) => Some(module),
        (true, None) => {
            eprintln!("microfaas-runner: --module without a module at fd {RUNNER_MODULE_FD}");
            return EXIT_USAGE;
        }
    };
    // Maps the region and closes its fd.
    let region = match SharedRegion::open(shm) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("microfaas-runner: bad shared region: {e}");
            return EXIT_USAGE;
        }
    };
    // Best effort: without it the host polls for an early exit (`alive` stays 0).
    let _ = ipc::robust::register_death_notice(&region.header().alive);
    serve(&region, &args, artifact, module)
}

fn serve(region: &SharedRegion, args: &RunnerArgs, artifact: OwnedFd, module: Option<OwnedFd>) -> u8 {
    let h = region.header();
    let parent = ipc::spawn::ParentWatch::now();
    let config = InstanceConfig {
        heap_limit_bytes: usize::try_from(h.heap_limit_bytes.load(Ordering::Relaxed)).unwrap_or(usize::MAX),
        stack_bytes: usize::try_from(h.stack_bytes.load(Ordering::Relaxed)).unwrap_or(usize::MAX),
    };
    let function = match load(artifact, module) {
        Ok(f) => f,
        Err(e) => return fatal(region, kind::LOAD_FAILED, phase::LOAD, &error_chain(&e), 0),
    };
    let mut instance = match Instance::new(function, &config) {
        Ok(i) => i,
        Err(e) => return fatal(region, kind::LOAD_FAILED, phase::LOAD, &error_chain(&e), 0),
    };
    // The sandbox is in place before the function's first code, its init().
    let entered = sandbox::runner::policy(&args.sandbox, std::process::id())
        .map_err(SandboxError::from)
        .and_then(|policy| sandbox::apply(&policy));
    if let Err(e) = entered {
        let message = format!("cannot enter the sandbox: {}", error_chain(&e));
        return fatal(region, kind::LOAD_FAILED, phase::LOAD, &message, 0);
    }
    if let Err(failure) = instance.init() {
        let (k, message, value) = describe(&failure);
        return fatal(region, k, phase::INIT, &message, value);
    }
    h.ready_ns.store(monotonic_ns(), Ordering::Relaxed);
    if h.state
        .compare_exchange(state::BOOTING, state::READY, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        futex::wake(&h.state, 1);
    }
    loop {
        loop {
            let s = h.state.load(Ordering::Acquire);
            if s == state::REQUEST {
                break;
            }
            if futex::wait(&h.state, s, Some(PARENT_CHECK)) == Woken::TimedOut && !parent.parent_alive() {
                return EXIT_OK;
            }
        }
        let sequence = h.sequence.load(Ordering::Acquire);
        h.state.store(state::RUNNING, Ordering::Release);
        if args.once {
            futex::wake(&h.state, 1);
        }
        let len = usize::try_from(h.input_len.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        let Some(input) = region.input(len) else {
            post(
                region,
                sequence,
                kind::MALFORMED,
                phase::HANDLE,
                b"input length beyond the buffer",
                0,
                false,
            );
            continue;
        };
        let ended = match instance.handle(input) {
            Ok(output) => {
                let bytes = output.bytes();
                h.entered_ns.store(output.entered_ns, Ordering::Relaxed);
                h.returned_ns.store(output.returned_ns, Ordering::Relaxed);
                if region.write_output(bytes).is_ok() {
                    post(region, sequence, kind::OK, phase::HANDLE, &[], bytes.len(), false);
                } else {
                    post_value(region, sequence, kind::OUTPUT_TOO_LARGE, bytes.len());
                }
                false
            }
            Err(failure) => {
                let (k, message, value) = describe(&failure);
                // Only a returned error leaves the instance trustworthy.
                let fatal = !matches!(failure, Failure::FunctionError { .. });
                post(region, sequence, k, phase::HANDLE, message.as_bytes(), value, fatal);
                fatal
            }
        };
        if ended {
            return EXIT_AFTER_FAILURE;
        }
        if args.once {
            return EXIT_OK;
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// The reply kind, message and value of a failure.
fn describe(failure: &Failure) -> (u32, String, u64) {
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    match failure {
        Failure::FunctionError { message } => (kind::FUNCTION_ERROR, message.clone(), 0),
        Failure::Panicked { message } => (kind::PANICKED, message.clone(), 0),
        Failure::OutOfMemory { message, limit_bytes } => (kind::OUT_OF_MEMORY, message.clone(), as_u64(*limit_bytes)),
        Failure::StackOverflow { stack_bytes } => (kind::STACK_OVERFLOW, String::new(), as_u64(*stack_bytes)),
        // Runners make no gated calls (keys are a language-worker layer).
        Failure::Fault { .. } | Failure::KeyViolation { .. } => (kind::FAULT, failure.to_string(), 0),
        Failure::Preempted | Failure::BadAbi | Failure::Malformed { .. } | Failure::Poisoned => {
            (kind::MALFORMED, failure.to_string(), 0)
        }
    }
}

fn fatal(region: &SharedRegion, k: u32, ph: u32, message: &str, value: u64) -> u8 {
    let sequence = region.header().sequence.load(Ordering::Acquire);
    post(region, sequence, k, ph, message.as_bytes(), value, true);
    EXIT_AFTER_FAILURE
}

fn post_value(region: &SharedRegion, sequence: u64, k: u32, len: usize) {
    post(region, sequence, k, phase::HANDLE, &[], len, false);
}

/// Writes a reply and wakes the host. For `OK`, `value_or_len` is the output
/// length (already in the buffer); otherwise `message` goes to the output
/// buffer and `value_or_len` to `reply_value`.
fn post(
    region: &SharedRegion,
    sequence: u64,
    k: u32,
    ph: u32,
    message: &[u8],
    value_or_len: impl TryInto<u64>,
    fatal: bool,
) {
    let h = region.header();
    let value = value_or_len.try_into().unwrap_or(u64::MAX);
    let len = if k == kind::OK {
        value
    } else {
        let cap = region.layout().output_capacity.min(MAX_MESSAGE_BYTES);
        let message = &message[..message.len().min(cap)];
        let _ = region.write_output(message);
        h.reply_value.store(value, Ordering::Relaxed);
        u64::try_from(message.len()).unwrap_or(0)
    };
    h.reply_len.store(len, Ordering::Relaxed);
    h.reply_kind.store(k, Ordering::Relaxed);
    h.phase.store(ph, Ordering::Relaxed);
    h.fatal.store(u32::from(fatal), Ordering::Relaxed);
    h.reply_sequence.store(sequence, Ordering::Relaxed);
    h.state.store(state::REPLY, Ordering::Release);
    futex::wake(&h.state, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let default_sandbox = SandboxSpec {
            settings: SandboxSettings::default(),
            netns: None,
            ipcns: None,
        };
        assert_eq!(
            parse_args(&a(&["--once"])),
            Some(RunnerArgs {
                once: true,
                module: false,
                sandbox: default_sandbox
            })
        );
        assert_eq!(
            parse_args(&a(&["--module", "--warm"])).map(|r| (r.once, r.module)),
            Some((false, true))
        );
        assert_eq!(
            parse_args(&a(&["--sandbox", "uid=7,gid=8,layers=-n-s", "--module", "--once"])).map(|r| r.module),
            Some(true)
        );
        assert_eq!(parse_args(&a(&["--warm", "--module"])), None);
        assert_eq!(parse_args(&a(&["--warm"])).map(|r| r.once), Some(false));
        assert_eq!(parse_args(&a(&["--cold"])), None);
        assert_eq!(parse_args(&a(&["--warm", "/x.so"])), None);
        assert_eq!(parse_args(&a(&[])), None);
        let sandboxed = parse_args(&a(&["--sandbox", "uid=7,gid=8,layers=-n-s", "--warm"])).unwrap();
        assert_eq!(sandboxed.sandbox.settings.uid, 7);
        assert!(!sandboxed.sandbox.settings.layers.identity);
        assert_eq!(parse_args(&a(&["--sandbox", "bogus", "--warm"])), None);
    }
}
