//! Builds function crates into verified artifacts.
