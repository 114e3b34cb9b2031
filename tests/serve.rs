//! `microfaas serve` end to end over loopback HTTP: requests signed in the
//! test (SigV4, the library's signer, itself checked against AWS's published
//! example and botocore in tests/python) run; a wrong secret, a missing, an
//! expired or a tampered signature gets 403 and runs nothing; malformed and
//! oversized requests get 4xx and the server stays up.

use microfaas::serve::client::{Client, Response, Signer};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const KEY: &str = "AKIDSERVETEST";
const SECRET: &str = "serve-test-secret";

struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str], auth: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        std::fs::write(
            &creds,
            format!("[default]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n"),
        )
        .unwrap();
        let log = dir.path().join("serve.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_microfaas"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--registry"])
            .arg(dir.path().join("registry"))
            .args(extra);
        if auth {
            cmd.arg("--credentials").arg(&creds);
        } else {
            cmd.arg("--insecure-no-auth");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening http://")
            .unwrap_or_else(|| panic!("server did not start: {line:?}"))
            .parse()
            .unwrap();
        Self {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn client(&self, secret: &str, clock_offset_secs: i64) -> Client {
        Client::connect(
            self.addr,
            Some(Signer {
                access_key_id: KEY.into(),
                secret: secret.into(),
                region: "us-east-1".into(),
                clock_offset_secs,
            }),
        )
        .unwrap()
    }

    fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Invocations of `function` that reached a backend.
    fn ran(&self, function: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| l["fn"] == function && l["op"] == "Invoke" && !l["backend"].is_null())
            .count()
    }

    fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn echo_artifact() -> Vec<u8> {
    std::fs::read(microfaas::builtin_dir().join("echo.so")).unwrap()
}

fn error_type(r: &Response) -> &str {
    r.header("x-amzn-errortype").unwrap_or("")
}

#[test]
fn good_signatures_run_and_bad_ones_get_403_and_run_nothing() {
    let server = Server::start(&[], true);
    let mut good = server.client(SECRET, 0);
    let r = good
        .create_function("echo", "microfaas-process", &echo_artifact())
        .unwrap();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let payload: Vec<u8> = (0..=255).collect();
    let r = good.invoke("echo", &payload, None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, payload);
    assert_eq!(server.ran("echo"), 1);

    // Wrong secret.
    let r = server.client("wrong", 0).invoke("echo", b"x", None).unwrap();
    assert_eq!((r.status, error_type(&r)), (403, "InvalidSignatureException"));
    // Expired: signed 6 minutes in the past, and in the future.
    for skew in [-360, 360] {
        let r = server.client(SECRET, skew).invoke("echo", b"x", None).unwrap();
        assert_eq!(
            (r.status, error_type(&r)),
            (403, "InvalidSignatureException"),
            "skew {skew}"
        );
        assert!(String::from_utf8_lossy(&r.body).contains("expired"));
    }
    // Within the skew: accepted.
    let r = server.client(SECRET, -240).invoke("echo", b"y", None).unwrap();
    assert_eq!(r.status, 200);
    // Missing.
    let mut unsigned = Client::connect(server.addr, None).unwrap();
    let r = unsigned.invoke("echo", b"x", None).unwrap();
    assert_eq!((r.status, error_type(&r)), (403, "MissingAuthenticationTokenException"));
    // Tampered: a good signature of one body, sent with another.
    let host = server.addr.to_string();
    let date = microfaas::serve::sigv4::format_amz_date(
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap(),
    );
    let path = "/2015-03-31/functions/echo/invocations";
    let hv: Vec<(&str, &[u8])> = vec![("host", host.as_bytes()), ("x-amz-date", date.as_bytes())];
    let auth = microfaas::serve::sigv4::sign(
        KEY,
        SECRET,
        "us-east-1",
        &date,
        &microfaas::serve::sigv4::RequestParts {
            method: "POST",
            raw_path: path,
            raw_query: "",
            headers: &hv,
            body: b"signed body",
        },
    )
    .unwrap();
    let headers = vec![
        ("host".to_owned(), host.clone()),
        ("x-amz-date".to_owned(), date.clone()),
        ("authorization".to_owned(), auth.clone()),
    ];
    let mut raw = Client::connect(server.addr, None).unwrap();
    raw.send_raw("POST", path, "", &headers, b"signed body").unwrap();
    assert_eq!(raw.read_response().unwrap().status, 200, "the untampered request runs");
    raw.send_raw("POST", path, "", &headers, b"other body!").unwrap();
    let r = raw.read_response().unwrap();
    assert_eq!((r.status, error_type(&r)), (403, "InvalidSignatureException"));
    // Tampered path: the same signature sent to another function.
    raw.send_raw(
        "POST",
        "/2015-03-31/functions/echo2/invocations",
        "",
        &headers,
        b"signed body",
    )
    .unwrap();
    assert_eq!(raw.read_response().unwrap().status, 403);
    // A refused CreateFunction stores nothing.
    let r = server
        .client("wrong", 0)
        .create_function("sneaky", "microfaas-process", &echo_artifact())
        .unwrap();
    assert_eq!(r.status, 403);
    let r = good
        .request("GET", "/2015-03-31/functions/sneaky", "", &[], b"")
        .unwrap();
    assert_eq!((r.status, error_type(&r)), (404, "ResourceNotFoundException"));

    assert_eq!(server.ran("echo"), 3, "only the three good invocations ran");
    let refused: Vec<_> = server.log_lines().into_iter().filter(|l| l["status"] == 403).collect();
    assert_eq!(refused.len(), 7);
    assert!(refused.iter().all(|l| l["backend"].is_null() && l["key"].is_null()));
    assert!(server.stop().success());
}

/// An invocation whose body is `mib` MiB, chunked (no declared length).
fn chunked_body(mib: usize) -> Vec<u8> {
    let mut out =
        b"POST /2015-03-31/functions/echo/invocations HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    let chunk = vec![b'z'; 1 << 20];
    for _ in 0..mib {
        out.extend_from_slice(b"100000\r\n");
        out.extend_from_slice(&chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    // The server may keep the connection open after its answer.
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.take(64 << 10).read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_and_oversized_requests_get_4xx_and_the_server_stays_up() {
    let server = Server::start(&[], true);
    let status = |resp: &str| resp.split(' ').nth(1).unwrap_or("").to_owned();
    // Not HTTP.
    assert_eq!(status(&raw_exchange(server.addr, b"\x16\x03\x01 hello\r\n\r\n")), "400");
    // Headers beyond the 64 KiB buffer.
    let big = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(100 << 10));
    let r = raw_exchange(server.addr, big.as_bytes());
    assert!(r.is_empty() || status(&r).starts_with('4'), "{r:.80}");
    // A declared body over the limit: refused before it is read.
    let r = raw_exchange(
        server.addr,
        b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\nhost: x\r\ncontent-length: 7000000\r\n\r\n",
    );
    assert_eq!(status(&r), "413", "{r:.200}");
    assert!(r.contains("RequestTooLargeException"));
    // An unsigned body is refused before a byte of it is read.
    let r = raw_exchange(server.addr, &chunked_body(7));
    assert_eq!(status(&r), "403", "{r:.200}");
    assert!(r.contains("MissingAuthenticationTokenException"));
    // Signed but nonsense.
    let mut c = server.client(SECRET, 0);
    let r = c
        .request("POST", "/2015-03-31/functions", "", &[], b"{not json")
        .unwrap();
    assert_eq!((r.status, error_type(&r)), (400, "InvalidParameterValueException"));
    let r = c.request("GET", "/nowhere", "", &[], b"").unwrap();
    assert_eq!(r.status, 404);
    let r = c.request("GET", "/2015-03-31/functions/%2e%2e", "", &[], b"").unwrap();
    assert_eq!(r.status, 400);
    let r = c
        .request("GET", "/2015-03-31/functions", "MaxItems=0", &[], b"")
        .unwrap();
    assert_eq!(r.status, 400);
    let r = c
        .request(
            "POST",
            "/2015-03-31/functions",
            "",
            &[],
            br#"{"FunctionName":"f","Runtime":"microfaas-process","Role":"r","Code":{"ZipFile":"f0VMRgo="}}"#,
        )
        .unwrap();
    assert_eq!((r.status, error_type(&r)), (400, "InvalidParameterValueException"));
    assert!(String::from_utf8_lossy(&r.body).contains("not a valid microfaas artifact"));
    // Still serving.
    let r = c
        .create_function("echo", "microfaas-process", &echo_artifact())
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(c.invoke("echo", b"alive", None).unwrap().body, b"alive");
    assert!(server.stop().success());
}

#[test]
fn insecure_mode_serves_unsigned_requests_and_forced_start_paths() {
    let server = Server::start(&[], false);
    let mut c = Client::connect(server.addr, None).unwrap();
    assert_eq!(
        c.create_function("echo", "microfaas-process", &echo_artifact())
            .unwrap()
            .status,
        201
    );
    let r = c.invoke("echo", b"hi", Some("cold")).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-microfaas-start"), Some("cold"));
    let r = c.invoke("echo", b"hi", Some("warm")).unwrap();
    assert_eq!(r.header("x-microfaas-start"), Some("warm"));
    let r = c.invoke("echo", b"hi", Some("function")).unwrap();
    assert_eq!((r.status, error_type(&r)), (400, "InvalidParameterValueException"));
    // A body over the limit without a declared length: refused at the limit.
    let status = |resp: &str| resp.split(' ').nth(1).unwrap_or("").to_owned();
    assert_eq!(status(&raw_exchange(server.addr, &chunked_body(7))), "413");
    assert_eq!(status(&raw_exchange(server.addr, &chunked_body(1))), "200");
    assert!(server.stop().success());
}

#[test]
fn the_server_refuses_to_start_without_credentials_or_with_a_bad_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_microfaas"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("creds");
    std::fs::write(&bad, "[Not A Tenant]\naws_access_key_id=a\naws_secret_access_key=b\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_microfaas"))
        .args(["serve", "--listen", "127.0.0.1:0", "--credentials"])
        .arg(&bad)
        .arg("--registry")
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tenant"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A zip of `entries` (name, bytes).
fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in entries {
        w.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Code uploaded with a module (`wasm-runtime`'s `.so` and a `.wasm` in one
/// zip) runs the module on every backend; `UpdateFunctionCode` with another
/// module changes what runs; the configuration names the module's digest;
/// a module that is not WebAssembly fails the invocation (a function
/// error), and the server keeps serving.
#[test]
fn code_with_a_module_runs_the_module() {
    use base64::Engine as _;
    let server = Server::start(&[], false);
    let mut c = Client::connect(server.addr, None).unwrap();
    let runtime = std::fs::read(microfaas::builtin(microfaas::WASM_RUNTIME).unwrap().path()).unwrap();
    let module = |name: &str| microfaas::builtin_module(name).unwrap();
    let echo = zip_of(&[("wasm-runtime.so", &runtime), ("echo.wasm", &module("echo"))]);
    for runtime_name in ["microfaas-process", "microfaas-language", "microfaas-vm"] {
        let name = format!("wasm-echo-{}", runtime_name.trim_start_matches("microfaas-"));
        let r = c.create_function(&name, runtime_name, &echo).unwrap();
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let config: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(config["MicrofaasModuleSha256"].is_string(), "{config}");
        let r = c.invoke(&name, b"interpreted", None).unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"interpreted"[..]),
            "{runtime_name}"
        );
    }
    let hash = zip_of(&[("wasm-runtime.so", &runtime), ("hash.wasm", &module("hash"))]);
    let body = serde_json::json!({ "ZipFile": base64::engine::general_purpose::STANDARD.encode(&hash) }).to_string();
    let r = c
        .request(
            "PUT",
            "/2015-03-31/functions/wasm-echo-process/code",
            "",
            &[],
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = c.invoke("wasm-echo-process", b"abc", None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 8, "the hash module's 8-byte digest, not an echo");

    let garbage = zip_of(&[("wasm-runtime.so", &runtime), ("bad.wasm", b"not webassembly")]);
    assert_eq!(
        c.create_function("bad", "microfaas-process", &garbage).unwrap().status,
        201
    );
    let r = c.invoke("bad", b"", None).unwrap();
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    assert!(
        String::from_utf8_lossy(&r.body).contains("invalid wasm module"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(c.invoke("wasm-echo-vm", b"alive", None).unwrap().body, b"alive");
    assert!(server.stop().success());
}
