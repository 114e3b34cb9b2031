//! Lineage inspection: `tree`, `show`, `diff` and `verify`, each a function
//! returning serde-serialisable data (the CLI prints it as text or JSON).

use crate::delta::{self, ChainNode, Source};
use crate::error::{InspectError, LineageError, NodeFileError};
use crate::id::{Label, Level, NodeId};
use crate::image::{ImageMeta, MergedImage, verify_image};
use crate::node::{Node, StateSummary};
use crate::pages::{self, PAGE_SIZE, PAGE_SIZE_U64, PageRange};
use crate::store::Store;
use serde::Serialize;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

/// A file the store refused, and why.
#[derive(Clone, Debug, Serialize)]
pub struct BadFile {
    /// The file.
    pub path: PathBuf,
    /// The node it is (or claims to be), if known.
    pub node: Option<NodeId>,
    /// The error, with its causes.
    pub error: String,
}

/// `err` and its causes, joined by `: `.
pub(crate) fn chain_text(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

fn bad_node_file(e: &NodeFileError) -> BadFile {
    let node = e
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".node"))
        .and_then(|n| n.parse().ok());
    BadFile {
        path: e.path().to_owned(),
        node,
        error: chain_text(e),
    }
}

/// One node in [`tree`].
#[derive(Clone, Debug, Serialize)]
pub struct TreeNode {
    /// Its id.
    pub id: NodeId,
    /// Its level.
    pub level: Level,
    /// Its label.
    pub label: Label,
    /// Pages it stores itself.
    pub own_pages: u64,
    /// Size of its node file.
    pub bytes_on_disk: u64,
    /// Disk space of its merged-image cache, if built (sparse: non-zero pages).
    pub image_bytes_on_disk: Option<u64>,
    /// Creation time, ms since the epoch.
    pub created_unix_ms: u64,
    /// Last use, ms since the epoch.
    pub last_used_unix_ms: u64,
    /// Why it cannot be used, if it cannot (e.g. its parent is missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Its children, oldest first.
    pub children: Vec<TreeNode>,
}

/// The whole store as a forest.
#[derive(Clone, Debug, Serialize)]
pub struct TreeReport {
    /// The store directory.
    pub store: PathBuf,
    /// Base nodes (and nodes whose parent is missing), oldest first.
    pub roots: Vec<TreeNode>,
    /// Node files that were refused.
    pub broken: Vec<BadFile>,
}

fn image_disk_bytes(store: &Store, id: NodeId) -> Option<u64> {
    std::fs::metadata(store.image_meta_path(id)).ok()?;
    std::fs::metadata(store.image_path(id))
        .ok()
        .map(|m| m.blocks().saturating_mul(512))
}

/// The lineage tree of every node.
pub fn tree(store: &Store) -> Result<TreeReport, InspectError> {
    let broken = store.scan().map_err(|e| match e {
        crate::error::OpenStoreError::Io { path, source } => InspectError::Io { path, source },
        crate::error::OpenStoreError::Key { path, reason } => InspectError::Io {
            path,
            source: std::io::Error::other(reason),
        },
    })?;
    let nodes = store.nodes();
    let mut children: BTreeMap<Option<NodeId>, Vec<Arc<Node>>> = BTreeMap::new();
    for n in &nodes {
        // A node whose parent is gone is shown as a root, with its problem.
        let parent = n.parent().filter(|p| nodes.iter().any(|m| m.id() == *p));
        children.entry(parent).or_default().push(Arc::clone(n));
    }
    for list in children.values_mut() {
        list.sort_by_key(|n| (n.created_unix_ms(), n.id()));
    }
    fn build(store: &Store, n: &Arc<Node>, children: &BTreeMap<Option<NodeId>, Vec<Arc<Node>>>) -> TreeNode {
        TreeNode {
            id: n.id(),
            level: n.level(),
            label: n.label().clone(),
            own_pages: n.own_page_count(),
            bytes_on_disk: n.file_len(),
            image_bytes_on_disk: image_disk_bytes(store, n.id()),
            created_unix_ms: n.created_unix_ms(),
            last_used_unix_ms: store.last_used_unix_ms(n),
            problem: store.lineage(n.id()).err().map(|e| chain_text(&e)),
            children: children
                .get(&Some(n.id()))
                .map(|kids| kids.iter().map(|k| build(store, k, children)).collect())
                .unwrap_or_default(),
        }
    }
    let roots = children
        .get(&None)
        .map(|r| r.iter().map(|n| build(store, n, &children)).collect())
        .unwrap_or_default();
    Ok(TreeReport {
        store: store.root().to_owned(),
        roots,
        broken: broken.iter().map(bad_node_file).collect(),
    })
}

