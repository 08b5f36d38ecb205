//! How many keys a worker claims. A batch is visible only when it commits, so an edit
//! that arrives behind a large backlog (another tenant's import, 64 writers editing at
//! once) waits for the batch in progress and then its own: batches are sized to take
//! about `daemon.batch_duration`, whatever the per-key cost is (a loaded database, long
//! texts, the local model's CPU time). But every batch also pays a fixed cost (its
//! claim, reads and write round trips; on a saturated server each of them waits for
//! CPU), and batches shorter than that cost would spend most of their time on it: a
//! batch is given at least twice its fixed cost, so that at least half of the time
//! goes to the keys. Both costs are estimated from the worker's recent batches.
//!
//! A remote provider's response time counts too: a batch commits only after its last
//! response, so 256 keys in requests of 16 at 200 ms, two in flight, held an edit
//! behind them for 1.6 s, and when a backlog ran out one daemon sat on such a batch
//! while another had nothing left (2 daemons gave 1.80× one). Claims stay whole
//! requests, so a smaller batch sends no more requests than a large one would, under
//! a rate limit or not; and at least two, so that while one worker does its batch's
//! database work the requests other workers queued keep the provider's slots busy
//! (with one request a batch, a daemon reached 135 of the provider's 160 rows/s).

use std::time::Duration;

/// How fast past batches are forgotten: each older batch weighs this much less.
const DECAY: f64 = 0.8;
/// Requests a batch holds at least when the provider's response time is most of a
/// key's cost: one worker's database work is covered by the others' queued requests.
const REQUESTS_AT_LEAST: usize = 2;

/// One worker's claim size, from a fit of `time = fixed + keys × per_key` over its
/// recent batches (least squares, exponentially weighted).
#[derive(Debug)]
pub struct BatchSizer {
    max: usize,
    target: f64,
    /// Weighted sums: batches, keys, seconds, keys², keys × seconds.
    sums: [f64; 5],
    fixed: f64,
    per_key: Option<f64>,
    /// Weighted sums of a remote provider's response time (seconds) and of keys.
    remote: [f64; 2],
    /// Inputs per embedding request: claims are rounded down to whole requests.
    request_size: usize,
}

impl BatchSizer {
    pub fn new(max: usize, target: Duration) -> Self {
        Self {
            max,
            target: target.as_secs_f64(),
            sums: [0.0; 5],
            fixed: 0.0,
            per_key: None,
            remote: [0.0; 2],
            request_size: 1,
        }
    }

    /// Claims in whole requests of `inputs` (from one request's worth up): a request
    /// costs a provider the same time full or not, so a batch of 186 one-chunk keys in
    /// requests of 16 paid for 12 requests' time and filled 11.6 of them.
    pub fn in_requests_of(mut self, inputs: usize) -> Self {
        self.request_size = inputs.max(1);
        self
    }

    /// Keys to claim next: `max` until a batch has been measured; then as many as fit
    /// in the target time (their own work and the provider's response time), or in
    /// twice the fixed cost when that is longer.
    pub fn next(&self) -> usize {
        let Some(per_key) = self.per_key else {
            return self.max;
        };
        let [remote_secs, remote_keys] = self.remote;
        let remote_per_key = if remote_keys > 0.0 {
            remote_secs / remote_keys
        } else {
            0.0
        };
        let duration = self.target.max(2.0 * self.fixed);
        let keys =
            (((duration - self.fixed) / (per_key + remote_per_key)) as usize).clamp(1, self.max);
        let provider_bound = remote_per_key > per_key;
        if provider_bound && keys < REQUESTS_AT_LEAST * self.request_size {
            (REQUESTS_AT_LEAST * self.request_size).min(self.max)
        } else if keys >= self.request_size {
            keys - keys % self.request_size
        } else {
            keys
        }
    }

