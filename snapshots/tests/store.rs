//! Creating, finding, merging and mapping nodes through the public API.

mod common;

use common::*;
use proptest::prelude::*;
use snapshots::{CreateNodeError, Label, Level, MapOptions, NodeSpec, PAGE_SIZE, PageRange, Store, crc64, dirty_runs};

fn read_all(m: &snapshots::GuestMapping) -> Vec<u8> {
    let mut buf = vec![0u8; m.len()];
    assert!(m.read_at(0, &mut buf));
    buf
}

#[test]
fn nodes_round_trip_through_a_reopened_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(reopened.nodes().len(), 3);
    let arg = reopened.node(s.arg.id()).unwrap();
    assert_eq!(arg.level(), Level::Argument);
    assert_eq!(arg.parent(), Some(s.func.id()));
    assert_eq!(arg.label(), &Label::argument("echo", "d1", "h1"));
    assert_eq!(arg.own_pages().collect::<Vec<_>>(), vec![5, 40]);
    assert_eq!(arg.read_state().unwrap(), b"state of [(5, 205), (40, 240)]");
    assert_eq!(arg.state_summary().get("rip").map(String::as_str), Some("0x1000"));
    assert_eq!(arg.read_page(40).unwrap().unwrap(), page(240));
    assert_eq!(arg.read_page(41).unwrap(), None);
    let chain: Vec<_> = reopened.lineage(s.arg.id()).unwrap().iter().map(|n| n.id()).collect();
    assert_eq!(chain, vec![s.base.id(), s.func.id(), s.arg.id()]);
    // Lookups by label.
    assert_eq!(reopened.find_base(None, Some(MEM)).unwrap().id(), s.base.id());
    assert_eq!(
        reopened.find_function(s.base.id(), "echo", "d1").unwrap().id(),
        s.func.id()
    );
    assert!(reopened.find_function(s.base.id(), "echo", "d2").is_none());
    assert_eq!(reopened.find_argument(s.func.id(), "h1").unwrap().id(), s.arg.id());
    assert!(reopened.find_argument(s.func.id(), "h2").is_none());
    // Prefix resolution.
    let text = s.arg.id().to_string();
    assert_eq!(reopened.resolve(&text[..10]).unwrap(), s.arg.id());
    assert!(reopened.resolve("zz").is_err());
}

#[test]
fn tree_rules_are_enforced_at_creation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let spec = |level, parent, label| NodeSpec {
        level,
        parent,
        label,
        guest_mem_bytes: MEM,
    };
    let invalid = |r: Result<snapshots::NodeWriter, CreateNodeError>| matches!(r, Err(CreateNodeError::Invalid(_)));
    assert!(invalid(store.create_node(spec(
        Level::Argument,
        Some(s.base.id()),
        Label::argument("e", "d", "h")
    ))));
    assert!(invalid(store.create_node(spec(
        Level::Function,
        None,
        Label::function("e", "d")
    ))));
    assert!(invalid(store.create_node(spec(
        Level::Base,
        Some(s.base.id()),
        Label::base(None)
    ))));
    assert!(invalid(store.create_node(spec(
        Level::Function,
        Some(s.base.id()),
        Label::base(None)
    ))));
    let mut other = spec(Level::Function, Some(s.base.id()), Label::function("e", "d"));
    other.guest_mem_bytes = MEM * 2;
    assert!(invalid(store.create_node(other)));
    let mut w = store
        .create_node(spec(Level::Function, Some(s.base.id()), Label::function("e", "d")))
        .unwrap();
    w.write_page(3, page(1).as_slice().try_into().unwrap()).unwrap();
    assert!(matches!(
        w.write_page(3, page(1).as_slice().try_into().unwrap()),
        Err(CreateNodeError::PageOrder { page: 3, previous: 3 })
    ));
    assert!(matches!(
        w.write_page(PAGES, page(1).as_slice().try_into().unwrap()),
        Err(CreateNodeError::PageRange { .. })
    ));
    assert!(matches!(
        w.write_run(10, &[0; 100]),
        Err(CreateNodeError::RunLength(100))
    ));
    drop(w);
    // An abandoned writer leaves nothing behind.
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    assert_eq!(Store::open(dir.path()).unwrap().nodes().len(), 3);
}

