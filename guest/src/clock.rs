//! TSC -> host `CLOCK_MONOTONIC` conversion with the host's calibration.

/// Converts TSC readings to host monotonic nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    tsc_base: u64,
    mono_base_ns: u64,
    ns_per_tsc_q32: u64,
}

impl Clock {
    /// A clock from the boot info's calibration triple.
    pub const fn new(tsc_base: u64, mono_base_ns: u64, ns_per_tsc_q32: u64) -> Self {
        Self {
            tsc_base,
            mono_base_ns,
            ns_per_tsc_q32,
        }
    }

    /// Moves the base to (`tsc`, `mono_ns`), keeping the rate. A base that
    /// would go backwards in host time is ignored.
    pub fn rebase(&mut self, tsc: u64, mono_ns: u64) {
        if mono_ns >= self.mono_base_ns {
            self.tsc_base = tsc;
            self.mono_base_ns = mono_ns;
        }
    }

    /// Host monotonic ns at TSC reading `tsc` (saturating; never before the base).
    pub fn ns_at(&self, tsc: u64) -> u64 {
        let ticks = u128::from(tsc.saturating_sub(self.tsc_base));
        let ns = (ticks * u128::from(self.ns_per_tsc_q32)) >> 32;
        self.mono_base_ns.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// The 32.32 ns-per-tick multiplier for a TSC of `tsc_khz` kHz (0 if unknown).
pub fn ns_per_tsc_q32(tsc_khz: u32) -> u64 {
    if tsc_khz == 0 {
        return 0;
    }
    // 1e6 ns per ms / (ticks per ms) in 32.32.
    (1_000_000u64 << 32) / u64::from(tsc_khz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_ticks_to_ns() {
        let c = Clock::new(1000, 5_000, ns_per_tsc_q32(2_000_000)); // 2 GHz
        assert_eq!(c.ns_at(1000), 5_000);
        assert_eq!(c.ns_at(3000), 6_000);
        assert_eq!(c.ns_at(0), 5_000); // before the base: clamps
        let one_sec = c.ns_at(1000 + 2_000_000_000);
        assert!((one_sec - 5_000).abs_diff(1_000_000_000) < 10);
    }

    #[test]
    fn rebase_moves_forward_only() {
        let mut c = Clock::new(0, 100, 1 << 32); // 1 ns per tick
        c.rebase(50, 1_000);
        assert_eq!(c.ns_at(60), 1_010);
        c.rebase(70, 500); // backwards: ignored
        assert_eq!(c.ns_at(60), 1_010);
    }

    #[test]
    fn unknown_frequency_is_zero() {
        assert_eq!(ns_per_tsc_q32(0), 0);
    }
}
