//! The `vm` backend adapter (not built yet).

use crate::{Backend, BackendKind, Config, Error};

/// Opens the `vm` backend.
pub fn open(_config: Config) -> Result<Box<dyn Backend>, Error> {
    Err(Error::BackendUnavailable {
        backend: BackendKind::Vm,
        reason: "not built yet".to_owned(),
    })
}