fn effective_of(chain: &[Arc<Node>]) -> Vec<(u64, Source)> {
    let nodes: Vec<ChainNode<'_>> = chain
        .iter()
        .map(|n| ChainNode {
            id: n.id(),
            index: n.index(),
        })
        .collect();
    delta::effective(&nodes)
}

/// How much a node shares with one sibling.
#[derive(Clone, Debug, Serialize)]
pub struct SiblingShare {
    /// The sibling.
    pub id: NodeId,
    /// Its label.
    pub label: Label,
    /// Pages both take from the same stored page of a common ancestor.
    pub shared_pages: u64,
    /// Pages both store themselves with identical content (could be shared).
    pub identical_own_pages: u64,
}

/// Files behind a node.
#[derive(Clone, Debug, Serialize)]
pub struct NodeFiles {
    /// Its node file.
    pub node: PathBuf,
    /// The node files of its lineage, base first.
    pub lineage: Vec<PathBuf>,
    /// Its merged-image cache, if built and current.
    pub image: Option<PathBuf>,
    /// The cache's metadata file, if built and current.
    pub image_meta: Option<PathBuf>,
}

/// One node in detail: [`show`].
#[derive(Clone, Debug, Serialize)]
pub struct ShowReport {
    /// Its id.
    pub id: NodeId,
    /// Its level.
    pub level: Level,
    /// Its label.
    pub label: Label,
    /// Its parent.
    pub parent: Option<NodeId>,
    /// Its lineage, base first (ends with itself).
    pub lineage: Vec<NodeId>,
    /// Its children.
    pub children: Vec<NodeId>,
    /// Guest memory size.
    pub guest_mem_bytes: u64,
    /// Pages it stores itself.
    pub own_pages: u64,
    /// Pages of its image that come from ancestors.
    pub inherited_pages: u64,
    /// Pages of its image that some node stores (the rest are zero).
    pub present_pages: u64,
    /// Its own pages, as guest-physical runs.
    pub own_ranges: Vec<PageRange>,
    /// Size of its node file.
    pub bytes_on_disk: u64,
    /// Size of the node files of its whole lineage.
    pub lineage_bytes_on_disk: u64,
    /// What it shares with each sibling.
    pub siblings: Vec<SiblingShare>,
    /// Size of its opaque vCPU/device state blob.
    pub state_bytes: u64,
    /// The VMM's summary of that state.
    pub state_summary: StateSummary,
    /// Creation time, ms since the epoch.
    pub created_unix_ms: u64,
    /// Last use, ms since the epoch.
    pub last_used_unix_ms: u64,
    /// Its merged image's metadata, if built and current.
    pub image: Option<ImageMeta>,
    /// Its files.
    pub files: NodeFiles,
}