#[test]
fn merged_image_is_the_overlay_and_maps_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let base_pages: Vec<_> = (0..8).map(|p| (p, p)).collect();
    let want = expected_memory(&[&base_pages, &[(4, 104), (5, 105), (20, 120)], &[(5, 205), (40, 240)]]);

    let image = store.image(s.arg.id()).unwrap();
    assert!(image.was_built());
    assert_eq!(
        image.present_ranges(),
        &[
            PageRange { start: 0, end: 8 },
            PageRange { start: 20, end: 21 },
            PageRange { start: 40, end: 41 }
        ]
    );
    // Page 0 of the base has seed 0, which is still non-zero content.
    assert_eq!(image.nonzero_ranges(), image.present_ranges());
    assert_eq!(std::fs::read(image.path()).unwrap(), want);
    let perms = std::fs::metadata(image.path()).unwrap().permissions();
    assert!(perms.readonly());

    let mut a = image.map(MapOptions::default()).unwrap();
    let b = image.map(MapOptions { huge_page_advice: true }).unwrap();
    assert_eq!(a.host_addr() as usize % snapshots::MAPPING_ALIGN, 0);
    assert_eq!(a.len(), usize::try_from(MEM).unwrap());
    assert_eq!(read_all(&a), want);
    // A's writes are private: B and the image file never see them.
    assert!(a.write_at(5 * 4096, &[0xAA; 64]));
    assert!(a.write_at(100 * 4096, &[0xBB; 8]));
    assert!(!a.write_at(MEM - 4, &[1; 8]));
    assert_eq!(read_all(&b), want);
    assert_eq!(std::fs::read(image.path()).unwrap(), want);
    let mut got = [0u8; 64];
    assert!(a.read_at(5 * 4096, &mut got));
    assert_eq!(got, [0xAA; 64]);
    assert_eq!(a.private_bytes().unwrap(), 2 * 4096);
    assert_eq!(b.private_bytes().unwrap(), 0);
    // Reset drops the private pages: back to the image.
    a.reset().unwrap();
    assert_eq!(read_all(&a), want);
    assert_eq!(a.private_bytes().unwrap(), 0);

    // The same process reuses the image; a new process finds the cache file.
    assert!(std::sync::Arc::ptr_eq(&image, &store.image(s.arg.id()).unwrap()));
    let other = Store::open(dir.path()).unwrap();
    let cached = other.image(s.arg.id()).unwrap();
    assert!(!cached.was_built());
    assert_eq!(cached.meta().chain.len(), 3);
    drop((a, b));
}

#[test]
fn stale_or_missing_image_caches_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let img = store.image(s.func.id()).unwrap();
    let path = img.path().to_owned();
    drop(img);
    // Missing image file: rebuilt.
    std::fs::remove_file(&path).unwrap();
    let fresh = Store::open(dir.path()).unwrap();
    assert!(fresh.image(s.func.id()).unwrap().was_built());
    // Metadata naming another lineage: rebuilt.
    let meta_path = fresh.image_meta_path(s.func.id());
    let text = std::fs::read_to_string(&meta_path).unwrap();
    let base_id = s.base.id().to_string();
    std::fs::write(&meta_path, text.replace(&base_id, &s.arg.id().to_string())).unwrap();
    let fresh = Store::open(dir.path()).unwrap();
    assert!(fresh.image_meta(s.func.id()).is_none());
    assert!(fresh.image(s.func.id()).unwrap().was_built());
    assert!(fresh.image_meta(s.func.id()).is_some());
    // An image from another kernel boot (not fsynced, may have lost pages): rebuilt.
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["boot_id"] = "another-boot".into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let fresh = Store::open(dir.path()).unwrap();
    assert!(fresh.image(s.func.id()).unwrap().was_built());
}

