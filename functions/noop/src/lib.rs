//! `noop`: records a monotonic timestamp and returns it (8 bytes, little
//! endian ns), the paper's microbenchmark.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;
use microfaas_sdk::{Error, clock_ns, export};

fn handle(_input: &[u8]) -> Result<Vec<u8>, Error> {
    Ok(clock_ns().to_le_bytes().to_vec())
}

export!(handle);
