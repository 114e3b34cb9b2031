//! The Lambda REST API's pure parts: routes, names, parameter checks, the
//! JSON shapes clients parse, and the mapping of our errors onto Lambda's
//! error types and status codes. No I/O here.

use super::registry::{FunctionMeta, RegistryError};
use crate::{BackendKind, ErrorKind, StartPath};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

/// Lambda's synchronous payload limit (request and response).
pub const MAX_SYNC_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;
/// Lambda's asynchronous (`Event`) payload limit.
pub const MAX_EVENT_PAYLOAD_BYTES: usize = 256 * 1024;
/// Lambda's limit of a zipped upload (the JSON body holds it in base64).
pub const MAX_ZIP_BYTES: usize = 50 * 1024 * 1024;
/// The largest JSON body of `CreateFunction` / `UpdateFunctionCode`.
pub const MAX_CODE_BODY_BYTES: usize = MAX_ZIP_BYTES / 3 * 4 + 64 * 1024;
/// The largest artifact accepted, once unzipped.
pub const MAX_ARTIFACT_BYTES: u64 = 64 * 1024 * 1024;
/// The largest body of any other request.
pub const MAX_SMALL_BODY_BYTES: usize = 64 * 1024;

/// The account id in the ARNs we print.
pub const ACCOUNT: &str = "000000000000";

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /2015-03-31/functions`
    Create,
    /// `GET /2015-03-31/functions`
    List,
    /// `GET /2015-03-31/functions/NAME`
    Get(String),
    /// `DELETE /2015-03-31/functions/NAME`
    Delete(String),
    /// `PUT /2015-03-31/functions/NAME/code`
    UpdateCode(String),
    /// `POST /2015-03-31/functions/NAME/invocations`
    Invoke(String),
}

impl Route {
    /// The Lambda operation name (for the access log).
    pub fn op(&self) -> &'static str {
        match self {
            Route::Create => "CreateFunction",
            Route::List => "ListFunctions",
            Route::Get(_) => "GetFunction",
            Route::Delete(_) => "DeleteFunction",
            Route::UpdateCode(_) => "UpdateFunctionCode",
            Route::Invoke(_) => "Invoke",
        }
    }

    /// The function it is about, if any.
    pub fn function(&self) -> Option<&str> {
        match self {
            Route::Create | Route::List => None,
            Route::Get(n) | Route::Delete(n) | Route::UpdateCode(n) | Route::Invoke(n) => Some(n),
        }
    }

    /// The largest body this route accepts.
    pub fn body_limit(&self) -> usize {
        match self {
            Route::Create | Route::UpdateCode(_) => MAX_CODE_BODY_BYTES,
            Route::Invoke(_) => MAX_SYNC_PAYLOAD_BYTES,
            _ => MAX_SMALL_BODY_BYTES,
        }
    }
}

/// A refusal in Lambda's terms: status, error type (botocore's error code)
/// and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `x-amzn-ErrorType`.
    pub error_type: &'static str,
    /// The message.
    pub message: String,
}

impl ApiError {
    /// A 400 `InvalidParameterValueException`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "InvalidParameterValueException", message)
    }

    /// Any refusal.
    pub fn new(status: u16, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
        }
    }

    /// A 404 `ResourceNotFoundException` for function `name`.
    pub fn not_found(name: &str) -> Self {
        Self::new(
            404,
            "ResourceNotFoundException",
            format!("Function not found: arn:aws:lambda:local:{ACCOUNT}:function:{name}"),
        )
    }

    /// Lambda's error body.
    pub fn body(&self) -> Vec<u8> {
        let kind = if self.status >= 500 { "Service" } else { "User" };
        json!({ "Type": kind, "message": self.message })
            .to_string()
            .into_bytes()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(name) => ApiError::not_found(&name),
            RegistryError::Exists(name) => ApiError::new(
                409,
                "ResourceConflictException",
                format!("Function already exist: {name}"),
            ),
            other => ApiError::new(500, "ServiceException", crate::serve::chain(&other)),
        }
    }
}

/// Lambda's function names: 1 to 64 of `[a-zA-Z0-9_-]`.
pub fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The function name of a path segment: a name, or a function ARN
/// (`arn:aws:lambda:REGION:ACCOUNT:function:NAME`), percent-decoded.
fn function_name(segment: &str) -> Result<String, ApiError> {
    let mut decoded = Vec::with_capacity(segment.len());
    let b = segment.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let v = segment
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::invalid("bad percent-encoding in the function name"))?;
            decoded.push(v);
            i += 3;
        } else {
            decoded.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(decoded).map_err(|_| ApiError::invalid("the function name is not UTF-8"))?;
    let name = match s.strip_prefix("arn:aws:lambda:") {
        Some(rest) => {
            let parts: Vec<&str> = rest.split(':').collect();
            match parts.as_slice() {
                [_region, _account, "function", name] | [_region, _account, "function", name, "$LATEST"] => {
                    (*name).to_owned()
                }
                _ => {
                    return Err(ApiError::invalid(
                        "a function ARN is arn:aws:lambda:REGION:ACCOUNT:function:NAME",
                    ));
                }
            }
        }
        None => s,
    };
    if !valid_function_name(&name) {
        return Err(ApiError::invalid(format!(
            "1 validation error detected: Value '{}' at 'functionName' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9-_]{{1,64}}",
            name.escape_debug()
        )));
    }
    Ok(name)
}

/// The route of `method` + raw `path`.
pub fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    let rest = path
        .strip_prefix("/2015-03-31/functions")
        .ok_or_else(|| ApiError::new(404, "UnknownOperationException", "Unknown operation"))?;
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let segs: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('/').collect()
    };
    let unknown = || ApiError::new(404, "UnknownOperationException", "Unknown operation");
    match (method, segs.as_slice()) {
        ("POST", []) => Ok(Route::Create),
        ("GET", []) => Ok(Route::List),
        ("GET", [name]) => Ok(Route::Get(function_name(name)?)),
        ("DELETE", [name]) => Ok(Route::Delete(function_name(name)?)),
        ("PUT", [name, "code"]) => Ok(Route::UpdateCode(function_name(name)?)),
        ("POST", [name, "invocations"]) => Ok(Route::Invoke(function_name(name)?)),
        _ => Err(unknown()),
    }
}

/// A query parameter (raw value, percent-decoded), if present.
pub fn query_param(raw_query: &str, key: &str) -> Option<String> {
    raw_query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k == key).then(|| {
            let mut out = Vec::new();
            let b = v.as_bytes();
            let mut i = 0;
            while i < b.len() {
                match (b[i], v.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())) {
                    (b'%', Some(x)) => {
                        out.push(x);
                        i += 3;
                    }
                    (c, _) => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    })
}

/// The `Qualifier` must be absent or `$LATEST` (no versions or aliases).
pub fn check_qualifier(raw_query: &str, name: &str) -> Result<(), ApiError> {
    match query_param(raw_query, "Qualifier").as_deref() {
        None | Some("$LATEST") => Ok(()),
        Some(_) => Err(ApiError::not_found(name)),
    }
}

/// The backend a `Runtime` names.
pub fn backend_of_runtime(runtime: &str) -> Result<BackendKind, ApiError> {
    match runtime {
        "microfaas-vm" => Ok(BackendKind::Vm),
        "microfaas-language" => Ok(BackendKind::Language),
        "microfaas-process" => Ok(BackendKind::Process),
        other => Err(ApiError::invalid(format!(
            "Value {} at 'runtime' failed to satisfy constraint: Member must be one of microfaas-vm, microfaas-language, microfaas-process",
            other.escape_debug()
        ))),
    }
}

/// The heap limit a `MemorySize` gets: the size rounded up to a power of
/// two (so a node opens at most a few backends of each kind: one per size).
pub fn heap_mib_of_memory_size(memory_mib: u64) -> u64 {
    memory_mib.next_power_of_two()
}

/// The body of `CreateFunction` (fields we read; others are ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateRequest {
    /// The name.
    pub function_name: String,
    /// Our backend selector.
    pub runtime: Option<String>,
    /// Kept.
    pub role: Option<String>,
    /// Kept.
    pub handler: Option<String>,
    /// Kept.
    pub description: Option<String>,
    /// Seconds, 1..=900.
    pub timeout: Option<u64>,
    /// MiB, 128..=10240.
    pub memory_size: Option<u64>,
    /// `Zip` only.
    pub package_type: Option<String>,
    /// The code.
    pub code: CodeRequest,
}

/// `Code` of `CreateFunction`, or the body of `UpdateFunctionCode`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CodeRequest {
    /// Base64 of a zip holding the artifact, or of the artifact itself.
    pub zip_file: Option<String>,
    /// Not supported.
    #[serde(rename = "S3Bucket")]
    pub s3_bucket: Option<String>,
    /// Not supported.
    pub image_uri: Option<String>,
    /// `UpdateFunctionCode`'s dry run: validate, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Parses a JSON request body.
pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("malformed request body: {e}")))
}

/// Checks a `CreateFunction`'s parameters: (backend, timeout s, memory MiB).
pub fn check_create(req: &CreateRequest) -> Result<(BackendKind, u64, u64), ApiError> {
    if !valid_function_name(&req.function_name) {
        return Err(ApiError::invalid("FunctionName must be 1 to 64 of [a-zA-Z0-9-_]"));
    }
    if let Some(p) = &req.package_type
        && p != "Zip"
    {
        return Err(ApiError::invalid("only PackageType Zip is supported"));
    }
    // Lambda's own bounds on the strings we store.
    for (field, value, max) in [
        ("Role", req.role.as_deref(), 2048),
        ("Handler", req.handler.as_deref(), 128),
        ("Description", req.description.as_deref(), 256),
    ] {
        if value.is_some_and(|v| v.chars().count() > max) {
            return Err(ApiError::invalid(format!("{field} must be at most {max} characters")));
        }
    }
    let kind = backend_of_runtime(req.runtime.as_deref().unwrap_or(""))?;
    let timeout = req.timeout.unwrap_or(3);
    if !(1..=900).contains(&timeout) {
        return Err(ApiError::invalid("Timeout must be between 1 and 900 seconds"));
    }
    let memory = req.memory_size.unwrap_or(128);
    if !(128..=10240).contains(&memory) {
        return Err(ApiError::invalid("MemorySize must be between 128 and 10240 MB"));
    }
    Ok((kind, timeout, memory))
}

/// Lambda's `FunctionConfiguration` of a stored function.
pub fn configuration(meta: &FunctionMeta, region: &str) -> Value {
    let sha = hex_to_base64(&meta.code_sha256);
    let mut config = json!({
        "FunctionName": meta.name,
        "FunctionArn": format!("arn:aws:lambda:{region}:{ACCOUNT}:function:{}", meta.name),
        "Runtime": meta.runtime,
        "Role": meta.role,
        "Handler": meta.handler,
        "CodeSize": meta.code_size,
        "Description": meta.description,
        "Timeout": meta.timeout_s,
        "MemorySize": meta.memory_mib,
        "LastModified": meta.last_modified,
        "CodeSha256": sha,
        "Version": "$LATEST",
        "RevisionId": meta.revision_id,
        "State": "Active",
        "LastUpdateStatus": "Successful",
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
    });
    // Ours (Lambda has no modules): the module's digest and size, when the
    // function was uploaded with one; `CodeSha256`/`CodeSize` stay the
    // artifact's.
    if let Some(module) = &meta.module_sha256 {
        config["MicrofaasModuleSha256"] = json!(hex_to_base64(module));
        config["MicrofaasModuleSize"] = json!(meta.module_size);
    }
    config
}

/// Lambda prints `CodeSha256` in base64; we store hex.
fn hex_to_base64(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| hex.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// How an invocation is to be run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvocationType {
    /// Wait for the result.
    RequestResponse,
    /// Queue it, answer 202.
    Event,
    /// Check the request, run nothing, answer 204.
    DryRun,
}

/// The `X-Amz-Invocation-Type` header's meaning.
pub fn invocation_type(header: Option<&[u8]>) -> Result<InvocationType, ApiError> {
    match header {
        None | Some(b"RequestResponse") => Ok(InvocationType::RequestResponse),
        Some(b"Event") => Ok(InvocationType::Event),
        Some(b"DryRun") => Ok(InvocationType::DryRun),
        Some(_) => Err(ApiError::invalid(
            "X-Amz-Invocation-Type must be RequestResponse, Event or DryRun",
        )),
    }
}

/// Our `X-Microfaas-Start` request header: absent or `auto` = the fastest
/// path, else exactly that start path.
pub fn start_request(header: Option<&[u8]>) -> Result<crate::StartRequest, ApiError> {
    let Some(v) = header else {
        return Ok(crate::StartRequest::Auto);
    };
    let path = match v {
        b"auto" => return Ok(crate::StartRequest::Auto),
        b"warm" => StartPath::Warm,
        b"cold" => StartPath::Cold,
        b"hot" => StartPath::Hot,
        b"argument" => StartPath::Argument,
        b"function" => StartPath::Function,
        b"base" => StartPath::Base,
        b"reset" => StartPath::Reset,
        _ => {
            return Err(ApiError::invalid(
                "X-Microfaas-Start must be auto, warm, cold, hot, argument, function, base or reset",
            ));
        }
    };
    Ok(crate::StartRequest::Force(path))
}

/// How an invocation's failure is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeFailure {
    /// The function failed: 200, `X-Amz-Function-Error: Unhandled`, and this
    /// `{errorType, errorMessage}` body.
    Function(Vec<u8>),
    /// The request or the service failed: a Lambda error.
    Api(ApiError),
}

/// The answer to an invocation that failed with `err`.
pub fn invoke_failure(err: &crate::Error) -> InvokeFailure {
    let message = crate::serve::chain(err);
    let kind = err.kind();
    match kind {
        ErrorKind::UnknownFunction => InvokeFailure::Api(ApiError::new(404, "ResourceNotFoundException", message)),
        ErrorKind::InputTooLarge => InvokeFailure::Api(ApiError::new(413, "RequestTooLargeException", message)),
        ErrorKind::UnsupportedStart | ErrorKind::Unsupported => InvokeFailure::Api(ApiError::invalid(message)),
        ErrorKind::InvalidArtifact => InvokeFailure::Api(ApiError::new(502, "InvalidRuntimeException", message)),
        ErrorKind::KvmUnavailable | ErrorKind::BackendUnavailable | ErrorKind::SnapshotCorrupt | ErrorKind::Io => {
            InvokeFailure::Api(ApiError::new(500, "ServiceException", message))
        }
        _ => InvokeFailure::Function(
            json!({ "errorType": format!("{kind:?}"), "errorMessage": message, "stackTrace": [] })
                .to_string()
                .into_bytes(),
        ),
    }
}

/// The body of `ListFunctions` for `all` (sorted by name), from `marker`.
pub fn list_page(all: &[FunctionMeta], raw_query: &str, region: &str) -> Result<Value, ApiError> {
    let max = match query_param(raw_query, "MaxItems") {
        None => 50,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| ApiError::invalid("MaxItems must be between 1 and 10000"))?,
    };
    let marker = query_param(raw_query, "Marker");
    let rest: Vec<&FunctionMeta> = all
        .iter()
        .filter(|m| marker.as_deref().is_none_or(|after| m.name.as_str() > after))
        .collect();
    let page: Vec<Value> = rest.iter().take(max).map(|m| configuration(m, region)).collect();
    let mut body = json!({ "Functions": page });
    if rest.len() > max
        && let Some(last) = rest.get(max - 1)
    {
        body["NextMarker"] = json!(last.name);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("POST", "/2015-03-31/functions"), Ok(Route::Create));
        assert_eq!(route("POST", "/2015-03-31/functions/"), Ok(Route::Create));
        assert_eq!(route("GET", "/2015-03-31/functions/"), Ok(Route::List));
        assert_eq!(route("GET", "/2015-03-31/functions/f-1"), Ok(Route::Get("f-1".into())));
        assert_eq!(
            route("DELETE", "/2015-03-31/functions/f"),
            Ok(Route::Delete("f".into()))
        );
        assert_eq!(
            route("PUT", "/2015-03-31/functions/f/code"),
            Ok(Route::UpdateCode("f".into()))
        );
        assert_eq!(
            route(
                "POST",
                "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A1%3Afunction%3Ag/invocations"
            ),
            Ok(Route::Invoke("g".into()))
        );
        for (m, p) in [
            ("GET", "/"),
            ("PUT", "/2015-03-31/functions/f"),
            ("POST", "/2015-03-31/functions/f/code"),
            ("GET", "/2015-03-31/functions/f/invocations/x"),
        ] {
            assert_eq!(route(m, p).unwrap_err().status, 404, "{m} {p}");
        }
        for p in [
            "/2015-03-31/functions/..",
            "/2015-03-31/functions/a%2Fb",
            "/2015-03-31/functions/a%zz",
            "/2015-03-31/functions/%ff",
            &format!("/2015-03-31/functions/{}", "x".repeat(65)),
        ] {
            assert_eq!(
                route("GET", p).unwrap_err().error_type,
                "InvalidParameterValueException",
                "{p}"
            );
        }
    }

    #[test]
    fn create_parameters_are_checked() {
        let req = |runtime: &str, timeout, memory| CreateRequest {
            function_name: "f".into(),
            runtime: Some(runtime.into()),
            role: None,
            handler: None,
            description: None,
            timeout,
            memory_size: memory,
            package_type: None,
            code: CodeRequest {
                zip_file: None,
                s3_bucket: None,
                image_uri: None,
                dry_run: false,
            },
        };
        assert_eq!(
            check_create(&req("microfaas-vm", None, None)).unwrap(),
            (BackendKind::Vm, 3, 128)
        );
        assert_eq!(check_create(&req("python3.12", None, None)).unwrap_err().status, 400);
        let mut long = req("microfaas-process", None, None);
        long.description = Some("d".repeat(257));
        assert_eq!(check_create(&long).unwrap_err().status, 400);
        assert_eq!(
            check_create(&req("microfaas-process", Some(0), None))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            check_create(&req("microfaas-process", Some(901), None))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            check_create(&req("microfaas-process", None, Some(64)))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(heap_mib_of_memory_size(128), 128);
        assert_eq!(heap_mib_of_memory_size(129), 256);
        assert_eq!(heap_mib_of_memory_size(10240), 16384);
    }

    #[test]
    fn invocation_headers() {
        assert_eq!(invocation_type(None), Ok(InvocationType::RequestResponse));
        assert_eq!(invocation_type(Some(b"Event")), Ok(InvocationType::Event));
        assert_eq!(invocation_type(Some(b"DryRun")), Ok(InvocationType::DryRun));
        assert!(invocation_type(Some(b"event")).is_err());
        assert_eq!(
            start_request(Some(b"cold")),
            Ok(crate::StartRequest::Force(StartPath::Cold))
        );
        assert!(start_request(Some(b"fast")).is_err());
        assert_eq!(check_qualifier("Qualifier=%24LATEST", "f"), Ok(()));
        assert_eq!(check_qualifier("Qualifier=1", "f").unwrap_err().status, 404);
    }

    #[test]
    fn function_errors_are_unhandled_and_request_errors_are_lambda_errors() {
        let e = crate::Error::BudgetExceeded {
            name: "f".into(),
            budget: std::time::Duration::from_secs(1),
        };
        let InvokeFailure::Function(body) = invoke_failure(&e) else {
            panic!("a budget overrun is the function's failure")
        };
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errorType"], "BudgetExceeded");
        let e = crate::Error::InputTooLarge { len: 9, limit: 1 };
        assert_eq!(
            invoke_failure(&e),
            InvokeFailure::Api(ApiError::new(413, "RequestTooLargeException", e.to_string()))
        );
    }

    #[test]
    fn list_pages_by_marker() {
        let metas: Vec<FunctionMeta> = ["a", "b", "c"]
            .iter()
            .map(|n| FunctionMeta {
                name: (*n).into(),
                tenant: "default".into(),
                runtime: String::new(),
                role: String::new(),
                handler: String::new(),
                description: String::new(),
                timeout_s: 3,
                memory_mib: 128,
                code_sha256: "ab".into(),
                code_size: 1,
                module_sha256: None,
                module_size: 0,
                last_modified: String::new(),
                revision_id: String::new(),
            })
            .collect();
        let p = list_page(&metas, "MaxItems=2", "r").unwrap();
        assert_eq!(p["Functions"].as_array().unwrap().len(), 2);
        assert_eq!(p["NextMarker"], "b");
        let p = list_page(&metas, "MaxItems=2&Marker=b", "r").unwrap();
        assert_eq!(p["Functions"][0]["FunctionName"], "c");
        assert!(p.get("NextMarker").is_none());
        assert!(list_page(&metas, "MaxItems=0", "r").is_err());
        assert_eq!(p["Functions"][0]["CodeSha256"], "qw==");
    }
}
