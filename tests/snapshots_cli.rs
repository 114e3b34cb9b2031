//! `microfaas snapshots {tree,show,diff,verify,gc}` over a small store built
//! through the `snapshots` library.

use snapshots::{Label, Level, Node, NodeId, NodeSpec, PAGE_SIZE, Store};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

const MEM: u64 = 1 << 20;

fn microfaas(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_microfaas"))
        .arg("snapshots")
        .args(args)
        .arg("--store")
        .arg(store)
        .env_remove("MICROFAAS_STORE")
        .output()
        .expect("running microfaas")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(store: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = microfaas(store, &all);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON")
}

fn node(store: &Store, level: Level, parent: Option<NodeId>, label: Label, pages: &[(u64, u8)]) -> Arc<Node> {
    let mut w = store
        .create_node(NodeSpec {
            level,
            parent,
            label,
            guest_mem_bytes: MEM,
        })
        .unwrap();
    for &(p, fill) in pages {
        w.write_page(p, &[fill; PAGE_SIZE]).unwrap();
    }
    let summary = [
        ("rip".to_owned(), "0x401000".to_owned()),
        ("cr3".to_owned(), "0x9000".to_owned()),
    ]
    .into();
    w.commit(b"vcpu", summary).unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
    base: Arc<Node>,
    func: Arc<Node>,
    arg: Arc<Node>,
    other: Arc<Node>,
}

/// base (pages 0..4) -> init-heavy (pages 2, 10, 11) -> argument (page 11, 12)
///                  -> checkpointed (pages 2, 20)
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let base = node(
        &store,
        Level::Base,
        None,
        Label::base(None),
        &[(0, 1), (1, 1), (2, 1), (3, 1)],
    );
    let func = node(
        &store,
        Level::Function,
        Some(base.id()),
        Label::function("init-heavy", "aaaa"),
        &[(2, 2), (10, 2), (11, 2)],
    );
    let arg = node(
        &store,
        Level::Argument,
        Some(func.id()),
        Label::argument("init-heavy", "aaaa", "in1"),
        &[(11, 3), (12, 3)],
    );
    let other = node(
        &store,
        Level::Function,
        Some(base.id()),
        Label::function("checkpointed", "bbbb"),
        &[(2, 2), (20, 4)],
    );
    Fixture {
        dir,
        base,
        func,
        arg,
        other,
    }
}

