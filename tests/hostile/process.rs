//! Hostile tests: process.
