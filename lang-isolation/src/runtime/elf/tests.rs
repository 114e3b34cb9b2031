//! Unit tests of the pure planning steps (real artifacts: `tests/loader.rs`).

use super::*;

fn seg(flags: u32, offset: u64, vaddr: u64, filesz: u64, memsz: u64) -> Segment {
    Segment {
        flags,
        offset,
        vaddr,
        filesz,
        memsz,
    }
}

#[test]
fn segments_become_pages_with_their_final_protection() {
    // The layout lld gives `echo`: R, R+X, RW (RELRO) with bss to the
    // page end, and a bss-only RW segment.
    let text = plan_segment(&seg(PF_X | 4, 0xad0, 0x1ad0, 0x145b, 0x145b), 0).unwrap();
    assert_eq!(
        text,
        SegmentPlan {
            start: 0x1000,
            file_offset: 0,
            file_bytes: 0x2000,
            zero_from: None,
            anon_bytes: 0,
            protection: Protection::ReadExec,
        }
    );
    let relro = plan_segment(&seg(PF_W | 4, 0x1f30, 0x3f30, 0x130, 0x10d0), 0).unwrap();
    assert_eq!(
        relro,
        SegmentPlan {
            start: 0x3000,
            file_offset: 0x1000,
            file_bytes: 0x2000,
            zero_from: Some(0x4060),
            anon_bytes: 0,
            protection: Protection::ReadWrite,
        }
    );
    let bss = plan_segment(&seg(PF_W | 4, 0x2060, 0x5060, 0, 0x10), 0).unwrap();
    assert_eq!((bss.start, bss.file_bytes, bss.anon_bytes), (0x5000, 0, 0x1000));
    // File data ending mid-page with bss beyond it: zero the tail, then
    // anonymous pages.
    let data = plan_segment(&seg(PF_W | 4, 0x7218, 0xa218, 0x1, 0x3000), 0).unwrap();
    assert_eq!(
        (data.file_bytes, data.zero_from, data.anon_bytes),
        (0x1000, Some(0xa219), 0x3000)
    );
    // A read-only segment is never zeroed (nothing may write it).
    let ro = plan_segment(&seg(4, 0, 0, 0xacc, 0xacc), 0).unwrap();
    assert_eq!((ro.zero_from, ro.protection), (None, Protection::Read));
}

#[test]
fn headers_are_refused_before_anything_is_read_from_them() {
    assert_eq!(plan(b""), Err(ElfError::Truncated("ELF header")));
    let mut h = [0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 1; // ELF32
    h[5] = 1;
    assert_eq!(plan(&h), Err(ElfError::NotSharedObject));
    h[4] = 2;
    h[16] = 3;
    h[18] = 62;
    h[54] = 32; // wrong program header size
    assert_eq!(plan(&h), Err(ElfError::Malformed("program header entry size")));
    h[54] = 56;
    h[32] = 64; // phoff
    h[56] = 1; // one header, past the end
    assert_eq!(plan(&h), Err(ElfError::Truncated("program headers")));
}