/// Details of one node.
pub fn show(store: &Store, id: NodeId) -> Result<ShowReport, InspectError> {
    let chain = store.lineage(id)?;
    let node = Arc::clone(chain.last().unwrap_or_else(|| unreachable!()));
    let eff = effective_of(&chain);
    let mut siblings = Vec::new();
    if let Some(parent) = node.parent() {
        for sib in store.children(parent).into_iter().filter(|s| s.id() != id) {
            let Ok(sib_chain) = store.lineage(sib.id()) else {
                continue;
            };
            let sib_eff = effective_of(&sib_chain);
            let sib_own: BTreeMap<u64, u64> = sib.index().iter().map(|e| (e.page, e.crc)).collect();
            let identical = node
                .index()
                .iter()
                .filter(|e| sib_own.get(&e.page) == Some(&e.crc))
                .count() as u64;
            siblings.push(SiblingShare {
                id: sib.id(),
                label: sib.label().clone(),
                shared_pages: delta::shared_pages(&eff, &sib_eff),
                identical_own_pages: identical,
            });
        }
    }
    let image = store.image_meta(id);
    let present = eff.len() as u64;
    Ok(ShowReport {
        id,
        level: node.level(),
        label: node.label().clone(),
        parent: node.parent(),
        lineage: chain.iter().map(|n| n.id()).collect(),
        children: store.children(id).iter().map(|n| n.id()).collect(),
        guest_mem_bytes: node.guest_mem_bytes(),
        own_pages: node.own_page_count(),
        inherited_pages: present - node.own_page_count(),
        present_pages: present,
        own_ranges: node.own_ranges(),
        bytes_on_disk: node.file_len(),
        lineage_bytes_on_disk: chain.iter().map(|n| n.file_len()).sum(),
        siblings,
        state_bytes: node.state_len(),
        state_summary: node.state_summary().clone(),
        created_unix_ms: node.created_unix_ms(),
        last_used_unix_ms: store.last_used_unix_ms(&node),
        files: NodeFiles {
            node: node.path().to_owned(),
            lineage: chain.iter().map(|n| n.path().to_owned()).collect(),
            image: image.as_ref().map(|_| store.image_path(id)),
            image_meta: image.as_ref().map(|_| store.image_meta_path(id)),
        },
        image,
    })
}

/// A run of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GpaRange {
    /// First byte.
    pub start_gpa: u64,
    /// One past the last byte.
    pub end_gpa: u64,
    /// Pages in the run.
    pub pages: u64,
}

impl From<PageRange> for GpaRange {
    fn from(r: PageRange) -> Self {
        GpaRange {
            start_gpa: r.start_gpa(),
            end_gpa: r.end_gpa(),
            pages: r.pages(),
        }
    }
}

/// How two nodes' memory differs: [`diff`].
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    /// The first node.
    pub a: NodeId,
    /// The second node.
    pub b: NodeId,
    /// Their nearest common ancestor, if any.
    pub common_ancestor: Option<NodeId>,
    /// Pages whose content differs.
    pub differing_pages: u64,
    /// Those pages as guest-physical runs.
    pub ranges: Vec<GpaRange>,
}

/// The pages in which the memory of `a` and `b` differs. Pages both take
/// from the same stored page are equal without reading; pages with
/// different checksums differ; the rest are compared byte by byte.
pub fn diff(store: &Store, a: NodeId, b: NodeId) -> Result<DiffReport, InspectError> {
    let ca = store.lineage(a)?;
    let cb = store.lineage(b)?;
    let (ea, eb) = (effective_of(&ca), effective_of(&cb));
    let zero_crc = store.page_tag(&[0u8; PAGE_SIZE]);
    let by_id: BTreeMap<NodeId, Arc<Node>> = ca.iter().chain(&cb).map(|n| (n.id(), Arc::clone(n))).collect();
    let read = |src: &Source, page: u64| -> Result<Vec<u8>, InspectError> {
        let node = by_id
            .get(&src.node)
            .ok_or_else(|| LineageError::UnknownNode(src.node.to_string()))?;
        Ok(node.read_page(page)?.unwrap_or_else(|| vec![0; PAGE_SIZE]))
    };
    let pages = delta::differing_pages(&ea, &eb, |page, x, y| match (x, y) {
        (Some(x), Some(y)) if x.crc != y.crc => Ok::<bool, InspectError>(false),
        (Some(x), Some(y)) => Ok(read(x, page)? == read(y, page)?),
        (Some(s), None) | (None, Some(s)) if s.crc != zero_crc => Ok(false),
        (Some(s), None) | (None, Some(s)) => Ok(pages::is_zero(&read(s, page)?)),
        (None, None) => Ok(true),
    })?;
    let common_ancestor = ca
        .iter()
        .zip(&cb)
        .take_while(|(x, y)| x.id() == y.id())
        .last()
        .map(|(x, _)| x.id());
    let ranges = pages::ranges_from_sorted(pages.iter().copied());
    Ok(DiffReport {
        a,
        b,
        common_ancestor,
        differing_pages: pages.len() as u64,
        ranges: ranges.into_iter().map(GpaRange::from).collect(),
    })
}

