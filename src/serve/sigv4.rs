//! AWS Signature Version 4: the credentials file (the AWS shared-credentials
//! INI), verification of a received request's `Authorization` header, and
//! signing (for our own clients and tests).
//!
//! Why the canonical request is built here rather than by `aws-sigv4`: that
//! crate signs an outgoing request and chooses itself which headers to sign,
//! while a verifier must canonicalise exactly the headers the *client* listed
//! in `SignedHeaders`, from the raw path and query it sent. The crypto is not
//! hand-written: HMAC-SHA256 is RustCrypto's `hmac` + `sha2`, and the final
//! comparison is `Mac::verify_slice` (constant time). The canonicalisation is
//! checked against AWS's published example (see the tests) and, end to end,
//! against botocore's signer (`tests/python/`).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;

pub use super::credentials::{Credentials, CredentialsError};

type HmacSha256 = Hmac<Sha256>;

/// The only algorithm accepted.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The service name in the credential scope.
pub const SERVICE: &str = "lambda";
/// Largest accepted difference between the request's date and ours.
pub const MAX_SKEW_SECS: i64 = 300;

/// Why a request was refused (each is a 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header (or not a SigV4 one).
    #[error("missing authentication token")]
    Missing,
    /// The header or a signed header does not parse.
    #[error("malformed authorization: {0}")]
    Malformed(&'static str),
    /// The access key id is not in the credentials file.
    #[error("the security token included in the request is invalid")]
    UnknownKey,
    /// The request's date is more than 5 minutes from ours.
    #[error("signature expired: request date {request} is more than 5 minutes from the server's time")]
    Expired {
        /// The request's `X-Amz-Date`.
        request: String,
    },
    /// The signature does not match.
    #[error(
        "the request signature we calculated does not match the signature you provided; check your AWS secret access key and signing method"
    )]
    Mismatch,
}

impl AuthError {
    /// Lambda's error type for this refusal (botocore's error code).
    pub fn error_type(&self) -> &'static str {
        match self {
            AuthError::Missing => "MissingAuthenticationTokenException",
            AuthError::UnknownKey => "UnrecognizedClientException",
            AuthError::Malformed(_) | AuthError::Expired { .. } | AuthError::Mismatch => "InvalidSignatureException",
        }
    }
}

/// The parts of a received request the signature covers.
#[derive(Debug)]
pub struct RequestParts<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The path as sent (percent-encoded).
    pub raw_path: &'a str,
    /// The query string as sent, without `?` (may be empty).
    pub raw_query: &'a str,
    /// Every header, names in any case, in the order received.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The body.
    pub body: &'a [u8],
}

impl<'a> RequestParts<'a> {
    fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// Who signed an accepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The access key id.
    pub access_key_id: String,
    /// Its profile in the credentials file: the tenant it acts for.
    pub profile: crate::Tenant,
}

