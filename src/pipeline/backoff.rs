use std::time::Duration;

/// Exponential backoff with jitter for retrying a sink's transient failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based): `initial · 2^attempt`, capped at `max`,
    /// then drawn uniformly from its upper half so that sinks recovering together do not retry in
    /// lockstep, yet never retry immediately.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        let ceiling_ms = u64::try_from(ceiling.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(fastrand::u64(ceiling_ms.div_ceil(2)..=ceiling_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_and_is_capped() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        for _ in 0..200 {
            let first = backoff.delay(0);
            assert!(
                (Duration::from_millis(50)..=Duration::from_millis(100)).contains(&first),
                "{first:?}"
            );
            let fourth = backoff.delay(3);
            assert!(
                (Duration::from_millis(400)..=Duration::from_millis(800)).contains(&fourth),
                "{fourth:?}"
            );
            let late = backoff.delay(40);
            assert!(
                (Duration::from_millis(2500)..=Duration::from_secs(5)).contains(&late),
                "{late:?}"
            );
        }
        let samples: std::collections::HashSet<_> = (0..50).map(|_| backoff.delay(5)).collect();
        assert!(samples.len() > 1, "jitter must vary the delay");
    }
}