#[test]
fn dirty_bitmap_streaming_stores_exactly_the_dirty_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mem_len = usize::try_from(MEM).unwrap();
    let mut memory = vec![0u8; mem_len];
    for p in [0usize, 1, 2, 9] {
        memory[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&page(p as u64));
    }
    let mut w = store
        .create_node(NodeSpec {
            level: Level::Base,
            parent: None,
            label: Label::base(Some("guest-1")),
            guest_mem_bytes: MEM,
        })
        .unwrap();
    assert_eq!(w.write_nonzero(&memory).unwrap(), 4);
    let base = w.commit(b"", Default::default()).unwrap();
    // The guest dirties pages 1 and 64..66 (64 cross a bitmap word).
    memory[PAGE_SIZE + 7] ^= 1;
    memory[64 * PAGE_SIZE..67 * PAGE_SIZE].fill(7);
    let bitmap = [1u64 << 1, 0b111, 0, 0];
    assert_eq!(
        dirty_runs(&bitmap),
        vec![PageRange { start: 1, end: 2 }, PageRange { start: 64, end: 67 }]
    );
    let mut w = store
        .create_node(NodeSpec {
            level: Level::Function,
            parent: Some(base.id()),
            label: Label::function("f", "d"),
            guest_mem_bytes: MEM,
        })
        .unwrap();
    assert_eq!(w.write_dirty(&memory, &bitmap).unwrap(), 4);
    let f = w.commit(b"regs", Default::default()).unwrap();
    assert_eq!(f.own_pages().collect::<Vec<_>>(), vec![1, 64, 65, 66]);
    let img = store.image(f.id()).unwrap();
    assert_eq!(std::fs::read(img.path()).unwrap(), memory);
    assert_eq!(crc64(&std::fs::read(img.path()).unwrap()), crc64(&memory));
}

#[test]
fn argument_nodes_are_trimmed_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let mut args = vec![s.arg.id()];
    for i in 2..6u64 {
        let n = node(
            &store,
            Level::Argument,
            Some(s.func.id()),
            Label::argument("echo", "d1", &format!("h{i}")),
            &[(50 + i, i)],
        );
        args.push(n.id());
    }
    // Give distinct last-used times: args[0] oldest ... args[4] newest, then
    // use args[1] most recently.
    let set_used = |id: snapshots::NodeId, secs_ago: u64| {
        let path = dir.path().join("used").join(id.to_string());
        let f = std::fs::File::create(&path).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago))
            .unwrap();
    };
    for (i, id) in args.iter().enumerate() {
        set_used(*id, 100 - u64::try_from(i).unwrap());
    }
    set_used(args[1], 1);
    let removed = store.trim_arguments(s.func.id(), 2).unwrap();
    let mut want = vec![args[0], args[2], args[3]];
    want.sort();
    let mut got = removed.clone();
    got.sort();
    assert_eq!(got, want);
    let left: Vec<_> = store.children(s.func.id()).iter().map(|n| n.id()).collect();
    assert_eq!(left.len(), 2);
    assert!(left.contains(&args[1]) && left.contains(&args[4]));
    assert!(!store.node_path(args[0]).exists());
    assert_eq!(Store::open(dir.path()).unwrap().nodes().len(), 4);
}