/// The fields of an `Authorization: AWS4-HMAC-SHA256 ...` header.
#[derive(Debug, PartialEq, Eq)]
struct AuthHeader<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_auth_header(value: &str) -> Result<AuthHeader<'_>, AuthError> {
    let rest = value.strip_prefix(ALGORITHM).ok_or(AuthError::Missing)?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let (k, v) = part.split_once('=').ok_or(AuthError::Malformed("expected key=value"))?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v),
            _ => return Err(AuthError::Malformed("unknown authorization field")),
        }
    }
    let credential = credential.ok_or(AuthError::Malformed("no Credential"))?;
    let signed = signed.ok_or(AuthError::Malformed("no SignedHeaders"))?;
    let signature = signature.ok_or(AuthError::Malformed("no Signature"))?;
    let mut scope = credential.split('/');
    let (Some(access_key_id), Some(date), Some(region), Some(service), Some("aws4_request"), None) = (
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
    ) else {
        return Err(AuthError::Malformed(
            "Credential is not KEY/DATE/REGION/SERVICE/aws4_request",
        ));
    };
    let signed_headers: Vec<&str> = signed.split(';').collect();
    if signed_headers
        .iter()
        .any(|h| h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return Err(AuthError::Malformed("SignedHeaders must be lowercase names"));
    }
    if !signed_headers.windows(2).all(|w| w[0] < w[1]) {
        return Err(AuthError::Malformed("SignedHeaders must be sorted and unique"));
    }
    if !signed_headers.contains(&"host") {
        return Err(AuthError::Malformed("host must be signed"));
    }
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::Malformed("Signature is not 64 hex digits"));
    }
    Ok(AuthHeader {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

/// Seconds since the epoch of an `X-Amz-Date` (`YYYYMMDDTHHMMSSZ`).
fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `X-Amz-Date` of a time in seconds since the epoch.
pub fn format_amz_date(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// RFC 3986 percent-encoding of everything but unreserved characters (and
/// `/` if `keep_slash`): SigV4's `UriEncode`.
fn uri_encode(out: &mut String, bytes: &[u8], keep_slash: bool) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The canonical URI of a non-S3 service: the path as sent, with dot
/// segments and empty segments removed, percent-encoded once more (botocore
/// and the AWS SDKs encode the already encoded path: `%` becomes `%25`).
fn canonical_uri(raw_path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for seg in raw_path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut path = String::from("/");
    path.push_str(&segments.join("/"));
    if raw_path.ends_with('/') && !segments.is_empty() {
        path.push('/');
    }
    let mut out = String::with_capacity(path.len());
    uri_encode(&mut out, path.as_bytes(), true);
    out
}

/// The canonical query: each name and value decoded and re-encoded strictly,
/// sorted by name, then value.
fn canonical_query(raw_query: &str) -> String {
    let mut pairs: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let (mut ek, mut ev) = (String::new(), String::new());
            uri_encode(&mut ek, &percent_decode(k), false);
            uri_encode(&mut ev, &percent_decode(v), false);
            (ek, ev)
        })
        .collect();
    pairs.sort();
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// A header value trimmed, with runs of spaces collapsed to one.
fn canonical_header_value(out: &mut String, value: &str) {
    let mut space = false;
    for c in value.trim().chars() {
        if c == ' ' || c == '\t' {
            space = true;
        } else {
            if space {
                out.push(' ');
                space = false;
            }
            out.push(c);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn hmac(key: &[u8], data: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length: new_from_slice cannot fail.
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(data);
    mac
}

/// The signing key of a secret for one date, region and service.
fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes())
        .finalize()
        .into_bytes();
    let k = hmac(&k, region.as_bytes()).finalize().into_bytes();
    let k = hmac(&k, service.as_bytes()).finalize().into_bytes();
    hmac(&k, b"aws4_request").finalize().into_bytes().to_vec()
}

/// The string to sign of a request, or why it cannot be built.
fn string_to_sign(
    req: &RequestParts<'_>,
    signed_headers: &[&str],
    amz_date: &str,
    scope: &str,
    payload_hash: &str,
) -> Result<String, AuthError> {
    let mut canonical = String::with_capacity(512);
    canonical.push_str(req.method);
    canonical.push('\n');
    canonical.push_str(&canonical_uri(req.raw_path));
    canonical.push('\n');
    canonical.push_str(&canonical_query(req.raw_query));
    canonical.push('\n');
    for name in signed_headers {
        let mut values = req
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .peekable();
        if values.peek().is_none() {
            return Err(AuthError::Malformed("a signed header is missing"));
        }
        canonical.push_str(name);
        canonical.push(':');
        for (i, (_, v)) in values.enumerate() {
            if i > 0 {
                canonical.push(',');
            }
            let v = std::str::from_utf8(v).map_err(|_| AuthError::Malformed("a signed header is not UTF-8"))?;
            canonical_header_value(&mut canonical, v);
        }
        canonical.push('\n');
    }
    canonical.push('\n');
    canonical.push_str(&signed_headers.join(";"));
    canonical.push('\n');
    canonical.push_str(payload_hash);
    Ok(format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    ))
}

/// The checks that need no body: an `Authorization` header that parses,
/// a known access key and a fresh `X-Amz-Date`. [`verify`] repeats them.
pub fn precheck(creds: &Credentials, headers: &[(&str, &[u8])], now_unix: i64) -> Result<(), AuthError> {
    let req = RequestParts {
        method: "",
        raw_path: "",
        raw_query: "",
        headers,
        body: b"",
    };
    let auth = req.header("authorization").ok_or(AuthError::Missing)?;
    let auth = std::str::from_utf8(auth).map_err(|_| AuthError::Malformed("Authorization is not UTF-8"))?;
    let auth = parse_auth_header(auth)?;
    creds.get(auth.access_key_id).ok_or(AuthError::UnknownKey)?;
    check_date(&req, &auth, now_unix).map(|_| ())
}

/// The request's `X-Amz-Date`, checked against the scope and our clock.
fn check_date<'a>(req: &RequestParts<'a>, auth: &AuthHeader<'_>, now_unix: i64) -> Result<&'a str, AuthError> {
    let amz_date = req
        .header("x-amz-date")
        .ok_or(AuthError::Malformed("no X-Amz-Date header"))?;
    let amz_date = std::str::from_utf8(amz_date).map_err(|_| AuthError::Malformed("X-Amz-Date is not UTF-8"))?;
    let when = parse_amz_date(amz_date).ok_or(AuthError::Malformed("X-Amz-Date is not YYYYMMDDTHHMMSSZ"))?;
    if !auth.signed_headers.contains(&"x-amz-date") {
        return Err(AuthError::Malformed("x-amz-date must be signed"));
    }
    if amz_date.get(..8) != Some(auth.date) {
        return Err(AuthError::Malformed("the credential scope's date is not the request's"));
    }
    if (now_unix - when).abs() > MAX_SKEW_SECS {
        return Err(AuthError::Expired {
            request: amz_date.to_owned(),
        });
    }
    Ok(amz_date)
}

/// Verifies the request's SigV4 signature against `creds` at time `now_unix`
/// (seconds since the epoch). Only header authentication is accepted (no
/// presigned query strings); the payload hash is the body's SHA-256 (an
/// `x-amz-content-sha256` header, if sent, must equal it).
pub fn verify(creds: &Credentials, req: &RequestParts<'_>, now_unix: i64) -> Result<Verified, AuthError> {
    let auth = req.header("authorization").ok_or(AuthError::Missing)?;
    let auth = std::str::from_utf8(auth).map_err(|_| AuthError::Malformed("Authorization is not UTF-8"))?;
    let auth = parse_auth_header(auth)?;
    let key = creds.get(auth.access_key_id).ok_or(AuthError::UnknownKey)?;
    if auth.service != SERVICE {
        return Err(AuthError::Malformed("the credential scope's service is not lambda"));
    }
    let amz_date = check_date(req, &auth, now_unix)?;
    let payload_hash = hex(&Sha256::digest(req.body));
    if let Some(claimed) = req.header("x-amz-content-sha256")
        && claimed != payload_hash.as_bytes()
    {
        return Err(AuthError::Mismatch);
    }
    let scope = format!("{}/{}/{}/aws4_request", auth.date, auth.region, auth.service);
    let sts = string_to_sign(req, &auth.signed_headers, amz_date, &scope, &payload_hash)?;
    let mut signature = Vec::with_capacity(32);
    for pair in auth.signature.as_bytes().chunks(2) {
        let pair = std::str::from_utf8(pair).map_err(|_| AuthError::Mismatch)?;
        signature.push(u8::from_str_radix(pair, 16).map_err(|_| AuthError::Mismatch)?);
    }
    let key_bytes = signing_key(&key.secret, auth.date, auth.region, auth.service);
    hmac(&key_bytes, sts.as_bytes())
        .verify_slice(&signature)
        .map_err(|_| AuthError::Mismatch)?;
    Ok(Verified {
        access_key_id: auth.access_key_id.to_owned(),
        profile: key.profile.clone(),
    })
}

/// Signs a request: returns the `Authorization` value for `req`, whose
/// headers must already hold `host` and `x-amz-date` (= `amz_date`). Every
/// header in `req.headers` is signed.
pub fn sign(
    access_key_id: &str,
    secret: &str,
    region: &str,
    amz_date: &str,
    req: &RequestParts<'_>,
) -> Result<String, AuthError> {
    let mut names: Vec<String> = req.headers.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
    names.sort();
    names.dedup();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let date = amz_date
        .get(..8)
        .ok_or(AuthError::Malformed("X-Amz-Date is too short"))?;
    let scope = format!("{date}/{region}/{SERVICE}/aws4_request");
    let payload_hash = hex(&Sha256::digest(req.body));
    let sts = string_to_sign(req, &names, amz_date, &scope, &payload_hash)?;
    let sig = hmac(&signing_key(secret, date, region, SERVICE), sts.as_bytes())
        .finalize()
        .into_bytes();
    Ok(format!(
        "{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={}, Signature={}",
        names.join(";"),
        hex(&sig)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    // AWS's published SigV4 example ("Create a signed AWS API request",
    // IAM ListUsers): secret, date and the signature AWS documents for it.
    const EXAMPLE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    #[test]
    fn aws_documented_example_signing_key_and_signature() {
        // The documented derived signing key for 20150830/us-east-1/iam.
        let key = signing_key(EXAMPLE_SECRET, "20150830", "us-east-1", "iam");
        assert_eq!(
            hex(&key),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
        let headers: [(&str, &[u8]); 3] = [
            ("Content-Type", b"application/x-www-form-urlencoded; charset=utf-8"),
            ("Host", b"iam.amazonaws.com"),
            ("X-Amz-Date", b"20150830T123600Z"),
        ];
        let req = RequestParts {
            method: "GET",
            raw_path: "/",
            raw_query: "Version=2010-05-08&Action=ListUsers",
            headers: &headers,
            body: b"",
        };
        let sts = string_to_sign(
            &req,
            &["content-type", "host", "x-amz-date"],
            "20150830T123600Z",
            "20150830/us-east-1/iam/aws4_request",
            &hex(&Sha256::digest(b"")),
        )
        .unwrap();
        // The documented hash of the canonical request.
        assert!(
            sts.ends_with("f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"),
            "{sts}"
        );
        let sig = hmac(&key, sts.as_bytes()).finalize().into_bytes();
        assert_eq!(
            hex(&sig),
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    fn creds() -> Credentials {
        Credentials::parse("# test\n[default]\naws_access_key_id = AKID\naws_secret_access_key = s3cret\nregion=x\n[other]\naws_access_key_id=AK2\naws_secret_access_key=two\n").unwrap()
    }

    fn signed(secret: &str, date: &str, body: &[u8]) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
        let headers: Vec<(&str, &[u8])> = vec![
            ("host", b"127.0.0.1:9000"),
            ("x-amz-date", date.as_bytes()),
            ("X-Amz-Invocation-Type", b"RequestResponse"),
        ];
        let req = RequestParts {
            method: "POST",
            raw_path: "/2015-03-31/functions/echo/invocations",
            raw_query: "",
            headers: &headers,
            body,
        };
        let auth = sign("AKID", secret, "us-east-1", date, &req).unwrap();
        let mut owned: Vec<(String, Vec<u8>)> = headers.iter().map(|(n, v)| ((*n).to_owned(), v.to_vec())).collect();
        owned.push(("Authorization".to_owned(), auth.into_bytes()));
        (owned, body.to_vec())
    }

    fn check(headers: &[(String, Vec<u8>)], body: &[u8], now: i64) -> Result<Verified, AuthError> {
        let h: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        verify(
            &creds(),
            &RequestParts {
                method: "POST",
                raw_path: "/2015-03-31/functions/echo/invocations",
                raw_query: "",
                headers: &h,
                body,
            },
            now,
        )
    }

    #[test]
    fn good_signature_verifies_and_each_tampering_is_refused() {
        let date = "20261202T021000Z";
        let now = parse_amz_date(date).unwrap();
        let (h, body) = signed("s3cret", date, b"payload");
        let ok = check(&h, &body, now).unwrap();
        assert_eq!(ok.profile.as_str(), "default");
        assert_eq!(check(&h, &body, now + 299).unwrap().access_key_id, "AKID");
        assert!(matches!(check(&h, &body, now + 301), Err(AuthError::Expired { .. })));
        assert!(matches!(check(&h, &body, now - 301), Err(AuthError::Expired { .. })));
        assert_eq!(check(&h, b"payloaD", now), Err(AuthError::Mismatch));
        let (wrong, _) = signed("not-it", date, b"payload");
        assert_eq!(check(&wrong, &body, now), Err(AuthError::Mismatch));
        let mut tampered = h.clone();
        tampered[2].1 = b"Event".to_vec();
        assert_eq!(check(&tampered, &body, now), Err(AuthError::Mismatch));
        let missing: Vec<_> = h.iter().filter(|(n, _)| n != "Authorization").cloned().collect();
        assert_eq!(check(&missing, &body, now), Err(AuthError::Missing));
        let mut unknown = h.clone();
        let a = String::from_utf8(unknown[3].1.clone())
            .unwrap()
            .replace("AKID/", "NOPE/");
        unknown[3].1 = a.into_bytes();
        assert_eq!(check(&unknown, &body, now), Err(AuthError::UnknownKey));
        let mut lying_hash = h.clone();
        lying_hash.push(("x-amz-content-sha256".into(), b"UNSIGNED-PAYLOAD".to_vec()));
        assert_eq!(check(&lying_hash, &body, now), Err(AuthError::Mismatch));
    }

    #[test]
    fn precheck_needs_no_body_and_refuses_what_verify_would() {
        let date = "20261202T021000Z";
        let now = parse_amz_date(date).unwrap();
        let (h, _) = signed("any-secret: precheck does not see it", date, b"body");
        let view: Vec<(&str, &[u8])> = h.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        assert_eq!(precheck(&creds(), &view, now), Ok(()));
        assert!(matches!(
            precheck(&creds(), &view, now + 400),
            Err(AuthError::Expired { .. })
        ));
        assert_eq!(precheck(&creds(), &view[..3], now), Err(AuthError::Missing));
        let other = Credentials::parse("[x]\naws_access_key_id=ZZ\naws_secret_access_key=z\n").unwrap();
        assert_eq!(precheck(&other, &view, now), Err(AuthError::UnknownKey));
    }

    #[test]
    fn malformed_authorization_headers_are_refused_not_panicked_on() {
        for bad in [
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request",
            "AWS4-HMAC-SHA256 Credential=a/b/c/lambda/aws4_request, SignedHeaders=host, Signature=zz",
            "AWS4-HMAC-SHA256 Credential=a/b, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request, SignedHeaders=x-amz-date;host, Signature=0000000000000000000000000000000000000000000000000000000000000000",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request, SignedHeaders=Host, Signature=0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(matches!(parse_auth_header(bad), Err(AuthError::Malformed(_))), "{bad}");
        }
        assert_eq!(parse_auth_header("Basic abc"), Err(AuthError::Missing));
    }

    #[test]
    fn dates_round_trip_and_bad_dates_are_refused() {
        for t in [0_i64, 951_782_400, 1_440_938_160, 1_796_177_400, 4_102_444_800] {
            assert_eq!(parse_amz_date(&format_amz_date(t)), Some(t), "{t}");
        }
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        for bad in [
            "",
            "20150830T123600",
            "2015083OT123600Z",
            "20151330T123600Z",
            "20150830T250000Z",
            "+0150830T123600Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn canonical_uri_and_query_match_the_sdks() {
        assert_eq!(
            canonical_uri("/2015-03-31/functions/f/invocations"),
            "/2015-03-31/functions/f/invocations"
        );
        assert_eq!(canonical_uri("/a/./b/../c//d/"), "/a/c/d/");
        assert_eq!(canonical_uri("/a%20b"), "/a%2520b");
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_query("b=2&a=1&a=0&c"), "a=0&a=1&b=2&c=");
        assert_eq!(canonical_query("Marker=x%2Fy&MaxItems=5"), "Marker=x%2Fy&MaxItems=5");
        assert_eq!(canonical_query("k=a b"), "k=a%20b");
    }

    #[test]
    fn credentials_file_errors() {
        assert!(matches!(Credentials::parse(""), Err(CredentialsError::Empty)));
        assert!(matches!(
            Credentials::parse("[a]\naws_access_key_id=x\n"),
            Err(CredentialsError::Incomplete { .. })
        ));
        assert!(matches!(
            Credentials::parse("aws_access_key_id=x\n"),
            Err(CredentialsError::Syntax { line: 1, .. })
        ));
        assert!(matches!(
            Credentials::parse(
                "[a]\naws_access_key_id=x\naws_secret_access_key=1\n[b]\naws_access_key_id=x\naws_secret_access_key=2\n"
            ),
            Err(CredentialsError::Duplicate { .. })
        ));
        assert!(matches!(
            Credentials::parse("[Alice]\naws_access_key_id=x\naws_secret_access_key=1\n"),
            Err(CredentialsError::Tenant(_))
        ));
        let c = creds();
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
