//! A token bucket per caller, for calls a misbehaving client could repeat without end (an
//! agent's status reports, each stored and fanned out to every replica).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Calls per second each caller may sustain, with bursts up to `burst`.
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimit {
    /// `per_second` sustained, `burst` at once.
    pub fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `caller` may make one more call at `now`.
    pub fn allow(&self, caller: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets
            .entry(caller.to_owned())
            .or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_caller() {
        let limit = RateLimit::new(10.0, 5.0);
        let start = Instant::now();
        for _ in 0..5 {
            assert!(limit.allow("prod", start));
        }
        assert!(!limit.allow("prod", start), "burst spent");
        assert!(limit.allow("staging", start), "per caller");
        assert!(!limit.allow("prod", start + Duration::from_millis(50)));
        assert!(
            limit.allow("prod", start + Duration::from_millis(150)),
            "refilled"
        );
        // Never more than the burst, however long the pause.
        let later = start + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(limit.allow("prod", later));
        }
        assert!(!limit.allow("prod", later));
    }
}
