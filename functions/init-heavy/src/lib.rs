//! `init-heavy`: `init()` builds an 8 MiB table (real work: a million
//! xorshift steps); `handle` looks up 8-byte entries indexed by the input
//! bytes and returns their XOR (8 bytes, little endian).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use microfaas_sdk::{Error, OnceBox, export};

/// Entries in the table (8 MiB of u64).
const ENTRIES: usize = 1 << 20;

static TABLE: OnceBox<Vec<u64>> = OnceBox::new();

fn init() -> Result<(), Error> {
    let mut table = Vec::with_capacity(ENTRIES);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..ENTRIES {
        for _ in 0..8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        table.push(x);
    }
    TABLE.set(Box::new(table)).map_err(|_| Error::new("init ran twice"))
}

fn handle(input: &[u8]) -> Result<Vec<u8>, Error> {
    let table = TABLE.get().ok_or_else(|| Error::new("init did not run"))?;
    let mut acc = 0u64;
    let mut index = 0usize;
    for &b in input {
        index = (index.wrapping_mul(31).wrapping_add(usize::from(b))) % ENTRIES;
        acc ^= table[index];
    }
    acc ^= table[input.len() % ENTRIES];
    Ok(acc.to_le_bytes().to_vec())
}

export!(handle, init = init);
