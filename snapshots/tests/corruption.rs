//! Truncated, bit-flipped, wrong-version and wrong-parent node files are
//! refused with an error naming the file, and no image of them is mapped.

mod common;

use common::*;
use snapshots::{ImageError, LineageError, NodeFileError, Store};
use snapshots::{Label, Level};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn flip(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

/// The full error chain as a user would read it.
fn text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s += ": ";
        s += &c.to_string();
        src = c.source();
    }
    s
}

/// Opens a fresh store over `dir`, asks for the image of `id`, and checks
/// that it is refused, names `bad_file`, and that no image was written.
fn refused(dir: &Path, id: snapshots::NodeId, bad_file: &Path) -> ImageError {
    let store = Store::open(dir).unwrap();
    let err = store.image(id).expect_err("a corrupt lineage must be refused");
    let msg = text(&err);
    assert!(
        msg.contains(&bad_file.display().to_string()),
        "error does not name {}: {msg}",
        bad_file.display()
    );
    assert!(
        !store.image_path(id).exists(),
        "an image was written for a refused node"
    );
    assert!(
        std::fs::read_dir(dir.join("tmp")).unwrap().next().is_none(),
        "temp files left behind"
    );
    // And verify reports it.
    let report = snapshots::verify(&store).unwrap();
    assert!(!report.ok());
    assert!(
        report.bad.iter().any(|b| b.path == bad_file),
        "verify missed {}",
        bad_file.display()
    );
    err
}

#[test]
fn truncated_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let path = s.func.path().to_owned();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = refused(dir.path(), s.arg.id(), &path);
    assert!(matches!(
        err,
        ImageError::Lineage(LineageError::Node {
            source: NodeFileError::Truncated { .. },
            ..
        })
    ));
    // Truncated inside the header block too.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(100)
        .unwrap();
    let err = refused(dir.path(), s.func.id(), &path);
    assert!(matches!(
        err,
        ImageError::Lineage(LineageError::Node {
            source: NodeFileError::Truncated { .. },
            ..
        })
    ));
}

#[test]
fn bit_flipped_header_index_metadata_or_page_is_refused() {
    // (offset of the flip, what it hits); the small function node stores 3
    // pages: index at 4096 + 3 * 4096.
    let index = 4096 + 3 * 4096;
    for (offset, what) in [(70u64, "header"), (4096 + 2 * 4096 + 5, "page"), (index + 3, "index")] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = small(&store);
        let path = s.func.path().to_owned();
        flip(&path, offset);
        let err = refused(dir.path(), s.arg.id(), &path);
        match what {
            "header" => assert!(
                matches!(
                    &err,
                    ImageError::Lineage(LineageError::Node {
                        source: NodeFileError::HeaderChecksum { .. },
                        ..
                    })
                ),
                "{err:?}"
            ),
            "index" => assert!(
                matches!(
                    &err,
                    ImageError::Lineage(LineageError::Node {
                        source: NodeFileError::SectionChecksum {
                            section: "page index",
                            ..
                        },
                        ..
                    })
                ),
                "{err:?}"
            ),
            _ => assert!(
                matches!(&err, ImageError::Corrupt(NodeFileError::PageChecksum { page: 20, .. })),
                "{err:?}"
            ),
        }
    }
    // The metadata JSON is the file's tail.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let path = s.arg.path().to_owned();
    flip(&path, std::fs::metadata(&path).unwrap().len() - 3);
    let err = refused(dir.path(), s.arg.id(), &path);
    assert!(text(&err).contains("metadata checksum mismatch"), "{}", text(&err));
}

#[test]
fn flipped_state_blob_is_refused_on_read_and_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let path = s.arg.path().to_owned();
    // The state blob follows the index: 4096 + 2 pages + 2 index entries.
    flip(&path, 4096 + 2 * 4096 + 2 * 16 + 1);
    // The state is read and authenticated when the node is opened.
    let store = Store::open(dir.path()).unwrap();
    let err = store.node(s.arg.id()).unwrap_err();
    assert!(text(&err).contains(&path.display().to_string()), "{}", text(&err));
    assert!(
        matches!(
            err,
            LineageError::Node {
                source: NodeFileError::SectionChecksum { section: "state", .. },
                ..
            }
        ),
        "{err:?}"
    );
    let report = snapshots::verify(&store).unwrap();
    assert_eq!(report.bad.len(), 1);
    assert_eq!(report.bad[0].path, path);
    assert_eq!(report.bad[0].node, Some(s.arg.id()));
}

#[test]
fn wrong_version_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let path = s.base.path().to_owned();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&7u32.to_le_bytes(), 8).unwrap();
    let err = refused(dir.path(), s.arg.id(), &path);
    let msg = text(&err);
    assert!(msg.contains("format version 7"), "{msg}");
    assert!(matches!(
        err,
        ImageError::Lineage(LineageError::Node {
            source: NodeFileError::UnsupportedVersion {
                found: 7,
                supported: 2,
                ..
            },
            ..
        })
    ));
}