#[test]
fn several_function_nodes_per_name_coexist_until_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    store.image(s.arg.id()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let v2 = node(
        &store,
        Level::Function,
        Some(s.base.id()),
        Label::function("echo", "d2"),
        &[(4, 999)],
    );
    assert_eq!(store.find_function(s.base.id(), "echo", "d2").unwrap().id(), v2.id());
    assert_eq!(
        store.find_function(s.base.id(), "echo", "d1").unwrap().id(),
        s.func.id()
    );
    // A dry run removes nothing.
    let dry = snapshots::gc(
        &store,
        &snapshots::GcOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(dry.removed.len(), 2);
    assert!(store.node_path(s.func.id()).exists());
    // --keep-functions: the superseded function stays.
    let kept = snapshots::gc(
        &store,
        &snapshots::GcOptions {
            keep_functions: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(kept.removed.is_empty());
    // Plain gc: the old function node and its argument subtree (and image) go.
    let report = snapshots::gc(&store, &snapshots::GcOptions::default()).unwrap();
    let ids: Vec<_> = report.removed.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![s.arg.id(), s.func.id()]);
    assert!(report.bytes_freed > 0);
    assert!(!store.image_path(s.arg.id()).exists());
    assert!(!store.image_meta_path(s.arg.id()).exists());
    let left: Vec<_> = Store::open(dir.path())
        .unwrap()
        .nodes()
        .iter()
        .map(|n| n.id())
        .collect();
    assert_eq!(left.len(), 2);
    assert!(left.contains(&s.base.id()) && left.contains(&v2.id()));
}

#[test]
fn gc_of_named_subtrees() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    // --keep-functions on the base removes only argument nodes.
    let opts = snapshots::GcOptions {
        roots: vec![s.base.id()],
        keep_functions: true,
        ..Default::default()
    };
    let r = snapshots::gc(&store, &opts).unwrap();
    assert_eq!(r.removed.iter().map(|n| n.id).collect::<Vec<_>>(), vec![s.arg.id()]);
    // Removing the base removes everything under it.
    let removed = store.remove_subtree(s.base.id()).unwrap();
    assert_eq!(removed, vec![s.func.id(), s.base.id()]);
    assert!(store.nodes().is_empty());
    assert!(store.remove_subtree(s.base.id()).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any chain of deltas merges into the naive overlay of its layers.
    #[test]
    fn merged_image_matches_overlay_model(
        layers in proptest::collection::vec(
            proptest::collection::btree_map(0u64..PAGES, 0u64..1000, 0..20), 1..4),
        zero_pages in proptest::collection::btree_set(0u64..PAGES, 0..5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let levels = [Level::Base, Level::Function, Level::Argument];
        let mut parent = None;
        let mut want = vec![0u8; usize::try_from(MEM).unwrap()];
        for (depth, layer) in layers.iter().enumerate() {
            let mut w = store.create_node(NodeSpec {
                level: levels[depth],
                parent,
                label: Label::argument("f", "d", "h"),
                guest_mem_bytes: MEM,
            }).unwrap();
            for (&p, &seed) in layer {
                // Some pages are rewritten to zero (a delta can zero a page).
                let content = if zero_pages.contains(&p) { vec![0u8; PAGE_SIZE] } else { page(seed) };
                w.write_page(p, content.as_slice().try_into().unwrap()).unwrap();
                let off = usize::try_from(p).unwrap() * PAGE_SIZE;
                want[off..off + PAGE_SIZE].copy_from_slice(&content);
            }
            parent = Some(w.commit(&[], Default::default()).unwrap().id());
        }
        let img = store.image(parent.unwrap()).unwrap();
        let m = img.map(MapOptions::default()).unwrap();
        prop_assert_eq!(read_all(&m), want.clone());
        for r in img.nonzero_ranges() {
            for p in r.start..r.end {
                let off = usize::try_from(p).unwrap() * PAGE_SIZE;
                prop_assert!(!snapshots::is_zero(&want[off..off + PAGE_SIZE]));
            }
        }
        let nonzero: u64 = snapshots::total_pages(img.nonzero_ranges());
        let model_nonzero = want.chunks(PAGE_SIZE).filter(|p| !snapshots::is_zero(p)).count() as u64;
        prop_assert_eq!(nonzero, model_nonzero);
    }
}

#[test]
fn image_caches_can_live_in_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let opts = snapshots::StoreOptions {
        images_dir: Some(images.path().to_owned()),
        ..Default::default()
    };
    let store = Store::open_with(dir.path(), opts.clone()).unwrap();
    let s = small(&store);
    let img = store.image(s.arg.id()).unwrap();
    assert!(img.path().starts_with(images.path()));
    assert!(store.images_dir().starts_with(images.path()));
    assert_eq!(
        std::fs::read_dir(dir.path().join("images"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    let again = Store::open_with(dir.path(), opts).unwrap();
    assert!(!again.image(s.arg.id()).unwrap().was_built());
    assert!(snapshots::verify(&again).unwrap().ok());
    // Removing the node removes its image there too.
    again.remove_subtree(s.arg.id()).unwrap();
    assert!(!img.path().exists());
}

#[test]
fn concurrent_first_uses_build_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let id = s.arg.id();
            std::thread::spawn(move || store.image(id).unwrap())
        })
        .collect();
    let images: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(images[0].was_built());
    assert!(images.iter().all(|i| std::sync::Arc::ptr_eq(i, &images[0])));
}

#[test]
fn thousand_instances_never_see_each_other_nor_change_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let img = store.image(s.func.id()).unwrap();
    let before = crc64(&std::fs::read(img.path()).unwrap());
    let mut instances = Vec::new();
    for i in 0..1000u32 {
        let mut m = img.map(MapOptions::default()).unwrap();
        // Each instance writes its own number into a shared page and a page of its own.
        assert!(m.write_at(4 * 4096, &i.to_le_bytes()));
        assert!(m.write_at(u64::from(100 + i % 150) * 4096, &i.to_le_bytes()));
        instances.push(m);
    }
    for (i, m) in (0u32..).zip(&instances) {
        let mut got = [0u8; 4];
        assert!(m.read_at(4 * 4096, &mut got));
        assert_eq!(u32::from_le_bytes(got), i);
    }
    let refs: Vec<&snapshots::GuestMapping> = instances.iter().collect();
    let private = snapshots::GuestMapping::private_bytes_of(&refs).unwrap();
    assert!(private.iter().all(|&b| b == 2 * 4096), "{:?}", &private[..4]);
    drop(instances);
    assert_eq!(crc64(&std::fs::read(img.path()).unwrap()), before);
    assert!(snapshots::verify(&store).unwrap().ok());
}

#[test]
fn a_child_can_be_snapshotted_from_a_restored_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let img = store.image(s.func.id()).unwrap();
    let mut m = img.map(MapOptions::default()).unwrap();
    // The "guest" writes pages 7 and 8; the dirty log says so.
    assert!(m.write_at(7 * 4096, &[9; 4096]));
    assert!(m.write_at(8 * 4096 + 10, &[9; 10]));
    let mut w = store
        .create_node(NodeSpec {
            level: Level::Argument,
            parent: Some(s.func.id()),
            label: Label::argument("echo", "d1", "h9"),
            guest_mem_bytes: MEM,
        })
        .unwrap();
    // What copy-on-write says was written is what the dirty log says.
    assert_eq!(m.written_pages().unwrap(), vec![PageRange { start: 7, end: 9 }]);
    assert_eq!(w.write_written_from(&m).unwrap(), 2);
    let child = w.commit(b"", Default::default()).unwrap();
    let child_img = store.image(child.id()).unwrap();
    let mut want = vec![0u8; m.len()];
    assert!(m.read_at(0, &mut want));
    assert_eq!(std::fs::read(child_img.path()).unwrap(), want);
    // Same through a dirty bitmap.
    let mut w = store
        .create_node(NodeSpec {
            level: Level::Argument,
            parent: Some(s.func.id()),
            label: Label::argument("echo", "d1", "h10"),
            guest_mem_bytes: MEM,
        })
        .unwrap();
    assert_eq!(w.write_dirty_from(&m, &[0b1_1000_0000]).unwrap(), 2);
    let twin = w.commit(b"", Default::default()).unwrap();
    assert_eq!(twin.index(), child.index());
    // Reading does not count as writing; reset forgets the writes.
    let mut buf = vec![0u8; m.len()];
    assert!(m.read_at(0, &mut buf));
    assert_eq!(m.written_pages().unwrap().len(), 1);
    m.reset().unwrap();
    assert!(m.written_pages().unwrap().is_empty());
}

