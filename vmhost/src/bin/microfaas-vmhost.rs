//! `microfaas-vmhost`: the `vm` backend's VMM host process (see the
//! `vmhost` crate). Exec'd by the backend with its fds at fixed numbers;
//! exits when the backend closes the control socket.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match vmhost::HostArgs::parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("microfaas-vmhost: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = vmhost::host::run(&args) {
        eprintln!("microfaas-vmhost: {e}");
        std::process::exit(1);
    }
}
