//! Token buckets per key (an ACME account, a requester): `rate` tokens a
//! minute, holding at most a minute's worth. Time is passed in, so the
//! limiter is pure and tests move the clock.

use std::collections::HashMap;

/// Keys tracked before idle, full buckets are dropped.
const MAX_KEYS: usize = 100_000;

/// Per-key token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u32,
    /// Tokens left and when last refilled (unix ms), per key.
    buckets: HashMap<String, (f64, i64)>,
}

impl RateLimiter {
    /// `rate` per minute per key; 0 means no limit.
    pub fn new(rate: u32) -> RateLimiter {
        RateLimiter {
            rate,
            buckets: HashMap::new(),
        }
    }

    /// The configured rate per minute (0: unlimited).
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Takes a token for `key` at `now_ms`; `Err(seconds)` until the next
    /// one when none is left.
    pub fn take(&mut self, key: &str, now_ms: i64) -> Result<(), u64> {
        if self.rate == 0 {
            return Ok(());
        }
        let (cap, per_ms) = (f64::from(self.rate), f64::from(self.rate) / 60_000.0);
        if self.buckets.len() >= MAX_KEYS {
            // Full buckets carry no state worth keeping.
            self.buckets
                .retain(|_, (t, at)| *t + (now_ms - *at) as f64 * per_ms < cap);
        }
        let (tokens, at) = self.buckets.entry(key.to_string()).or_insert((cap, now_ms));
        *tokens = (*tokens + (now_ms - *at).max(0) as f64 * per_ms).min(cap);
        *at = now_ms;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        Err(((1.0 - *tokens) / per_ms / 1000.0).ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimiter;

    #[test]
    fn allows_a_minute_of_burst_then_refills() {
        let mut l = RateLimiter::new(2);
        assert!(l.take("a", 0).is_ok());
        assert!(l.take("a", 0).is_ok());
        // Empty: one token comes back every 30 s.
        assert_eq!(l.take("a", 0), Err(30));
        assert_eq!(l.take("a", 15_000), Err(15));
        // Other keys have their own budget.
        assert!(l.take("b", 15_000).is_ok());
        assert!(l.take("a", 30_000).is_ok());
        assert!(l.take("a", 30_000).is_err());
        // Never more than a minute's worth.
        assert!(l.take("a", 10_000_000).is_ok());
        assert!(l.take("a", 10_000_000).is_ok());
        assert!(l.take("a", 10_000_000).is_err());
        // 0 means no limit.
        let mut off = RateLimiter::new(0);
        assert!((0..1000).all(|_| off.take("a", 0).is_ok()));
    }
}
