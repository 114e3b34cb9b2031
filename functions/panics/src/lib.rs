//! `panics`: panics on every call (for fault tests).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;
use microfaas_sdk::{Error, export};

fn handle(input: &[u8]) -> Result<Vec<u8>, Error> {
    panic!("deliberate panic on an input of {} bytes", input.len());
}

export!(handle);
