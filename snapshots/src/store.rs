//! The store directory: opening it (cleaning dead writers' temp files),
//! the in-memory node index, lookups, lineage resolution with parent checks,
//! and last-used times.

use crate::error::{LineageError, NodeFileError, OpenStoreError};
use crate::id::{Level, NodeId};
use crate::image::MergedImage;
use crate::key::StoreKey;
use crate::node::{self, Node};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Environment variable naming the store directory.
pub const STORE_ENV: &str = "MICROFAAS_STORE";
/// Environment variable naming a directory for merged-image caches (e.g. a
/// tmpfs mounted `huge=always`); each store gets its own sub-directory.
pub const IMAGE_DIR_ENV: &str = "MICROFAAS_IMAGE_DIR";

/// Where a store keeps what is not its lineage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// Directory for merged-image caches instead of `STORE/images`. Images
    /// are caches rebuilt from the lineage, so a volatile file system is
    /// fine; on a tmpfs mounted `huge=always` (with
    /// [`MapOptions::huge_page_advice`](crate::MapOptions)) mappings get huge
    /// pages. The store uses a sub-directory named for its root.
    pub images_dir: Option<PathBuf>,
    /// The largest guest memory a node may claim (the configured guest's);
    /// `None` is the format's cap of 64 GiB. A node claiming more is
    /// refused when opened, before its index is read or anything the
    /// header sizes is allocated or mapped.
    pub max_guest_mem_bytes: Option<u64>,
}

impl StoreOptions {
    /// Options from the environment ([`IMAGE_DIR_ENV`]).
    pub fn from_env() -> Self {
        StoreOptions {
            images_dir: std::env::var_os(IMAGE_DIR_ENV)
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
            max_guest_mem_bytes: None,
        }
    }
}

/// The default store: `$MICROFAAS_STORE`, else `$XDG_CACHE_HOME/microfaas/snapshots`,
/// else `~/.cache/microfaas/snapshots`.
pub fn default_store_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(STORE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("microfaas").join("snapshots")
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    to_unix_ms(SystemTime::now())
}

