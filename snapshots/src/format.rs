//! The node file's fixed header and page index: byte layout, encoding and
//! validation (pure; no I/O). See the crate docs for the full format.

use crate::id::{Level, NodeId};
use crate::pages::PAGE_SIZE_U64;

/// First 8 bytes of every node file.
pub const MAGIC: [u8; 8] = *b"MFAASNOD";
/// The node file format version this build writes and reads. Version 2
/// added the keyed MAC (bytes 160..192) and keyed page tags in the index;
/// version 1 files (checksums only) are refused as another version.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the header block; page data starts right after it, page aligned.
pub const HEADER_LEN: u64 = 4096;
/// Bytes of the header covered by the header CRC (fields, then the CRC).
pub const HEADER_CRC_END: usize = 160;
/// Where the node's 32-byte keyed MAC sits in the header.
pub const MAC_OFFSET: usize = HEADER_CRC_END;
/// Bytes of the header that carry fields (the rest of the block is zero).
pub const HEADER_USED: usize = MAC_OFFSET + 32;
/// Bytes per page index entry: page index (u64) + keyed page tag (u64).
pub const INDEX_ENTRY_LEN: u64 = 16;
/// Largest vCPU/device state blob accepted (the vm backend's is ~5 KiB;
/// it is read into memory whenever a node is opened).
pub const STATE_MAX_BYTES: u64 = 1 << 20;
/// Largest metadata JSON accepted.
pub const META_MAX_BYTES: u64 = 1 << 20;
/// Largest guest memory accepted (64 GiB).
pub const GUEST_MEM_MAX_BYTES: u64 = 64 << 30;

/// CRC-64/XZ (ECMA-182 polynomial) of `bytes`.
pub fn crc64(bytes: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(bytes);
    d.sum64()
}

/// The decoded fixed header of a node file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The node's level.
    pub level: Level,
    /// The node's id.
    pub id: NodeId,
    /// Parent id; `None` for a base.
    pub parent: Option<NodeId>,
    /// The parent's `header_crc` when this node was made (0 for a base): a
    /// parent file swapped for another is caught even if it bears the id.
    pub parent_check: u64,
    /// Guest memory size in bytes (page multiple).
    pub guest_mem_bytes: u64,
    /// Pages stored in this node.
    pub page_count: u64,
    /// Byte offset of the page index.
    pub index_offset: u64,
    /// Byte offset of the state blob.
    pub state_offset: u64,
    /// Length of the state blob.
    pub state_len: u64,
    /// Byte offset of the metadata JSON.
    pub meta_offset: u64,
    /// Length of the metadata JSON.
    pub meta_len: u64,
    /// Total file length.
    pub file_len: u64,
    /// CRC64 of the page index.
    pub index_crc: u64,
    /// CRC64 of the state blob.
    pub state_crc: u64,
    /// CRC64 of the metadata JSON.
    pub meta_crc: u64,
}

/// Why a header block was refused (the caller adds the file name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderFault {
    /// Fewer bytes than the header block.
    Short(u64),
    /// Not a node file.
    Magic,
    /// A version this build does not read.
    Version(u32),
    /// The header's own checksum failed.
    Checksum,
    /// Fields that contradict each other or exceed a cap.
    Malformed(String),
}

impl Header {
    /// Offsets and lengths for a node of `page_count` pages, `state_len`
    /// state bytes and `meta_len` metadata bytes; `None` on overflow.
    pub fn layout(page_count: u64, state_len: u64, meta_len: u64) -> Option<(u64, u64, u64, u64)> {
        let index_offset = HEADER_LEN.checked_add(page_count.checked_mul(PAGE_SIZE_U64)?)?;
        let state_offset = index_offset.checked_add(page_count.checked_mul(INDEX_ENTRY_LEN)?)?;
        let meta_offset = state_offset.checked_add(state_len)?;
        let file_len = meta_offset.checked_add(meta_len)?;
        Some((index_offset, state_offset, meta_offset, file_len))
    }

    /// Byte offset of the `slot`-th stored page's data.
    pub fn page_offset(slot: u64) -> Option<u64> {
        HEADER_LEN.checked_add(slot.checked_mul(PAGE_SIZE_U64)?)
    }

