//! Human durations such as `24h`, `90d`, `10y`.

use crate::Error;
use std::time::Duration;

/// Longest duration accepted anywhere (100 years).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 366 * 86_400);

/// Parses a duration like `15m`, `24h`, `90d` or `3y` (a year is 365.25 days).
pub fn parse_duration(s: &str) -> Result<Duration, Error> {
    let d = humantime::parse_duration(s.trim()).map_err(|_| Error::Duration(s.to_string()))?;
    // Also keeps `now + d` far from the calendar's end, so it cannot overflow.
    if d.is_zero() || d > MAX_DURATION {
        return Err(Error::Duration(s.to_string()));
    }
    Ok(d)
}

/// Formats a duration compactly for messages.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Serde helper for optional human durations in config and policy files.
pub mod serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    /// Deserialize an optional human duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| super::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert!(parse_duration("10y").unwrap() > Duration::from_secs(3650 * 86_400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("20000y").is_err());
    }
}
