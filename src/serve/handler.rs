//! One request: bounded body, SigV4, routing to the node's operations on the
//! blocking pool, Lambda's response shapes and one access-log line.

use super::api::{self, ApiError, InvocationType, InvokeFailure, Route};
use super::{EventJob, State, chain, lock, node, sanitize, sigv4};
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Request bodies held in memory at once over all connections, in MiB (a
/// body takes its declared length, or its route's limit if undeclared,
/// rounded up to whole MiB, before a byte of it is read).
pub(super) const BODY_BUDGET_MIB: usize = 512;
/// How long a client may take to send a body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

fn now_unix() -> i64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

/// What the access log records of one request besides method and path.
#[derive(Debug, Default)]
struct LogFields {
    op: &'static str,
    function: Option<String>,
    key: Option<String>,
    start: Option<&'static str>,
    backend: Option<&'static str>,
    error: Option<String>,
    bytes_in: usize,
}

pub(super) type Resp = Response<Full<Bytes>>;

fn response(status: u16, body: Vec<u8>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

fn json_response(status: u16, v: &serde_json::Value) -> Resp {
    let mut r = response(status, v.to_string().into_bytes());
    set(&mut r, "content-type", "application/json");
    r
}

fn set(r: &mut Resp, name: &'static str, value: &str) {
    if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

fn error_response(e: &ApiError, f: &mut LogFields) -> Resp {
    f.error = Some(e.error_type.to_owned());
    let mut r = response(e.status, e.body());
    set(&mut r, "content-type", "application/json");
    set(&mut r, "x-amzn-errortype", e.error_type);
    if e.status == 429 {
        set(&mut r, "retry-after", "1");
    }
    r
}

pub(super) async fn handle(state: Arc<State>, req: Request<Incoming>, peer: SocketAddr) -> Result<Resp, Infallible> {
    let t0 = Instant::now();
    let seq = state.request_seq.fetch_add(1, Ordering::Relaxed);
    let request_id = format!("{}-{seq:x}", sanitize(&state.node_name));
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let invocation_id = req
        .headers()
        .get("amz-sdk-invocation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut f = LogFields::default();
    let mut resp = if state.draining.load(Ordering::SeqCst) {
        let mut r = error_response(
            &ApiError::new(503, "ServiceException", "the node is shutting down"),
            &mut f,
        );
        set(&mut r, "connection", "close");
        r
    } else {
        match serve(&state, req, &request_id, &mut f).await {
            Ok(r) => r,
            Err(e) => error_response(&e, &mut f),
        }
    };
    set(&mut resp, "x-amzn-requestid", &request_id);
    set(&mut resp, "x-microfaas-node", &state.node_name);
    let bytes_out = hyper::body::Body::size_hint(resp.body()).exact().unwrap_or(0);
    state.log.line(&serde_json::json!({
        "ts": now_unix(), "node": state.node_name, "req": request_id, "peer": peer.to_string(),
        "method": method, "path": path, "op": f.op, "fn": f.function, "key": f.key,
        "status": resp.status().as_u16(), "in": f.bytes_in, "out": bytes_out,
        "us": t0.elapsed().as_micros(), "start": f.start, "backend": f.backend, "err": f.error,
        "invocation_id": invocation_id,
    }));
    Ok(resp)
}

async fn serve(
    state: &Arc<State>,
    req: Request<Incoming>,
    request_id: &str,
    f: &mut LogFields,
) -> Result<Resp, ApiError> {
    let routed = api::route(req.method().as_str(), req.uri().path());
    let limit = routed.as_ref().map_or(api::MAX_SMALL_BODY_BYTES, Route::body_limit);
    if let Ok(r) = &routed {
        f.op = r.op();
        f.function = r.function().map(str::to_owned);
    }
    let too_large = || {
        ApiError::new(
            413,
            "RequestTooLargeException",
            format!("Request must be smaller than {limit} bytes for this operation"),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(too_large());
    }
    // Before reading a body: a request without a plausible signature (known
    // key, fresh date) is refused now, so that only key holders make the
    // server buffer bodies.
    if let Some(creds) = &state.credentials {
        let headers: Vec<(&str, &[u8])> = req.headers().iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        sigv4::precheck(creds, &headers, now_unix()).map_err(|e| ApiError::new(403, e.error_type(), e.to_string()))?;
    }
    let shutting_down = || ApiError::new(503, "ServiceException", "the node is shutting down");
    let _upload = if limit > api::MAX_SYNC_PAYLOAD_BYTES {
        Some(state.uploads.acquire().await.map_err(|_| shutting_down())?)
    } else {
        None
    };
    let reserve = declared.map_or(limit, |n| usize::try_from(n).unwrap_or(limit));
    let mib = u32::try_from(reserve.div_ceil(1 << 20).clamp(1, BODY_BUDGET_MIB)).unwrap_or(1);
    let _budget = state.body_budget.acquire_many(mib).await.map_err(|_| shutting_down())?;
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await {
        Err(_) => {
            return Err(ApiError::new(
                408,
                "RequestTimeoutException",
                "the request body took too long",
            ));
        }
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(e)) => return Err(ApiError::invalid(format!("reading the request body: {e}"))),
    };
    f.bytes_in = body.len();
    let raw_query = parts.uri.query().unwrap_or("");
    let mut tenant = crate::Tenant::default();
    if let Some(creds) = &state.credentials {
        let headers: Vec<(&str, &[u8])> = parts.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        let verified = sigv4::verify(
            creds,
            &sigv4::RequestParts {
                method: parts.method.as_str(),
                raw_path: parts.uri.path(),
                raw_query,
                headers: &headers,
                body: &body,
            },
            now_unix(),
        )
        .map_err(|e| ApiError::new(403, e.error_type(), e.to_string()))?;
        f.key = Some(verified.access_key_id);
        tenant = verified.profile;
    }
    let route = routed?;
    let header = |name: &str| parts.headers.get(name).map(hyper::header::HeaderValue::as_bytes);
    match route {
        Route::Create => {
            let req: api::CreateRequest = api::parse_json(&body)?;
            f.function = Some(req.function_name.clone());
            let st = Arc::clone(state);
            let meta = blocking(move || st.node.create(&tenant, &req)).await?;
            Ok(json_response(201, &api::configuration(&meta, &state.region)))
        }
        Route::List => {
            let st = Arc::clone(state);
            let all = blocking(move || st.node.list(&tenant)).await?;
            Ok(json_response(200, &api::list_page(&all, raw_query, &state.region)?))
        }
        Route::Get(name) => {
            api::check_qualifier(raw_query, &name)?;
            let st = Arc::clone(state);
            let meta = blocking(move || st.node.get(&tenant, &name)).await?;
            Ok(json_response(
                200,
                &serde_json::json!({
                    "Configuration": api::configuration(&meta, &state.region),
                    "Code": { "RepositoryType": "microfaas-registry" },
                }),
            ))
        }
        Route::Delete(name) => {
            api::check_qualifier(raw_query, &name)?;
            let st = Arc::clone(state);
            blocking(move || st.node.delete(&tenant, &name)).await?;
            Ok(response(204, Vec::new()))
        }
        Route::UpdateCode(name) => {
            let code: api::CodeRequest = api::parse_json(&body)?;
            let st = Arc::clone(state);
            let meta = blocking(move || st.node.update_code(&tenant, &name, &code)).await?;
            Ok(json_response(200, &api::configuration(&meta, &state.region)))
        }
        Route::Invoke(name) => {
            api::check_qualifier(raw_query, &name)?;
            let kind = api::invocation_type(header("x-amz-invocation-type"))?;
            let start = api::start_request(header("x-microfaas-start"))?;
            let tail = header("x-amz-log-type") == Some(b"Tail");
            invoke(state, tenant, name, kind, start, tail, body, request_id, f).await
        }
    }
}

/// Runs `op` on the blocking pool.
async fn blocking<T: Send + 'static>(op: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(op)
        .await
        .map_err(|e| ApiError::new(500, "ServiceException", format!("the operation failed: {e}")))?
}

#[allow(clippy::too_many_arguments)]
async fn invoke(
    state: &Arc<State>,
    tenant: crate::Tenant,
    name: String,
    kind: InvocationType,
    start: crate::StartRequest,
    tail: bool,
    body: Bytes,
    request_id: &str,
    f: &mut LogFields,
) -> Result<Resp, ApiError> {
    let received = Instant::now();
    let to_api = |e: node::InvokeError| match e.failure() {
        InvokeFailure::Api(a) => a,
        InvokeFailure::Function(_) => ApiError::new(502, "ServiceException", chain(&e)),
    };
    match kind {
        InvocationType::DryRun => {
            let st = Arc::clone(state);
            match tokio::task::spawn_blocking(move || st.node.check(&tenant, &name)).await {
                Ok(Ok(())) => Ok(response(204, Vec::new())),
                Ok(Err(e)) => Err(to_api(e)),
                Err(e) => Err(ApiError::new(500, "ServiceException", e.to_string())),
            }
        }
        InvocationType::Event => {
            if body.len() > api::MAX_EVENT_PAYLOAD_BYTES {
                return Err(ApiError::new(
                    413,
                    "RequestTooLargeException",
                    format!(
                        "an Event payload must be at most {} bytes",
                        api::MAX_EVENT_PAYLOAD_BYTES
                    ),
                ));
            }
            let st = Arc::clone(state);
            let n = name.clone();
            let t = tenant.clone();
            blocking(move || st.node.exists(&t, &n)).await?;
            let sender = lock(&state.events).clone();
            let sender = sender.ok_or_else(|| ApiError::new(503, "ServiceException", "the node is shutting down"))?;
            let job = EventJob {
                tenant,
                name,
                payload: body.to_vec(),
                request_id: request_id.to_owned(),
            };
            match sender.try_send(job) {
                Ok(()) => Ok(response(202, Vec::new())),
                Err(mpsc::error::TrySendError::Full(_)) => Err(ApiError::new(
                    429,
                    "TooManyRequestsException",
                    "Rate Exceeded: the node's event queue is full",
                )),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    Err(ApiError::new(503, "ServiceException", "the node is shutting down"))
                }
            }
        }
        InvocationType::RequestResponse => {
            let st = Arc::clone(state);
            let ran = tokio::task::spawn_blocking(move || st.node.invoke(&tenant, &name, &body, start))
                .await
                .map_err(|e| ApiError::new(500, "ServiceException", e.to_string()))?;
            // A function whose init fails at deploy is the function's failure.
            let ran = match ran {
                Ok(r) => r,
                Err(e) => match e.failure() {
                    InvokeFailure::Api(a) => return Err(a),
                    InvokeFailure::Function(b) => return Ok(function_error(b, f, None)),
                },
            };
            f.backend = Some(ran.backend.as_str());
            match ran.result {
                Ok(inv) => {
                    f.start = Some(inv.start.as_str());
                    let t = inv.timings;
                    let mut r = response(200, inv.output);
                    set(&mut r, "content-type", "application/octet-stream");
                    set(&mut r, "x-amz-executed-version", "$LATEST");
                    set(&mut r, "x-microfaas-backend", ran.backend.as_str());
                    set(&mut r, "x-microfaas-start", inv.start.as_str());
                    set(
                        &mut r,
                        "x-microfaas-timings",
                        &format!(
                            "start_ns={};dispatch_ns={};exec_ns={};total_ns={}",
                            t.start_ns, t.dispatch_ns, t.exec_ns, t.total_ns
                        ),
                    );
                    set(
                        &mut r,
                        "x-microfaas-server-ns",
                        &received.elapsed().as_nanos().to_string(),
                    );
                    if tail {
                        let log = format!("backend={} start={} total_ns={}\n", ran.backend, inv.start, t.total_ns);
                        set(
                            &mut r,
                            "x-amz-log-result",
                            &base64::engine::general_purpose::STANDARD.encode(log),
                        );
                    }
                    Ok(r)
                }
                Err(e) => match api::invoke_failure(&e) {
                    InvokeFailure::Api(a) => Err(a),
                    InvokeFailure::Function(b) => Ok(function_error(b, f, Some(ran.backend))),
                },
            }
        }
    }
}

fn function_error(body: Vec<u8>, f: &mut LogFields, backend: Option<crate::BackendKind>) -> Resp {
    f.error = Some("Unhandled".into());
    let mut r = response(200, body);
    set(&mut r, "content-type", "application/json");
    set(&mut r, "x-amz-function-error", "Unhandled");
    set(&mut r, "x-amz-executed-version", "$LATEST");
    if let Some(b) = backend {
        set(&mut r, "x-microfaas-backend", b.as_str());
    }
    r
}
