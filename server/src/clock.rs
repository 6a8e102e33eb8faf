//! Wall-clock time for records people read; decisions take it as an argument.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Whole milliseconds of `duration`, saturating, as Redis and the wire want them.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch; 0 if the clock is before it.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
