//! The collector: moves what the capture triggers appended to `kbsync.changes` into
//! the outbox (`outbox::collect`) and wakes the workers.
//!
//! It folds when the listener says so (a NOTIFY, a reconnect), and again shortly after
//! while changes keep coming: only the capturing transaction that wins the wake-up
//! lock NOTIFYs (see `capture`), so a writer that lost it may commit just after the
//! fold that the winner's NOTIFY started. Follow-up folds come 20 ms after a fold that
//! moved something and double, up to the fallback poll, while nothing new arrives: a
//! change whose transaction stayed open for a while after writing is found about
//! twice that while later, and never later than the fallback poll.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use kbsync_core::outbox;

/// The least time between two folds: under a write storm every NOTIFY would start one.
const MIN_SPACING: Duration = Duration::from_millis(10);
/// The first follow-up after a fold that moved changes.
const FIRST_FOLLOW_UP: Duration = Duration::from_millis(10);

/// The wait before the next follow-up fold, after a fold that moved `moved` changes.
fn next_follow_up(previous: Duration, moved: i64, fallback_poll: Duration) -> Duration {
    if moved > 0 {
        FIRST_FOLLOW_UP.min(fallback_poll)
    } else {
        previous.saturating_mul(2).min(fallback_poll)
    }
}

/// Fold and wake until cancelled (`Ok`) or a database error (the caller reconnects).
pub async fn run(
    client: &Client,
    fallback_poll: Duration,
    notified: &mut watch::Receiver<u64>,
    wake_workers: &watch::Sender<u64>,
    cancel: &CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    // A (re)connect may follow changes nobody was told about: look at once, and let
    // the workers look at the outbox too.
    let mut told = true;
    let mut follow_up = fallback_poll;
    loop {
        notified.borrow_and_update();
        let moved = outbox::collect(client).await?;
        if moved > 0 {
            metrics::counter!("kbsync_changes_collected_total").increment(moved as u64);
        }
        // A NOTIFY also comes from keys queued straight into the outbox (the sweep,
        // `kbsync errors retry`): the workers look whenever one came.
        if moved > 0 || told {
            wake_workers.send_modify(|n| *n = n.wrapping_add(1));
        }
        follow_up = next_follow_up(follow_up, moved, fallback_poll);
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(MIN_SPACING) => {}
        }
        told = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            changed = notified.changed() => match changed {
                Ok(()) => true,
                // The listener is gone (the daemon is stopping): poll meanwhile.
                Err(_) => {
                    tokio::time::sleep(follow_up).await;
                    false
                }
            },
            _ = tokio::time::sleep(follow_up) => false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follow_ups_start_short_after_work_and_back_off_to_the_fallback_poll() {
        let poll = Duration::from_secs(5);
        let mut wait = next_follow_up(poll, 3, poll);
        assert_eq!(wait, Duration::from_millis(10));
        let mut waits = vec![wait];
        for _ in 0..12 {
            wait = next_follow_up(wait, 0, poll);
            waits.push(wait);
        }
        assert_eq!(waits[1], Duration::from_millis(20));
        assert_eq!(waits[2], Duration::from_millis(40));
        assert_eq!(*waits.last().unwrap_or(&Duration::ZERO), poll);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        // A short fallback poll caps even the first follow-up.
        assert_eq!(
            next_follow_up(poll, 1, Duration::from_millis(5)),
            Duration::from_millis(5)
        );
    }
}
