//! Latency distributions: an HDR histogram per series, percentiles in µs.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies of one series, recorded in nanoseconds.
#[derive(Debug, Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

/// Percentiles of a series in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub median_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest sample.
    pub max_us: f64,
}

impl Latencies {
    /// An empty series (1 ns to 1,000 s, 3 significant digits).
    pub fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 1_000_000_000_000, 3).expect("valid histogram bounds"),
        }
    }

    /// Records one sample in nanoseconds (clamped into the histogram's range).
    pub fn record_ns(&mut self, ns: u64) {
        self.hist.saturating_record(ns.max(1));
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// The percentiles.
    pub fn summary(&self) -> Summary {
        Summary {
            count: self.hist.len(),
            median_us: us(self.hist.value_at_quantile(0.5)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            max_us: us(self.hist.max()),
        }
    }

    /// `(latency_us, cumulative fraction)` points of the CDF, for plots.
    pub fn cdf_points(&self) -> Vec<(f64, f64)> {
        let total = self.hist.len();
        if total == 0 {
            return Vec::new();
        }
        let mut points = Vec::new();
        let mut seen = 0u64;
        for v in self.hist.iter_recorded() {
            seen += v.count_at_value();
            points.push((us(v.value_iterated_to()), ratio(seen, total)));
        }
        points
    }
}

/// Nanoseconds as microseconds.
#[allow(clippy::cast_precision_loss)]
pub fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// `a / b` as a float.
#[allow(clippy::cast_precision_loss)]
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_series() {
        let mut l = Latencies::new();
        for ns in 1..=10_000u64 {
            l.record_ns(ns * 1000);
        }
        let s = l.summary();
        assert_eq!(s.count, 10_000);
        assert!((s.median_us - 5000.0).abs() < 10.0, "{s:?}");
        assert!((s.p99_us - 9900.0).abs() < 20.0, "{s:?}");
        assert!((s.p999_us - 9990.0).abs() < 20.0, "{s:?}");
        let cdf = l.cdf_points();
        assert!((cdf.last().unwrap().1 - 1.0).abs() < 1e-9);
        assert!(cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
