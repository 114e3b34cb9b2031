//! Uploaded code: the base64 `ZipFile` of `CreateFunction` and
//! `UpdateFunctionCode`, unzipped within bounds. Uploaded code is hostile:
//! the caller verifies the bytes exactly as `microfaas verify` verifies a file.

use super::api::{ApiError, CodeRequest, MAX_ARTIFACT_BYTES, MAX_ZIP_BYTES};
use base64::Engine as _;
use std::io::Read as _;

/// What an upload holds: the artifact and, optionally, its module
/// (deploy-time data for the artifact's `load`, e.g. the WebAssembly module
/// `wasm-runtime` runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The artifact's bytes.
    pub artifact: Vec<u8>,
    /// The module's bytes: the zip's one `.wasm` entry, if it has one.
    pub module: Option<Vec<u8>>,
}

/// The code of an upload: the base64 `ZipFile` decoded, then, if it is a
/// zip, its one `.so` entry and its `.wasm` entry if any (at most one; each
/// bounded, never trusting sizes the zip declares), else the bytes
/// themselves as the artifact. Verification of the artifact is the
/// caller's ([`crate::Artifact::load`], as for the CLI); the module is data
/// the artifact's `load` checks when the function is deployed.
pub fn extract_code(code: &CodeRequest) -> Result<Upload, ApiError> {
    if code.s3_bucket.is_some() || code.image_uri.is_some() {
        return Err(ApiError::invalid("only Code.ZipFile is supported (no S3 or image)"));
    }
    let b64 = code
        .zip_file
        .as_deref()
        .ok_or_else(|| ApiError::invalid("Code.ZipFile is required"))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| ApiError::invalid(format!("ZipFile is not base64: {e}")))?;
    if raw.len() > MAX_ZIP_BYTES {
        return Err(ApiError::new(
            413,
            "RequestTooLargeException",
            "the zipped code is larger than 50 MB",
        ));
    }
    if !raw.starts_with(b"PK\x03\x04") {
        return Ok(Upload {
            artifact: raw,
            module: None,
        });
    }
    let bad = |e: zip::result::ZipError| ApiError::invalid(format!("ZipFile is not a valid zip: {e}"));
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&raw)).map_err(bad)?;
    let (mut artifact, mut module) = (None, None);
    for i in 0..archive.len() {
        let entry = archive.by_index(i).map_err(bad)?;
        if !entry.is_file() {
            continue;
        }
        let name = entry.name().map_err(bad)?;
        let (slot, what) = if name.ends_with(".so") {
            (&mut artifact, "more than one .so artifact")
        } else if name.ends_with(".wasm") {
            (&mut module, "more than one .wasm module")
        } else {
            continue;
        };
        if slot.replace(i).is_some() {
            return Err(ApiError::invalid(format!("the zip holds {what}")));
        }
    }
    let index = artifact.ok_or_else(|| ApiError::invalid("the zip holds no .so artifact"))?;
    Ok(Upload {
        artifact: unzip(&mut archive, index, "artifact")?,
        module: module.map(|i| unzip(&mut archive, i, "module")).transpose()?,
    })
}

/// Entry `index` of `archive`, read up to [`MAX_ARTIFACT_BYTES`].
fn unzip(
    archive: &mut zip::ZipArchive<std::io::Cursor<&Vec<u8>>>,
    index: usize,
    what: &str,
) -> Result<Vec<u8>, ApiError> {
    let entry = archive
        .by_index(index)
        .map_err(|e| ApiError::invalid(format!("ZipFile is not a valid zip: {e}")))?;
    let mut out = Vec::new();
    entry
        .take(MAX_ARTIFACT_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::invalid(format!("unzipping the {what}: {e}")))?;
    if u64::try_from(out.len()).unwrap_or(u64::MAX) > MAX_ARTIFACT_BYTES {
        return Err(ApiError::new(
            413,
            "RequestTooLargeException",
            format!("the unzipped {what} is larger than 64 MiB"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(bytes: &[u8]) -> CodeRequest {
        CodeRequest {
            zip_file: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            s3_bucket: None,
            image_uri: None,
            dry_run: false,
        }
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        use std::io::Write as _;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, bytes) in entries {
            w.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn code_is_the_zip_entry_or_the_bytes() {
        let only = |artifact: &[u8]| Upload {
            artifact: artifact.to_vec(),
            module: None,
        };
        assert_eq!(extract_code(&code(b"\x7fELF raw")).unwrap(), only(b"\x7fELF raw"));
        let z = zip_of(&[("README", b"hi"), ("lib/f.so", b"\x7fELF zipped")]);
        assert_eq!(extract_code(&code(&z)).unwrap(), only(b"\x7fELF zipped"));
        let with_module = zip_of(&[("f.so", b"\x7fELF"), ("m/echo.wasm", b"\0asm")]);
        assert_eq!(
            extract_code(&code(&with_module)).unwrap(),
            Upload {
                artifact: b"\x7fELF".to_vec(),
                module: Some(b"\0asm".to_vec()),
            }
        );
        let two = zip_of(&[("a.so", b"1"), ("b.so", b"2")]);
        assert_eq!(extract_code(&code(&two)).unwrap_err().status, 400);
        let two_modules = zip_of(&[("a.so", b"1"), ("a.wasm", b"2"), ("b.wasm", b"3")]);
        assert_eq!(extract_code(&code(&two_modules)).unwrap_err().status, 400);
        let module_only = zip_of(&[("a.wasm", b"2")]);
        assert_eq!(extract_code(&code(&module_only)).unwrap_err().status, 400);
        let none = zip_of(&[("a.txt", b"1")]);
        assert_eq!(extract_code(&code(&none)).unwrap_err().status, 400);
        let mut truncated = z.clone();
        truncated.truncate(z.len() / 2);
        assert_eq!(extract_code(&code(&truncated)).unwrap_err().status, 400);
        let bad_b64 = CodeRequest {
            zip_file: Some("!!!".into()),
            ..code(b"")
        };
        assert_eq!(extract_code(&bad_b64).unwrap_err().status, 400);
    }

    #[test]
    fn a_zip_bomb_stops_at_the_cap() {
        use std::io::Write as _;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        w.start_file("bomb.so", opts).unwrap();
        let chunk = vec![0_u8; 1 << 20];
        for _ in 0..65 {
            w.write_all(&chunk).unwrap();
        }
        let z = w.finish().unwrap().into_inner();
        assert!(z.len() < 1 << 20, "compressed small: {}", z.len());
        assert_eq!(extract_code(&code(&z)).unwrap_err().status, 413);
    }
}
