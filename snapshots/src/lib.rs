//! Snapshot store for the `vm` backend (SEUSS): a tree of guest-memory
//! snapshots on disk, each node storing only the pages that differ from its
//! parent, restored by mapping a merged image copy-on-write.
//!
//! ```text
//!   base (guest booted, runtime ready)            nodes/B.node  all non-zero pages
//!    +-- function  echo @digest1                  nodes/F.node  pages dirtied by load + init()
//!    |    +-- argument  input=h1                  nodes/A.node  pages dirtied up to checkpoint()
//!    |    +-- argument  input=h2
//!    +-- function  echo @digest2  (redeployed; the old node is left to gc)
//! ```
//!
//! # Using it from the VMM
//!
//! Creating a node from dirty pages (streamed straight out of guest memory,
//! no full copy):
//!
//! ```no_run
//! # fn demo(guest_memory: &[u8], dirty_bitmap: &[u64], vcpu_state: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
//! use snapshots::{Label, Level, NodeSpec, Store};
//! let store = Store::open_default()?;
//! let base = store.find_base(None, Some(64 << 20)).expect("a base");
//! let mut w = store.create_node(NodeSpec {
//!     level: Level::Function,
//!     parent: Some(base.id()),
//!     label: Label::function("echo", "sha256:..."),
//!     guest_mem_bytes: 64 << 20,
//! })?;
//! w.write_dirty(guest_memory, dirty_bitmap)?; // KVM_GET_DIRTY_LOG bitmap
//! let summary = [("rip".to_owned(), "0x401000".to_owned())].into();
//! let node = w.commit(vcpu_state, summary)?;
//! # let _ = node; Ok(()) }
//! ```
//!
//! Starting an instance from a node:
//!
//! ```no_run
//! # fn demo(store: &snapshots::Store, id: snapshots::NodeId) -> Result<(), Box<dyn std::error::Error>> {
//! let image = store.image(id)?; // built once, cached on disk, shared (Arc); marks `id` used
//! let memory = image.map(snapshots::MapOptions::default())?; // MAP_PRIVATE, 2 MiB aligned
//! let state = store.node(id)?.read_state()?; // the VMM's vCPU/device blob
//! // KVM_SET_USER_MEMORY_REGION { guest_phys_addr: 0,
//! //   userspace_addr: memory.host_addr() as u64, memory_size: memory.len() as u64 }
//! # let _ = (memory, state); Ok(()) }
//! ```
//!
//! The rest of the VMM's contract:
//!
//! - A child of a restored instance (a function node from a base, an
//!   argument node from a function node) takes the pages written since the
//!   restore: [`NodeWriter::write_dirty_from`] with KVM's dirty bitmap, or
//!   [`NodeWriter::write_written_from`], which asks the kernel which pages
//!   copy-on-write made private (it also sees the VMM's own writes). A base
//!   takes [`NodeWriter::write_nonzero`] of fresh guest memory.
//! - Lookups: [`Store::find_base`], [`Store::find_function`] (name +
//!   artifact digest: a changed artifact gets a new function node and the old
//!   one is left to [`gc`]), [`Store::find_argument`] (input hash).
//! - LRU: [`Store::touch`] when an argument node is used without calling
//!   [`Store::image`] again; [`Store::trim_arguments`] after creating one.
//! - Pre-made VM shells: [`MergedImage::map_at`] maps an image over an
//!   address range the VMM reserved (and pointed a memory slot at) earlier.
//! - Pooled instances: [`GuestMapping::reset`] drops an instance's private
//!   pages (back to the image) without remapping;
//!   [`GuestMapping::private_bytes_of`] measures private memory for `stats()`.
//! - Guest memory is one region from guest-physical 0; page `i` is
//!   guest-physical `i * 4096`.
//!
//! # Store layout
//!
//! ```text
//! STORE/key              the store key: 32 random bytes, mode 0600, owned by
//!                        the host's uid (a store whose key is group/other-
//!                        accessible or owned by another uid is refused)
//! STORE/nodes/ID.node    one node file per node, immutable once renamed in
//! STORE/images/ID.img    merged image cache of node ID (sparse, mode 0444)
//! STORE/images/ID.json   its metadata: the lineage it was built from, present
//!                        and non-zero page runs; written last (commit mark)
//! STORE/used/ID          empty file whose mtime is node ID's last use
//! STORE/tmp/NAME.PID.tmp files being written; those of dead PIDs are removed
//! ```
//!
//! `ID` is 128 random bits as 32 lowercase hex digits, drawn at creation.
//! Image caches may live elsewhere ([`StoreOptions::images_dir`], or the
//! `MICROFAAS_IMAGE_DIR` environment variable), e.g. on a tmpfs mounted
//! `huge=always` so mappings of them can use huge pages.
//!
//! # Authentication
//!
//! Checksums catch accidents; the keyed MAC catches forgery (see
//! [`StoreKey`]). Each node's header carries a keyed BLAKE3 MAC over its
//! header fields (id, parent id and check, level, sizes, section CRCs),
//! page index, state blob and metadata (label, creation time); each index
//! entry carries a 64-bit keyed tag of its page rather than a CRC. A node
//! failing its MAC is refused ([`NodeFileError::Unauthenticated`], naming
//! the file) wherever it is opened — the scan at open, lookups, `verify` —
//! so a planted node never reaches a lookup. A cached merged image is
//! checked page by page against its lineage's tags before this process
//! first maps it, and rebuilt if it fails. Refused files are recorded
//! ([`Store::take_refusals`]) for the caller to report. A node claiming
//! more memory than [`StoreOptions::max_guest_mem_bytes`] is refused before
//! its index is read.
//!
//! # Node file format (version 2)
//!
//! All integers little-endian. CRCs are CRC-64/XZ (ECMA-182 polynomial);
//! tags and the MAC are keyed BLAKE3 (keys derived from `STORE/key`).
//!
//! ```text
//! offset  size        field
//! 0       8           magic "MFAASNOD"
//! 8       4           format version (1)
//! 12      4           header length (4096)
//! 16      4           page size (4096)
//! 20      1           level: 1 base, 2 function, 3 argument; 3 zero bytes
//! 24      16          node id
//! 40      16          parent id (zero for a base)
//! 56      8           parent check: the parent's header CRC when this node was made
//! 64      8           guest memory bytes (page multiple, <= 64 GiB)
//! 72      8           page count N
//! 80      8           index offset  = 4096 + N * 4096
//! 88      8           state offset  = index offset + N * 16
//! 96      8           state length S (<= 1 MiB)
//! 104     8           meta offset   = state offset + S
//! 112     8           meta length M (<= 1 MiB)
//! 120     8           file length   = meta offset + M
//! 128     8           CRC of the page index
//! 136     8           CRC of the state blob
//! 144     8           CRC of the metadata
//! 152     8           CRC of bytes 0..152 (header CRC)
//! 160     32          MAC of bytes 0..160, the index, the state, the metadata
//! 192     3904        zero (checked: every byte of the file is covered)
//! 4096    N * 4096    page data, in index order (page aligned)
//! ...     N * 16      page index: (guest page index u64, keyed tag of the page u64),
//!                     strictly ascending, every page < guest pages
//! ...     S           vCPU/device state blob (opaque, the VMM's)
//! ...     M           metadata JSON: {"label": {"function", "digest",
//!                     "input_hash"}, "created_unix_ms", "state_summary": {..}}
//! ```
//!
//! The header is written last (over a zero block) and the file is renamed
//! into `nodes/` only after `fsync`, so a node file is either complete or
//! absent. Opening checks magic, version, header CRC, caps (including the
//! configured memory cap), the section layout, the exact file length
//! (truncation), the id against the file name, the index, state and
//! metadata CRCs and then the MAC; page tags are checked whenever pages are
//! read (building an image checks every page it takes; pages a newer node
//! overrides are checked by `verify`). A lineage is usable only if
//! each parent exists, has the level above, the same memory size, and the
//! header CRC the child recorded (a parent file swapped for another is
//! refused).
//!
//! # Restore
//!
//! [`Store::image`] merges a node's lineage (newest page wins) into
//! `images/ID.img` once, after checking every page it takes, and reuses it
//! while its recorded lineage and kernel boot match (images are caches and
//! are not fsynced; a reboot may have lost their unwritten pages, so an image
//! from another boot is rebuilt). [`MergedImage::map`] maps it
//! `MAP_PRIVATE` from a read-only descriptor: instances share every page
//! they do not write, and nothing they write reaches the file. One mapping
//! per instance (not one per delta run) keeps `vm.max_map_count` and
//! teardown cheap. Node files are never mapped.

