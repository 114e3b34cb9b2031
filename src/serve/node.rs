//! One node's functions: the backends it opened (lazily, one per backend
//! kind and heap size), the functions it deployed from the registry, and the
//! blocking operations the HTTP layer runs on its blocking pool.

use super::api::{self, ApiError};
use super::registry::{FunctionMeta, Registry, RegistryError, Version};
use crate::{Artifact, Backend, BackendKind, Config, FunctionId, FunctionSpec, Invocation, StartRequest, Tenant};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A function deployed on this node, at one registry version.
#[derive(Debug, Clone)]
struct Loaded {
    version: Version,
    tenant: Tenant,
    backend: Arc<dyn Backend>,
    id: FunctionId,
}

/// The node's state.
#[derive(Debug)]
pub struct Node {
    registry: Registry,
    store_root: PathBuf,
    backends: Mutex<HashMap<(BackendKind, u64), Arc<dyn Backend>>>,
    slots: Mutex<HashMap<String, Arc<Mutex<Option<Loaded>>>>>,
    revision: AtomicU64,
    node_name: String,
    /// Invocations that reached a backend (for tests: nothing runs unless
    /// authenticated).
    pub invocations: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An invocation's result, with where it ran.
#[derive(Debug)]
pub struct Ran {
    /// The backend's answer.
    pub result: Result<Invocation, crate::Error>,
    /// Which backend.
    pub backend: BackendKind,
}

impl Node {
    /// A node over `registry`, keeping vm snapshot stores under `store_root`.
    pub fn new(registry: Registry, store_root: PathBuf, node_name: String) -> Self {
        Self {
            registry,
            store_root,
            backends: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            revision: AtomicU64::new(0),
            node_name,
            invocations: AtomicU64::new(0),
        }
    }

