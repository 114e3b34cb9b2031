//! A process SIGKILLed while creating nodes leaves no visible partial node
//! and no corruption. The test re-runs this test binary as the victim (the
//! `crash_victim` test, which does nothing unless the environment says so).

use snapshots::{Label, Level, NodeSpec, PAGE_SIZE, Store};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DIR_ENV: &str = "SNAPSHOTS_CRASH_VICTIM_DIR";
const MODE_ENV: &str = "SNAPSHOTS_CRASH_VICTIM_MODE";
/// 64 MiB of guest memory.
const MEM: u64 = 64 << 20;

fn page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for (i, chunk) in p.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed ^ (i as u64).wrapping_mul(0x9e37_79b9)).to_le_bytes());
    }
    p
}

/// The victim: creates nodes under the store's base until killed.
#[test]
fn crash_victim() {
    let (Some(dir), Ok(mode)) = (std::env::var_os(DIR_ENV), std::env::var(MODE_ENV)) else {
        return; // An ordinary test run: nothing to do.
    };
    let store = Store::open(dir).unwrap();
    let base = store.find_base(None, None).unwrap();
    let pages = MEM / 4096;
    let mut round = 0u64;
    loop {
        round += 1;
        let mut w = store
            .create_node(NodeSpec {
                level: Level::Function,
                parent: Some(base.id()),
                label: Label::function("victim", &format!("round-{round}")),
                guest_mem_bytes: MEM,
            })
            .unwrap();
        // Slow mode writes one big node, announcing itself half way, then
        // dawdles so the killer strikes mid-write; loop mode commits nodes
        // of varying size as fast as it can.
        let count = if mode == "slow" { pages } else { 1 + (round * 97) % 512 };
        for p in 0..count {
            w.write_page(p, &page(p ^ round)).unwrap();
            if mode == "slow" && p == count / 2 {
                println!("HALFWAY");
            }
            if mode == "slow" && p > count / 2 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let node = w.commit(&round.to_le_bytes(), Default::default()).unwrap();
        println!("COMMITTED {}", node.id());
    }
}

fn spawn_victim(dir: &Path, mode: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_victim", "--nocapture", "--test-threads=1"])
        .env(DIR_ENV, dir)
        .env(MODE_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn sigkill(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "victim was not killed by SIGKILL: {status:?}");
}

fn make_base(dir: &Path) -> Store {
    let store = Store::open(dir).unwrap();
    let mut w = store
        .create_node(NodeSpec {
            level: Level::Base,
            parent: None,
            label: Label::base(None),
            guest_mem_bytes: MEM,
        })
        .unwrap();
    for p in 0..16 {
        w.write_page(p, &page(p)).unwrap();
    }
    w.commit(b"base", Default::default()).unwrap();
    store
}

fn tmp_files(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    std::fs::read_dir(dir.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
        .collect()
}

/// After a crash: only complete nodes, all valid, the dead writer's temp
/// file gone, and the store still usable.
fn assert_clean_after_crash(dir: &Path, committed: &[String]) -> usize {
    let store = Store::open(dir).unwrap();
    assert!(tmp_files(dir).is_empty(), "temp leftovers survived reopening");
    let report = snapshots::verify(&store).unwrap();
    assert!(report.ok(), "corruption after a crash: {:?}", report.bad);
    let names: Vec<String> = store.nodes().iter().map(|n| n.id().to_string()).collect();
    for id in committed {
        assert!(names.contains(id), "committed node {id} lost");
    }
    // At most one node committed after its id was last printed.
    assert!(
        names.len() <= 1 + committed.len() + 1,
        "{} nodes for {} commits",
        names.len(),
        committed.len()
    );
    // Every node's image builds (the store is not wedged).
    for n in store.nodes() {
        store.image(n.id()).unwrap();
    }
    names.len()
}

#[test]
fn killed_mid_node_leaves_no_partial_node() {
    let dir = tempfile::tempdir().unwrap();
    make_base(dir.path());
    let mut child = spawn_victim(dir.path(), "slow");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !line.contains("HALFWAY") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "victim exited early");
        assert!(Instant::now() < deadline);
    }
    std::thread::sleep(Duration::from_millis(50));
    // Prove it is mid-creation: a large temp file and no new node yet.
    let tmps = tmp_files(dir.path());
    assert_eq!(tmps.len(), 1, "{tmps:?}");
    assert!(tmps[0].1 >= MEM / 4, "temp file only {} bytes", tmps[0].1);
    sigkill(&mut child);
    assert_eq!(
        assert_clean_after_crash(dir.path(), &[]),
        1,
        "a partial node became visible"
    );
}

#[test]
fn killed_at_random_points_never_corrupts() {
    let dir = tempfile::tempdir().unwrap();
    make_base(dir.path());
    let mut committed: Vec<String> = Vec::new();
    for (round, delay_ms) in [15u64, 40, 90, 160, 250].into_iter().enumerate() {
        let mut child = spawn_victim(dir.path(), "loop");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                // libtest may print "test crash_victim ... " before the
                // first line, so search rather than strip a prefix.
                .filter_map(|l| l.split_once("COMMITTED ").map(|(_, id)| id.trim().to_owned()))
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        sigkill(&mut child);
        committed.extend(reader.join().unwrap());
        let nodes = assert_clean_after_crash(dir.path(), &committed);
        // Nodes that made it but were not announced count as committed next time.
        let store = Store::open(dir.path()).unwrap();
        committed = store
            .nodes()
            .iter()
            .filter(|n| n.level() == Level::Function)
            .map(|n| n.id().to_string())
            .collect();
        assert_eq!(committed.len() + 1, nodes, "round {round}");
        eprintln!(
            "round {round}: killed after {delay_ms} ms, {} nodes committed so far",
            committed.len()
        );
    }
    assert!(committed.len() >= 3, "the victim barely ran: {} nodes", committed.len());
}
