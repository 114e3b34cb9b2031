//! What a language cold start costs inside the worker, by step, with the
//! runtime's own loader against `dlopen` of the same artifact:
//!
//! `cargo run --release -p lang-isolation --example loader_bench [-- N [FUNCTION]]`
//!
//! * parse: read the sealed memfd and check it into a plan (once per
//!   artifact in a worker, at deploy);
//! * map: a fresh private image mapped and relocated, then unmapped;
//! * cold: map + instance in recycled memory + `init` + `handle` + unmap
//!   (what the worker's cold path does);
//! * dlopen: `dlopen` + 3 × `dlsym` + `dlclose` of the same bytes in a file
//!   (the old cold path's load step, without its `init` and `handle`).

use lang_isolation::runtime::{ArtifactImage, Instance, InstanceConfig, LoadedFunction, SealedArtifact};
use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

fn median_us(mut ns: Vec<u64>) -> (f64, f64) {
    ns.sort_unstable();
    let at = |p: usize| ns[(ns.len() - 1) * p / 100] as f64 / 1000.0;
    (at(50), at(99))
}

fn time(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..n / 10 {
        f();
    }
    let samples = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
        })
        .collect();
    median_us(samples)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let name = std::env::args().nth(2).unwrap_or_else(|| "noop".to_owned());
    let root = std::env::temp_dir().join("microfaas-loader-bench");
    let functions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions");
    let mut opts = microfaas_builder::BuildOptions::new(root.join("cache"));
    let so = root.join(format!("{name}.so"));
    opts.out = Some(so.clone());
    microfaas_builder::build(&functions.join(&name), &opts).expect("building the function");
    let bytes = std::fs::read(&so).expect("reading the artifact");

    let sealed = || SealedArtifact::create(&name, &bytes).expect("memfd");
    let image = ArtifactImage::parse(sealed()).expect("parse");
    let plan = image.plan();
    println!(
        "{name}: {} bytes, {} segments, {} relocations, span {} KiB, {} mappings at most; {n} rounds (us)",
        bytes.len(),
        plan.segments.len(),
        plan.relocations.len(),
        plan.span / 1024,
        plan.max_mappings()
    );
    println!("{:<34} {:>8} {:>8}", "step", "p50", "p99");
    let row = |what: &str, (p50, p99): (f64, f64)| println!("{what:<34} {p50:>8.2} {p99:>8.2}");

    let file = sealed();
    row(
        "parse (pread + check)",
        time(n, || {
            let f = SealedArtifact::from_fd(file.as_fd().try_clone_to_owned().expect("dup")).expect("sealed");
            drop(ArtifactImage::parse(f).expect("parse"));
        }),
    );
    row(
        "map + relocate + unmap",
        time(n, || drop(LoadedFunction::load(&image).expect("load"))),
    );
    let config = InstanceConfig::default();
    let mut shell = Some(
        Instance::new(LoadedFunction::load(&image).expect("load"), &config)
            .expect("instance")
            .into_shell(),
    );
    row(
        "cold: map, init, handle, unmap",
        time(n, || {
            let function = LoadedFunction::load(&image).expect("load");
            let mut instance = Instance::from_shell(function, shell.take().expect("shell")).expect("shell");
            instance.init().expect("init");
            drop(instance.handle(b"").expect("handle"));
            shell = Some(instance.into_shell());
        }),
    );

    let path = CString::new(so.as_os_str().as_encoded_bytes()).expect("path");
    row(
        "dlopen + 3 dlsym + dlclose",
        time(n, || {
            // SAFETY: the artifact was built and verified by `microfaas build`:
            // it has no initialisers, so loading it runs no code of its own.
            unsafe {
                let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                assert!(!h.is_null(), "dlopen failed");
                for sym in [c"MICROFAAS_ABI_VERSION", c"microfaas_v1_init", c"microfaas_v1_handle"] {
                    assert!(!libc::dlsym(h, sym.as_ptr()).is_null());
                }
                libc::dlclose(h);
            }
        }),
    );
}
