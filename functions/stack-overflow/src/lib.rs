//! `stack-overflow`: recurses without bound, 1 KiB a frame (for guard-page
//! tests).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;
use microfaas_sdk::{Error, export};

fn recurse(depth: u64, frame: [u8; 1024]) -> u64 {
    let frame = core::hint::black_box(frame);
    // Never true in practice (the stack runs out long before); keeps the
    // recursion formally conditional.
    if depth == u64::MAX {
        return 0;
    }
    let below = recurse(depth + 1, frame);
    below.wrapping_add(u64::from(frame[usize::try_from(depth % 1024).unwrap_or(0)]))
}

fn handle(input: &[u8]) -> Result<Vec<u8>, Error> {
    let seed = input.first().copied().unwrap_or(1);
    Ok(recurse(0, [seed; 1024]).to_le_bytes().to_vec())
}

export!(handle);
