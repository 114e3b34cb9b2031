//! A small blocking HTTP/1.1 keep-alive client of `microfaas serve`, signing
//! with SigV4: what `compare http` measures with and the Rust tests talk
//! through. One connection per [`Client`]; responses are bounded (headers
//! 64 KiB, body 8 MiB, `Content-Length` required).

use super::sigv4;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAX_HEADER_BYTES: usize = 64 << 10;
const MAX_BODY_BYTES: usize = 8 << 20;

/// Credentials to sign with.
#[derive(Clone)]
pub struct Signer {
    /// The access key id.
    pub access_key_id: String,
    /// Its secret.
    pub secret: String,
    /// The region in the credential scope.
    pub region: String,
    /// Added to the clock when signing (tests sign in the past with it).
    pub clock_offset_secs: i64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct Client {
    stream: BufReader<TcpStream>,
    host: String,
    signer: Option<Signer>,
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    /// Connects to `addr`; `signer` = `None` sends unsigned requests (for a
    /// server started with `--insecure-no-auth`).
    pub fn connect(addr: SocketAddr, signer: Option<Signer>) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Self {
            stream: BufReader::new(stream),
            host: addr.to_string(),
            signer,
        })
    }

    /// Sends one request and reads its response. `path` is sent as is
    /// (already percent-encoded), `query` without `?`.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut all: Vec<(String, String)> = vec![("host".into(), self.host.clone())];
        all.extend(headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())));
        if let Some(s) = &self.signer {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX) + s.clock_offset_secs;
            let date = sigv4::format_amz_date(now);
            all.push(("x-amz-date".into(), date.clone()));
            let view: Vec<(&str, &[u8])> = all.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
            let auth = sigv4::sign(
                &s.access_key_id,
                &s.secret,
                &s.region,
                &date,
                &sigv4::RequestParts {
                    method,
                    raw_path: path,
                    raw_query: query,
                    headers: &view,
                    body,
                },
            )
            .map_err(|e| bad(e.to_string()))?;
            all.push(("authorization".into(), auth));
        }
        self.send_raw(method, path, query, &all, body)?;
        self.read_response()
    }

    /// Writes a request exactly as given (tests use it to send what a
    /// signer would not).
    pub fn send_raw(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> std::io::Result<()> {
        let mut head = format!("{method} {path}");
        if !query.is_empty() {
            head.push('?');
            head.push_str(query);
        }
        head.push_str(" HTTP/1.1\r\n");
        for (n, v) in headers {
            head.push_str(n);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        s.flush()
    }

    /// Reads one response.
    pub fn read_response(&mut self) -> std::io::Result<Response> {
        let mut line = String::new();
        let mut header_bytes = 0_usize;
        self.stream.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        let mut length = None;
        loop {
            line.clear();
            let n = self.stream.read_line(&mut line)?;
            header_bytes = header_bytes.saturating_add(n);
            if n == 0 || header_bytes > MAX_HEADER_BYTES {
                return Err(bad("response headers truncated or too long"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').ok_or_else(|| bad("bad header line"))?;
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().to_owned();
            if name == "content-length" {
                length = Some(value.parse::<usize>().map_err(|_| bad("bad content-length"))?);
            }
            if name == "transfer-encoding" {
                return Err(bad("chunked responses are not supported"));
            }
            headers.push((name, value));
        }
        let length = length.ok_or_else(|| bad("no content-length"))?;
        if length > MAX_BODY_BYTES {
            return Err(bad("response body too large"));
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body)?;
        Ok(Response { status, headers, body })
    }

    /// `Invoke` of `name` (`RequestResponse`), forcing `start` if given.
    pub fn invoke(&mut self, name: &str, payload: &[u8], start: Option<&str>) -> std::io::Result<Response> {
        let path = format!("/2015-03-31/functions/{name}/invocations");
        match start {
            Some(s) => self.request("POST", &path, "", &[("x-microfaas-start", s)], payload),
            None => self.request("POST", &path, "", &[], payload),
        }
    }

    /// `CreateFunction` of the artifact `code` on `runtime`.
    pub fn create_function(&mut self, name: &str, runtime: &str, code: &[u8]) -> std::io::Result<Response> {
        use base64::Engine as _;
        let body = serde_json::json!({
            "FunctionName": name,
            "Runtime": runtime,
            "Role": "arn:aws:iam::000000000000:role/microfaas",
            "Handler": "handle",
            "Code": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(code) },
        })
        .to_string();
        self.request(
            "POST",
            "/2015-03-31/functions",
            "",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    }
}
