//! Hostile tests: build.
