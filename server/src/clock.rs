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

/// Unix ms `at_ms` as RFC 3339 to the second (`2026-11-26T10:00:00Z`); `None` before the
/// epoch or from the year 10000 on, which humantime cannot print (it would fail the write).
pub fn rfc3339(at_ms: i64) -> Option<String> {
    const YEAR_10000_MS: u64 = 253_402_300_800_000;
    let ms = u64::try_from(at_ms).ok().filter(|ms| *ms < YEAR_10000_MS)?;
    let time = UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    Some(humantime::format_rfc3339_seconds(time).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_humantime_cannot_print_are_none_not_a_panic() {
        assert_eq!(rfc3339(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            rfc3339(1_764_151_200_000).as_deref(),
            Some("2025-11-26T10:00:00Z")
        );
        assert_eq!(
            rfc3339(253_402_300_799_999).as_deref(),
            Some("9999-12-31T23:59:59Z")
        );
        assert_eq!(rfc3339(253_402_300_800_000), None);
        assert_eq!(rfc3339(i64::MAX), None);
        assert_eq!(rfc3339(-1), None);
    }
}
