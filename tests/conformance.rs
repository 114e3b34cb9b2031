//! The cross-backend conformance suite: written once over the `Backend`
//! trait and run for every backend. Same function + same input = same
//! output; every bad case gives the same typed error, after which the
//! backend serves the next request correctly; concurrent callers all get
//! correct answers.
//!
//! A backend that needs KVM is skipped (with the reason printed) only when
//! `/dev/kvm` is unusable and `MICROFAAS_REQUIRE_KVM` is not `1`.

mod conformance_cases;

use conformance_cases::*;
use microfaas::{Backend, BackendKind};
use std::sync::Arc;

/// One module per backend, one test per case: adding a backend is one line.
macro_rules! conformance {
    ($($module:ident => $kind:expr;)*) => {$(
        mod $module {
            use super::*;
            fn backend() -> Option<Arc<dyn Backend>> {
                open($kind).map(Arc::from)
            }
            #[test]
            fn same_output() {
                if let Some(b) = backend() { super::same_output(b.as_ref()) }
            }
            #[test]
            fn bad_cases() {
                if let Some(b) = backend() { super::bad_cases(b.as_ref()) }
            }
            #[test]
            fn concurrent_callers() {
                if let Some(b) = backend() { super::concurrent_callers(b.as_ref()) }
            }
            #[test]
            fn evict_and_stats() {
                if let Some(b) = backend() { super::evict_and_stats(b.as_ref()) }
            }
        }
    )*};
}

conformance! {
    process => BackendKind::Process;
    language => BackendKind::Language;
    vm => BackendKind::Vm;
}
