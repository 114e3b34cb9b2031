//! One adapter per backend: each maps a backend crate's own API and errors
//! onto the [`Backend`] trait.

mod language;
mod process;
mod vm;
mod vm_snapshots;

use crate::{Backend, BackendKind, Config, Error};

/// Opens the backend `kind` with `config`.
pub fn open(kind: BackendKind, config: Config) -> Result<Box<dyn Backend>, Error> {
    match kind {
        BackendKind::Process => process::open(config),
        BackendKind::Language => language::open(config),
        BackendKind::Vm => vm::open(config),
    }
}

/// What the `language` and `process` backends hand their workers and
/// runners for `spec`: its artifact's sealed memfd and, for a function
/// deployed with a module, the module in a sealed memfd of its own (made
/// per deployment: the pair is one image in a worker).
fn function_code(spec: &crate::FunctionSpec) -> Result<lang_isolation::runtime::FunctionCode, Error> {
    use lang_isolation::runtime::{FunctionCode, SealedArtifact};
    let artifact = spec.artifact.sealed()?;
    let Some(module) = spec.module.as_deref() else {
        return Ok(FunctionCode::new(artifact));
    };
    let label = format!("module of {}", spec.name);
    let sealed = SealedArtifact::create(&label, module).map_err(|e| Error::InvalidArtifact {
        path: label.clone().into(),
        reason: e.to_string(),
    })?;
    Ok(FunctionCode::with_module(artifact, std::sync::Arc::new(sealed)))
}
