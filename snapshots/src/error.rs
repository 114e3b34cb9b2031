//! The crate's error types, one per operation. Every error about a file
//! names the file; causes are `#[source]`s and are not repeated in the text.

use crate::id::NodeId;
use std::io;
use std::path::PathBuf;

/// A node file was refused: it is unreadable, truncated, corrupt, of another
/// format version, or not the node it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum NodeFileError {
    /// Reading failed.
    #[error("{}: cannot read snapshot node file", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Not a node file at all.
    #[error("{}: not a snapshot node file (bad magic)", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// Written by a format version this build does not read.
    #[error("{}: snapshot format version {found}; this build reads version {supported}", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// Shorter than its header says.
    #[error("{}: truncated: {actual} bytes, expected {expected}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header promises.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The header's own checksum failed.
    #[error("{}: header checksum mismatch", path.display())]
    HeaderChecksum {
        /// The file.
        path: PathBuf,
    },
    /// A section's checksum failed.
    #[error("{}: {section} checksum mismatch", path.display())]
    SectionChecksum {
        /// The file.
        path: PathBuf,
        /// `page index`, `state` or `metadata`.
        section: &'static str,
    },
    /// A stored page's checksum failed.
    #[error("{}: page {page} (guest-physical {gpa:#x}) checksum mismatch", path.display())]
    PageChecksum {
        /// The file.
        path: PathBuf,
        /// Guest page index.
        page: u64,
        /// Its guest-physical address.
        gpa: u64,
    },
    /// Checksums hold but the contents contradict themselves.
    #[error("{}: malformed: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file's keyed MAC does not hold: it was not written by a holder of
    /// this store's key as it is now (planted, altered with checksums
    /// recomputed, or from another store).
    #[error("{}: snapshot node is not authenticated by this store's key (planted or altered; refused)", path.display())]
    Unauthenticated {
        /// The file.
        path: PathBuf,
    },
    /// The node claims more memory than the configured guest has.
    #[error("{}: snapshot node refused: {reason}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What it claims.
        reason: String,
    },
    /// The file bears another node's id.
    #[error("{}: file is named for node {expected} but holds node {found}", path.display())]
    IdMismatch {
        /// The file.
        path: PathBuf,
        /// The id its name gives.
        expected: NodeId,
        /// The id inside.
        found: NodeId,
    },
}

impl NodeFileError {
    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            NodeFileError::Io { path, .. }
            | NodeFileError::BadMagic { path }
            | NodeFileError::UnsupportedVersion { path, .. }
            | NodeFileError::Truncated { path, .. }
            | NodeFileError::HeaderChecksum { path }
            | NodeFileError::SectionChecksum { path, .. }
            | NodeFileError::PageChecksum { path, .. }
            | NodeFileError::Malformed { path, .. }
            | NodeFileError::Unauthenticated { path }
            | NodeFileError::TooLarge { path, .. }
            | NodeFileError::IdMismatch { path, .. } => path,
        }
    }
}

/// Opening a store failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// The store's key file is unusable.
    #[error("{}: snapshot store key refused: {reason}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A store directory could not be made or read.
    #[error("{}: cannot open snapshot store directory", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A node or its chain of ancestors could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum LineageError {
    /// No node has this id.
    #[error("no snapshot node {0}")]
    UnknownNode(String),
    /// More than one node starts with this prefix.
    #[error("snapshot node prefix `{0}` is ambiguous")]
    AmbiguousPrefix(String),
    /// A node file in the chain is unusable.
    #[error("snapshot node {id} is unusable")]
    Node {
        /// The node.
        id: NodeId,
        /// The cause (names the file).
        #[source]
        source: NodeFileError,
    },
    /// A node's parent is gone.
    #[error("{}: parent node {parent} is missing", path.display())]
    ParentMissing {
        /// The child's file.
        path: PathBuf,
        /// The parent it names.
        parent: NodeId,
    },
    /// A node's parent exists but is not the node it was made from.
    #[error("{}: parent node {parent} does not match: {reason}", path.display())]
    ParentMismatch {
        /// The child's file.
        path: PathBuf,
        /// The parent it names.
        parent: NodeId,
        /// What differs.
        reason: String,
    },
}

/// Creating a node failed; nothing of it is visible in the store.
#[derive(Debug, thiserror::Error)]
pub enum CreateNodeError {
    /// Writing, syncing or renaming failed.
    #[error("{}: cannot write snapshot node", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The parent cannot be used.
    #[error("cannot create a snapshot node under this parent")]
    Parent(#[source] LineageError),
    /// The node's spec contradicts the tree's rules.
    #[error("invalid snapshot node: {0}")]
    Invalid(String),
    /// Pages must be written in strictly ascending order.
    #[error("page {page} written after page {previous}: pages must ascend")]
    PageOrder {
        /// The page written.
        page: u64,
        /// The previous page.
        previous: u64,
    },
    /// A page beyond guest memory.
    #[error("page {page} lies beyond the guest's {guest_pages} pages")]
    PageRange {
        /// The page written.
        page: u64,
        /// Pages in guest memory.
        guest_pages: u64,
    },
    /// A run whose length is not a page multiple.
    #[error("a run of {0} bytes is not a whole number of pages")]
    RunLength(usize),
    /// No random id could be drawn.
    #[error("cannot draw a node id: {0}")]
    Random(getrandom::Error),
}

/// Building or opening the merged image of a node failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The node's lineage is unusable.
    #[error("cannot resolve the lineage of the merged image")]
    Lineage(#[from] LineageError),
    /// A node's page data failed its checksum (the image is not built).
    #[error("a snapshot node's page data is corrupt; the merged image was not built")]
    Corrupt(#[source] NodeFileError),
    /// A cached merged image does not hold what its lineage records.
    #[error("{}: merged image refused: {pages} pages differ from what its lineage records (swapped or altered)", path.display())]
    Unauthenticated {
        /// The image file.
        path: PathBuf,
        /// Pages that differ.
        pages: usize,
    },
    /// Reading or writing the image failed.
    #[error("{}: cannot build or open the merged image", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Mapping a merged image failed.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// `mmap` failed.
    #[error("cannot map {bytes} bytes of the merged image {}", path.display())]
    Mmap {
        /// The image file.
        path: PathBuf,
        /// Bytes asked for.
        bytes: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image does not fit this host's address space.
    #[error("merged image of {0} bytes does not fit the address space")]
    TooLarge(u64),
}

/// An inspection (tree, show, diff, verify) failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A named node is unusable.
    #[error("cannot inspect the snapshot store")]
    Lineage(#[from] LineageError),
    /// Reading a file failed.
    #[error("{}: cannot read", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Page data is corrupt.
    #[error("cannot compare pages")]
    Node(#[from] NodeFileError),
}

/// Garbage collection failed part way; what was removed stays removed.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A named node is unknown.
    #[error("cannot collect garbage")]
    Lineage(#[from] LineageError),
    /// Removing a file failed.
    #[error("{}: cannot remove", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}