mod delta;
mod error;
mod format;
mod gc;
mod id;
mod image;
mod inspect;
mod key;
mod mapping;
mod node;
mod pages;
mod store;
mod writer;

pub use delta::{ChainNode, Source, differing_pages, effective, providers, shared_pages};
pub use error::{
    CreateNodeError, GcError, ImageError, InspectError, LineageError, MapError, NodeFileError, OpenStoreError,
};
pub use format::{FORMAT_VERSION, IndexEntry, STATE_MAX_BYTES, crc64};
pub use gc::{GcOptions, GcReport, RemovedNode, gc};
pub use id::{Label, Level, NodeId, ParseNodeIdError};
pub use image::{ChainLink, IMAGE_FORMAT_VERSION, ImageMeta, MergedImage};
pub use inspect::{
    BadFile, DiffReport, GpaRange, NodeFiles, ShowReport, SiblingShare, TreeNode, TreeReport, VerifyReport, diff, show,
    tree, verify,
};
pub use key::{KEY_FILE, StoreKey};
pub use mapping::{
    GuestMapping, MAPPING_ALIGN, MapOptions, pagemap_entry_is_private, smaps_anonymous_by_start, smaps_anonymous_bytes,
};
pub use node::{Node, NodeMeta, StateSummary};
pub use pages::{
    PAGE_SIZE, PAGE_SIZE_U64, PageRange, dirty_runs, is_zero, nonzero_runs, ranges_from_sorted, total_pages, union,
};
pub use store::{IMAGE_DIR_ENV, Refusal, STORE_ENV, Store, StoreOptions, default_store_dir};
pub use writer::{NodeSpec, NodeWriter};