#[test]
fn bad_magic_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let path = s.arg.path().to_owned();
    flip(&path, 0);
    let err = refused(dir.path(), s.arg.id(), &path);
    assert!(text(&err).contains("bad magic"));
}

#[test]
fn missing_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    std::fs::remove_file(s.func.path()).unwrap();
    let err = refused(dir.path(), s.arg.id(), s.arg.path());
    assert!(matches!(err, ImageError::Lineage(LineageError::ParentMissing { parent, .. }) if parent == s.func.id()));
    // The tree shows the orphan as a root, with its problem.
    let tree = snapshots::tree(&Store::open(dir.path()).unwrap()).unwrap();
    let orphan = tree.roots.iter().find(|r| r.id == s.arg.id()).expect("orphan listed");
    assert!(
        orphan.problem.as_deref().unwrap_or("").contains("is missing"),
        "{:?}",
        orphan.problem
    );
    // gc removes the orphan.
    let store = Store::open(dir.path()).unwrap();
    let r = snapshots::gc(&store, &snapshots::GcOptions::default()).unwrap();
    assert_eq!(r.removed.iter().map(|n| n.id).collect::<Vec<_>>(), vec![s.arg.id()]);
    assert!(snapshots::verify(&store).unwrap().ok());
}

#[test]
fn swapped_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    // Another function node under the same base, copied over the parent's
    // file name: its id differs from its name.
    let other = node(
        &store,
        Level::Function,
        Some(s.base.id()),
        Label::function("echo", "d1"),
        &[(4, 1)],
    );
    std::fs::copy(other.path(), s.func.path()).unwrap();
    let store2 = Store::open(dir.path()).unwrap();
    let err = store2.image(s.arg.id()).unwrap_err();
    assert!(
        matches!(
            &err,
            ImageError::Lineage(LineageError::Node {
                source: NodeFileError::IdMismatch { .. },
                ..
            })
        ),
        "{err:?}"
    );
    refused(dir.path(), s.arg.id(), s.func.path());
}

#[test]
fn parent_with_same_id_but_other_content_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    // Forge a parent: same id and position in the tree, different pages. It
    // is internally consistent (checksums hold) but is not the node the
    // argument was made from.
    let func_path = s.func.path().to_owned();
    let mut bytes = std::fs::read(&func_path).unwrap();
    let page_crc_offset = 4096 + 3 * 4096 + 8; // first index entry's CRC
    bytes[4096] ^= 1; // change page 4's content ...
    let new_page_crc = snapshots::crc64(&bytes[4096..8192]);
    bytes[page_crc_offset..page_crc_offset + 8].copy_from_slice(&new_page_crc.to_le_bytes());
    let index = &bytes[4096 + 3 * 4096..4096 + 3 * 4096 + 3 * 16];
    let index_crc = snapshots::crc64(index);
    bytes[128..136].copy_from_slice(&index_crc.to_le_bytes()); // ... and its index CRC
    let header_crc = snapshots::crc64(&bytes[..152]);
    bytes[152..160].copy_from_slice(&header_crc.to_le_bytes()); // ... and the header CRC
    std::fs::write(&func_path, &bytes).unwrap();
    // Every checksum holds, but the keyed MAC does not: the forged parent
    // is refused by name, and so is everything built on it.
    let store = Store::open(dir.path()).unwrap();
    let err = store.image(s.func.id()).unwrap_err();
    assert!(
        matches!(
            &err,
            ImageError::Lineage(LineageError::Node {
                source: NodeFileError::Unauthenticated { .. },
                ..
            })
        ),
        "{err:?}"
    );
    assert!(text(&err).contains(&func_path.display().to_string()), "{}", text(&err));
    assert!(store.image(s.arg.id()).is_err());
    assert!(!store.image_path(s.arg.id()).exists());
    let refusals = store.take_refusals();
    assert!(refusals.iter().any(|r| r.path == func_path), "{refusals:?}");
}

#[test]
fn node_of_another_store_is_refused() {
    // A node file made by another store (a valid MAC under another key),
    // copied in with its parent: neither is accepted.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store_a = Store::open(a.path()).unwrap();
    let s = small(&store_a);
    let store_b = Store::open(b.path()).unwrap();
    for n in [&s.base, &s.func] {
        let to = store_b.node_path(n.id());
        std::fs::copy(n.path(), &to).unwrap();
    }
    let broken = store_b.scan().unwrap();
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(
        broken
            .iter()
            .all(|e| matches!(e, NodeFileError::Unauthenticated { .. }))
    );
    assert!(store_b.nodes().is_empty());
    assert!(store_b.image(s.func.id()).is_err());
}