    fn backend(&self, kind: BackendKind, heap_mib: u64) -> Result<Arc<dyn Backend>, crate::Error> {
        let mut backends = lock(&self.backends);
        if let Some(b) = backends.get(&(kind, heap_mib)) {
            return Ok(Arc::clone(b));
        }
        let mut config = Config {
            input_limit_bytes: api::MAX_SYNC_PAYLOAD_BYTES,
            output_limit_bytes: api::MAX_SYNC_PAYLOAD_BYTES,
            ..Config::default()
        };
        config.heap_limit_bytes = usize::try_from(heap_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        config.vm.store_dir = Some(self.store_root.join(format!("heap-{heap_mib}")));
        let b: Arc<dyn Backend> = Arc::from(crate::open(kind, config)?);
        backends.insert((kind, heap_mib), Arc::clone(&b));
        Ok(b)
    }

    /// The stored artifact of `meta`, verified again (the registry is shared
    /// and trusted no more than an upload) and checked against its digest.
    fn artifact(&self, meta: &FunctionMeta) -> Result<Arc<Artifact>, crate::Error> {
        let path = self.registry.code_path(&meta.code_sha256);
        let artifact = Artifact::load(&path)?;
        if artifact.digest() != meta.code_sha256 {
            return Err(crate::Error::InvalidArtifact {
                path,
                reason: "its digest is not the one the registry records".into(),
            });
        }
        Ok(Arc::new(artifact))
    }

    /// The stored module of `meta`, if it has one, checked against its
    /// digest (the registry is trusted no more than an upload).
    fn module(&self, meta: &FunctionMeta) -> Result<Option<Arc<[u8]>>, crate::Error> {
        let Some(sha256) = &meta.module_sha256 else {
            return Ok(None);
        };
        let path = self.registry.module_path(sha256);
        let bytes =
            std::fs::read(&path).map_err(|e| crate::Error::io(format!("reading module {}", path.display()), e))?;
        if sha256_hex(&bytes) != *sha256 {
            return Err(crate::Error::InvalidArtifact {
                path,
                reason: "the module's digest is not the one the registry records".into(),
            });
        }
        Ok(Some(bytes.into()))
    }

    /// The function deployed at the registry's current version (deploying it
    /// on this node first if needed: the first invoke after a create, an
    /// update, or a node failure).
    fn loaded(&self, name: &str, caller: &Tenant) -> Result<Loaded, InvokeError> {
        let l = self.loaded_any(name)?;
        if &l.tenant != caller {
            return Err(RegistryError::NotFound(name.to_owned()).into());
        }
        Ok(l)
    }

    fn loaded_any(&self, name: &str) -> Result<Loaded, InvokeError> {
        let version = match self.registry.version(name) {
            Ok(v) => v,
            Err(e) => {
                lock(&self.slots).remove(name);
                return Err(e.into());
            }
        };
        let slot = Arc::clone(lock(&self.slots).entry(name.to_owned()).or_default());
        let mut slot = lock(&slot);
        if let Some(l) = slot.as_ref()
            && l.version == version
        {
            return Ok(l.clone());
        }
        let meta = self.registry.get(name)?;
        let kind = api::backend_of_runtime(&meta.runtime).map_err(InvokeError::Api)?;
        let tenant = Tenant::new(&meta.tenant).map_err(|e| {
            InvokeError::Registry(RegistryError::Corrupt {
                path: self.registry.meta_path(name),
                reason: e.to_string(),
            })
        })?;
        let artifact = self.artifact(&meta).map_err(InvokeError::Backend)?;
        let module = self.module(&meta).map_err(InvokeError::Backend)?;
        let backend = self
            .backend(kind, api::heap_mib_of_memory_size(meta.memory_mib))
            .map_err(InvokeError::Backend)?;
        if let Some(old) = slot.take() {
            // Its instances go; the backend keeps the (unreachable) spec.
            let _ = old.backend.evict(&old.id);
        }
        let mut spec = FunctionSpec::new(name, artifact)
            .with_budget(Duration::from_secs(meta.timeout_s))
            .with_tenant(tenant.clone());
        if let Some(module) = module {
            spec = spec.with_module(module);
        }
        let id = backend.deploy(&spec).map_err(InvokeError::Backend)?;
        let l = Loaded {
            version,
            tenant,
            backend,
            id,
        };
        *slot = Some(l.clone());
        Ok(l)
    }

    /// Runs `name` once on `input`.
    pub fn invoke(&self, caller: &Tenant, name: &str, input: &[u8], start: StartRequest) -> Result<Ran, InvokeError> {
        let l = self.loaded(name, caller)?;
        self.invocations.fetch_add(1, Ordering::Relaxed);
        let result = l.backend.invoke(&l.id, input, start);
        Ok(Ran {
            result,
            backend: l.backend.kind(),
        })
    }

    /// Checks that `name` exists and can be deployed here (`DryRun`).
    pub fn check(&self, caller: &Tenant, name: &str) -> Result<(), InvokeError> {
        self.loaded(name, caller).map(|_| ())
    }

    /// The function's configuration, if `caller` may see it (another
    /// tenant's function is not found).
    pub fn get(&self, caller: &Tenant, name: &str) -> Result<FunctionMeta, ApiError> {
        let meta = self.registry.get(name)?;
        if meta.tenant != caller.as_str() {
            return Err(ApiError::not_found(name));
        }
        Ok(meta)
    }

    /// The functions `caller` may see, by name.
    pub fn list(&self, caller: &Tenant) -> Result<Vec<FunctionMeta>, ApiError> {
        let mut all = self.registry.list()?;
        all.retain(|m| m.tenant == caller.as_str());
        Ok(all)
    }

    /// Whether `caller` has a function `name` (one `stat` and, the first
    /// time, a read).
    pub fn exists(&self, caller: &Tenant, name: &str) -> Result<(), ApiError> {
        self.get(caller, name).map(|_| ())
    }

    fn new_revision(&self) -> String {
        let n = self.revision.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        format!("{}-{}-{n}", self.node_name, t.as_nanos())
    }

    /// Verifies uploaded code exactly as `microfaas verify` does a file, and
    /// stores it and its module, if any.
    fn store_code(&self, code: &api::CodeRequest) -> Result<StoredCode, ApiError> {
        let upload = super::code::extract_code(code)?;
        let bytes = upload.artifact;
        let temp = self.registry.write_temp(&bytes)?;
        let verified = Artifact::load(&temp);
        let artifact = match verified {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return Err(ApiError::invalid(format!(
                    "the code is not a valid microfaas artifact: {}",
                    super::chain(&e)
                )));
            }
        };
        let digest = artifact.digest().to_owned();
        self.registry.store_code(&temp, &digest)?;
        let module = match upload.module {
            None => None,
            Some(module) => {
                let module_digest = sha256_hex(&module);
                let temp = self.registry.write_temp(&module)?;
                self.registry.store_module(&temp, &module_digest)?;
                Some((module_digest, u64::try_from(module.len()).unwrap_or(u64::MAX)))
            }
        };
        Ok(StoredCode {
            sha256: digest,
            size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            module,
        })
    }

