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
