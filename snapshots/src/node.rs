//! Reading one node file: header, page index, metadata and state, each
//! size-capped and checksummed before use; page data verified on demand.

use crate::error::NodeFileError;
use crate::format::{
    self, HEADER_CRC_END, HEADER_LEN, HEADER_USED, Header, HeaderFault, IndexEntry, MAC_OFFSET, crc64,
};
use crate::id::{Label, Level, NodeId};
use crate::key::StoreKey;
use crate::pages::{PAGE_SIZE, PAGE_SIZE_U64, PageRange, ranges_from_sorted};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The small structured vCPU/device state summary the VMM hands over with
/// the opaque state blob, shown by `snapshots show` (e.g. `rip`, `rsp`,
/// `cr3`).
pub type StateSummary = BTreeMap<String, String>;

/// The metadata section (JSON) of a node file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// What the node is of.
    pub label: Label,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Summary of the vCPU/device state.
    #[serde(default)]
    pub state_summary: StateSummary,
}

/// A node whose header, page index, state blob and metadata passed their
/// checksums and the store's keyed MAC. The state is kept in memory (read
/// once, when the MAC was checked); page data is checked against its keyed
/// tag whenever it is read.
#[derive(Debug, Clone)]
pub struct Node {
    pub(crate) header: Header,
    pub(crate) header_crc: u64,
    pub(crate) meta: NodeMeta,
    pub(crate) index: Vec<IndexEntry>,
    pub(crate) state: Vec<u8>,
    pub(crate) key: std::sync::Arc<StoreKey>,
    pub(crate) path: PathBuf,
}

fn to_usize(v: u64, path: &Path) -> Result<usize, NodeFileError> {
    usize::try_from(v).map_err(|_| NodeFileError::Malformed {
        path: path.to_owned(),
        reason: format!("section of {v} bytes does not fit in memory"),
    })
}

