//! `alloc-hog`: allocates 1 MiB blocks, touching each, until the runtime
//! refuses (for heap-limit tests).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use microfaas_sdk::{Error, export};

fn handle(_input: &[u8]) -> Result<Vec<u8>, Error> {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        blocks.push(vec![0xa5; 1 << 20]);
        core::hint::black_box(&blocks);
    }
}

export!(handle);
