//! The `vm` backend's use of the snapshot store (SEUSS): the base node
//! (booted guest, keyed by the guest build and memory layout), function
//! nodes (artifact loaded and `init()` done, keyed by name + artifact
//! digest) and argument nodes (stopped at `checkpoint()`, keyed by a hash of
//! artifact digest + input, LRU-bounded per function). Instances start from
//! a node by mapping its merged image copy-on-write and restoring the saved
//! vCPU state; children are written from the pages a restored instance
//! made private (guest and VMM writes alike).
//!
//! Nothing the store holds is trusted until checked: node files carry the
//! store's keyed MAC and merged images are checked against their lineage
//! before this process maps them (the `snapshots` crate); a node's saved
//! state must fit its level (a base idle at request 0, a function node idle
//! after its load, an argument node stopped at a checkpoint) and the
//! mailbox in its memory ([`SavedState::check_mailbox`]); a node claiming
//! more memory than the configured guest is refused at open. A refused
//! node or image is named (a warning on stderr, the `snapshot_files_refused`
//! counter) and the backend keeps serving: a refused image is re-merged, a
//! refused base or function node is made anew from a fresh boot (base) or
//! from the base (function), exactly as if it were missing, and a refused
//! argument node is skipped (the invocation starts from the function node
//! and writes a new one).

use crate::Error;
use sha2::{Digest, Sha256};
use snapshots::{
    GuestMapping, ImageError, Label, Level, LineageError, MapOptions, MergedImage, NodeFileError, NodeId, NodeSpec,
    Store,
};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmm::{ExternalMemory, Instance, InstanceConfig, Pristine, ResetSource, SavedState, Shell, Vmm};

/// A node ready to start instances from: its merged image (mapped per
/// instance) and its decoded state, both loaded once.
#[derive(Debug)]
pub(crate) struct Restorable {
    pub(crate) id: NodeId,
    path: PathBuf,
    image: Arc<MergedImage>,
    state: SavedState,
    /// What an instance of an idle node is reset to (`None` at a
    /// checkpoint).
    reset: Option<Arc<ResetSource>>,
}

/// A node's merged image as the pristine memory a reset reads.
#[derive(Debug)]
struct ImagePristine(Arc<MergedImage>);

impl Pristine for ImagePristine {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf)
    }
}

impl Restorable {
    /// The node's merged image file (a VMM host process maps it itself).
    pub(crate) fn image_path(&self) -> &std::path::Path {
        self.image.path()
    }

    /// The node's directory in the store.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The node's saved state.
    pub(crate) fn state(&self) -> &SavedState {
        &self.state
    }
}

/// Guest memory of a restored instance: a private mapping of a merged image.
#[derive(Debug)]
pub(crate) struct SnapshotMemory(pub(crate) GuestMapping);

