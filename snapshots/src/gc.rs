//! Removing nodes: whole subtrees (a node never outlives its parent), LRU
//! trimming of a function's argument nodes, and garbage collection of
//! superseded, orphaned, unused or broken nodes and stale image caches.

use crate::error::GcError;
use crate::id::{Label, Level, NodeId};
use crate::node::Node;
use crate::store::{NODES_DIR, Store, now_unix_ms, sync_dir};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What [`gc`] removes.
#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    /// Remove these subtrees. Empty: remove what nothing needs (orphaned,
    /// broken and superseded nodes, stale image caches, and with
    /// `unused_for`, nodes unused for that long). Node files of another
    /// format version are never removed without being named.
    pub roots: Vec<NodeId>,
    /// Never remove base or function nodes (only argument nodes).
    pub keep_functions: bool,
    /// Also remove argument (and, unless `keep_functions`, function) nodes
    /// whose last use is older than this.
    pub unused_for: Option<Duration>,
    /// Report only; remove nothing.
    pub dry_run: bool,
}

/// A removed node.
#[derive(Clone, Debug, Serialize)]
pub struct RemovedNode {
    /// Its id.
    pub id: NodeId,
    /// Its level.
    pub level: Level,
    /// Its label.
    pub label: Label,
    /// Why it went.
    pub reason: String,
    /// Node file bytes freed.
    pub bytes: u64,
}

/// What [`gc`] did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Whether nothing was actually removed.
    pub dry_run: bool,
    /// Nodes removed, children before parents.
    pub removed: Vec<RemovedNode>,
    /// Other files removed: broken node files, stale image caches.
    pub removed_files: Vec<PathBuf>,
    /// Bytes freed (node files, images, other files).
    pub bytes_freed: u64,
}

fn io_err(path: PathBuf) -> impl FnOnce(std::io::Error) -> GcError {
    move |source| GcError::Io { path, source }
}

/// Removes a file; a file already gone is fine. Returns its allocated bytes.
fn remove(path: &std::path::Path) -> Result<u64, GcError> {
    use std::os::unix::fs::MetadataExt;
    let bytes = std::fs::metadata(path)
        .map(|m| m.blocks().saturating_mul(512))
        .unwrap_or(0);
    match std::fs::remove_file(path) {
        Ok(()) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(path.to_owned())(e)),
    }
}

impl Store {
    /// `id` and every descendant, children before parents.
    fn subtree(&self, id: NodeId) -> Vec<Arc<Node>> {
        let nodes = self.nodes();
        let mut children: BTreeMap<NodeId, Vec<Arc<Node>>> = BTreeMap::new();
        for n in &nodes {
            if let Some(p) = n.parent() {
                children.entry(p).or_default().push(Arc::clone(n));
            }
        }
        let mut out = Vec::new();
        let mut stack: Vec<(Arc<Node>, bool)> = nodes
            .iter()
            .filter(|n| n.id() == id)
            .map(|n| (Arc::clone(n), false))
            .collect();
        while let Some((n, expanded)) = stack.pop() {
            if expanded {
                out.push(n);
            } else {
                let kids = children.get(&n.id()).cloned().unwrap_or_default();
                stack.push((n, true));
                stack.extend(kids.into_iter().map(|k| (k, false)));
            }
        }
        out
    }

    /// Removes node `id` and all its descendants (with their image caches
    /// and last-used records). Returns the removed ids, children first.
    pub fn remove_subtree(&self, id: NodeId) -> Result<Vec<NodeId>, GcError> {
        self.node(id)?;
        let _lock = self
            .lock(true)
            .map_err(io_err(self.root().join(crate::store::LOCK_FILE)))?;
        let doomed = self.subtree(id);
        let mut report = GcReport::default();
        for n in &doomed {
            self.remove_node(n, "removed with its subtree", &mut report)?;
        }
        sync_dir(&self.root().join(NODES_DIR)).map_err(io_err(self.root().join(NODES_DIR)))?;
        Ok(doomed.iter().map(|n| n.id()).collect())
    }

    fn remove_node(&self, n: &Node, reason: &str, report: &mut GcReport) -> Result<(), GcError> {
        let mut bytes = 0;
        if !report.dry_run {
            // Node file first: from then on nothing can start from it.
            bytes += remove(n.path())?;
            for p in [
                self.image_meta_path(n.id()),
                self.image_path(n.id()),
                self.used_path(n.id()),
            ] {
                bytes += remove(&p)?;
            }
            self.forget(n.id());
        } else {
            bytes = n.file_len();
        }
        report.bytes_freed += bytes;
        report.removed.push(RemovedNode {
            id: n.id(),
            level: n.level(),
            label: n.label().clone(),
            reason: reason.to_owned(),
            bytes: n.file_len(),
        });
        Ok(())
    }

