//! The store key: 32 random bytes in `STORE/key` (mode 0600, owned by the
//! host's uid), created with the store and never written into a node or
//! image file. Everything the store reads back is authenticated with keys
//! derived from it (BLAKE3 in keyed mode):
//!
//! - a node's MAC (32 bytes in its header) covers its header fields (id,
//!   parent id, parent check, level, memory size, page count, section
//!   layout and checksums), its page index, its state blob and its metadata
//!   (label: function name, artifact digest, input hash; creation time);
//! - each stored page's index entry carries a 64-bit keyed tag of the page
//!   (the index itself is covered by the MAC), so page data cannot be
//!   replaced by other data with the same checksum;
//! - a merged image is accepted only if every page of it carries the tag
//!   its lineage (MAC-checked nodes) records for that page.
//!
//! Only a process that can read the key file can make a node the store
//! accepts: the host's uid. Sandboxed functions run under another uid with
//! no file system at all; a process with the host's uid is outside what the
//! MAC can defend against (it can read the key).

use crate::error::OpenStoreError;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// File name of the key inside the store directory.
pub const KEY_FILE: &str = "key";
/// Key length in bytes.
const KEY_LEN: usize = 32;

/// Domain-separation contexts of the derived keys.
const NODE_MAC_CONTEXT: &str = "microfaas snapshots 2026-12 node MAC";
const PAGE_TAG_CONTEXT: &str = "microfaas snapshots 2026-12 page tag";

/// The store's secret, as the two keys derived from it.
#[derive(Clone)]
pub struct StoreKey {
    node_mac: [u8; 32],
    page_tag: [u8; 32],
    zero_page_tag: u64,
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

/// A node MAC being computed over the node's sections, in file order of
/// their meaning: header fields, index, state, metadata (each
/// length-prefixed, so no section can donate bytes to its neighbour).
pub(crate) struct NodeMac(blake3::Hasher);

impl NodeMac {
    /// Adds a section's length; then its bytes go in through [`NodeMac::update`].
    pub(crate) fn section(&mut self, len: u64) {
        self.0.update(&len.to_le_bytes());
    }
    /// Adds bytes of the current section.
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The MAC.
    pub(crate) fn finish(&self) -> blake3::Hash {
        self.0.finalize()
    }
}

impl StoreKey {
    /// Derives the working keys from the 32 secret bytes.
    pub fn from_secret(secret: &[u8; KEY_LEN]) -> StoreKey {
        let page_tag = blake3::derive_key(PAGE_TAG_CONTEXT, secret);
        let mut key = StoreKey {
            node_mac: blake3::derive_key(NODE_MAC_CONTEXT, secret),
            page_tag,
            zero_page_tag: 0,
        };
        key.zero_page_tag = key.page_tag(&[0u8; crate::pages::PAGE_SIZE]);
        key
    }

    /// The keyed 64-bit tag of one page's bytes (what a node's index stores
    /// for the page). Without the key, a page with a chosen tag cannot be
    /// made (one guess in 2^64).
    pub fn page_tag(&self, page: &[u8]) -> u64 {
        let h = blake3::keyed_hash(&self.page_tag, page);
        let mut w = [0u8; 8];
        w.copy_from_slice(&h.as_bytes()[..8]);
        u64::from_le_bytes(w)
    }

    /// The tag of an all-zero page.
    pub fn zero_page_tag(&self) -> u64 {
        self.zero_page_tag
    }

    /// Starts a node MAC.
    pub(crate) fn node_mac(&self) -> NodeMac {
        NodeMac(blake3::Hasher::new_keyed(&self.node_mac))
    }

    /// Reads the key of the store at `root`, creating it if the store has
    /// none (a new store, or one of format version 1, whose node files are
    /// then refused as another version and rebuilt). Refuses a key file
    /// that is not a regular file, is group/other-accessible, is not owned
    /// by this process's effective uid, or has the wrong length.
    pub fn load_or_create(root: &Path) -> Result<StoreKey, OpenStoreError> {
        let path = root.join(KEY_FILE);
        let bad = |reason: String| OpenStoreError::Key {
            path: path.clone(),
            reason,
        };
        let io = |source: std::io::Error| OpenStoreError::Io {
            path: path.clone(),
            source,
        };
        let file = match File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(root, &path).map_err(io)?,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(bad("the key file is a symbolic link".to_owned()));
            }
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if let Some(reason) = key_file_fault(meta.is_file(), meta.mode(), meta.uid(), euid, meta.len()) {
            return Err(bad(reason));
        }
        let mut secret = [0u8; KEY_LEN];
        (&file).read_exact(&mut secret).map_err(io)?;
        Ok(StoreKey::from_secret(&secret))
    }
}

