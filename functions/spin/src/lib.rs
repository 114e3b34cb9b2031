//! `spin`: never returns (for budget enforcement tests).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;
use microfaas_sdk::{Error, export};

fn handle(_input: &[u8]) -> Result<Vec<u8>, Error> {
    let mut counter: u64 = 0;
    loop {
        counter = core::hint::black_box(counter.wrapping_add(1));
    }
}

export!(handle);