/// What [`verify`] found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Node files checked (every section and page).
    pub nodes_checked: u64,
    /// Merged images checked against their lineage.
    pub images_checked: u64,
    /// Image caches that are out of date (rebuilt on next use; not errors).
    pub stale_images: Vec<PathBuf>,
    /// Every bad file, one entry per fault.
    pub bad: Vec<BadFile>,
}

impl VerifyReport {
    /// Whether everything checked out.
    pub fn ok(&self) -> bool {
        self.bad.is_empty()
    }
}

/// Checks every checksum in the store: every node file's header, index,
/// metadata, state and pages, every lineage link, and every current
/// merged image page by page.
pub fn verify(store: &Store) -> Result<VerifyReport, InspectError> {
    let broken = store.scan().map_err(|e| match e {
        crate::error::OpenStoreError::Io { path, source } => InspectError::Io { path, source },
        crate::error::OpenStoreError::Key { path, reason } => InspectError::Io {
            path,
            source: std::io::Error::other(reason),
        },
    })?;
    let mut bad: Vec<BadFile> = broken.iter().map(bad_node_file).collect();
    let nodes = store.nodes();
    let mut images_checked = 0;
    let mut stale_images = Vec::new();
    for n in &nodes {
        bad.extend(n.verify_all().iter().map(bad_node_file));
        match store.lineage(n.id()) {
            Err(e) => bad.push(BadFile {
                path: n.path().to_owned(),
                node: Some(n.id()),
                error: chain_text(&e),
            }),
            Ok(chain) => {
                let img_path = store.image_path(n.id());
                if !img_path.exists() {
                    continue;
                }
                let Some(meta) = store.image_meta(n.id()) else {
                    stale_images.push(img_path);
                    continue;
                };
                let file = std::fs::File::open(&img_path).map_err(|source| InspectError::Io {
                    path: img_path.clone(),
                    source,
                })?;
                let img = MergedImage {
                    path: img_path.clone(),
                    file,
                    meta,
                    built_now: false,
                };
                images_checked += 1;
                match verify_image(&img, &chain).map(|c| c.bad) {
                    Ok(pages) if pages.is_empty() => {}
                    Ok(pages) => bad.push(BadFile {
                        path: img_path,
                        node: Some(n.id()),
                        error: format!(
                            "merged image differs from its lineage in {} pages, first at guest-physical {:#x}",
                            pages.len(),
                            pages[0] * PAGE_SIZE_U64
                        ),
                    }),
                    Err(e) => bad.push(bad_node_file(&e)),
                }
            }
        }
    }
    // Image caches with no node are stale too.
    let dir = store.images_dir().to_owned();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let known = name
                .strip_suffix(".img")
                .and_then(|s| s.parse::<NodeId>().ok())
                .map(|id| nodes.iter().any(|n| n.id() == id));
            if known == Some(false) {
                stale_images.push(e.path());
            }
        }
    }
    Ok(VerifyReport {
        nodes_checked: nodes.len() as u64,
        images_checked,
        stale_images,
        bad,
    })
}