    /// The header's fields and their CRC ([`HEADER_CRC_END`] bytes); the
    /// MAC follows them.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_USED);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&4096u32.to_le_bytes()); // header_len
        b.extend_from_slice(&4096u32.to_le_bytes()); // page_size
        b.extend_from_slice(&[self.level.to_byte(), 0, 0, 0]);
        b.extend_from_slice(self.id.as_bytes());
        b.extend_from_slice(self.parent.map(|p| *p.as_bytes()).unwrap_or([0; 16]).as_slice());
        for v in [
            self.parent_check,
            self.guest_mem_bytes,
            self.page_count,
            self.index_offset,
            self.state_offset,
            self.state_len,
            self.meta_offset,
            self.meta_len,
            self.file_len,
            self.index_crc,
            self.state_crc,
            self.meta_crc,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        debug_assert_eq!(b.len(), HEADER_CRC_END - 8);
        let crc = crc64(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a header block (at least [`HEADER_USED`] bytes).
    pub fn decode(b: &[u8]) -> Result<Header, HeaderFault> {
        if b.len() < HEADER_USED {
            return Err(HeaderFault::Short(b.len() as u64));
        }
        if b[..8] != MAGIC {
            return Err(HeaderFault::Magic);
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        // The version is checked before the checksum so that a future
        // format (whose header may differ) is named as such, not as corrupt.
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(HeaderFault::Version(version));
        }
        if crc64(&b[..HEADER_CRC_END - 8]) != u64_at(HEADER_CRC_END - 8) {
            return Err(HeaderFault::Checksum);
        }
        let bad = |s: &str| Err(HeaderFault::Malformed(s.to_owned()));
        if u32_at(12) != 4096 || u32_at(16) != 4096 {
            return bad("header length or page size is not 4096");
        }
        let Some(level) = Level::from_byte(b[20]) else {
            return bad("unknown node level");
        };
        let id16 = |o: usize| {
            let mut w = [0u8; 16];
            w.copy_from_slice(&b[o..o + 16]);
            w
        };
        let id = NodeId::from_bytes(id16(24));
        let parent_raw = id16(40);
        let parent = (parent_raw != [0; 16]).then(|| NodeId::from_bytes(parent_raw));
        let mut fields = (56..HEADER_CRC_END - 8).step_by(8).map(u64_at);
        let mut next = || fields.next().unwrap_or(0);
        let h = Header {
            level,
            id,
            parent,
            parent_check: next(),
            guest_mem_bytes: next(),
            page_count: next(),
            index_offset: next(),
            state_offset: next(),
            state_len: next(),
            meta_offset: next(),
            meta_len: next(),
            file_len: next(),
            index_crc: next(),
            state_crc: next(),
            meta_crc: next(),
        };
        h.check()?;
        Ok(h)
    }

    /// Cross-checks fields: caps, levels and the section layout.
    fn check(&self) -> Result<(), HeaderFault> {
        let bad = |s: String| Err(HeaderFault::Malformed(s));
        if (self.level == Level::Base) != self.parent.is_none() {
            return bad(format!(
                "a {} node {} a parent",
                self.level,
                if self.parent.is_some() { "with" } else { "without" }
            ));
        }
        if self.guest_mem_bytes == 0
            || !self.guest_mem_bytes.is_multiple_of(PAGE_SIZE_U64)
            || self.guest_mem_bytes > GUEST_MEM_MAX_BYTES
        {
            return bad(format!(
                "guest memory size {} is not a page multiple in 4 KiB..64 GiB",
                self.guest_mem_bytes
            ));
        }
        if self.page_count > self.guest_mem_bytes / PAGE_SIZE_U64 {
            return bad(format!(
                "{} pages stored in a {}-byte guest",
                self.page_count, self.guest_mem_bytes
            ));
        }
        if self.state_len > STATE_MAX_BYTES {
            return bad(format!(
                "state blob of {} bytes exceeds the cap of {STATE_MAX_BYTES}",
                self.state_len
            ));
        }
        if self.meta_len > META_MAX_BYTES {
            return bad(format!(
                "metadata of {} bytes exceeds the cap of {META_MAX_BYTES}",
                self.meta_len
            ));
        }
        let expect = Header::layout(self.page_count, self.state_len, self.meta_len);
        if expect != Some((self.index_offset, self.state_offset, self.meta_offset, self.file_len)) {
            return bad("section offsets do not match the section lengths".to_owned());
        }
        Ok(())
    }
}

/// One page index entry: which guest page a stored page is, and its CRC64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Guest page index.
    pub page: u64,
    /// The keyed tag of the page's 4096 bytes ([`crate::StoreKey::page_tag`];
    /// the field keeps its old name).
    pub crc: u64,
}

/// Encodes index entries (16 bytes each, little-endian).
pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * 16);
    for e in entries {
        b.extend_from_slice(&e.page.to_le_bytes());
        b.extend_from_slice(&e.crc.to_le_bytes());
    }
    b
}

