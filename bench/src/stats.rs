//! Percentiles by sorting, and number formatting for the reports.

use std::collections::BTreeMap;
use std::time::Duration;

/// Order statistics of a set of durations.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub min: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl Summary {
    /// Summarises `samples` (sorted in place); `None` when there are none.
    pub fn of(samples: &mut [Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let total: Duration = samples.iter().sum();
        let count = samples.len();
        Some(Self {
            count,
            min: samples[0],
            p50: percentile(samples, 50.0),
            p90: percentile(samples, 90.0),
            p99: percentile(samples, 99.0),
            max: samples[count - 1],
            mean: total / u32::try_from(count).unwrap_or(u32::MAX),
        })
    }

    /// `p50 1.23 ms  p90 …` on one line.
    pub fn line(&self) -> String {
        format!(
            "p50 {} ms  p90 {} ms  p99 {} ms  max {} ms  (min {} ms, mean {} ms, n={})",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max),
            ms(self.min),
            ms(self.mean),
            self.count
        )
    }
}

/// Nearest-rank percentile of sorted, non-empty `sorted`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds with two decimals.
pub fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

/// `a: 1, b: 2` for a counted breakdown.
pub fn breakdown(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes as MiB with two decimals.
pub fn mib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let summary = Summary::of(&mut samples).unwrap();
        assert_eq!(summary.p50, Duration::from_millis(50));
        assert_eq!(summary.p90, Duration::from_millis(90));
        assert_eq!(summary.p99, Duration::from_millis(99));
        assert_eq!(summary.max, Duration::from_millis(100));
        assert_eq!(summary.min, Duration::from_millis(1));
        let mut one = vec![Duration::from_millis(7)];
        let summary = Summary::of(&mut one).unwrap();
        assert_eq!(summary.p50, Duration::from_millis(7));
        assert_eq!(summary.p99, Duration::from_millis(7));
        assert!(Summary::of(&mut []).is_none());
    }
}