    /// A batch of `keys` took `local` of its own work (reads, chunking, the local
    /// model, the write) and waited `remote` for a remote provider's responses.
    pub fn record(&mut self, keys: usize, local: Duration, remote: Duration) {
        if keys == 0 {
            return;
        }
        let (n, t) = (keys as f64, local.as_secs_f64());
        for (sum, value) in self.remote.iter_mut().zip([remote.as_secs_f64(), n]) {
            *sum = DECAY * *sum + value;
        }
        for (sum, value) in self.sums.iter_mut().zip([1.0, n, t, n * n, n * t]) {
            *sum = DECAY * *sum + value;
        }
        let [w, sn, st, snn, snt] = self.sums;
        let (mean_n, mean_t) = (sn / w, st / w);
        let variance = snn / w - mean_n * mean_n;
        // A floor per key: a batch shorter than the clock can tell is fast, not free.
        const FLOOR: f64 = 1e-6;
        if variance > (0.1 * mean_n).powi(2) {
            // Batches of different sizes: fit both costs.
            let per_key = ((snt / w - mean_n * mean_t) / variance).max(FLOOR);
            self.fixed = (mean_t - per_key * mean_n).max(0.0);
            self.per_key = Some(per_key);
        } else {
            // Batches of one size tell nothing about the split: keep the fixed cost
            // and give the rest of the change to the keys.
            self.per_key = Some(((t - self.fixed) / n).max(FLOOR));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(200);

    /// Batches that cost `fixed` plus `per_key` for each key; the size settled on.
    fn settle(sizer: &mut BatchSizer, fixed: Duration, per_key: Duration) -> usize {
        for _ in 0..30 {
            let keys = sizer.next();
            sizer.record(keys, fixed + per_key * keys as u32, Duration::ZERO);
        }
        sizer.next()
    }

    #[test]
    fn claims_are_whole_requests_once_they_fill_one() {
        // 186 keys fit the target; requests of 16 make that 176 (11 full requests).
        let mut sizer = BatchSizer::new(256, TARGET).in_requests_of(16);
        let keys = settle(
            &mut sizer,
            Duration::from_millis(14),
            Duration::from_millis(1),
        );
        assert_eq!(keys % 16, 0, "{keys}");
        assert!((160..=192).contains(&keys), "{keys}");
        // Below one request's worth, the target still rules.
        let mut slow = BatchSizer::new(256, TARGET).in_requests_of(16);
        let keys = settle(
            &mut slow,
            Duration::from_millis(5),
            Duration::from_millis(20),
        );
        assert!((8..=10).contains(&keys), "{keys}");
    }

    #[test]
    fn the_first_claim_is_the_largest_batch() {
        assert_eq!(BatchSizer::new(256, TARGET).next(), 256);
    }

    #[test]
    fn slow_keys_shrink_batches_to_the_target_duration() {
        let mut sizer = BatchSizer::new(256, TARGET);
        // 20 ms per key: 256 keys would take 5 s; 200 ms holds 9 after the fixed 5 ms.
        let keys = settle(
            &mut sizer,
            Duration::from_millis(5),
            Duration::from_millis(20),
        );
        assert!((8..=10).contains(&keys), "{keys}");
    }

    #[test]
    fn a_large_fixed_cost_gets_a_batch_twice_as_long() {
        let mut sizer = BatchSizer::new(256, TARGET);
        // A saturated server: 180 ms per batch whatever its size, 5 ms per key. A
        // 200 ms batch would hold 4 keys and spend 90% on the fixed cost; 360 ms holds 36.
        let keys = settle(
            &mut sizer,
            Duration::from_millis(180),
            Duration::from_millis(5),
        );
        assert!((33..=39).contains(&keys), "{keys}");
    }

    #[test]
    fn fast_keys_grow_batches_back_to_the_maximum() {
        let mut sizer = BatchSizer::new(256, TARGET);
        let slow = settle(
            &mut sizer,
            Duration::from_millis(5),
            Duration::from_millis(50),
        );
        assert!(slow < 8, "{slow}");
        // The load goes away: 0.1 ms per key.
        let fast = settle(
            &mut sizer,
            Duration::from_millis(5),
            Duration::from_micros(100),
        );
        assert_eq!(fast, 256);
    }

    #[test]
    fn a_very_slow_key_still_claims_one_and_an_empty_claim_changes_nothing() {
        let mut sizer = BatchSizer::new(256, TARGET);
        sizer.record(1, Duration::from_secs(30), Duration::ZERO);
        assert_eq!(sizer.next(), 1);
        sizer.record(0, Duration::from_millis(1), Duration::ZERO);
        assert_eq!(sizer.next(), 1);
        sizer.record(50, Duration::ZERO, Duration::ZERO);
        assert!(sizer.next() > 1);
    }

    /// A provider answering each request in `latency`, `in_flight` requests at a
    /// time, requests of 16 inputs; a key's own work costs 0.2 ms. The size settled on.
    fn settle_remote(sizer: &mut BatchSizer, latency: Duration, in_flight: usize) -> usize {
        for _ in 0..30 {
            let keys = sizer.next();
            let rounds = keys.div_ceil(16).div_ceil(in_flight) as u32;
            sizer.record(
                keys,
                Duration::from_millis(5) + Duration::from_micros(200) * keys as u32,
                latency * rounds,
            );
        }
        sizer.next()
    }

    #[test]
    fn a_slow_provider_shrinks_batches_to_whole_requests_within_the_target() {
        // 200 ms a request, two at a time: 256 keys waited 1.6 s for their responses.
        let mut sizer = BatchSizer::new(256, TARGET).in_requests_of(16);
        let keys = settle_remote(&mut sizer, Duration::from_millis(200), 2);
        assert_eq!(keys, 32);
        // A fast provider leaves the batch to the keys' own work.
        let mut fast = BatchSizer::new(256, TARGET).in_requests_of(16);
        let keys = settle_remote(&mut fast, Duration::from_millis(1), 8);
        assert_eq!(keys, 256);
    }

    #[test]
    fn a_provider_slower_than_the_target_still_gets_two_full_requests() {
        // 2 s a request: not even one request fits in 200 ms, and a part-filled
        // request would cost the provider as much as a full one.
        let mut sizer = BatchSizer::new(256, TARGET).in_requests_of(16);
        assert_eq!(settle_remote(&mut sizer, Duration::from_secs(2), 2), 32);
        // Without a remote provider a slow key is still sized by the target alone.
        let mut local = BatchSizer::new(256, TARGET).in_requests_of(16);
        let keys = settle(
            &mut local,
            Duration::from_millis(5),
            Duration::from_millis(20),
        );
        assert!((8..=10).contains(&keys), "{keys}");
    }
}