impl Node {
    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.header.id
    }
    /// Its parent (`None` for a base).
    pub fn parent(&self) -> Option<NodeId> {
        self.header.parent
    }
    /// Its level.
    pub fn level(&self) -> Level {
        self.header.level
    }
    /// Its label.
    pub fn label(&self) -> &Label {
        &self.meta.label
    }
    /// Guest memory size in bytes.
    pub fn guest_mem_bytes(&self) -> u64 {
        self.header.guest_mem_bytes
    }
    /// Guest memory size in pages.
    pub fn guest_pages(&self) -> u64 {
        self.header.guest_mem_bytes / PAGE_SIZE_U64
    }
    /// Creation time, ms since the Unix epoch.
    pub fn created_unix_ms(&self) -> u64 {
        self.meta.created_unix_ms
    }
    /// The VMM's state summary.
    pub fn state_summary(&self) -> &StateSummary {
        &self.meta.state_summary
    }
    /// Length of the opaque state blob.
    pub fn state_len(&self) -> u64 {
        self.header.state_len
    }
    /// The node file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Size of the node file in bytes.
    pub fn file_len(&self) -> u64 {
        self.header.file_len
    }
    /// Number of pages this node stores itself.
    pub fn own_page_count(&self) -> u64 {
        self.header.page_count
    }
    /// The pages this node stores, ascending.
    pub fn own_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.iter().map(|e| e.page)
    }
    /// The pages this node stores, as runs.
    pub fn own_ranges(&self) -> Vec<PageRange> {
        ranges_from_sorted(self.own_pages())
    }
    /// The header checksum (a child records it as its `parent_check`).
    pub fn header_crc(&self) -> u64 {
        self.header_crc
    }
    /// The page index: `(guest page, CRC64)`, ascending by page.
    pub fn index(&self) -> &[IndexEntry] {
        &self.index
    }

    /// The opaque vCPU/device state blob (read and authenticated when the
    /// node was opened: later changes to the file cannot reach it).
    pub fn read_state(&self) -> Result<Vec<u8>, NodeFileError> {
        Ok(self.state.clone())
    }

    /// Reads stored pages `slots` (positions in the index) into `buf`
    /// (`slots.len() * 4096` bytes) and checks each page's CRC64.
    pub(crate) fn read_slots(
        &self,
        file: &File,
        slots: std::ops::Range<usize>,
        buf: &mut [u8],
    ) -> Result<(), NodeFileError> {
        let first = u64::try_from(slots.start).unwrap_or(u64::MAX);
        let offset = Header::page_offset(first).ok_or_else(|| NodeFileError::Malformed {
            path: self.path.clone(),
            reason: "page offset overflows".to_owned(),
        })?;
        read_at(file, &self.path, buf, offset)?;
        for (entry, page) in self.index[slots].iter().zip(buf.chunks_exact(PAGE_SIZE)) {
            if self.key.page_tag(page) != entry.crc {
                return Err(NodeFileError::PageChecksum {
                    path: self.path.clone(),
                    page: entry.page,
                    gpa: entry.page.saturating_mul(PAGE_SIZE_U64),
                });
            }
        }
        Ok(())
    }

    /// Reads one stored page (by guest page index) if this node stores it.
    pub fn read_page(&self, page: u64) -> Result<Option<Vec<u8>>, NodeFileError> {
        let Ok(slot) = self.index.binary_search_by_key(&page, |e| e.page) else {
            return Ok(None);
        };
        let file = open(&self.path)?;
        let mut buf = vec![0u8; PAGE_SIZE];
        self.read_slots(&file, slot..slot + 1, &mut buf)?;
        Ok(Some(buf))
    }

    /// Checks every section and every page; returns every fault found.
    pub fn verify_all(&self) -> Vec<NodeFileError> {
        let mut faults = Vec::new();
        let file = match open(&self.path) {
            Ok(f) => f,
            Err(e) => {
                faults.push(e);
                return faults;
            }
        };
        const CHUNK: usize = 256;
        let mut buf = vec![0u8; CHUNK * PAGE_SIZE];
        let mut slot = 0;
        while slot < self.index.len() {
            let n = CHUNK.min(self.index.len() - slot);
            let chunk = &mut buf[..n * PAGE_SIZE];
            match self.read_slots(&file, slot..slot + n, chunk) {
                Ok(()) => {}
                Err(NodeFileError::PageChecksum { .. }) => {
                    // Report each bad page of the chunk, not just the first.
                    for (entry, page) in self.index[slot..slot + n].iter().zip(chunk.chunks_exact(PAGE_SIZE)) {
                        if self.key.page_tag(page) != entry.crc {
                            faults.push(NodeFileError::PageChecksum {
                                path: self.path.clone(),
                                page: entry.page,
                                gpa: entry.page.saturating_mul(PAGE_SIZE_U64),
                            });
                        }
                    }
                }
                Err(e) => {
                    faults.push(e);
                    break;
                }
            }
            slot += n;
        }
        faults
    }
}

