//! Worker processes for the process and language backends.