#[test]
fn node_claiming_more_than_the_configured_memory_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let capped = Store::open_with(
        dir.path(),
        snapshots::StoreOptions {
            max_guest_mem_bytes: Some(s.base.guest_mem_bytes() - 4096),
            ..Default::default()
        },
    )
    .unwrap();
    let broken = capped.scan().unwrap();
    assert_eq!(broken.len(), 3, "{broken:?}");
    for e in &broken {
        assert!(matches!(e, NodeFileError::TooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("configured guest memory"), "{e}");
    }
    assert!(capped.nodes().is_empty());
}

#[test]
fn corrupted_image_cache_is_reported_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let img = store.image(s.arg.id()).unwrap();
    let path = img.path().to_owned();
    drop(img);
    assert!(snapshots::verify(&store).unwrap().ok());
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&path, perms).unwrap();
    flip(&path, 3 * 4096 + 9);
    let report = snapshots::verify(&store).unwrap();
    assert_eq!(report.images_checked, 1);
    assert_eq!(report.bad.len(), 1);
    assert_eq!(report.bad[0].path, path);
    assert!(report.bad[0].error.contains("0x3000"), "{}", report.bad[0].error);
}

#[test]
fn verify_rereads_files_changed_under_an_open_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    assert!(snapshots::verify(&store).unwrap().ok());
    flip(s.func.path(), 70);
    let report = snapshots::verify(&store).unwrap();
    assert!(
        report
            .bad
            .iter()
            .any(|b| b.path == s.func.path() && b.error.contains("header checksum")),
        "{:?}",
        report.bad
    );
    // The argument under it is reported as unusable too.
    assert!(report.bad.iter().any(|b| b.path == s.arg.path()), "{:?}", report.bad);
}

#[test]
fn gc_leaves_files_of_another_format_version_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let f = std::fs::OpenOptions::new().write(true).open(s.arg.path()).unwrap();
    f.write_all_at(&2u32.to_le_bytes(), 8).unwrap();
    let r = snapshots::gc(&store, &snapshots::GcOptions::default()).unwrap();
    assert!(r.removed_files.is_empty(), "{:?}", r.removed_files);
    assert!(s.arg.path().exists());
}

mod any_flipped_bit {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any single flipped bit anywhere in a node file is caught when the
        /// file is opened or when `verify` reads it.
        #[test]
        fn is_detected(position in 0.0f64..1.0, bit in 0u8..8) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let s = small(&store);
            let path = s.func.path().to_owned();
            let len = std::fs::metadata(&path).unwrap().len();
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
            let offset = ((len as f64) * position) as u64;
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, offset).unwrap();
            b[0] ^= 1 << bit;
            f.write_all_at(&b, offset).unwrap();
            let report = snapshots::verify(&Store::open(dir.path()).unwrap()).unwrap();
            prop_assert!(report.bad.iter().any(|b| b.path == path), "flip at {} bit {} missed", offset, bit);
        }
    }
}

#[test]
fn swapped_merged_image_is_refused_and_rebuilt_before_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let func_img = store.image(s.func.id()).unwrap();
    let arg_img = store.image(s.arg.id()).unwrap();
    let want: Vec<u8> = std::fs::read(func_img.path()).unwrap();
    // Another node's image (same size, same lineage prefix) in its place,
    // metadata untouched.
    let path = func_img.path().to_owned();
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(arg_img.path(), &path).unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), want);
    // A new process (store) checks it before its first mapping.
    let store = Store::open(dir.path()).unwrap();
    let img = store.image(s.func.id()).unwrap();
    assert!(img.was_built(), "the swapped image was used");
    let refusals = store.take_refusals();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0].path, path);
    assert!(refusals[0].reason.contains("merged image refused"), "{:?}", refusals[0]);
    assert_eq!(std::fs::read(&path).unwrap(), want);
    // The rebuilt image passes its check in the next process.
    let store = Store::open(dir.path()).unwrap();
    assert!(!store.image(s.func.id()).unwrap().was_built());
    assert!(store.take_refusals().is_empty());
}

#[test]
fn node_moved_under_another_parent_fails_its_mac() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    // A second function node under the same base, and the argument node
    // re-pointed at it: parent id and parent check rewritten, header CRC
    // recomputed (the attacker knows the other node's header CRC).
    let other = common::node(
        &store,
        snapshots::Level::Function,
        Some(s.base.id()),
        snapshots::Label::function("other", "d2"),
        &[(4, 7)],
    );
    let path = s.arg.path().to_owned();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[40..56].copy_from_slice(other.id().as_bytes());
    bytes[56..64].copy_from_slice(&other.header_crc().to_le_bytes());
    let crc = snapshots::crc64(&bytes[..152]);
    bytes[152..160].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = store.node(s.arg.id()).unwrap_err();
    assert!(
        matches!(
            err,
            LineageError::Node {
                source: NodeFileError::Unauthenticated { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(store.children(other.id()).is_empty());
}
