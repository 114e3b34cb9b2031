//! `microfaas serve`: a FaaS node speaking the AWS Lambda REST API subset
//! clients use (create/get/list/update/delete, invoke), over HTTP/1.1 with
//! keep-alive, every request authenticated with SigV4, every backend behind
//! one process. Backend calls block, so they run on tokio's blocking pool.
//!
//! Our own response headers on `Invoke`: `X-Microfaas-Backend`,
//! `X-Microfaas-Start` (the start path), `X-Microfaas-Timings`
//! (`start_ns=..;dispatch_ns=..;exec_ns=..;total_ns=..`, the backend's),
//! `X-Microfaas-Server-Ns` (from the request read and authenticated to the
//! response ready, in this server) and, on every response, `X-Microfaas-Node`. The request header
//! `X-Microfaas-Start: cold|warm|hot|function|base|argument` forces a path.

pub mod api;
pub mod client;
mod code;
pub mod credentials;
mod handler;
mod node;
pub mod registry;
pub mod sigv4;

use hyper_util::rt::{TokioIo, TokioTimer};
use node::Node;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};

/// The options of `microfaas serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The credentials file; `None` only with `--insecure-no-auth`.
    pub credentials: Option<PathBuf>,
    /// The function registry directory (shared by a cluster's nodes).
    pub registry: PathBuf,
    /// Where this node keeps vm snapshot stores (default: under the
    /// registry, per node).
    pub store: Option<PathBuf>,
    /// `Event` invocations queued at most; more get 429.
    pub event_queue: usize,
    /// The node's name in `X-Microfaas-Node` and the access log.
    pub node_name: Option<String>,
    /// The region in ARNs.
    pub region: String,
    /// Connections served at once (more wait in the kernel's backlog).
    pub max_connections: usize,
    /// How long SIGTERM waits for in-flight requests and queued events.
    pub drain_timeout: Duration,
    /// The access log file (appended to); `None` = stderr.
    pub access_log: Option<PathBuf>,
}

/// Stops a running server as SIGTERM does (for servers run in-process).
#[derive(Debug, Clone)]
pub struct Stopper(Arc<tokio::sync::Notify>);

impl Stopper {
    /// Starts the graceful shutdown.
    pub fn stop(&self) {
        self.0.notify_one();
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The credentials file.
    #[error("credentials")]
    Credentials(#[from] sigv4::CredentialsError),
    /// The registry directory.
    #[error("function registry")]
    Registry(#[from] registry::RegistryError),
    /// Socket, runtime or signal set-up.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) use crate::error_chain as chain;

/// One queued `Event` invocation.
#[derive(Debug)]
struct EventJob {
    tenant: crate::Tenant,
    name: String,
    payload: Vec<u8>,
    request_id: String,
}

#[derive(Debug)]
struct State {
    node: Node,
    credentials: Option<sigv4::Credentials>,
    region: String,
    node_name: String,
    draining: AtomicBool,
    events: Mutex<Option<mpsc::Sender<EventJob>>>,
    uploads: Semaphore,
    body_budget: Semaphore,
    request_seq: AtomicU64,
    log: LogSink,
}

/// Runs the server until SIGTERM, SIGINT or [`Stopper::stop`];
/// `on_listening` is told the bound address (and given the stopper) first.
pub fn run(opts: ServeOptions, on_listening: impl FnOnce(SocketAddr, Stopper)) -> Result<(), ServeError> {
    let credentials = opts.credentials.as_deref().map(sigv4::Credentials::load).transpose()?;
    let log = match &opts.access_log {
        None => LogSink::Stderr,
        Some(path) => LogSink::File(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ServeError::Io {
                    context: format!("opening the access log {}", path.display()),
                    source,
                })?,
        ),
    };
    let registry = registry::Registry::open(&opts.registry)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(256)
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            context: "starting the tokio runtime".into(),
            source,
        })?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| ServeError::Io {
                context: format!("listening on {}", opts.listen),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Io {
            context: "reading the bound address".into(),
            source,
        })?;
        let node_name = opts.node_name.clone().unwrap_or_else(|| addr.to_string());
        let store = opts
            .store
            .clone()
            .unwrap_or_else(|| opts.registry.join("nodes").join(sanitize(&node_name)).join("vm-store"));
        let (tx, rx) = mpsc::channel(opts.event_queue.max(1));
        let state = Arc::new(State {
            node: Node::new(registry, store, node_name.clone()),
            credentials,
            region: opts.region.clone(),
            node_name,
            draining: AtomicBool::new(false),
            events: Mutex::new(Some(tx)),
            uploads: Semaphore::new(2),
            body_budget: Semaphore::new(handler::BODY_BUDGET_MIB),
            request_seq: AtomicU64::new(0),
            log,
        });
        let consumers = spawn_event_consumers(&state, rx, 2);
        let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
        let stopper = Stopper(Arc::new(tokio::sync::Notify::new()));
        let stop = Arc::clone(&stopper.0);
        on_listening(addr, stopper);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let connections = Arc::new(Semaphore::new(opts.max_connections.max(1)));
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&connections).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = stop.notified() => break,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = stop.notified() => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    state
                        .log
                        .line(&serde_json::json!({ "event": "accept_error", "error": e.to_string() }));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let conn = graceful.watch(connection(Arc::clone(&state), stream, peer));
            tokio::spawn(async move {
                let _ = conn.await;
                drop(permit);
            });
        }
        state.draining.store(true, Ordering::SeqCst);
        state
            .log
            .line(&serde_json::json!({ "event": "draining", "node": state.node_name }));
        let drain = async {
            graceful.shutdown().await;
            // Accepted events still run: close the queue, let it empty.
            drop(lock(&state.events).take());
            for c in consumers {
                let _ = c.await;
            }
        };
        tokio::pin!(drain);
        let deadline = tokio::time::sleep(opts.drain_timeout);
        tokio::pin!(deadline);
        // While in-flight requests finish, new connections are still
        // accepted and each request on them answered 503 (and closed).
        let drained = loop {
            tokio::select! {
                () = &mut drain => break true,
                () = &mut deadline => break false,
                a = listener.accept() => if let Ok((stream, peer)) = a {
                    tokio::spawn(connection(Arc::clone(&state), stream, peer));
                },
            }
        };
        drop(listener);
        state
            .log
            .line(&serde_json::json!({ "event": "stopped", "node": state.node_name, "drained": drained }));
        Ok(())
    })
}