fn to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An on-disk snapshot store. Cheap to clone (shared state); `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) root: PathBuf,
    pub(crate) images_dir: PathBuf,
    /// Serialises image builds in this process (builds are rare and large).
    pub(crate) build_lock: Mutex<()>,
    temp_seq: AtomicU64,
    nodes: RwLock<BTreeMap<NodeId, Arc<Node>>>,
    pub(crate) images: Mutex<HashMap<NodeId, Arc<MergedImage>>>,
    touched: Mutex<HashMap<NodeId, Instant>>,
    /// The store key (see [`crate::key`]).
    pub(crate) key: Arc<StoreKey>,
    /// Nodes claiming more guest memory are refused.
    pub(crate) max_guest_mem_bytes: u64,
    /// Files refused since the last [`Store::take_refusals`].
    refusals: Mutex<Vec<Refusal>>,
}

/// A file the store refused to use (a node file at a scan or lookup, or a
/// merged image cache that failed its content check), with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The file.
    pub path: PathBuf,
    /// Why (the error's message, which names the file).
    pub reason: String,
}

/// Sub-directories of a store.
pub(crate) const NODES_DIR: &str = "nodes";
pub(crate) const IMAGES_DIR: &str = "images";
pub(crate) const TMP_DIR: &str = "tmp";
pub(crate) const USED_DIR: &str = "used";
pub(crate) const LOCK_FILE: &str = "lock";

/// Touch a node's last-used time at most this often.
const TOUCH_INTERVAL: Duration = Duration::from_secs(1);

/// Fsyncs a directory so that renames and unlinks in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The pid a temp file name carries (`NAME.PID.tmp`).
fn temp_owner(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".tmp")?;
    stem.rsplit('.').next()?.parse().ok()
}

impl Store {
    /// Opens (creating if needed) the store at `root` with
    /// [`StoreOptions::from_env`], removes temp files left by writers that
    /// died, and indexes every valid node. Invalid node files are skipped
    /// here and reported by [`Store::scan`] and `verify`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, OpenStoreError> {
        Store::open_with(root, StoreOptions::from_env())
    }

    /// [`Store::open`] with explicit options.
    pub fn open_with(root: impl Into<PathBuf>, opts: StoreOptions) -> Result<Store, OpenStoreError> {
        let root = root.into();
        for sub in [NODES_DIR, TMP_DIR, USED_DIR] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|source| OpenStoreError::Io { path: dir, source })?;
        }
        let key = Arc::new(StoreKey::load_or_create(&root)?);
        let images_dir = match opts.images_dir {
            None => root.join(IMAGES_DIR),
            Some(dir) => {
                // One sub-directory per store, so stores never see (or
                // collect) each other's images.
                let canonical = fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
                let tag = crate::format::crc64(canonical.as_os_str().as_encoded_bytes());
                dir.join(format!("store-{tag:016x}"))
            }
        };
        fs::create_dir_all(&images_dir).map_err(|source| OpenStoreError::Io {
            path: images_dir.clone(),
            source,
        })?;
        let store = Store {
            inner: Arc::new(Inner {
                root,
                images_dir,
                build_lock: Mutex::new(()),
                temp_seq: AtomicU64::new(0),
                nodes: RwLock::new(BTreeMap::new()),
                images: Mutex::new(HashMap::new()),
                touched: Mutex::new(HashMap::new()),
                key,
                max_guest_mem_bytes: opts
                    .max_guest_mem_bytes
                    .unwrap_or(crate::format::GUEST_MEM_MAX_BYTES)
                    .min(crate::format::GUEST_MEM_MAX_BYTES),
                refusals: Mutex::new(Vec::new()),
            }),
        };
        store.clean_temp()?;
        store.scan()?;
        Ok(store)
    }

    /// Opens the store at [`default_store_dir`].
    pub fn open_default() -> Result<Store, OpenStoreError> {
        Store::open(default_store_dir())
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The file of node `id`.
    pub fn node_path(&self, id: NodeId) -> PathBuf {
        self.inner.root.join(NODES_DIR).join(format!("{id}.node"))
    }

    /// The merged-image cache file of node `id`.
    pub fn image_path(&self, id: NodeId) -> PathBuf {
        self.inner.images_dir.join(format!("{id}.img"))
    }

    /// The merged-image cache's metadata file of node `id`.
    pub fn image_meta_path(&self, id: NodeId) -> PathBuf {
        self.inner.images_dir.join(format!("{id}.json"))
    }

    pub(crate) fn used_path(&self, id: NodeId) -> PathBuf {
        self.inner.root.join(USED_DIR).join(id.to_string())
    }

    /// Takes the store's advisory lock (`STORE/lock`): shared while a node
    /// is committed, exclusive while nodes are removed, so no node is
    /// committed under a parent being removed. Released when the file drops.
    pub(crate) fn lock(&self, exclusive: bool) -> std::io::Result<File> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.inner.root.join(LOCK_FILE))?;
        // Waits again when a signal interrupts the wait (another process
        // holds the lock and the caller has a timer or handler running).
        loop {
            let taken = if exclusive { f.lock() } else { f.lock_shared() };
            match taken {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        }
        Ok(f)
    }

    /// The directory of merged-image caches.
    pub fn images_dir(&self) -> &Path {
        &self.inner.images_dir
    }

    /// A fresh temp file path in `dir` for this process: `NAME.SEQ.PID.tmp`.
    pub(crate) fn temp_in(&self, dir: &Path, name: &str) -> PathBuf {
        let seq = self.inner.temp_seq.fetch_add(1, Ordering::Relaxed);
        dir.join(format!("{name}.{seq}.{}.tmp", std::process::id()))
    }

    /// A fresh temp file path in `tmp/`.
    pub(crate) fn temp_path(&self, name: &str) -> PathBuf {
        self.temp_in(&self.inner.root.join(TMP_DIR), name)
    }

    /// Removes temp files of dead processes (from `tmp/` and the images
    /// directory).
    fn clean_temp(&self) -> Result<(), OpenStoreError> {
        for dir in [self.inner.root.join(TMP_DIR), self.inner.images_dir.clone()] {
            let entries = fs::read_dir(&dir).map_err(|source| OpenStoreError::Io {
                path: dir.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if dir == self.inner.images_dir && !name.ends_with(".tmp") {
                    continue;
                }
                let alive = temp_owner(&name).is_some_and(|pid| Path::new("/proc").join(pid.to_string()).exists());
                if !alive {
                    // A writer that died; its file never became a node or image.
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// Re-reads every node file from disk (nodes made by other processes
    /// appear, removed ones go, files changed underneath are re-checked).
    /// Returns the node files that were refused.
    pub fn scan(&self) -> Result<Vec<NodeFileError>, OpenStoreError> {
        let dir = self.inner.root.join(NODES_DIR);
        let entries = fs::read_dir(&dir).map_err(|source| OpenStoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut nodes = BTreeMap::new();
        let mut broken = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".node").and_then(|s| s.parse::<NodeId>().ok()) else {
                continue;
            };
            let path = entry.path();
            match node::load(&path, Some(id), &self.inner.key, self.inner.max_guest_mem_bytes) {
                Ok(n) => {
                    nodes.insert(id, Arc::new(n));
                }
                Err(e) => {
                    self.refuse(e.path(), &e);
                    broken.push(e);
                }
            }
        }
        *self.inner.nodes.write().unwrap_or_else(PoisonError::into_inner) = nodes;
        Ok(broken)
    }

    /// Records a refused file (at most once per path until taken).
    pub(crate) fn refuse(&self, path: &Path, why: &dyn std::error::Error) {
        let reason = crate::inspect::chain_text(why);
        let mut refusals = self.inner.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        if !refusals.iter().any(|r| r.path == path) {
            refusals.push(Refusal {
                path: path.to_owned(),
                reason,
            });
        }
    }

    /// The files refused since the last call (node files that failed their
    /// checks or MAC, merged images that failed their content check), each
    /// named; the caller reports them. A refused file is never used.
    pub fn take_refusals(&self) -> Vec<Refusal> {
        std::mem::take(&mut *self.inner.refusals.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The largest guest memory a node may claim here.
    pub fn max_guest_mem_bytes(&self) -> u64 {
        self.inner.max_guest_mem_bytes
    }

    /// The keyed tag of a page's bytes under this store's key (what a
    /// node's index records for it).
    pub fn page_tag(&self, page: &[u8]) -> u64 {
        self.inner.key.page_tag(page)
    }

    fn read_nodes(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<NodeId, Arc<Node>>> {
        self.inner.nodes.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, node: Arc<Node>) {
        self.inner
            .nodes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.id(), node);
    }

    pub(crate) fn forget(&self, id: NodeId) {
        self.inner
            .nodes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        self.inner
            .images
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Every valid node, ordered by id.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.read_nodes().values().cloned().collect()
    }

    /// Node `id`, from the index or (if another process made it) from disk.
    pub fn node(&self, id: NodeId) -> Result<Arc<Node>, LineageError> {
        if let Some(n) = self.read_nodes().get(&id) {
            return Ok(Arc::clone(n));
        }
        let path = self.node_path(id);
        if !path.exists() {
            return Err(LineageError::UnknownNode(id.to_string()));
        }
        let n = Arc::new(
            node::load(&path, Some(id), &self.inner.key, self.inner.max_guest_mem_bytes)
                .inspect_err(|e| self.refuse(e.path(), e))
                .map_err(|source| LineageError::Node { id, source })?,
        );
        self.insert(Arc::clone(&n));
        Ok(n)
    }

    /// The node a full id or a unique id prefix names.
    pub fn resolve(&self, text: &str) -> Result<NodeId, LineageError> {
        if let Ok(id) = text.parse::<NodeId>() {
            return Ok(id);
        }
        let text = text.to_ascii_lowercase();
        let nodes = self.read_nodes();
        let mut hits = nodes
            .keys()
            .filter(|id| !text.is_empty() && id.to_string().starts_with(&text));
        match (hits.next(), hits.next()) {
            (Some(&id), None) => Ok(id),
            (Some(_), Some(_)) => Err(LineageError::AmbiguousPrefix(text)),
            _ => Err(LineageError::UnknownNode(text)),
        }
    }

    /// The chain from the base to `id` (oldest first), each link checked:
    /// the parent exists, is the very node the child was made from (its
    /// header checksum), has the level above, and the same memory size.
    pub fn lineage(&self, id: NodeId) -> Result<Vec<Arc<Node>>, LineageError> {
        let mut chain = vec![self.node(id)?];
        loop {
            let child = Arc::clone(chain.last().unwrap_or_else(|| unreachable!()));
            let Some(parent_id) = child.parent() else { break };
            let parent = match self.node(parent_id) {
                Ok(p) => p,
                Err(LineageError::UnknownNode(_)) => {
                    return Err(LineageError::ParentMissing {
                        path: child.path().to_owned(),
                        parent: parent_id,
                    });
                }
                Err(e) => return Err(e),
            };
            check_link(&child, &parent)?;
            chain.push(parent);
        }
        chain.reverse();
        Ok(chain)
    }

    /// The direct children of `id`.
    pub fn children(&self, id: NodeId) -> Vec<Arc<Node>> {
        self.read_nodes()
            .values()
            .filter(|n| n.parent() == Some(id))
            .cloned()
            .collect()
    }

    /// The newest base node, optionally with a given label digest and
    /// memory size.
    pub fn find_base(&self, digest: Option<&str>, guest_mem_bytes: Option<u64>) -> Option<Arc<Node>> {
        self.newest(|n| {
            n.level() == Level::Base
                && digest.is_none_or(|d| n.label().digest.as_deref() == Some(d))
                && guest_mem_bytes.is_none_or(|b| n.guest_mem_bytes() == b)
        })
    }

    /// The newest function node under `base` for this function name and
    /// artifact digest (a changed artifact has another digest, hence another
    /// node).
    pub fn find_function(&self, base: NodeId, name: &str, digest: &str) -> Option<Arc<Node>> {
        self.newest(|n| {
            n.parent() == Some(base)
                && n.level() == Level::Function
                && n.label().function.as_deref() == Some(name)
                && n.label().digest.as_deref() == Some(digest)
        })
    }

    /// The argument node under `function` for this input hash.
    pub fn find_argument(&self, function: NodeId, input_hash: &str) -> Option<Arc<Node>> {
        self.newest(|n| {
            n.parent() == Some(function)
                && n.level() == Level::Argument
                && n.label().input_hash.as_deref() == Some(input_hash)
        })
    }

    fn newest(&self, pred: impl Fn(&Node) -> bool) -> Option<Arc<Node>> {
        self.read_nodes()
            .values()
            .filter(|n| pred(n))
            .max_by_key(|n| n.created_unix_ms())
            .cloned()
    }

    /// Records that `id` was just used (for LRU trimming and `tree`).
    /// Cheap: at most one file timestamp update per node per second.
    pub fn touch(&self, id: NodeId) -> std::io::Result<()> {
        {
            let mut touched = self.inner.touched.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            if touched
                .get(&id)
                .is_some_and(|t| now.duration_since(*t) < TOUCH_INTERVAL)
            {
                return Ok(());
            }
            touched.insert(id, now);
        }
        let path = self.used_path(id);
        let f = File::options().create(true).truncate(false).write(true).open(&path)?;
        f.set_modified(SystemTime::now())
    }

    /// When `id` was last used (its creation if never), ms since the epoch.
    pub fn last_used_unix_ms(&self, node: &Node) -> u64 {
        fs::metadata(self.used_path(node.id()))
            .and_then(|m| m.modified())
            .map(to_unix_ms)
            .unwrap_or_else(|_| node.created_unix_ms())
    }
}

/// Checks that `parent` is the node `child` was made from.
pub(crate) fn check_link(child: &Node, parent: &Node) -> Result<(), LineageError> {
    let mismatch = |reason: String| LineageError::ParentMismatch {
        path: child.path().to_owned(),
        parent: parent.id(),
        reason,
    };
    if child.header.parent_check != parent.header_crc() {
        return Err(mismatch(format!(
            "the parent file {} is not the one this node was made from (header checksum {:#018x}, expected {:#018x})",
            parent.path().display(),
            parent.header_crc(),
            child.header.parent_check
        )));
    }
    if child.level().parent_level() != Some(parent.level()) {
        return Err(mismatch(format!(
            "{} nodes cannot be parents of {} nodes",
            parent.level(),
            child.level()
        )));
    }
    if child.guest_mem_bytes() != parent.guest_mem_bytes() {
        return Err(mismatch(format!(
            "guest memory sizes differ ({} vs {} bytes)",
            child.guest_mem_bytes(),
            parent.guest_mem_bytes()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Header;
    use crate::id::Label;
    use crate::node::NodeMeta;

    fn node(level: Level, id: u8, parent: Option<u8>, parent_check: u64, mem: u64, header_crc: u64) -> Node {
        let (index_offset, state_offset, meta_offset, file_len) = Header::layout(0, 0, 0).unwrap();
        Node {
            header: Header {
                level,
                id: NodeId::from_bytes([id; 16]),
                parent: parent.map(|p| NodeId::from_bytes([p; 16])),
                parent_check,
                guest_mem_bytes: mem,
                page_count: 0,
                index_offset,
                state_offset,
                state_len: 0,
                meta_offset,
                meta_len: 0,
                file_len,
                index_crc: 0,
                state_crc: 0,
                meta_crc: 0,
            },
            header_crc,
            meta: NodeMeta {
                label: Label::default(),
                created_unix_ms: 0,
                state_summary: Default::default(),
            },
            index: Vec::new(),
            state: Vec::new(),
            key: Arc::new(StoreKey::from_secret(&[0; 32])),
            path: PathBuf::from(format!("/store/nodes/{id}.node")),
        }
    }

    #[test]
    fn links_check_identity_level_and_size() {
        let base = node(Level::Base, 1, None, 0, 4096, 77);
        let func = node(Level::Function, 2, Some(1), 77, 4096, 88);
        assert!(check_link(&func, &base).is_ok());
        let arg = node(Level::Argument, 3, Some(2), 88, 4096, 99);
        assert!(check_link(&arg, &func).is_ok());
        // Replaced parent (other header checksum).
        let forged = node(Level::Base, 1, None, 0, 4096, 78);
        let err = check_link(&func, &forged).unwrap_err().to_string();
        assert!(
            err.contains("/store/nodes/2.node") && err.contains("not the one"),
            "{err}"
        );
        // An argument directly under a base.
        let skip = node(Level::Argument, 4, Some(1), 77, 4096, 5);
        let err = check_link(&skip, &base).unwrap_err().to_string();
        assert!(err.contains("base nodes cannot be parents of argument nodes"), "{err}");
        // Another memory size.
        let big = node(Level::Function, 5, Some(1), 77, 8192, 6);
        assert!(
            check_link(&big, &base)
                .unwrap_err()
                .to_string()
                .contains("memory sizes differ")
        );
    }

    #[test]
    fn temp_names_carry_their_pid() {
        assert_eq!(temp_owner("0123.node.7.4242.tmp"), Some(4242));
        assert_eq!(temp_owner("x.tmp"), None);
        assert_eq!(temp_owner("a.12"), None);
    }
}