#[test]
fn tree_shows_the_lineage_in_text_and_json() {
    let f = fixture();
    let out = microfaas(f.dir.path(), &["tree"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for (n, label) in [
        (&f.base, "base"),
        (&f.func, "init-heavy"),
        (&f.arg, "input=in1"),
        (&f.other, "checkpointed"),
    ] {
        assert!(text.contains(&n.id().short()), "{text}");
        assert!(text.contains(label), "{text}");
    }
    // The base's two children: one branches on, the last closes; the
    // argument node hangs under the function node.
    let starts = |p: &str| text.lines().filter(|l| l.starts_with(p)).count();
    assert_eq!((starts("├ "), starts("└ ")), (1, 1), "{text}");
    let arg_line = text.lines().find(|l| l.contains("input=in1")).unwrap();
    assert!(arg_line.starts_with("│ └ ") || arg_line.starts_with("  └ "), "{text}");
    let v = json(f.dir.path(), &["tree"]);
    let roots = v["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0]["id"], f.base.id().to_string());
    assert_eq!(roots[0]["level"], "base");
    assert_eq!(roots[0]["own_pages"], 4);
    let kids = roots[0]["children"].as_array().unwrap();
    assert_eq!(kids.len(), 2);
    // Siblings are ordered oldest first; both may share a millisecond, so
    // find the function node by its label.
    let func = kids
        .iter()
        .find(|k| k["label"]["function"] == "init-heavy")
        .unwrap_or_else(|| panic!("no init-heavy node in {kids:?}"));
    assert!(kids.iter().any(|k| k["label"]["function"] == "checkpointed"));
    assert_eq!(func["own_pages"], 3);
    assert_eq!(func["bytes_on_disk"], f.func.file_len());
    assert_eq!(func["children"][0]["level"], "argument");
    assert_eq!(func["children"][0]["label"]["input_hash"], "in1");
    assert!(func["created_unix_ms"].as_u64().unwrap() > 0);
    assert!(func["last_used_unix_ms"].as_u64().unwrap() > 0);
}

#[test]
fn show_reports_pages_siblings_state_and_files() {
    let f = fixture();
    let prefix = &f.func.id().to_string()[..8];
    let v = json(f.dir.path(), &["show", prefix]);
    assert_eq!(v["id"], f.func.id().to_string());
    assert_eq!(v["own_pages"], 3);
    assert_eq!(v["inherited_pages"], 3); // base pages 0, 1, 3
    assert_eq!(v["present_pages"], 6);
    assert_eq!(v["state_summary"]["rip"], "0x401000");
    assert_eq!(v["state_bytes"], 4);
    let sib = &v["siblings"][0];
    assert_eq!(sib["id"], f.other.id().to_string());
    assert_eq!(sib["shared_pages"], 3); // pages 0, 1, 3 from the base
    assert_eq!(sib["identical_own_pages"], 1); // page 2, same content in both
    assert_eq!(v["files"]["node"], f.func.path().display().to_string());
    assert_eq!(v["lineage"].as_array().unwrap().len(), 2);
    let text = stdout(&microfaas(f.dir.path(), &["show", &f.arg.id().to_string()]));
    assert!(text.contains("2 own, 5 inherited"), "{text}");
    assert!(text.contains("0x401000"), "{text}");
    assert!(text.contains(&f.arg.path().display().to_string()), "{text}");
}

#[test]
fn diff_lists_differing_guest_physical_ranges() {
    let f = fixture();
    let v = json(
        f.dir.path(),
        &["diff", &f.arg.id().to_string(), &f.other.id().to_string()],
    );
    // arg: 0-1,3 base; 2 func(2); 10 func; 11,12 arg. other: 0-1,3 base; 2 (2); 20.
    // Page 2 has equal content in both (stored twice): not a difference.
    assert_eq!(v["differing_pages"], 4);
    assert_eq!(v["common_ancestor"], f.base.id().to_string());
    let ranges = v["ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 2);
    assert_eq!(ranges[0]["start_gpa"], 10 * 4096);
    assert_eq!(ranges[0]["end_gpa"], 13 * 4096);
    assert_eq!(ranges[1]["start_gpa"], 20 * 4096);
    let text = stdout(&microfaas(
        f.dir.path(),
        &["diff", &f.base.id().to_string(), &f.base.id().to_string()],
    ));
    assert!(text.contains("0 pages differ"), "{text}");
}

#[test]
fn verify_reports_each_bad_file_and_fails() {
    let f = fixture();
    let out = microfaas(f.dir.path(), &["verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout(&out).contains("checked 4 node files (checksums and keyed MAC)"),
        "{}",
        stdout(&out)
    );
    // Corrupt a page of one node and truncate another.
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(f.other.path()).unwrap();
    file.write_all_at(&[0xEE], 4096 + 17).unwrap();
    let len = std::fs::metadata(f.arg.path()).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(f.arg.path())
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let out = microfaas(f.dir.path(), &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains(&format!("BAD {}", f.other.path().display())), "{text}");
    assert!(
        text.contains("page 2 (guest-physical 0x2000) checksum mismatch"),
        "{text}"
    );
    assert!(text.contains(&format!("BAD {}", f.arg.path().display())), "{text}");
    assert!(text.contains("truncated"), "{text}");
    let out = microfaas(f.dir.path(), &["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bad"].as_array().unwrap().len(), 2);
}

#[test]
fn gc_removes_subtrees_and_honours_keep_functions() {
    let f = fixture();
    let store = Store::open(f.dir.path()).unwrap();
    store.image(f.arg.id()).unwrap();
    assert!(store.image_path(f.arg.id()).exists());
    // --keep-functions on the base: only the argument node goes.
    let v = json(f.dir.path(), &["gc", "--keep-functions", &f.base.id().to_string()]);
    let removed: Vec<&str> = v["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(removed, vec![f.arg.id().to_string()]);
    assert!(!f.arg.path().exists());
    assert!(
        !store.image_path(f.arg.id()).exists(),
        "image cache of a removed node survived"
    );
    // A dry run changes nothing.
    let out = microfaas(f.dir.path(), &["gc", "--dry-run", &f.func.id().to_string()]);
    assert!(stdout(&out).contains("would remove"), "{}", stdout(&out));
    assert!(f.func.path().exists());
    // Removing a function removes it (and would remove its descendants).
    let out = microfaas(f.dir.path(), &["gc", &f.func.id().to_string()]);
    assert!(out.status.success());
    assert!(!f.func.path().exists());
    assert!(f.other.path().exists() && f.base.path().exists());
    // Unknown ids are an error, naming the id.
    let out = microfaas(f.dir.path(), &["gc", "ffffffff"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ffffffff"));
}

#[test]
fn store_defaults_to_the_environment_variable() {
    let f = fixture();
    let out = Command::new(env!("CARGO_BIN_EXE_microfaas"))
        .args(["snapshots", "tree", "--json"])
        .env("MICROFAAS_STORE", f.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["store"], f.dir.path().display().to_string());
}

#[test]
fn tree_and_show_escape_control_characters_in_labels() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let base = node(&store, Level::Base, None, Label::base(None), &[(0, 1)]);
    let hostile = "evil\x1b[2J\x1b]0;pwned\x07\nFORGED LINE\r";
    let func = node(
        &store,
        Level::Function,
        Some(base.id()),
        Label::function(hostile, "d\x1b[31m"),
        &[(1, 2)],
    );
    drop(store);
    for args in [vec!["tree"], vec!["show", &func.id().to_string()]] {
        let out = microfaas(dir.path(), &args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = stdout(&out);
        assert!(
            !text.contains('\x1b') && !text.contains('\x07') && !text.contains('\r'),
            "{args:?}: {text:?}"
        );
        assert!(!text.lines().any(|l| l.starts_with("FORGED LINE")), "{args:?}: {text}");
        assert!(
            text.contains("evil\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\nFORGED LINE\\r"),
            "{args:?}: {text}"
        );
    }
}