pub(crate) fn open(path: &Path) -> Result<File, NodeFileError> {
    File::open(path).map_err(|source| NodeFileError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), NodeFileError> {
    file.read_exact_at(buf, offset).map_err(|source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            let actual = file.metadata().map(|m| m.len()).unwrap_or(0);
            NodeFileError::Truncated {
                path: path.to_owned(),
                expected: offset.saturating_add(buf.len() as u64),
                actual,
            }
        } else {
            NodeFileError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Opens and validates a node file: header (magic, version, checksum,
/// caps, layout), the configured memory cap (`max_guest_mem_bytes`, checked
/// before anything the header sizes is read or allocated), file length,
/// that the id inside matches `expected` (the id its file name gives), the
/// page index, state and metadata checksums, and last the keyed MAC over
/// header, index, state and metadata. Nothing of the file is interpreted
/// (index entries, metadata JSON, label) before the MAC holds.
pub fn load(
    path: &Path,
    expected: Option<NodeId>,
    key: &std::sync::Arc<StoreKey>,
    max_guest_mem_bytes: u64,
) -> Result<Node, NodeFileError> {
    let p = || path.to_owned();
    let file = open(path)?;
    let actual = file
        .metadata()
        .map_err(|source| NodeFileError::Io { path: p(), source })?
        .len();
    let mut block = vec![0u8; PAGE_SIZE];
    if actual < HEADER_LEN {
        return Err(NodeFileError::Truncated {
            path: p(),
            expected: HEADER_LEN,
            actual,
        });
    }
    read_at(&file, path, &mut block, 0)?;
    let header = Header::decode(&block).map_err(|fault| match fault {
        HeaderFault::Short(_) => NodeFileError::Truncated {
            path: p(),
            expected: HEADER_LEN,
            actual,
        },
        HeaderFault::Magic => NodeFileError::BadMagic { path: p() },
        HeaderFault::Version(found) => NodeFileError::UnsupportedVersion {
            path: p(),
            found,
            supported: format::FORMAT_VERSION,
        },
        HeaderFault::Checksum => NodeFileError::HeaderChecksum { path: p() },
        HeaderFault::Malformed(reason) => NodeFileError::Malformed { path: p(), reason },
    })?;
    // The padding is covered by no checksum, so it must be exactly zero:
    // then no flipped bit anywhere in a node file goes unnoticed.
    if !crate::pages::is_zero(&block[HEADER_USED..]) {
        return Err(NodeFileError::Malformed {
            path: p(),
            reason: "non-zero bytes in the header padding".to_owned(),
        });
    }
    let mut crc_bytes = [0u8; 8];
    crc_bytes.copy_from_slice(&block[HEADER_CRC_END - 8..HEADER_CRC_END]);
    let header_crc = u64::from_le_bytes(crc_bytes);
    if header.guest_mem_bytes > max_guest_mem_bytes {
        return Err(NodeFileError::TooLarge {
            path: p(),
            reason: format!(
                "it claims {} bytes of guest memory ({} pages stored); the configured guest memory is {} bytes",
                header.guest_mem_bytes, header.page_count, max_guest_mem_bytes
            ),
        });
    }
    if actual < header.file_len {
        return Err(NodeFileError::Truncated {
            path: p(),
            expected: header.file_len,
            actual,
        });
    }
    if actual > header.file_len {
        return Err(NodeFileError::Malformed {
            path: p(),
            reason: format!("{} trailing bytes after the metadata", actual - header.file_len),
        });
    }
    if let Some(expected) = expected
        && expected != header.id
    {
        return Err(NodeFileError::IdMismatch {
            path: p(),
            expected,
            found: header.id,
        });
    }
    let index_len = header.page_count.saturating_mul(format::INDEX_ENTRY_LEN);
    let mut index_bytes = vec![0u8; to_usize(index_len, path)?];
    read_at(&file, path, &mut index_bytes, header.index_offset)?;
    if crc64(&index_bytes) != header.index_crc {
        return Err(NodeFileError::SectionChecksum {
            path: p(),
            section: "page index",
        });
    }
    let mut state = vec![0u8; to_usize(header.state_len, path)?];
    read_at(&file, path, &mut state, header.state_offset)?;
    if crc64(&state) != header.state_crc {
        return Err(NodeFileError::SectionChecksum {
            path: p(),
            section: "state",
        });
    }
    let mut meta_bytes = vec![0u8; to_usize(header.meta_len, path)?];
    read_at(&file, path, &mut meta_bytes, header.meta_offset)?;
    if crc64(&meta_bytes) != header.meta_crc {
        return Err(NodeFileError::SectionChecksum {
            path: p(),
            section: "metadata",
        });
    }
    let mut stored = [0u8; 32];
    stored.copy_from_slice(&block[MAC_OFFSET..HEADER_USED]);
    // `blake3::Hash` compares in constant time.
    if node_mac(key, &block[..HEADER_CRC_END], &index_bytes, &state, &meta_bytes) != stored {
        return Err(NodeFileError::Unauthenticated { path: p() });
    }
    let guest_pages = header.guest_mem_bytes / PAGE_SIZE_U64;
    let index = format::decode_index(&index_bytes, guest_pages)
        .map_err(|reason| NodeFileError::Malformed { path: p(), reason })?;
    let meta: NodeMeta = serde_json::from_slice(&meta_bytes).map_err(|e| NodeFileError::Malformed {
        path: p(),
        reason: format!("metadata: {e}"),
    })?;
    Ok(Node {
        header,
        header_crc,
        meta,
        index,
        state,
        key: std::sync::Arc::clone(key),
        path: p(),
    })
}

/// The MAC of a node: its header fields and CRC (`header`, the first
/// [`HEADER_CRC_END`] bytes), page index, state blob and metadata.
pub(crate) fn node_mac(key: &StoreKey, header: &[u8], index: &[u8], state: &[u8], meta: &[u8]) -> blake3::Hash {
    let mut mac = key.node_mac();
    for section in [header, index, state, meta] {
        mac.section(section.len() as u64);
        mac.update(section);
    }
    mac.finish()
}
