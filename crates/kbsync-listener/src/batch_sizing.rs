//! How many keys a worker claims: about as many as it processes in
//! `daemon.batch_duration`. A batch is visible only when it commits, so an edit that
//! arrives behind a large backlog (another tenant's import, 64 writers editing at
//! once) waits for the batch in progress and then its own; sizing batches by time, not
//! by count, bounds that wait whatever the per-key cost is (a loaded database, long
//! texts, the local model's CPU time).

use std::time::Duration;

/// One worker's claim size, from the throughput of its own recent batches.
#[derive(Debug)]
pub struct BatchSizer {
    max: usize,
    target: Duration,
    keys_per_second: Option<f64>,
}

impl BatchSizer {
    pub fn new(max: usize, target: Duration) -> Self {
        Self {
            max,
            target,
            keys_per_second: None,
        }
    }

    /// Keys to claim next: `max` until a batch has been measured, then what the
    /// measured rate processes in the target time, between 1 and `max`.
    pub fn next(&self) -> usize {
        match self.keys_per_second {
            None => self.max,
            Some(rate) => ((rate * self.target.as_secs_f64()) as usize).clamp(1, self.max),
        }
    }

    /// A batch of `keys` took `elapsed` (time that a smaller batch would not shorten
    /// per key, such as a remote provider's response time, already taken out).
    pub fn record(&mut self, keys: usize, elapsed: Duration) {
        if keys == 0 {
            return;
        }
        // A batch shorter than the clock can tell counts as 0.1 ms: fast, not infinite.
        let rate = keys as f64 / elapsed.as_secs_f64().max(1e-4);
        // Half the weight to the newest batch: follows a change of load within a few
        // batches without swinging on one slow or fast one.
        self.keys_per_second = Some(match self.keys_per_second {
            None => rate,
            Some(old) => 0.5 * old + 0.5 * rate,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(200);

    /// Simulates batches that cost `fixed` plus `per_key` for each key.
    fn settle(sizer: &mut BatchSizer, fixed: Duration, per_key: Duration, rounds: usize) {
        for _ in 0..rounds {
            let keys = sizer.next();
            sizer.record(keys, fixed + per_key * keys as u32);
        }
    }

    #[test]
    fn the_first_claim_is_the_largest_batch() {
        assert_eq!(BatchSizer::new(256, TARGET).next(), 256);
    }

    #[test]
    fn slow_keys_shrink_batches_to_the_target_duration() {
        let mut sizer = BatchSizer::new(256, TARGET);
        // 20 ms per key (a saturated database): 256 keys would take 5 s.
        settle(
            &mut sizer,
            Duration::from_millis(5),
            Duration::from_millis(20),
            20,
        );
        let keys = sizer.next();
        let took = Duration::from_millis(5) + Duration::from_millis(20) * keys as u32;
        assert!(
            (8..=10).contains(&keys) && took <= Duration::from_millis(250),
            "{keys} keys, {took:?}"
        );
    }

    #[test]
    fn fast_keys_grow_batches_back_to_the_maximum() {
        let mut sizer = BatchSizer::new(256, TARGET);
        settle(
            &mut sizer,
            Duration::from_millis(5),
            Duration::from_millis(50),
            10,
        );
        assert!(sizer.next() < 8, "{}", sizer.next());
        // The load goes away: 0.1 ms per key.
        settle(
            &mut sizer,
            Duration::from_millis(5),
            Duration::from_micros(100),
            10,
        );
        assert_eq!(sizer.next(), 256);
    }

    #[test]
    fn a_very_slow_key_still_claims_one_and_an_empty_claim_changes_nothing() {
        let mut sizer = BatchSizer::new(256, TARGET);
        sizer.record(1, Duration::from_secs(30));
        assert_eq!(sizer.next(), 1);
        sizer.record(0, Duration::from_millis(1));
        assert_eq!(sizer.next(), 1);
        sizer.record(50, Duration::ZERO);
        assert!(sizer.next() > 1);
    }
}
