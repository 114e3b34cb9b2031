//! What the authenticated snapshot store costs: the keyed page tag against
//! the CRC it replaced, opening a store (every node's MAC), the first use of
//! a merged image in a process (its content check) against a cached hit,
//! the alternative of copying the image into a sealed memfd, and deploys
//! and starts of `noop` and `init-heavy` on a fresh backend over an
//! existing store (first mapping in a process). A benchmark, not a test:
//!
//! ```text
//! cargo run --release --example store_mac_cost
//! ```

use microfaas::{Backend, BackendKind, Config, FunctionSpec, StartPath, StartRequest, VmConfig};
use snapshots::{Level, Store};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn open(store: &Path) -> Box<dyn Backend> {
    let config = Config {
        vm: VmConfig {
            store_dir: Some(store.to_owned()),
            ..VmConfig::default()
        },
        ..Config::default()
    };
    microfaas::open(BackendKind::Vm, config).expect("vm backend")
}

/// Copies the data runs of `image` into a sealed memfd (the alternative to
/// mapping the checked file): returns the time taken.
fn memfd_copy(image: &Path) -> Duration {
    let t = Instant::now();
    let src = std::fs::File::open(image).unwrap();
    let len = src.metadata().unwrap().len();
    let fd = nix::sys::memfd::memfd_create(
        c"image",
        nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING | nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .unwrap();
    let mut dst = std::fs::File::from(fd);
    dst.set_len(len).unwrap();
    // Only the file's data runs are read and copied (holes stay holes).
    use nix::unistd::{Whence, lseek};
    let mut buf = vec![0u8; 1 << 20];
    let mut off: i64 = 0;
    let end = i64::try_from(len).unwrap();
    while off < end {
        let Ok(start) = lseek(&src, off, Whence::SeekData) else {
            break;
        };
        let stop = lseek(&src, start, Whence::SeekHole).unwrap_or(end).min(end);
        let mut at = start;
        while at < stop {
            let n = buf.len().min(usize::try_from(stop - at).unwrap());
            let pos = u64::try_from(at).unwrap();
            src.read_exact_at(&mut buf[..n], pos).unwrap();
            dst.write_all_at(&buf[..n], pos).unwrap();
            at += i64::try_from(n).unwrap();
        }
        off = stop;
    }
    dst.flush().unwrap();
    use nix::fcntl::{FcntlArg, SealFlag};
    let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
    nix::fcntl::fcntl(&dst, FcntlArg::F_ADD_SEALS(seals)).unwrap();
    t.elapsed()
}

fn main() {
    let page = [0x5au8; 4096];
    let store_dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(store_dir.path()).unwrap();
        let n = 100_000;
        let t = Instant::now();
        let mut x = 0u64;
        for _ in 0..n {
            x ^= snapshots::crc64(std::hint::black_box(&page));
        }
        let crc = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            x ^= s.page_tag(std::hint::black_box(&page));
        }
        let tag = t.elapsed() / n;
        println!(
            "per 4 KiB page: CRC64 {:.2} us, keyed BLAKE3 tag {:.2} us ({x:x})",
            us(crc),
            us(tag)
        );
    }
    let functions = ["noop", "init-heavy"];
    // First deploys: base and function nodes written (tags + MAC).
    let b = open(store_dir.path());
    for f in functions {
        let t = Instant::now();
        b.deploy(&FunctionSpec::new(f, microfaas::builtin(f).unwrap())).unwrap();
        println!(
            "{f}: first deploy (writes its function node) {:.1} ms",
            us(t.elapsed()) / 1e3
        );
    }
    drop(b);
    // Store level: opening (every node's MAC), first image use (content
    // check) and a cached hit, per function node.
    let rounds = 20;
    let mut opens = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let s = Store::open(store_dir.path()).unwrap();
        opens.push(t.elapsed());
        drop(s);
    }
    let s = Store::open(store_dir.path()).unwrap();
    println!(
        "store open ({} nodes, MAC of each): median {:.0} us",
        s.nodes().len(),
        us(median(opens))
    );
    for f in functions {
        let node = s
            .nodes()
            .into_iter()
            .find(|n| n.level() == Level::Function && n.label().function.as_deref() == Some(f))
            .unwrap();
        let (mut first, mut hit, mut memfd) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let fresh = Store::open(store_dir.path()).unwrap();
            let t = Instant::now();
            let img = fresh.image(node.id()).unwrap();
            first.push(t.elapsed());
            assert!(!img.was_built());
            let t = Instant::now();
            let _ = fresh.image(node.id()).unwrap();
            hit.push(t.elapsed());
            memfd.push(memfd_copy(img.path()));
        }
        let img = s.image(node.id()).unwrap();
        println!(
            "{f}: image of {} MiB, {} non-zero pages: first use in a process (lineage + content check) {:.0} us, \
             in-process hit {:.1} us; copying it into a sealed memfd instead {:.0} us",
            img.guest_mem_bytes() >> 20,
            snapshots::total_pages(img.nonzero_ranges()),
            us(median(first)),
            us(median(hit)),
            us(median(memfd)),
        );
    }
    // Backend level: a fresh backend (a new process's caches) over the
    // existing store: deploy (finds and checks the nodes, first mapping)
    // and the first function start.
    for f in functions {
        let (mut deploys, mut starts) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let b = open(store_dir.path());
            let t = Instant::now();
            let id = b.deploy(&FunctionSpec::new(f, microfaas::builtin(f).unwrap())).unwrap();
            deploys.push(t.elapsed());
            let r = b.invoke(&id, b"", StartRequest::Force(StartPath::Function)).unwrap();
            starts.push(Duration::from_nanos(r.timings.start_ns));
        }
        println!(
            "{f}: fresh backend over the store: deploy median {:.2} ms, function start median {:.3} ms",
            us(median(deploys)) / 1e3,
            us(median(starts)) / 1e3
        );
    }
}
