//! `sha512`: the paper's Figure 2 workload. Input: the number of rounds N as
//! decimal text (empty = 1). Hashes a 64-byte block N times, each round's
//! digest being the next round's block, and returns the final 64-byte digest.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;
use microfaas_sdk::{Error, export};
use sha2::{Digest, Sha512};

/// Rounds above this are refused (keeps one request bounded).
const MAX_ROUNDS: u64 = 100_000_000;

fn parse_rounds(input: &[u8]) -> Result<u64, Error> {
    if input.is_empty() {
        return Ok(1);
    }
    let text = core::str::from_utf8(input).map_err(|_| Error::new("input must be a decimal round count"))?;
    let rounds: u64 = text
        .trim()
        .parse()
        .map_err(|_| Error::new("input must be a decimal round count"))?;
    if rounds > MAX_ROUNDS {
        return Err(Error::new("too many rounds"));
    }
    Ok(rounds)
}

fn handle(input: &[u8]) -> Result<Vec<u8>, Error> {
    let rounds = parse_rounds(input)?;
    let mut block = [0u8; 64];
    for _ in 0..rounds {
        let digest = Sha512::digest(block);
        block.copy_from_slice(&digest);
    }
    Ok(block.to_vec())
}

export!(handle);
