//! Hostile tests: language.
