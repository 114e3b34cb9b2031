//! The `microfaas` command line: build functions, invoke them on any backend.

use clap::{Parser, Subcommand};
use microfaas::error_chain as chain;
use microfaas::{
    Artifact, Backend, BackendKind, Config, Error, ErrorKind, FunctionSpec, StartPath, StartRequest, Tenant,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// `println!` that ends the command quietly when stdout's reader has gone
/// away (`microfaas snapshots tree --json | head`): `println!` would panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::stdout_line(format_args!($($arg)*))
    };
}

mod snapshots_cli;

/// Writes one line to stdout (see [`outln!`]).
pub(crate) fn stdout_line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        stdout_failed(&e);
    }
}

/// A write to stdout failed: a closed pipe ends the command quietly with
/// success, as it does for `head`-fed Unix tools; anything else is an error.
fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1);
}

/// microfaas: one FaaS host, three isolation backends (vm, language, process).
#[derive(Debug, Parser)]
#[command(name = "microfaas", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Invoke a function once: its output goes to stdout, the start path and
    /// timings to stderr (or everything as one JSON object with --json).
    Invoke {
        /// Backend to run on.
        #[arg(long, value_parser = ["process", "language", "vm"])]
        backend: String,
        /// A function from functions/ (e.g. echo) or a path to a built artifact.
        function: String,
        /// Deploy-time data for the function's `load` (e.g. a WebAssembly
        /// module for wasm-runtime): an example module's name (`microfaas
        /// functions --modules`) or a file.
        #[arg(long)]
        module: Option<String>,
        /// Input text.
        #[arg(long, conflicts_with = "input_file")]
        input: Option<String>,
        /// File whose bytes are the input.
        #[arg(long)]
        input_file: Option<PathBuf>,
        /// Force a cold start.
        #[arg(long)]
        cold: bool,
        /// Invocation budget in milliseconds.
        #[arg(long)]
        budget_ms: Option<u64>,
        /// The tenant the function is deployed for (1-32 of [a-z0-9_-]):
        /// its own `language` workers and its own sandbox uid.
        #[arg(long, default_value = Tenant::DEFAULT)]
        tenant: Tenant,
        /// Print one JSON object on stdout instead.
        #[arg(long)]
        json: bool,
        /// The vm backend's snapshot store (default: $MICROFAAS_STORE, else
        /// the user's cache directory).
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Compile a function crate into one verified shared object.
    Build {
        /// The function crate's directory.
        dir: PathBuf,
        /// Where to write the artifact (default: DIR/target/microfaas/NAME.so).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a built artifact.
    Verify {
        /// The artifact file.
        artifact: PathBuf,
    },
    /// List the example functions (with --modules: the example WebAssembly
    /// modules, to run on wasm-runtime with `invoke --module`).
    Functions {
        /// List the example modules instead.
        #[arg(long)]
        modules: bool,
    },
    /// Inspect the vm backend's snapshot store: tree, show, diff, verify, gc.
    Snapshots(snapshots_cli::SnapshotsCommand),
    /// Serve the AWS Lambda API (HTTP/1.1, SigV4) for every backend until
    /// SIGTERM; prints `listening http://ADDR` on stdout once bound, one
    /// JSON access-log line per request on stderr.
    Serve {
        /// Address to listen on (e.g. 127.0.0.1:9000; port 0 picks one).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// AWS shared-credentials file (INI) of the accepted access keys.
        #[arg(long, required_unless_present = "insecure_no_auth")]
        credentials: Option<PathBuf>,
        /// Accept unsigned requests (benchmarks only).
        #[arg(long, conflicts_with = "credentials")]
        insecure_no_auth: bool,
        /// The function registry directory (shared by a cluster's nodes).
        #[arg(long, default_value = "microfaas-registry")]
        registry: PathBuf,
        /// Where the vm backend's snapshot stores go (default: REGISTRY/nodes/NODE/vm-store).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Event invocations queued at most (more get 429).
        #[arg(long, default_value_t = 1024)]
        event_queue: usize,
        /// The node's name (default: the listen address).
        #[arg(long)]
        node_name: Option<String>,
        /// The region printed in ARNs.
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// Connections served at once.
        #[arg(long, default_value_t = 4096)]
        max_connections: usize,
        /// Seconds SIGTERM waits for in-flight requests and queued events.
        #[arg(long, default_value_t = 60)]
        drain_timeout_s: u64,
        /// Append the access log to this file instead of stderr.
        #[arg(long)]
        access_log: Option<PathBuf>,
    },
}

/// A failure of the command, with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
    kind: Option<ErrorKind>,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match e.kind() {
            ErrorKind::BackendUnavailable
            | ErrorKind::UnknownFunction
            | ErrorKind::UnsupportedStart
            | ErrorKind::Unsupported => 2,
            ErrorKind::InvalidArtifact | ErrorKind::KvmUnavailable => 2,
            _ => 1,
        };
        Failure {
            code,
            message: chain(&e),
            kind: Some(e.kind()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = matches!(cli.command, Command::Invoke { json: true, .. });
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                let obj = serde_json::json!({
                    "error": { "kind": f.kind.map(|k| format!("{k:?}")), "message": f.message }
                });
                outln!("{obj}");
            } else {
                eprintln!("error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Invoke {
            backend,
            function,
            module,
            input,
            input_file,
            cold,
            budget_ms,
            tenant,
            json,
            store,
        } => {
            let kind: BackendKind = backend.parse().map_err(|m| Failure {
                code: 2,
                message: m,
                kind: None,
            })?;
            let input = match (input, input_file) {
                (Some(text), _) => text.into_bytes(),
                (None, Some(path)) => {
                    std::fs::read(&path).map_err(|e| Error::io(format!("reading input file {}", path.display()), e))?
                }
                (None, None) => Vec::new(),
            };
            let (name, artifact) = resolve_function(&function)?;
            let mut config = Config::default();
            config.vm.store_dir = store;
            let backend = microfaas::open(kind, config)?;
            let mut spec = FunctionSpec::new(name.clone(), artifact).with_tenant(tenant);
            if let Some(module) = module {
                spec = spec.with_module(resolve_module(&module)?);
            }
            if let Some(ms) = budget_ms {
                spec = spec.with_budget(Duration::from_millis(ms));
            }
            invoke(backend.as_ref(), &spec, &input, cold, json)
        }
        Command::Build { dir, out } => {
            let mut opts = microfaas_builder::BuildOptions::new(microfaas_builder::default_cache_dir());
            let out = match out {
                Some(out) => out,
                None => default_build_out(&dir)?,
            };
            opts.out = Some(out);
            let built = microfaas_builder::build(&dir, &opts).map_err(|e| Failure {
                code: 1,
                message: chain(&e),
                kind: None,
            })?;
            outln!("{}", built.path.display());
            eprintln!(
                "built `{}` ({}; inputs {})",
                built.name,
                if built.cached { "cached" } else { "compiled" },
                &built.input_hash[..16]
            );
            Ok(())
        }
        Command::Verify { artifact } => {
            let a = Artifact::load(&artifact)?;
            outln!("{}: ok (sha256 {})", a.path().display(), a.digest());
            Ok(())
        }
        Command::Functions { modules } => {
            let names = if modules {
                microfaas::builtin_module_names()
            } else {
                microfaas::builtin_names()
            };
            for name in names {
                outln!("{name}");
            }
            Ok(())
        }
        Command::Snapshots(cmd) => snapshots_cli::run(cmd).map_err(|e| Failure {
            code: e.code,
            message: e.message,
            kind: None,
        }),
        Command::Serve {
            listen,
            credentials,
            insecure_no_auth: _,
            registry,
            store,
            event_queue,
            node_name,
            region,
            max_connections,
            drain_timeout_s,
            access_log,
        } => {
            let opts = microfaas::serve::ServeOptions {
                listen,
                credentials,
                registry,
                store,
                event_queue,
                node_name,
                region,
                max_connections,
                drain_timeout: Duration::from_secs(drain_timeout_s),
                access_log,
            };
            microfaas::serve::run(opts, |addr, _| outln!("listening http://{addr}")).map_err(|e| Failure {
                code: 1,
                message: chain(&e),
                kind: None,
            })
        }
    }
}

fn resolve_function(function: &str) -> Result<(String, Arc<Artifact>), Failure> {
    let path = Path::new(function);
    if function.contains('/') || function.ends_with(".so") {
        let artifact = Artifact::load(path)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| function.to_owned());
        return Ok((name, Arc::new(artifact)));
    }
    Ok((function.to_owned(), microfaas::builtin(function)?))
}