/// Decodes an index, checking that pages strictly ascend and lie below
/// `guest_pages`.
pub fn decode_index(b: &[u8], guest_pages: u64) -> Result<Vec<IndexEntry>, String> {
    if !b.len().is_multiple_of(16) {
        return Err("page index length is not a multiple of 16".to_owned());
    }
    let mut out = Vec::with_capacity(b.len() / 16);
    let mut prev: Option<u64> = None;
    for chunk in b.chunks_exact(16) {
        let mut w = [0u8; 8];
        w.copy_from_slice(&chunk[..8]);
        let page = u64::from_le_bytes(w);
        w.copy_from_slice(&chunk[8..]);
        let crc = u64::from_le_bytes(w);
        if page >= guest_pages {
            return Err(format!("page {page} lies beyond the guest's {guest_pages} pages"));
        }
        if prev.is_some_and(|p| p >= page) {
            return Err(format!("page index not strictly ascending at page {page}"));
        }
        prev = Some(page);
        out.push(IndexEntry { page, crc });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let (index_offset, state_offset, meta_offset, file_len) = Header::layout(3, 10, 20).unwrap();
        Header {
            level: Level::Function,
            id: NodeId::from_bytes([7; 16]),
            parent: Some(NodeId::from_bytes([9; 16])),
            parent_check: 42,
            guest_mem_bytes: 1 << 20,
            page_count: 3,
            index_offset,
            state_offset,
            state_len: 10,
            meta_offset,
            meta_len: 20,
            file_len,
            index_crc: 1,
            state_crc: 2,
            meta_crc: 3,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        let mut b = h.encode();
        assert_eq!(b.len(), HEADER_CRC_END);
        b.resize(HEADER_USED, 0);
        assert_eq!(Header::decode(&b), Ok(h));
        assert_eq!(sample().index_offset, 4096 + 3 * 4096);
    }

    #[test]
    fn every_flipped_header_bit_is_refused() {
        let mut b = sample().encode();
        b.resize(HEADER_USED, 0);
        for bit in 0..HEADER_CRC_END * 8 {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(Header::decode(&c).is_err(), "bit {bit} flip accepted");
        }
    }

    #[test]
    fn version_and_magic_are_named() {
        let mut b = sample().encode();
        b.resize(HEADER_USED, 0);
        b[8] = 1;
        assert_eq!(Header::decode(&b), Err(HeaderFault::Version(1)));
        b[0] = b'X';
        assert_eq!(Header::decode(&b), Err(HeaderFault::Magic));
        assert_eq!(Header::decode(&b[..10]), Err(HeaderFault::Short(10)));
    }

    #[test]
    fn inconsistent_fields_are_malformed() {
        let mut h = sample();
        h.file_len += 1;
        let enc = |h: &Header| {
            let mut b = h.encode();
            b.resize(HEADER_USED, 0);
            b
        };
        assert!(matches!(Header::decode(&enc(&h)), Err(HeaderFault::Malformed(_))));
        let mut h = sample();
        h.parent = None;
        assert!(matches!(Header::decode(&enc(&h)), Err(HeaderFault::Malformed(_))));
        let mut h = sample();
        h.guest_mem_bytes = 4097;
        assert!(matches!(Header::decode(&enc(&h)), Err(HeaderFault::Malformed(_))));
        assert_eq!(Header::layout(u64::MAX / 2, 0, 0), None);
    }

    #[test]
    fn index_round_trips_and_rejects_disorder() {
        let e = vec![IndexEntry { page: 1, crc: 5 }, IndexEntry { page: 4, crc: 6 }];
        assert_eq!(decode_index(&encode_index(&e), 5).unwrap(), e);
        assert!(decode_index(&encode_index(&e), 4).is_err());
        let rev: Vec<_> = e.iter().rev().copied().collect();
        assert!(decode_index(&encode_index(&rev), 5).is_err());
        assert!(decode_index(&[0; 15], 5).is_err());
    }

    #[test]
    fn crc_is_crc64_xz() {
        // The standard check value of CRC-64/XZ.
        assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
    }
}
