//! Builds one function crate: `cargo run -p microfaas-builder --example build_one -- DIR [CACHE]`.
fn main() {
    let mut args = std::env::args_os().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: build_one DIR [CACHE]"));
    let cache = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(microfaas_builder::default_cache_dir);
    let start = std::time::Instant::now();
    match microfaas_builder::build(&dir, &microfaas_builder::BuildOptions::new(cache)) {
        Ok(b) => println!(
            "{} ({}) in {:?}",
            b.path.display(),
            if b.cached { "cached" } else { "compiled" },
            start.elapsed()
        ),
        Err(e) => {
            let mut msg = e.to_string();
            let mut s = std::error::Error::source(&e);
            while let Some(c) = s {
                msg.push_str(&format!(": {c}"));
                s = c.source();
            }
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}
