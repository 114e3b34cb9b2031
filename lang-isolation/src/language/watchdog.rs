//! The watchdog's decision rule, pure: given what a worker published in
//! shared memory (the in-flight request and its deadline) and the time,
//! signal it, kill it, or leave it alone.

/// What to do about one worker now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchAction {
    /// Within budget, or idle.
    Nothing,
    /// Past its deadline: send the preemption signal (again).
    Signal,
    /// Past its deadline by more than the grace: the function does not
    /// yield; kill the worker.
    Kill,
}

/// Since when the watchdog has seen request `seq` overdue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overdue {
    /// The overdue request.
    pub seq: u64,
    /// When it was first seen overdue.
    pub since_ns: u64,
}

/// Decides for one worker. `signals` is false in periodic mode (the worker
/// preempts itself; the watchdog only escalates). `track` is the watchdog's
/// memory for this worker.
pub fn decide(
    signals: bool,
    seq: u64,
    deadline_ns: u64,
    now_ns: u64,
    grace_ns: u64,
    track: &mut Option<Overdue>,
) -> WatchAction {
    if seq == 0 || deadline_ns == 0 || now_ns < deadline_ns {
        *track = None;
        return WatchAction::Nothing;
    }
    let since = match *track {
        Some(o) if o.seq == seq => o.since_ns,
        _ => {
            *track = Some(Overdue { seq, since_ns: now_ns });
            now_ns
        }
    };
    if now_ns.saturating_sub(since) > grace_ns {
        WatchAction::Kill
    } else if signals {
        WatchAction::Signal
    } else {
        WatchAction::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_and_in_budget_cost_nothing() {
        let mut t = None;
        assert_eq!(decide(true, 0, 0, 100, 10, &mut t), WatchAction::Nothing);
        assert_eq!(decide(true, 5, 200, 100, 10, &mut t), WatchAction::Nothing);
        assert_eq!(decide(true, 5, 0, 100, 10, &mut t), WatchAction::Nothing);
        assert_eq!(t, None);
    }

    #[test]
    fn signal_then_kill_after_grace() {
        let mut t = None;
        assert_eq!(decide(true, 5, 100, 100, 10, &mut t), WatchAction::Signal);
        assert_eq!(decide(true, 5, 100, 110, 10, &mut t), WatchAction::Signal);
        assert_eq!(decide(true, 5, 100, 111, 10, &mut t), WatchAction::Kill);
        // A new request starts a new grace period.
        assert_eq!(decide(true, 6, 105, 120, 10, &mut t), WatchAction::Signal);
        assert_eq!(t, Some(Overdue { seq: 6, since_ns: 120 }));
    }

    #[test]
    fn periodic_mode_only_escalates() {
        let mut t = None;
        assert_eq!(decide(false, 5, 100, 100, 10, &mut t), WatchAction::Nothing);
        assert_eq!(decide(false, 5, 100, 200, 10, &mut t), WatchAction::Kill);
    }
}
