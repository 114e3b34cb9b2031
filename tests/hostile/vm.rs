//! Hostile tests: vm.
