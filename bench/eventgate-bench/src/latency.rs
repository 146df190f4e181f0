//! Latency histograms: HdrHistogram with 3 significant digits (a value is
//! reported to within 0.1 %), in microseconds. Owns only the counting; what
//! a latency measures (publish → receipt, first or last receipt of an
//! event) is the caller's.

use hdrhistogram::Histogram;

/// Significant digits kept: 0.1 % resolution.
const SIGFIG: u8 = 3;

/// Largest latency recorded as itself (one hour, in µs); longer ones count as it.
const MAX_US: u64 = 3_600_000_000;

/// Latencies in microseconds. The histogram is made on the first value (it
/// grows with the largest one), so that a client that receives nothing (the
/// idle mode holds 19,000) costs nothing. Counts are `u32`: no bucket of a
/// run reaches 4 × 10⁹ deliveries.
#[derive(Default, Clone)]
pub(crate) struct Latencies(Option<Histogram<u32>>);

impl Latencies {
    /// Counts one latency.
    pub(crate) fn record(&mut self, us: u64) {
        if self.0.is_none() {
            self.0 = Histogram::new(SIGFIG).ok();
        }
        if let Some(h) = self.0.as_mut() {
            // Auto-resizing: only an allocation failure could refuse it.
            let _ = h.record(us.min(MAX_US));
        }
    }

    /// Adds another histogram's counts to this one.
    pub(crate) fn merge(&mut self, other: &Latencies) {
        let Some(theirs) = &other.0 else { return };
        match self.0.as_mut() {
            Some(mine) => {
                let _ = mine.add(theirs);
            }
            None => self.0 = Some(theirs.clone()),
        }
    }

    /// The value at quantile `q` (0..=1), 0 when empty.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        self.0.as_ref().map_or(0, |h| h.value_at_quantile(q))
    }

    /// The largest value, 0 when empty.
    pub(crate) fn max(&self) -> u64 {
        self.0.as_ref().map_or(0, Histogram::max)
    }

    /// The mean, 0 when empty.
    pub(crate) fn mean(&self) -> f64 {
        self.0
            .as_ref()
            .filter(|h| !h.is_empty())
            .map_or(0.0, Histogram::mean)
    }
}

#[cfg(test)]
mod tests {
    use super::Latencies;

    #[test]
    fn quantiles_are_within_a_tenth_of_a_percent() {
        let mut a = Latencies::default();
        let mut b = Latencies::default();
        for us in 1..=5_000u64 {
            a.record(us * 10);
        }
        for us in 5_001..=10_000u64 {
            b.record(us * 10);
        }
        a.merge(&b);
        let near = |got: u64, want: f64| (got as f64 - want).abs() <= want * 0.001 + 1.0;
        assert!(near(a.quantile(0.5), 50_000.0), "{}", a.quantile(0.5));
        assert!(near(a.quantile(0.99), 99_000.0), "{}", a.quantile(0.99));
        assert!(near(a.max(), 100_000.0), "{}", a.max());
        assert!((a.mean() - 50_005.0).abs() < 60.0, "{}", a.mean());
    }

    #[test]
    fn an_empty_histogram_reports_zero_and_merges_into_nothing() {
        let mut a = Latencies::default();
        a.merge(&Latencies::default());
        assert_eq!((a.quantile(0.99), a.max(), a.mean()), (0, 0, 0.0));
        let mut b = Latencies::default();
        b.record(7);
        a.merge(&b);
        assert_eq!(a.quantile(0.5), 7);
    }
}
