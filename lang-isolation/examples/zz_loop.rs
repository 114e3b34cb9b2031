use lang_isolation::language::{Dispatcher, DispatcherConfig, Start};
use std::time::{Duration, Instant};
fn main() {
    let dir = std::path::Path::new("/work/targets/language/microfaas-functions");
    let mut c = DispatcherConfig::new("/work/targets/language/release/microfaas-worker");
    c.workers = Some(1);
    let d = Dispatcher::start(c).unwrap();
    let f = d.deploy(&dir.join("noop.so"), Duration::from_millis(100)).unwrap();
    println!("worker pid {}", d.stats().worker_pids[0]);
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(4) { d.invoke(f, b"", Start::Warm).unwrap(); n += 1; }
    println!("{n} invocations");
}
