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

#[test]
fn pkru_writes_are_found_at_every_offset() {
    use PkruInstruction::*;
    assert_eq!(find_pkru_instruction(&[0x90, 0x0f, 0x01, 0xef]), Some((1, Wrpkru)));
    // XRSTOR [rax] = 0F AE 28; XRSTOR64 [rdi] = 48 0F AE 2F; XRSTORS [rcx] = 0F C7 19.
    assert_eq!(find_pkru_instruction(&[0x0f, 0xae, 0x28]), Some((0, Xrstor)));
    assert_eq!(find_pkru_instruction(&[0x48, 0x0f, 0xae, 0x2f]), Some((1, Xrstor)));
    assert_eq!(find_pkru_instruction(&[0x0f, 0xc7, 0x19]), Some((0, Xrstors)));
    assert_eq!(
        find_pkru_instruction(&[0x0f, 0xae, 0xa8]),
        Some((0, Xrstor)),
        "mod 10, disp32"
    );
    // Look-alikes: LFENCE (0F AE E8..EF: /5 with mod 11), XSAVE (0F AE /4),
    // RDPKRU (0F 01 EE), CMPXCHG8B (0F C7 /1), RDRAND (0F C7 /6 mod 11).
    for ok in [
        &[0x0f, 0xae, 0xe8][..],
        &[0x0f, 0xae, 0xef],
        &[0x0f, 0xae, 0x20],
        &[0x0f, 0x01, 0xee],
        &[0x0f, 0xc7, 0x0e],
        &[0x0f, 0xc7, 0xf0],
        &[0x0f, 0xc7, 0xd8],
        &[0x0f, 0x01],
        &[0x0f],
        &[],
    ] {
        assert_eq!(find_pkru_instruction(ok), None, "{ok:02x?}");
    }
    // Hidden inside another instruction's immediate: still found.
    // mov eax, 0xef010f00 = B8 00 0F 01 EF
    assert_eq!(
        find_pkru_instruction(&[0xb8, 0x00, 0x0f, 0x01, 0xef]),
        Some((2, Wrpkru))
    );
}

#[test]
fn only_executable_pages_are_scanned_and_the_offset_is_named() {
    let mut file = vec![0u8; 0x3000];
    let text = SegmentPlan {
        start: 0x1000,
        file_offset: 0x1000,
        file_bytes: 0x1000,
        zero_from: None,
        anon_bytes: 0,
        protection: Protection::ReadExec,
    };
    let rodata = SegmentPlan {
        start: 0x2000,
        file_offset: 0x2000,
        file_bytes: 0x1000,
        protection: Protection::Read,
        ..text
    };
    file[0x2100..0x2103].copy_from_slice(&[0x0f, 0x01, 0xef]);
    assert_eq!(
        scan_executable(&file, &[text, rodata]),
        Ok(()),
        "data may hold the bytes"
    );
    // Across a page boundary inside the executable range: found.
    file[0x1ffe..0x2001].copy_from_slice(&[0x0f, 0xae, 0x29]);
    assert_eq!(
        scan_executable(
            &file,
            &[
                text,
                SegmentPlan {
                    file_bytes: 0x2000,
                    ..text
                }
            ]
        ),
        Err(ElfError::ForbiddenInstruction {
            instruction: PkruInstruction::Xrstor,
            offset: 0x1ffe
        })
    );
    let e = ElfError::ForbiddenInstruction {
        instruction: PkruInstruction::Wrpkru,
        offset: 0x1234,
    };
    assert!(
        e.to_string().contains("0x1234") && e.to_string().contains("WRPKRU"),
        "{e}"
    );
}

mod scan_prop {
    use super::*;
    use proptest::prelude::*;

    /// The naive reference: decode the three rules at every offset.
    fn naive(bytes: &[u8]) -> Option<(usize, PkruInstruction)> {
        (0..bytes.len()).find_map(|i| {
            let b = &bytes[i..];
            if b.len() < 3 || b[0] != 0x0f {
                return None;
            }
            let (md, reg) = (b[2] >> 6, (b[2] >> 3) & 7);
            let kind = match (b[1], b[2]) {
                (0x01, 0xef) => PkruInstruction::Wrpkru,
                (0xae, _) if md != 3 && reg == 5 => PkruInstruction::Xrstor,
                (0xc7, _) if md != 3 && reg == 3 => PkruInstruction::Xrstors,
                _ => return None,
            };
            Some((i, kind))
        })
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        // Biased towards the interesting bytes so matches actually occur.
        let byte = prop_oneof![
            3 => any::<u8>(),
            2 => Just(0x0fu8),
            1 => prop::sample::select(vec![0x01u8, 0xef, 0xae, 0xc7, 0x28, 0xe8, 0x18, 0x98, 0xd8]),
        ];
        proptest::collection::vec(byte, 0..64)
    }

    proptest! {
        #[test]
        fn scanner_matches_the_naive_decoder(b in bytes()) {
            prop_assert_eq!(find_pkru_instruction(&b), naive(&b));
        }
    }
}