/// Why a key file with these properties is refused (pure, for tests).
pub(crate) fn key_file_fault(is_file: bool, mode: u32, uid: u32, euid: u32, len: u64) -> Option<String> {
    if !is_file {
        return Some("the key is not a regular file".to_owned());
    }
    if mode & 0o077 != 0 {
        return Some(format!(
            "the key file has mode {:04o}; it must be readable by its owner only (chmod 600 it, or recreate the store)",
            mode & 0o7777
        ));
    }
    if uid != euid {
        return Some(format!(
            "the key file is owned by uid {uid}, not by this process's uid {euid}"
        ));
    }
    if len != KEY_LEN as u64 {
        return Some(format!("the key file has {len} bytes, not {KEY_LEN}"));
    }
    None
}

/// Creates the key file: random bytes into a temp file of mode 0600, then
/// linked into place only if no key exists yet (two processes creating the
/// same store agree on whichever key was linked first).
fn create(root: &Path, path: &Path) -> std::io::Result<File> {
    let mut secret = [0u8; KEY_LEN];
    getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = root.join(crate::store::TMP_DIR).join(format!(
        "key.{}.{}.tmp",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        std::process::id()
    ));
    let written = (|| {
        let mut f = File::options().write(true).create_new(true).mode(0o600).open(&tmp)?;
        // The mode given to open is masked by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(&secret)?;
        f.sync_all()?;
        match fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    let _ = fs::remove_file(&tmp);
    written?;
    crate::store::sync_dir(root)?;
    File::options().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_rules() {
        assert_eq!(key_file_fault(true, 0o100600, 5, 5, 32), None);
        assert!(key_file_fault(true, 0o100644, 5, 5, 32).unwrap().contains("mode 0644"));
        assert!(key_file_fault(true, 0o100640, 5, 5, 32).unwrap().contains("mode 0640"));
        assert!(key_file_fault(true, 0o100600, 6, 5, 32).unwrap().contains("uid 6"));
        assert!(key_file_fault(true, 0o100600, 5, 5, 31).unwrap().contains("31 bytes"));
        assert!(key_file_fault(false, 0o040700, 5, 5, 32).is_some());
    }

    #[test]
    fn keys_differ_per_secret_and_purpose() {
        let a = StoreKey::from_secret(&[1; 32]);
        let b = StoreKey::from_secret(&[2; 32]);
        let page = [7u8; 4096];
        assert_ne!(a.page_tag(&page), b.page_tag(&page));
        assert_eq!(a.page_tag(&page), StoreKey::from_secret(&[1; 32]).page_tag(&page));
        assert_eq!(a.zero_page_tag(), a.page_tag(&[0; 4096]));
        assert_ne!(a.node_mac, a.page_tag);
        let mac = |k: &StoreKey, parts: &[&[u8]]| {
            let mut m = k.node_mac();
            for p in parts {
                m.section(p.len() as u64);
                m.update(p);
            }
            m.finish()
        };
        // Length prefixes: moving a byte between sections changes the MAC.
        assert_ne!(mac(&a, &[b"ab", b"c"]), mac(&a, &[b"a", b"bc"]));
        assert_ne!(mac(&a, &[b"ab"]), mac(&b, &[b"ab"]));
    }

    #[test]
    fn created_key_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(crate::store::TMP_DIR)).unwrap();
        let k1 = StoreKey::load_or_create(dir.path()).unwrap();
        let meta = fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let k2 = StoreKey::load_or_create(dir.path()).unwrap();
        assert_eq!(k1.page_tag(&[3; 4096]), k2.page_tag(&[3; 4096]));
        fs::set_permissions(dir.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = StoreKey::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("/key") && err.contains("mode 0644"), "{err}");
    }
}