#[test]
fn store_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
    check::<snapshots::MergedImage>();
    check::<snapshots::GuestMapping>();
    fn send<T: Send>() {}
    send::<snapshots::NodeWriter>();
}

#[test]
fn diff_treats_stored_zero_pages_as_absent_and_compares_equal_content() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    // Sibling of `func`: rewrites page 4 with func's content (equal, stored
    // twice), stores an all-zero page 30 (equal to absent), and page 31.
    let mut w = store
        .create_node(NodeSpec {
            level: Level::Function,
            parent: Some(s.base.id()),
            label: Label::function("other", "d"),
            guest_mem_bytes: MEM,
        })
        .unwrap();
    w.write_page(4, page(104).as_slice().try_into().unwrap()).unwrap();
    w.write_page(30, &[0; PAGE_SIZE]).unwrap();
    w.write_page(31, page(7).as_slice().try_into().unwrap()).unwrap();
    let other = w.commit(b"", Default::default()).unwrap();
    let d = snapshots::diff(&store, s.func.id(), other.id()).unwrap();
    // func differs in 5 (105 vs base 5) and 20; other in 31.
    let pages: Vec<(u64, u64)> = d.ranges.iter().map(|r| (r.start_gpa / 4096, r.pages)).collect();
    assert_eq!(pages, vec![(5, 1), (20, 1), (31, 1)]);
    assert_eq!(d.differing_pages, 3);
    assert_eq!(d.common_ancestor, Some(s.base.id()));
    assert_eq!(
        snapshots::diff(&store, s.arg.id(), s.arg.id()).unwrap().differing_pages,
        0
    );
    let show = snapshots::show(&store, other.id()).unwrap();
    assert_eq!(show.own_pages, 3);
    assert_eq!(show.siblings.len(), 1);
    assert_eq!(show.siblings[0].identical_own_pages, 1);
    // Base pages 0-3, 6, 7 are shared: 4 and 5 are overridden by one or both.
    assert_eq!(show.siblings[0].shared_pages, 6);
    let img = store.image(other.id()).unwrap();
    assert_eq!(
        img.present_ranges(),
        &[PageRange { start: 0, end: 8 }, PageRange { start: 30, end: 32 }]
    );
    assert_eq!(
        img.nonzero_ranges(),
        &[PageRange { start: 0, end: 8 }, PageRange { start: 31, end: 32 }]
    );
}

#[test]
fn a_node_is_not_committed_under_a_parent_removed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let s = small(&store);
    let mut w = store
        .create_node(NodeSpec {
            level: Level::Argument,
            parent: Some(s.func.id()),
            label: Label::argument("echo", "d1", "late"),
            guest_mem_bytes: MEM,
        })
        .unwrap();
    w.write_page(1, page(1).as_slice().try_into().unwrap()).unwrap();
    store.remove_subtree(s.func.id()).unwrap();
    let err = w.commit(b"", Default::default()).unwrap_err();
    assert!(
        matches!(
            err,
            CreateNodeError::Parent(snapshots::LineageError::ParentMissing { .. })
        ),
        "{err:?}"
    );
    assert!(std::fs::read_dir(dir.path().join("tmp")).unwrap().next().is_none());
    assert_eq!(Store::open(dir.path()).unwrap().nodes().len(), 1);
}
