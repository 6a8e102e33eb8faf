//! The one retry pacing every long-running loop of the server and the agent uses.

use std::time::Duration;

/// Exponential backoff with jitter, capped: retries of many replicas or agents that failed
/// together spread out instead of hammering a recovering dependency in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial,
            initial,
            max,
        }
    }

    /// The delay before the next attempt: uniformly between half and all of the current step.
    pub fn delay(&mut self) -> Duration {
        let step = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let half = step / 2;
        half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// `base` spread uniformly over ±20%, so that replicas and agents started together do not
/// keep acting in lockstep.
pub fn jittered(base: Duration) -> Duration {
    let factor = 0.8 + 0.4 * fastrand::f64();
    Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.delay()).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(60)));
        assert!(delays[9] >= Duration::from_secs(30));
        backoff.reset();
        assert!(backoff.delay() <= Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_a_fifth_and_never_overflows() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
        assert!(jittered(Duration::MAX) >= Duration::MAX / 2);
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
