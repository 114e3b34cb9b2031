//! Creating a node: [`NodeWriter`] streams pages into a temp file and
//! [`NodeWriter::commit`] makes it visible atomically (fsync, rename, fsync
//! the directory). A writer dropped or killed before commit leaves nothing
//! visible.

use crate::error::{CreateNodeError, LineageError};
use crate::format::{self, HEADER_LEN, Header, IndexEntry, crc64};
use crate::id::{Label, Level, NodeId};
use crate::mapping::GuestMapping;
use crate::node::{Node, NodeMeta, StateSummary};
use crate::pages::{self, PAGE_SIZE, PAGE_SIZE_U64, PageRange};
use crate::store::{NODES_DIR, Store, now_unix_ms, sync_dir};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

/// What a new node is.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Its level; a base has no parent, a function's parent is a base, an
    /// argument's parent a function node.
    pub level: Level,
    /// Its parent.
    pub parent: Option<NodeId>,
    /// What it is of (function nodes need a name and digest, argument nodes
    /// an input hash).
    pub label: Label,
    /// Guest memory size in bytes (must equal the parent's).
    pub guest_mem_bytes: u64,
}

/// Streams one node's pages to a temp file; see [`Store::create_node`].
#[derive(Debug)]
pub struct NodeWriter {
    store: Store,
    id: NodeId,
    spec: NodeSpec,
    parent_check: u64,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    index: Vec<IndexEntry>,
    committed: bool,
}

const WRITE_BUFFER_BYTES: usize = 1 << 20;

impl Store {
    /// Starts a node. Pages then go in through [`NodeWriter::write_page`],
    /// [`NodeWriter::write_run`] or [`NodeWriter::write_dirty`] (strictly
    /// ascending), and [`NodeWriter::commit`] adds the vCPU/device state and
    /// makes the node visible.
    ///
    /// A base stores every non-zero page of guest memory (its parent is the
    /// all-zero memory, see [`NodeWriter::write_nonzero`]); a child stores
    /// the pages dirtied since its parent was taken.
    pub fn create_node(&self, spec: NodeSpec) -> Result<NodeWriter, CreateNodeError> {
        let invalid = |s: String| Err(CreateNodeError::Invalid(s));
        if spec.guest_mem_bytes == 0
            || !spec.guest_mem_bytes.is_multiple_of(PAGE_SIZE_U64)
            || spec.guest_mem_bytes > format::GUEST_MEM_MAX_BYTES
        {
            return invalid(format!(
                "guest memory size {} is not a page multiple up to 64 GiB",
                spec.guest_mem_bytes
            ));
        }
        let parent_check = match (spec.level.parent_level(), spec.parent) {
            (None, None) => 0,
            (Some(want), Some(parent)) => {
                let chain = self.lineage(parent).map_err(CreateNodeError::Parent)?;
                let p = chain.last().unwrap_or_else(|| unreachable!());
                if p.level() != want {
                    return invalid(format!(
                        "{} node: its parent is at {} level, must be at {want} level",
                        spec.level,
                        p.level()
                    ));
                }
                if p.guest_mem_bytes() != spec.guest_mem_bytes {
                    return invalid(format!(
                        "guest memory size {} differs from the parent's {}",
                        spec.guest_mem_bytes,
                        p.guest_mem_bytes()
                    ));
                }
                p.header_crc()
            }
            (None, Some(_)) => return invalid("a base node has no parent".to_owned()),
            (Some(_), None) => return invalid(format!("{} node: it needs a parent", spec.level)),
        };
        match spec.level {
            Level::Function if spec.label.function.is_none() || spec.label.digest.is_none() => {
                return invalid("a function node's label needs a function name and a digest".to_owned());
            }
            Level::Argument if spec.label.input_hash.is_none() => {
                return invalid("an argument node's label needs an input hash".to_owned());
            }
            _ => {}
        }
        let id = NodeId::random().map_err(CreateNodeError::Random)?;
        let tmp_path = self.temp_path(&format!("{id}.node"));
        let io = |source| CreateNodeError::Io {
            path: tmp_path.clone(),
            source,
        };
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io)?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
        // The header block stays zero (an invalid header) until commit.
        out.write_all(&[0u8; 4096]).map_err(io)?;
        Ok(NodeWriter {
            store: self.clone(),
            id,
            spec,
            parent_check,
            tmp_path,
            out: Some(out),
            index: Vec::new(),
            committed: false,
        })
    }
}

impl NodeWriter {
    /// The id the node will have.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Pages written so far.
    pub fn pages_written(&self) -> u64 {
        self.index.len() as u64
    }

    fn io(&self, source: std::io::Error) -> CreateNodeError {
        CreateNodeError::Io {
            path: self.tmp_path.clone(),
            source,
        }
    }

