//! The conformance suite on the `vm` backend from every start path: each
//! case's `Auto` invocations are forced onto one path (`cold`, `base`,
//! `function`, `argument`, `hot`; `cold` without `same_output`, which
//! asserts that a used function does not start cold). `argument` applies to functions that
//! call `checkpoint()`; for the others (the backend answers
//! `UnsupportedStart`) those invocations start from the function snapshot.

mod conformance_cases;

use conformance_cases::*;
use microfaas::{
    Backend, BackendKind, Error, ErrorKind, FunctionId, FunctionSpec, Invocation, StartPath, StartRequest, Stats,
};

/// The `vm` backend with `Auto` starts forced onto one path.
#[derive(Debug)]
struct Forced {
    inner: Box<dyn Backend>,
    path: StartPath,
}

impl Backend for Forced {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn deploy(&self, spec: &FunctionSpec) -> Result<FunctionId, Error> {
        self.inner.deploy(spec)
    }
    fn invoke(&self, id: &FunctionId, input: &[u8], start: StartRequest) -> Result<Invocation, Error> {
        if start != StartRequest::Auto {
            return self.inner.invoke(id, input, start);
        }
        match self.inner.invoke(id, input, StartRequest::Force(self.path)) {
            Err(e) if e.kind() == ErrorKind::UnsupportedStart && self.path == StartPath::Argument => {
                self.inner.invoke(id, input, StartRequest::Force(StartPath::Function))
            }
            other => {
                if let Ok(r) = &other {
                    assert_eq!(
                        r.start, self.path,
                        "{id}: forced {} but served by {}",
                        self.path, r.start
                    );
                }
                other
            }
        }
    }
    fn evict(&self, id: &FunctionId) -> Result<(), Error> {
        self.inner.evict(id)
    }
    fn stats(&self) -> Stats {
        self.inner.stats()
    }
}

fn forced(path: StartPath) -> Option<Forced> {
    open(BackendKind::Vm).map(|inner| Forced { inner, path })
}

macro_rules! paths {
    ($($module:ident => $path:expr;)*) => {$(
        mod $module {
            use super::*;
            #[test]
            fn same_output() {
                if let Some(b) = forced($path) { super::same_output(&b) }
            }
            #[test]
            fn bad_cases() {
                if let Some(b) = forced($path) { super::bad_cases(&b) }
            }
            #[test]
            fn concurrent_callers() {
                if let Some(b) = forced($path) { super::concurrent_callers(&b) }
            }
            #[test]
            fn evict_and_stats() {
                if let Some(b) = forced($path) { super::evict_and_stats(&b) }
            }
        }
    )*};
}

/// `cold`: `same_output` checks that a used function does not start cold,
/// so it is left out here (it forces `cold` itself for every echo input).
mod cold {
    use super::*;
    #[test]
    fn bad_cases() {
        if let Some(b) = forced(StartPath::Cold) {
            super::bad_cases(&b)
        }
    }
    #[test]
    fn concurrent_callers() {
        if let Some(b) = forced(StartPath::Cold) {
            super::concurrent_callers(&b)
        }
    }
    #[test]
    fn evict_and_stats() {
        if let Some(b) = forced(StartPath::Cold) {
            super::evict_and_stats(&b)
        }
    }
}

paths! {
    base => StartPath::Base;
    function => StartPath::Function;
    argument => StartPath::Argument;
    hot => StartPath::Hot;
}
