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

/// When the watchdog must look again, given the time `now_ns`, the
/// deadlines the workers have published (`0` = none armed), the smallest
/// budget any request can carry (`min_budget_ns`: a request not yet armed,
/// queued or submitted later, is due no earlier than `now_ns` plus that),
/// the promised preemption latency `interval_ns` and how often deaths are
/// looked for while work is outstanding (`reap_ns`). Pure.
///
/// A deadline still ahead is woken for exactly; one already passed (its
/// worker signalled, a kill pending after the grace) is looked at again
/// every `interval_ns`. Nothing is checked more often than that unless a
/// deadline falls sooner, and between deadlines the watchdog sleeps, so a
/// stream of short requests does not wake it (and preempt its caller's
/// core) every interval.
pub fn next_wake(
    now_ns: u64,
    deadlines: impl IntoIterator<Item = u64>,
    min_budget_ns: u64,
    interval_ns: u64,
    reap_ns: u64,
) -> u64 {
    let interval = interval_ns.max(1);
    let not_armed = min_budget_ns.max(interval).min(reap_ns.max(interval));
    let mut wake = now_ns.saturating_add(not_armed);
    for deadline in deadlines {
        let at = match deadline {
            0 => continue,
            d if d > now_ns => d,
            _ => now_ns.saturating_add(interval),
        };
        wake = wake.min(at);
    }
    wake
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn without_deadlines_it_sleeps_the_smallest_budget_or_the_reap_period() {
        assert_eq!(next_wake(1000, [], 10 * MS, 50_000, MS), 1000 + MS);
        assert_eq!(next_wake(1000, [0, 0], 300_000, 50_000, MS), 1000 + 300_000);
        // Never more often than the interval, even for tinier budgets.
        assert_eq!(next_wake(1000, [], 10, 50_000, MS), 1000 + 50_000);
        // A reap period below the interval does not make it spin.
        assert_eq!(next_wake(1000, [], 10 * MS, 50_000, 0), 1000 + 50_000);
    }

    #[test]
    fn it_wakes_at_the_earliest_armed_deadline() {
        let now = 5 * MS;
        assert_eq!(
            next_wake(now, [now + 400_000, now + 7_000], 10 * MS, 50_000, MS),
            now + 7_000
        );
        assert_eq!(next_wake(now, [now + 2 * MS], 10 * MS, 50_000, MS), now + MS);
    }

    #[test]
    fn a_passed_deadline_is_rechecked_every_interval() {
        let now = 5 * MS;
        assert_eq!(next_wake(now, [now, now + MS / 2], 10 * MS, 50_000, MS), now + 50_000);
        assert_eq!(next_wake(now, [1], 10 * MS, 50_000, MS), now + 50_000);
    }

    #[test]
    fn no_request_can_be_due_before_the_wake_unnoticed() {
        // Any request armed after `now` (budget >= min_budget) is due at or
        // after the wake, or within `interval` of it when the budget is
        // below the interval.
        for min_budget in [1, 20_000, 50_000, 700_000, 3 * MS] {
            for budget in [min_budget, min_budget + 1, 10 * MS] {
                let now = 9 * MS;
                let wake = next_wake(now, [], min_budget, 50_000, MS);
                for start in [now, now + 1, now + 30_000] {
                    let due = start + budget;
                    assert!(wake <= due.max(now + 50_000), "{min_budget} {budget} {start}");
                }
            }
        }
    }

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