    /// Writes a run of consecutive guest pages starting at `first_page`
    /// (`data.len()` a multiple of 4096), e.g. straight from guest memory.
    /// Pages must ascend across calls.
    pub fn write_run(&mut self, first_page: u64, data: &[u8]) -> Result<(), CreateNodeError> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(CreateNodeError::RunLength(data.len()));
        }
        let guest_pages = self.spec.guest_mem_bytes / PAGE_SIZE_U64;
        let count = (data.len() / PAGE_SIZE) as u64;
        if let Some(prev) = self.index.last()
            && first_page <= prev.page
        {
            return Err(CreateNodeError::PageOrder {
                page: first_page,
                previous: prev.page,
            });
        }
        match first_page.checked_add(count) {
            Some(end) if end <= guest_pages => {}
            _ => {
                return Err(CreateNodeError::PageRange {
                    page: first_page.saturating_add(count.saturating_sub(1)),
                    guest_pages,
                });
            }
        }
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            self.index.push(IndexEntry {
                page: first_page + i as u64,
                crc: self.store.inner.key.page_tag(page),
            });
        }
        let out = self
            .out
            .as_mut()
            .unwrap_or_else(|| unreachable!("writer used after commit"));
        out.write_all(data).map_err(|e| CreateNodeError::Io {
            path: self.tmp_path.clone(),
            source: e,
        })
    }

    /// Writes one guest page.
    pub fn write_page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), CreateNodeError> {
        self.write_run(page, data)
    }

    /// Writes the pages a KVM dirty bitmap marks (`KVM_GET_DIRTY_LOG`
    /// layout), reading them straight out of `memory` (guest memory from
    /// guest-physical 0), one run per write. Returns the pages written.
    pub fn write_dirty(&mut self, memory: &[u8], dirty_bitmap: &[u64]) -> Result<u64, CreateNodeError> {
        self.write_ranges(memory, &pages::dirty_runs(dirty_bitmap))
    }

    /// Like [`NodeWriter::write_dirty`], reading from a restored instance's
    /// [`GuestMapping`] (to snapshot a child of the node it was started
    /// from). Dirty pages pass through a small staging buffer, so no
    /// reference into guest memory is held; pause the vCPU first.
    pub fn write_dirty_from(&mut self, memory: &GuestMapping, dirty_bitmap: &[u64]) -> Result<u64, CreateNodeError> {
        const STAGE_PAGES: u64 = 256;
        let guest_pages = (memory.len() / PAGE_SIZE) as u64;
        let mut stage = vec![0u8; PAGE_SIZE * 256];
        let mut written = 0;
        for run in pages::dirty_runs(dirty_bitmap) {
            let mut page = run.start;
            while page < run.end {
                let n = (run.end - page).min(STAGE_PAGES);
                let buf = &mut stage[..usize::try_from(n).unwrap_or(0) * PAGE_SIZE];
                if !memory.read_at(page.saturating_mul(PAGE_SIZE_U64), buf) {
                    return Err(CreateNodeError::PageRange {
                        page: page + n - 1,
                        guest_pages,
                    });
                }
                self.write_run(page, buf)?;
                page += n;
                written += n;
            }
        }
        Ok(written)
    }

    /// Writes the pages a restored instance wrote since its mapping was
    /// made ([`GuestMapping::written_pages`]): a child of the node it was
    /// started from, without KVM's dirty log. Pause the vCPU first.
    pub fn write_written_from(&mut self, memory: &GuestMapping) -> Result<u64, CreateNodeError> {
        let ranges = memory.written_pages().map_err(|source| CreateNodeError::Io {
            path: "/proc/self/pagemap".into(),
            source,
        })?;
        let mut bitmap = vec![0u64; (memory.len() / PAGE_SIZE).div_ceil(64)];
        for r in &ranges {
            for p in r.start..r.end {
                let (word, bit) = (usize::try_from(p / 64).unwrap_or(usize::MAX), p % 64);
                if let Some(w) = bitmap.get_mut(word) {
                    *w |= 1 << bit;
                }
            }
        }
        self.write_dirty_from(memory, &bitmap)
    }

    /// Writes every non-zero page of `memory` (for a base node). Returns the
    /// pages written.
    pub fn write_nonzero(&mut self, memory: &[u8]) -> Result<u64, CreateNodeError> {
        self.write_ranges(memory, &pages::nonzero_runs(memory))
    }

    /// Writes the given runs of pages out of `memory`.
    pub fn write_ranges(&mut self, memory: &[u8], ranges: &[PageRange]) -> Result<u64, CreateNodeError> {
        let mut written = 0;
        for r in ranges {
            let bytes = |p: u64| usize::try_from(p.checked_mul(PAGE_SIZE_U64)?).ok();
            let slice = bytes(r.start)
                .zip(bytes(r.end))
                .and_then(|(s, e)| memory.get(s..e))
                .ok_or(CreateNodeError::PageRange {
                    page: r.end.saturating_sub(1),
                    guest_pages: (memory.len() / PAGE_SIZE) as u64,
                })?;
            self.write_run(r.start, slice)?;
            written += r.pages();
        }
        Ok(written)
    }

    /// Adds the opaque vCPU/device `state` blob and its `summary`, then
    /// makes the node visible atomically and durably: sections are appended,
    /// the header written last, the file fsynced, renamed into `nodes/`,
    /// and the directory fsynced.
    pub fn commit(mut self, state: &[u8], summary: StateSummary) -> Result<Arc<Node>, CreateNodeError> {
        let state_len = state.len() as u64;
        if state_len > format::STATE_MAX_BYTES {
            return Err(CreateNodeError::Invalid(format!(
                "state blob of {state_len} bytes exceeds the cap of {}",
                format::STATE_MAX_BYTES
            )));
        }
        let meta = NodeMeta {
            label: self.spec.label.clone(),
            created_unix_ms: now_unix_ms(),
            state_summary: summary,
        };
        let meta_bytes = serde_json::to_vec(&meta).map_err(|e| CreateNodeError::Invalid(format!("metadata: {e}")))?;
        let meta_len = meta_bytes.len() as u64;
        if meta_len > format::META_MAX_BYTES {
            return Err(CreateNodeError::Invalid(format!(
                "metadata of {meta_len} bytes exceeds the cap"
            )));
        }
        let index_bytes = format::encode_index(&self.index);
        let page_count = self.index.len() as u64;
        let (index_offset, state_offset, meta_offset, file_len) = Header::layout(page_count, state_len, meta_len)
            .ok_or_else(|| CreateNodeError::Invalid("node too large".to_owned()))?;
        let header = Header {
            level: self.spec.level,
            id: self.id,
            parent: self.spec.parent,
            parent_check: self.parent_check,
            guest_mem_bytes: self.spec.guest_mem_bytes,
            page_count,
            index_offset,
            state_offset,
            state_len,
            meta_offset,
            meta_len,
            file_len,
            index_crc: crc64(&index_bytes),
            state_crc: crc64(state),
            meta_crc: crc64(&meta_bytes),
        };
        let mut header_bytes = header.encode();
        let mac = crate::node::node_mac(&self.store.inner.key, &header_bytes, &index_bytes, state, &meta_bytes);
        header_bytes.extend_from_slice(mac.as_bytes());
        let mut out = self
            .out
            .take()
            .unwrap_or_else(|| unreachable!("writer committed twice"));
        let file = (|| {
            out.write_all(&index_bytes)?;
            out.write_all(state)?;
            out.write_all(&meta_bytes)?;
            let file = out.into_inner().map_err(std::io::IntoInnerError::into_error)?;
            file.write_all_at(&header_bytes, 0)?;
            file.sync_all()?;
            Ok(file)
        })()
        .map_err(|e| self.io(e))?;
        debug_assert_eq!(file.metadata().map(|m| m.len()).ok(), Some(file_len));
        drop(file);
        let nodes_dir = self.store.root().join(NODES_DIR);
        let final_path = self.store.node_path(self.id);
        // Under the shared store lock, the parent cannot be removed between
        // this check and the rename.
        let _lock = self.store.lock(false).map_err(|e| self.io(e))?;
        if let Some(parent) = self.spec.parent
            && !self.store.node_path(parent).exists()
        {
            return Err(CreateNodeError::Parent(LineageError::ParentMissing {
                path: final_path,
                parent,
            }));
        }
        std::fs::rename(&self.tmp_path, &final_path).map_err(|e| self.io(e))?;
        self.committed = true;
        sync_dir(&nodes_dir).map_err(|source| CreateNodeError::Io {
            path: nodes_dir.clone(),
            source,
        })?;
        let mut crc = [0u8; 8];
        crc.copy_from_slice(&header_bytes[format::HEADER_CRC_END - 8..format::HEADER_CRC_END]);
        let node = Arc::new(Node {
            header,
            header_crc: u64::from_le_bytes(crc),
            meta,
            index: std::mem::take(&mut self.index),
            state: state.to_vec(),
            key: Arc::clone(&self.store.inner.key),
            path: final_path,
        });
        debug_assert_eq!(HEADER_LEN, 4096);
        self.store.insert(Arc::clone(&node));
        Ok(node)
    }
}

impl Drop for NodeWriter {
    fn drop(&mut self) {
        if !self.committed {
            // Never committed: the temp file is garbage.
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}
