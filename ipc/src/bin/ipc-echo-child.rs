//! The test child of `tests/child.rs`: maps the region at fd 3 (refusing a
//! region of the wrong size with exit status 2), reports the fds it was
//! started with on stdout's replacement (a pipe at fd `ECHO_REPORT_FD`, if
//! given), then answers each request `n` with `n + 1`, parking on the
//! request ring's tail while idle; exits when its parent dies.

#[path = "../../tests/echo_protocol.rs"]
#[allow(dead_code)]
mod echo_protocol;

use echo_protocol::{HANG, REGION_BYTES, header, rings};
use ipc::futex::{self, Woken};
use ipc::region::SharedRegion;
use ipc::spawn::ParentWatch;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    fds
}

fn main() {
    let parent = ParentWatch::now();
    // The directory read itself holds one fd, which shows in the list: the
    // parent allows for exactly one number it did not give.
    let fds = open_fds();
    if let Some(n) = std::env::var("ECHO_REPORT_FD").ok().and_then(|v| v.parse::<i32>().ok()) {
        // SAFETY: the parent passed a pipe's write end at this number, and
        // nothing else in this process owns it.
        let mut report = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(n) });
        let _ = writeln!(report, "{}", fds.join(" "));
    }
    // SAFETY: fd 3 is the region the parent passed; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let region = match SharedRegion::from_fd(fd, REGION_BYTES) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ipc-echo-child: {e}");
            std::process::exit(2);
        }
    };
    let h = header(&region);
    let (requests, replies) = rings(&region);
    if let Err(e) = ipc::robust::register_death_notice(&h.alive) {
        eprintln!("ipc-echo-child: no death notice: {e}");
        std::process::exit(3);
    }
    h.ready.store(1, Ordering::Release);
    futex::wake_all(&h.ready);
    loop {
        if let Some(n) = requests.pop() {
            if n == HANG {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    if !parent.parent_alive() {
                        return;
                    }
                }
            }
            while replies.try_push(n.wrapping_add(1)).is_err() {
                std::thread::yield_now();
            }
            h.answered.fetch_add(1, Ordering::Release);
            futex::wake_all(replies.tail_word());
            continue;
        }
        let tail = requests.tail_word();
        h.parked.store(1, Ordering::SeqCst);
        let seen = tail.load(Ordering::SeqCst);
        if requests.is_empty()
            && futex::wait(tail, seen, Some(Duration::from_millis(200))) == Woken::TimedOut
            && !parent.parent_alive()
        {
            return;
        }
        h.parked.store(0, Ordering::SeqCst);
    }
}
