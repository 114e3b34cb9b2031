//! `microfaas-worker`: one language-backend worker process. Started (by
//! exec) by the dispatcher with its shared region and settings on the
//! command line and its initial function catalog on stdin.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = lang_isolation::language::worker::run(args) {
        let mut msg = format!("microfaas-worker: {e}");
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            msg.push_str(&format!(": {c}"));
            cur = c.source();
        }
        eprintln!("{msg}");
        std::process::exit(2);
    }
}