/// Serves one connection: HTTP/1.1, keep-alive, headers within 64 KiB and
/// 30 s.
fn connection(
    state: Arc<State>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> impl hyper_util::server::graceful::GracefulConnection<Error = hyper::Error> + Send + 'static {
    let _ = stream.set_nodelay(true);
    let svc = hyper::service::service_fn(move |req| handler::handle(Arc::clone(&state), req, peer));
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), svc)
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal, ServeError> {
    tokio::signal::unix::signal(kind).map_err(|source| ServeError::Io {
        context: "installing the signal handler".into(),
        source,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn spawn_event_consumers(
    state: &Arc<State>,
    rx: mpsc::Receiver<EventJob>,
    count: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    (0..count)
        .map(|_| {
            let rx = Arc::clone(&rx);
            let state = Arc::clone(state);
            tokio::spawn(async move {
                loop {
                    let job = rx.lock().await.recv().await;
                    let Some(job) = job else { break };
                    let st = Arc::clone(&state);
                    let t0 = Instant::now();
                    let name = job.name.clone();
                    let outcome = tokio::task::spawn_blocking(move || {
                        st.node
                            .invoke(&job.tenant, &job.name, &job.payload, crate::StartRequest::Auto)
                    })
                    .await;
                    let outcome = match outcome {
                        Ok(Ok(ran)) => match ran.result {
                            Ok(inv) => format!("ok start={}", inv.start),
                            Err(e) => format!("function error {:?}", e.kind()),
                        },
                        Ok(Err(e)) => format!("not run: {}", chain(&e)),
                        Err(e) => format!("not run: {e}"),
                    };
                    state.log.line(&serde_json::json!({
                        "event": "async_invoke", "node": state.node_name, "req": job.request_id,
                        "fn": name, "outcome": outcome, "us": t0.elapsed().as_micros(),
                    }));
                }
            })
        })
        .collect()
}

/// Where access-log lines go: one JSON object per line, one `write(2)` each.
#[derive(Debug)]
enum LogSink {
    Stderr,
    File(std::fs::File),
}

impl LogSink {
    fn line(&self, v: &serde_json::Value) {
        use std::io::Write as _;
        let mut text = v.to_string();
        text.push('\n');
        // A log that cannot be written does not stop the server.
        let _ = match self {
            LogSink::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
            LogSink::File(f) => (&*f).write_all(text.as_bytes()),
        };
    }
}