    /// Keeps the `keep` most recently used argument nodes under `function`
    /// and removes the rest (LRU bound per function). Returns removed ids.
    pub fn trim_arguments(&self, function: NodeId, keep: usize) -> Result<Vec<NodeId>, GcError> {
        let mut args: Vec<(u64, u64, Arc<Node>)> = self
            .children(function)
            .into_iter()
            .filter(|n| n.level() == Level::Argument)
            .map(|n| (self.last_used_unix_ms(&n), n.created_unix_ms(), n))
            .collect();
        args.sort_by_key(|a| std::cmp::Reverse((a.0, a.1)));
        let mut removed = Vec::new();
        for (_, _, n) in args.into_iter().skip(keep) {
            removed.extend(self.remove_subtree(n.id())?);
        }
        Ok(removed)
    }
}

/// Garbage collection; see [`GcOptions`].
pub fn gc(store: &Store, opts: &GcOptions) -> Result<GcReport, GcError> {
    let _lock = store
        .lock(!opts.dry_run)
        .map_err(io_err(store.root().join(crate::store::LOCK_FILE)))?;
    let broken = store.scan().map_err(|e| match e {
        crate::error::OpenStoreError::Io { path, source } => GcError::Io { path, source },
        crate::error::OpenStoreError::Key { path, reason } => GcError::Io {
            path,
            source: std::io::Error::other(reason),
        },
    })?;
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    let nodes = store.nodes();
    // Which nodes go, and why (a node's subtree goes with it).
    let mut doomed: BTreeMap<NodeId, String> = BTreeMap::new();
    if opts.roots.is_empty() {
        for n in &nodes {
            if let Err(e) = store.lineage(n.id()) {
                doomed.insert(n.id(), format!("unusable lineage: {e}"));
            }
        }
        if !opts.keep_functions {
            // Superseded: an older function node with the same base and name.
            let mut newest: BTreeMap<(Option<NodeId>, String), &Arc<Node>> = BTreeMap::new();
            for n in nodes.iter().filter(|n| n.level() == Level::Function) {
                let key = (n.parent(), n.label().function.clone().unwrap_or_default());
                match newest.get(&key) {
                    Some(m) if m.created_unix_ms() >= n.created_unix_ms() => {
                        doomed
                            .entry(n.id())
                            .or_insert_with(|| format!("superseded by {}", m.id()));
                    }
                    Some(m) => {
                        doomed
                            .entry(m.id())
                            .or_insert_with(|| format!("superseded by {}", n.id()));
                        newest.insert(key, n);
                    }
                    None => {
                        newest.insert(key, n);
                    }
                }
            }
        }
        if let Some(age) = opts.unused_for {
            let cutoff = now_unix_ms().saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
            for n in &nodes {
                let eligible = n.level() == Level::Argument || (n.level() == Level::Function && !opts.keep_functions);
                if eligible && store.last_used_unix_ms(n) < cutoff {
                    doomed
                        .entry(n.id())
                        .or_insert_with(|| format!("unused for more than {} s", age.as_secs()));
                }
            }
        }
    } else {
        for &root in &opts.roots {
            store.node(root)?;
            doomed.insert(root, "named for removal".to_owned());
        }
    }
    // Expand to subtrees, children first, each node once.
    let mut seen = BTreeSet::new();
    let mut order: Vec<(Arc<Node>, String)> = Vec::new();
    for (id, reason) in &doomed {
        for n in store.subtree(*id) {
            if opts.keep_functions && n.level() != Level::Argument {
                continue;
            }
            if seen.insert(n.id()) {
                let why = if n.id() == *id {
                    reason.clone()
                } else {
                    format!("descendant of {id}")
                };
                order.push((n, why));
            }
        }
    }
    // Children before parents across subtrees too.
    order.sort_by_key(|(n, _)| std::cmp::Reverse(n.level()));
    for (n, why) in &order {
        store.remove_node(n, why, &mut report)?;
    }
    if opts.roots.is_empty() {
        for e in broken {
            if matches!(e, crate::error::NodeFileError::UnsupportedVersion { .. }) {
                // Another build's format, not garbage: leave it alone.
                continue;
            }
            let path = e.path().to_owned();
            if !opts.dry_run {
                report.bytes_freed += remove(&path)?;
            }
            report.removed_files.push(path);
        }
        // Image caches whose node is gone.
        let dir = store.images_dir().to_owned();
        let live: BTreeSet<String> = store.nodes().iter().map(|n| n.id().to_string()).collect();
        for entry in std::fs::read_dir(&dir).map_err(io_err(dir.clone()))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = name.split('.').next().unwrap_or("");
            if !live.contains(stem) {
                if !opts.dry_run {
                    report.bytes_freed += remove(&entry.path())?;
                }
                report.removed_files.push(entry.path());
            }
        }
    }
    if !opts.dry_run {
        for d in [store.root().join(NODES_DIR), store.images_dir().to_owned()] {
            sync_dir(&d).map_err(io_err(d.clone()))?;
        }
    }
    Ok(report)
}
