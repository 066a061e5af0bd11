//! Retry timing: jittered exponential backoff and `Retry-After`.

use std::time::{Duration, SystemTime};

/// First backoff step; doubled per attempt.
const BASE_DELAY: Duration = Duration::from_millis(100);
/// No single wait is longer than this, whatever the attempt count or the server says:
/// a blocked reader is better served by an error it can report than by a long stall.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// The wait before retry number `attempt` (0-based): `BASE * 2^attempt`, capped, with
/// "equal jitter" (half fixed, half random) so that many readers failing together do not
/// retry in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let exp = BASE_DELAY.saturating_mul(1u32 << attempt.min(16));
    let capped = exp.min(MAX_DELAY);
    let half = capped / 2;
    let jitter_ms = rand::random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter_ms)
}

/// Parses `Retry-After`: delta-seconds or an HTTP date (relative to `now`). Dates in the
/// past mean "now". Garbage gives `None`: the caller falls back to its own backoff.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["", "-1", "soon", "1.5", "Sun, 99 Nov 1994 08:49:47 GMT"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            let full = BASE_DELAY
                .saturating_mul(1u32 << attempt.min(16))
                .min(MAX_DELAY);
            assert!(
                d >= full / 2 && d <= full + Duration::from_millis(1),
                "{attempt}: {d:?}"
            );
        }
    }
}
