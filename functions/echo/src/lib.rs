//! `echo`: returns its input unchanged.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;
use microfaas_sdk::{Error, export};

fn handle(input: &[u8]) -> Result<Vec<u8>, Error> {
    Ok(input.to_vec())
}

export!(handle);