    /// `CreateFunction`.
    pub fn create(&self, caller: &Tenant, req: &api::CreateRequest) -> Result<FunctionMeta, ApiError> {
        let (kind, timeout_s, memory_mib) = api::check_create(req)?;
        let code = self.store_code(&req.code)?;
        let (module_sha256, module_size) = code.module.unzip();
        let meta = FunctionMeta {
            name: req.function_name.clone(),
            tenant: caller.as_str().to_owned(),
            runtime: format!("microfaas-{kind}"),
            role: req.role.clone().unwrap_or_default(),
            handler: req.handler.clone().unwrap_or_default(),
            description: req.description.clone().unwrap_or_default(),
            timeout_s,
            memory_mib,
            code_sha256: code.sha256,
            code_size: code.size,
            module_sha256,
            module_size: module_size.unwrap_or(0),
            last_modified: now_iso8601(),
            revision_id: self.new_revision(),
        };
        self.registry.create(&meta)?;
        Ok(meta)
    }

    /// `UpdateFunctionCode`.
    pub fn update_code(&self, caller: &Tenant, name: &str, code: &api::CodeRequest) -> Result<FunctionMeta, ApiError> {
        let mut meta = self.get(caller, name)?;
        let stored = self.store_code(code)?;
        if code.dry_run {
            return Ok(meta);
        }
        let (module_sha256, module_size) = stored.module.unzip();
        meta.code_sha256 = stored.sha256;
        meta.code_size = stored.size;
        meta.module_sha256 = module_sha256;
        meta.module_size = module_size.unwrap_or(0);
        meta.last_modified = now_iso8601();
        meta.revision_id = self.new_revision();
        self.registry.replace(&meta)?;
        Ok(meta)
    }

    /// `DeleteFunction`.
    pub fn delete(&self, caller: &Tenant, name: &str) -> Result<(), ApiError> {
        self.get(caller, name)?;
        self.registry.delete(name)?;
        let slot = lock(&self.slots).remove(name);
        if let Some(slot) = slot
            && let Some(l) = lock(&slot).take()
        {
            let _ = l.backend.evict(&l.id);
        }
        Ok(())
    }
}

/// Why an invocation did not reach the function.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The registry refused (not found, corrupt, I/O).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A request error.
    #[error("{}", .0.message)]
    Api(ApiError),
    /// Opening the backend, loading or deploying failed.
    #[error(transparent)]
    Backend(crate::Error),
}

impl InvokeError {
    /// As a Lambda answer.
    pub fn failure(&self) -> api::InvokeFailure {
        match self {
            InvokeError::Registry(e) => api::InvokeFailure::Api(match e {
                RegistryError::NotFound(n) => ApiError::not_found(n),
                other => ApiError::new(500, "ServiceException", super::chain(other)),
            }),
            InvokeError::Api(e) => api::InvokeFailure::Api(e.clone()),
            InvokeError::Backend(e) => api::invoke_failure(e),
        }
    }
}

/// Now as Lambda's `LastModified` (`2026-12-02T02:10:21.000+0000`).
pub fn now_iso8601() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    let d = super::sigv4::format_amz_date(secs);
    // YYYYMMDDTHHMMSSZ -> YYYY-MM-DDTHH:MM:SS.mmm+0000
    format!(
        "{}-{}-{}T{}:{}:{}.{:03}+0000",
        &d[0..4],
        &d[4..6],
        &d[6..8],
        &d[9..11],
        &d[11..13],
        &d[13..15],
        t.subsec_millis()
    )
}

/// Uploaded code as stored: the artifact's digest and size, and the
/// module's, if it came with one.
#[derive(Debug)]
struct StoredCode {
    sha256: String,
    size: u64,
    module: Option<(String, u64)>,
}

/// Hex SHA-256 of `bytes` (a module's content address).
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