// SAFETY: `GuestMapping` is one private read/write mapping of `len()` bytes
// at `host_addr()`, owned by the value and unmapped only when it drops.
unsafe impl ExternalMemory for SnapshotMemory {
    fn host_addr(&self) -> *mut u8 {
        self.0.host_addr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The mapping an instance was restored onto, if it was.
pub(crate) fn mapping_of(instance: &Instance) -> Option<&GuestMapping> {
    instance
        .external_memory()?
        .as_any()
        .downcast_ref::<SnapshotMemory>()
        .map(|m| &m.0)
}

/// The snapshot side of the backend.
#[derive(Debug)]
pub(crate) struct Snapshots {
    store: Store,
    base_key: String,
    mem_bytes: u64,
    base: Mutex<Option<Arc<Restorable>>>,
    /// Runtime bases (a booted guest with a runtime artifact loaded and
    /// initialised: the base of the functions deployed with a module on
    /// it), by the artifact's digest.
    runtime_bases: Mutex<HashMap<String, Arc<Restorable>>>,
    /// Argument nodes kept per function (LRU).
    pub(crate) arguments_per_function: usize,
    /// Nodes refused in this process (never looked up again).
    refused: Mutex<HashSet<NodeId>>,
    /// Store files refused so far (nodes and images).
    pub(crate) files_refused: AtomicU64,
}

/// What a node's saved state must be at its level, if it is not (pure).
pub(crate) fn level_fault(level: Level, state: &SavedState) -> Option<String> {
    match level {
        // A booted guest (request 0), or a runtime base (its runtime loaded
        // by request 1).
        Level::Base if state.at_checkpoint || state.seq > 1 => Some(format!(
            "a base node must be idle before its first request or after its runtime's load, but its state is {} at request {}",
            if state.at_checkpoint { "at a checkpoint" } else { "idle" },
            state.seq
        )),
        Level::Function if state.at_checkpoint || state.seq == 0 => Some(format!(
            "a function node must be idle after its load request, but its state is {} at request {}",
            if state.at_checkpoint { "at a checkpoint" } else { "idle" },
            state.seq
        )),
        Level::Argument if !state.at_checkpoint || state.seq < 2 => Some(format!(
            "an argument node must be stopped at a checkpoint of an invocation, but its state is {} at request {}",
            if state.at_checkpoint { "at a checkpoint" } else { "idle" },
            state.seq
        )),
        _ => None,
    }
}

/// The hex SHA-256 of `parts`, each length-prefixed.
fn digest_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(u64::try_from(p.len()).unwrap_or(u64::MAX).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of the argument node of `input` to the artifact `digest`.
pub(crate) fn input_hash(digest: &str, input: &[u8]) -> String {
    digest_hex(&[digest.as_bytes(), input])
}

/// The trait error for a store failure, naming the file where there is one.
pub(crate) fn store_error(context: &str, e: &(dyn std::error::Error + 'static)) -> Error {
    let mut path: Option<PathBuf> = None;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(n) = c.downcast_ref::<NodeFileError>() {
            path = Some(n.path().to_owned());
            break;
        }
        if let Some(LineageError::ParentMissing { path: p, .. } | LineageError::ParentMismatch { path: p, .. }) =
            c.downcast_ref::<LineageError>()
        {
            path = Some(p.clone());
            break;
        }
        cause = c.source();
    }
    let detail = format!("{context}: {}", super::vm::error_chain(e));
    match path {
        Some(path) => Error::SnapshotCorrupt { path, detail },
        None => Error::io(detail, std::io::Error::other("snapshot store")),
    }
}

impl Snapshots {
    /// Opens the store at `dir` (or the default) for instances of `config`.
    pub(crate) fn open(
        dir: Option<PathBuf>,
        config: &InstanceConfig,
        arguments_per_function: usize,
    ) -> Result<Self, Error> {
        let layout = vmm::layout::Layout::new(config.layout)
            .map_err(|e| Error::io("vm layout", std::io::Error::other(e.to_string())))?;
        // Nodes claiming more memory than this guest has are refused when
        // opened, before their index is read or anything is mapped.
        let opts = snapshots::StoreOptions {
            max_guest_mem_bytes: Some(layout.mem_bytes),
            ..snapshots::StoreOptions::from_env()
        };
        let store = Store::open_with(dir.unwrap_or_else(snapshots::default_store_dir), opts).map_err(|e| match e {
            snapshots::OpenStoreError::Key { path, reason } => Error::SnapshotCorrupt {
                path,
                detail: format!("the snapshot store's key is unusable: {reason}"),
            },
            other => store_error("opening the snapshot store", &other),
        })?;
        // The base depends on the guest build, the layout (and the page
        // tables and descriptor tables the VMM writes for it), the boot info
        // and the state format: any change makes (and keys) a new base.
        let base_key = digest_hex(&[
            vmm::GUEST_KERNEL,
            format!("{:?}/{}", config.layout, config.idle_spin_us).as_bytes(),
            &vmm::state::STATE_VERSION.to_le_bytes(),
            &vmm::layout::LAYOUT_VERSION.to_le_bytes(),
        ]);
        let s = Self {
            store,
            base_key,
            mem_bytes: layout.mem_bytes,
            base: Mutex::new(None),
            runtime_bases: Mutex::new(HashMap::new()),
            arguments_per_function,
            refused: Mutex::new(HashSet::new()),
            files_refused: AtomicU64::new(0),
        };
        s.report();
        Ok(s)
    }

    /// Names every file the store refused since the last report (stderr)
    /// and counts them.
    pub(crate) fn report(&self) {
        for r in self.store.take_refusals() {
            self.files_refused.fetch_add(1, Ordering::Relaxed);
            // The reason names the file.
            eprintln!("microfaas: warning: snapshot store: {}", r.reason);
        }
    }

    /// Refuses node `id` for the rest of this process (named by `why`).
    pub(crate) fn refuse(&self, id: NodeId, why: &Error) {
        if let Ok(mut refused) = self.refused.lock()
            && refused.insert(id)
        {
            self.files_refused.fetch_add(1, Ordering::Relaxed);
            eprintln!("microfaas: warning: snapshot store: refused node {id}: {why}");
        }
    }

    fn is_refused(&self, id: NodeId) -> bool {
        self.refused.lock().map(|r| r.contains(&id)).unwrap_or(true)
    }

    /// Loads node `id` (expected at `level`) for restoring: its file
    /// (MAC-checked), merged image (content-checked) and state, which must
    /// fit the level and the mailbox in the image.
    pub(crate) fn restorable(&self, id: NodeId, level: Level) -> Result<Arc<Restorable>, Error> {
        let r = self.load_restorable(id, level);
        self.report();
        r
    }

    fn load_restorable(&self, id: NodeId, level: Level) -> Result<Arc<Restorable>, Error> {
        let node = self
            .store
            .node(id)
            .map_err(|e| store_error("opening a snapshot node", &e))?;
        let corrupt = |detail: String| Error::SnapshotCorrupt {
            path: node.path().to_owned(),
            detail,
        };
        if node.level() != level {
            return Err(corrupt(format!(
                "a {} node where a {level} node was expected",
                node.level()
            )));
        }
        let blob = node
            .read_state()
            .map_err(|e| store_error("reading the snapshot state", &e))?;
        let state = SavedState::decode(&blob).map_err(|e| corrupt(format!("the vCPU state is unusable: {e}")))?;
        if let Some(fault) = level_fault(level, &state) {
            return Err(corrupt(format!("the saved state does not fit its level: {fault}")));
        }
        let image = self
            .store
            .image(id)
            .map_err(|e: ImageError| store_error("building the snapshot image", &e))?;
        let mut mailbox = [0u8; vmm::channel::MAILBOX_BYTES];
        image
            .read_at(vmm::abi::MAILBOX_ADDR, &mut mailbox)
            .map_err(|e| corrupt(format!("reading the mailbox from the merged image: {e}")))?;
        state
            .check_mailbox(&vmm::channel::parse(&mailbox))
            .map_err(|e| corrupt(format!("the saved state does not match its memory: {e}")))?;
        let reset = ResetSource::new(state.clone(), Box::new(ImagePristine(Arc::clone(&image))))
            .ok()
            .map(Arc::new);
        Ok(Arc::new(Restorable {
            id,
            path: node.path().to_owned(),
            image,
            state,
            reset,
        }))
    }

    /// The base node, made once per store (booting with `boot`) and cached.
    pub(crate) fn base(&self, boot: impl Fn() -> Result<Instance, Error>) -> Result<Arc<Restorable>, Error> {
        let mut cached = self.base.lock().map_err(|_| super::vm::poisoned())?;
        if let Some(b) = cached.as_ref() {
            return Ok(Arc::clone(b));
        }
        let made = self.find_or_make_base(&self.base_key, Label::base(Some(&self.base_key)), 0, &boot)?;
        *cached = Some(Arc::clone(&made));
        Ok(made)
    }

    /// The runtime base of `runtime`: a base node (no parent: the whole
    /// guest memory) of a guest booted with `runtime` loaded and its
    /// `init()` run (by `load`), made once per store and artifact, keyed by
    /// the base's key and the artifact's digest, and cached.
    pub(crate) fn runtime_base(
        &self,
        runtime: &crate::Artifact,
        load: impl Fn() -> Result<Instance, Error>,
    ) -> Result<Arc<Restorable>, Error> {
        let mut cached = self.runtime_bases.lock().map_err(|_| super::vm::poisoned())?;
        if let Some(b) = cached.get(runtime.digest()) {
            return Ok(Arc::clone(b));
        }
        let key = digest_hex(&[self.base_key.as_bytes(), runtime.digest().as_bytes()]);
        let name = runtime
            .path()
            .file_stem()
            .map_or_else(|| "runtime".to_owned(), |s| s.to_string_lossy().into_owned());
        let label = Label {
            function: Some(format!("runtime {name}")),
            ..Label::base(Some(&key))
        };
        let made = self.find_or_make_base(&key, label, 1, &load)?;
        cached.insert(runtime.digest().to_owned(), Arc::clone(&made));
        Ok(made)
    }

    /// The base node keyed `key` (its saved state at request `seq`), or
    /// one made from the instance `make` returns, labelled `label`.
    fn find_or_make_base(
        &self,
        key: &str,
        label: Label,
        seq: u32,
        make: &impl Fn() -> Result<Instance, Error>,
    ) -> Result<Arc<Restorable>, Error> {
        // A refused base is replaced by a fresh one, as if it were missing.
        loop {
            let found = self
                .store
                .find_base(Some(key), Some(self.mem_bytes))
                .filter(|n| !self.is_refused(n.id()));
            let made = found.is_none();
            let id = match found {
                Some(node) => node.id(),
                None => self.make_base(label.clone(), make)?,
            };
            let restorable = self.restorable(id, Level::Base).and_then(|r| {
                if r.state.seq == seq {
                    Ok(r)
                } else {
                    Err(Error::SnapshotCorrupt {
                        path: r.path.clone(),
                        detail: format!("a base node keyed for request {seq} holds request {}", r.state.seq),
                    })
                }
            });
            match restorable {
                Ok(r) => return Ok(r),
                Err(e @ Error::SnapshotCorrupt { .. }) if !made => self.refuse(id, &e),
                Err(e) => return Err(e),
            }
        }
    }

    fn make_base(&self, label: Label, make: &impl Fn() -> Result<Instance, Error>) -> Result<NodeId, Error> {
        let mut instance = make()?;
        let state = instance
            .save()
            .map_err(|e| store_error("saving the booted guest", &e))?;
        let mut w = self
            .store
            .create_node(NodeSpec {
                level: Level::Base,
                parent: None,
                label,
                guest_mem_bytes: self.mem_bytes,
            })
            .map_err(|e| store_error("creating the base node", &e))?;
        // SAFETY: the instance is idle (it answered its boot doorbell, or
        // its load, and no request is in flight) for this call.
        let memory = unsafe { instance.guest_memory() };
        w.write_nonzero(memory)
            .map_err(|e| store_error("writing the base node", &e))?;
        let node = w
            .commit(&state.encode(), state.summary())
            .map_err(|e| store_error("committing the base node", &e))?;
        Ok(node.id())
    }

    /// Starts an instance from `node`.
    pub(crate) fn restore(
        &self,
        vmm: &Vmm,
        shell: Option<Shell>,
        config: &InstanceConfig,
        node: &Restorable,
    ) -> Result<Instance, Error> {
        let restored = match shell {
            // A shell with its memory slots ready: map the image over them.
            Some(shell) => Instance::restore_into(
                vmm,
                shell,
                config,
                |addr, len| {
                    let want = node.image.guest_mem_bytes();
                    if u64::try_from(len).ok() != Some(want) {
                        return Err(format!("the image has {want} bytes, the shell {len}").into());
                    }
                    // SAFETY: `restore_into` hands over its reservation of
                    // exactly `len` bytes (checked equal to the image) at
                    // `addr`; the mapping made here owns it from now on.
                    let mapping = unsafe { node.image.map_at(addr, MapOptions::default()) }?;
                    Ok(Box::new(SnapshotMemory(mapping)) as Box<dyn ExternalMemory>)
                },
                &node.state,
            ),
            None => {
                let mapping = node
                    .image
                    .map(MapOptions::default())
                    .map_err(|e| store_error("mapping the snapshot image", &e))?;
                Instance::restore(vmm, None, config, Box::new(SnapshotMemory(mapping)), &node.state)
            }
        };
        if let (Ok(instance), Some(reset)) = (&restored, &node.reset) {
            instance.set_reset_source(Arc::clone(reset));
        }
        restored.map_err(|e| match e {
            vmm::VmmError::KvmUnavailable(_) => Error::KvmUnavailable {
                detail: super::vm::error_chain(&e),
            },
            // KVM refusing the saved registers (e.g. a CR0/CR4 value), or a
            // state that does not match its memory: the node is at fault,
            // and named (a VM or vCPU the host could not make is not).
            e if e.blames_saved_state() => Error::SnapshotCorrupt {
                path: node.path.clone(),
                detail: format!(
                    "restoring an instance from snapshot node {}: {}",
                    node.id,
                    super::vm::error_chain(&e)
                ),
            },
            other => store_error("restoring an instance from a snapshot", &other),
        })
    }

    /// The function node of `name` at artifact `digest` under `base`.
    pub(crate) fn find_function(&self, base: NodeId, name: &str, digest: &str) -> Option<NodeId> {
        let found = self
            .store
            .find_function(base, name, digest)
            .filter(|n| !self.is_refused(n.id()))
            .map(|n| n.id());
        self.report();
        found
    }

    /// The argument node of `input_hash` under function node `function`.
    pub(crate) fn find_argument(&self, function: NodeId, input_hash: &str) -> Option<NodeId> {
        self.store
            .find_argument(function, input_hash)
            .filter(|n| !self.is_refused(n.id()))
            .map(|n| n.id())
    }

    /// Whether function node `function` has argument nodes.
    pub(crate) fn has_arguments(&self, function: NodeId) -> bool {
        self.store
            .children(function)
            .iter()
            .any(|n| n.level() == Level::Argument)
    }

    /// Marks node `id` used (argument LRU).
    pub(crate) fn touch(&self, id: NodeId) {
        let _ = self.store.touch(id);
    }

    /// Writes a child of `parent` from a stopped instance restored from it:
    /// the pages it made private plus its saved state.
    pub(crate) fn create_child(
        &self,
        instance: &mut Instance,
        parent: NodeId,
        level: Level,
        label: Label,
    ) -> Result<NodeId, Error> {
        let state = instance
            .save()
            .map_err(|e| store_error("saving the instance state", &e))?;
        let mapping = mapping_of(instance).ok_or_else(|| {
            Error::io(
                "creating a snapshot node",
                std::io::Error::other("the instance was not restored from a snapshot"),
            )
        })?;
        let mut w = self
            .store
            .create_node(NodeSpec {
                level,
                parent: Some(parent),
                label,
                guest_mem_bytes: self.mem_bytes,
            })
            .map_err(|e| store_error("creating a snapshot node", &e))?;
        w.write_written_from(mapping)
            .map_err(|e| store_error("writing a snapshot node", &e))?;
        let node = w
            .commit(&state.encode(), state.summary())
            .map_err(|e| store_error("committing a snapshot node", &e))?;
        Ok(node.id())
    }

    /// Keeps the most recently used argument nodes of `function`; returns
    /// the removed ones.
    pub(crate) fn trim_arguments(&self, function: NodeId) -> Vec<NodeId> {
        self.store
            .trim_arguments(function, self.arguments_per_function)
            .unwrap_or_default()
    }
}

/// Private memory of `mappings` (from smaps), one figure each.
pub(crate) fn private_bytes(mappings: &[&GuestMapping]) -> Vec<u64> {
    GuestMapping::private_bytes_of(mappings).unwrap_or_else(|_| vec![0; mappings.len()])
}

/// The cache of argument nodes of one function node, by input hash.
pub(crate) type ArgumentCache = Mutex<HashMap<String, Arc<Restorable>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_must_fit_its_level() {
        let st = |seq, at_checkpoint| SavedState {
            seq,
            at_checkpoint,
            vcpu: Default::default(),
        };
        assert_eq!(level_fault(Level::Base, &st(0, false)), None);
        assert_eq!(level_fault(Level::Function, &st(1, false)), None);
        assert_eq!(level_fault(Level::Argument, &st(2, true)), None);
        // A runtime base holds its runtime's load (request 1), no more.
        assert_eq!(level_fault(Level::Base, &st(1, false)), None);
        assert!(level_fault(Level::Base, &st(2, false)).is_some());
        assert!(level_fault(Level::Base, &st(1, true)).is_some());
        assert!(level_fault(Level::Function, &st(1, true)).is_some());
        assert!(level_fault(Level::Function, &st(0, false)).is_some());
        let err = level_fault(Level::Argument, &st(2, false)).unwrap();
        assert!(err.contains("must be stopped at a checkpoint"), "{err}");
    }

    #[test]
    fn input_hashes_separate_digest_and_input() {
        assert_ne!(input_hash("ab", b"c"), input_hash("a", b"bc"));
        assert_eq!(input_hash("d", b"x"), input_hash("d", b"x"));
        assert_eq!(input_hash("d", b"").len(), 64);
    }
}
