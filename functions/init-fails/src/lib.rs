//! `init-fails`: `init()` returns an error naming what it missed, after
//! allocating (so the message crosses the ABI from the function's heap);
//! `handle` is never reached (for fault tests).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::format;
use alloc::vec::Vec;
use microfaas_sdk::{Error, export};

fn init() -> Result<(), Error> {
    let wanted: Vec<u32> = (1..=3).collect();
    Err(Error::new(format!("init-fails: configuration {wanted:?} not found")))
}

fn handle(_input: &[u8]) -> Result<Vec<u8>, Error> {
    Err(Error::new("init-fails: handle ran although init failed"))
}

export!(handle, init = init);