/// `--module`: an example module by name, or a file (a path, or a name
/// ending in `.wasm`).
fn resolve_module(module: &str) -> Result<Arc<[u8]>, Failure> {
    if module.contains('/') || module.ends_with(".wasm") {
        let bytes = std::fs::read(module).map_err(|e| Error::io(format!("reading module {module}"), e))?;
        return Ok(bytes.into());
    }
    Ok(microfaas::builtin_module(module)?)
}

fn invoke(backend: &dyn Backend, spec: &FunctionSpec, input: &[u8], cold: bool, json: bool) -> Result<(), Failure> {
    let id = backend.deploy(spec)?;
    let start = if cold {
        StartRequest::Force(StartPath::Cold)
    } else {
        StartRequest::Auto
    };
    let done = backend.invoke(&id, input, start)?;
    if json {
        let obj = serde_json::json!({
            "backend": backend.kind(),
            "function": spec.name,
            "tenant": spec.tenant.as_str(),
            "start": done.start,
            "output": std::str::from_utf8(&done.output).ok(),
            "output_hex": done.output.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "timings": done.timings,
        });
        outln!("{obj}");
    } else {
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = stdout.write_all(&done.output).and_then(|()| stdout.flush()) {
            stdout_failed(&e);
        }
        let t = done.timings;
        eprintln!(
            "\nstart: {}  total: {:.1} us  start: {:.1} us  dispatch: {:.1} us  exec: {:.1} us",
            done.start,
            us(t.total_ns),
            us(t.start_ns),
            us(t.dispatch_ns),
            us(t.exec_ns)
        );
    }
    Ok(())
}

#[allow(clippy::cast_precision_loss)]
fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// `DIR/target/microfaas/NAME.so`, creating the directories; refuses a
/// symbolic link (or anything but a directory) on the way, since the
/// crate's author controls `DIR` and the builder may run as root.
fn default_build_out(dir: &Path) -> Result<PathBuf, Failure> {
    let fail = |message: String| Failure {
        code: 1,
        message,
        kind: None,
    };
    let mut at = dir
        .canonicalize()
        .map_err(|e| fail(format!("no crate at {}: {e}", dir.display())))?;
    let name = at
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "function".to_owned());
    for part in ["target", "microfaas"] {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(fail(format!(
                    "{} is not a directory (a symbolic link?): refusing to write the artifact through it; pass --out",
                    at.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(|e| fail(format!("creating {}: {e}", at.display())))?;
            }
            Err(e) => return Err(fail(format!("{}: {e}", at.display()))),
        }
    }
    Ok(at.join(format!("{name}.so")))
}
