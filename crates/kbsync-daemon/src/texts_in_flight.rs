//! Texts one of this daemon's workers is embedding right now, by content hash. Two
//! batches that need the same new text at once (two tenants list the same product;
//! a reconcile queues both keys of a copied page) would each find it missing in the
//! knowledge table and each pay for it. Instead the first batch to ask embeds it and
//! the second waits for its vector.
//!
//! A batch registers its texts *before* it looks them up in the table and keeps them
//! registered until its write has committed: whoever asks later either finds the
//! text registered or finds it stored, never neither. (Across daemons nothing is
//! shared; two daemons can still each embed a text once.)

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

type Hash = [u8; 32];
type Slot = watch::Receiver<Option<Vec<f32>>>;

#[derive(Default)]
pub struct TextsInFlight {
    registered: Mutex<HashMap<Hash, Slot>>,
}

/// The texts a batch registered: it embeds (or finds stored) these, and publishes
/// each vector as soon as it has it. Dropping it unregisters them; a waiter whose
/// text was never published (the provider refused it, the batch failed) embeds it
/// itself.
pub struct Registered<'a> {
    in_flight: &'a TextsInFlight,
    senders: HashMap<Hash, watch::Sender<Option<Vec<f32>>>>,
}

/// A text another batch registered first.
pub struct Awaited {
    slot: Slot,
}

impl TextsInFlight {
    /// Registers every hash no other batch has registered; returns the registration
    /// and, by position in `hashes`, the texts to wait for.
    pub fn register<'a>(&'a self, hashes: &[Hash]) -> (Registered<'a>, Vec<(usize, Awaited)>) {
        let mut registered = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        let mut senders = HashMap::new();
        let mut awaited = Vec::new();
        for (at, hash) in hashes.iter().enumerate() {
            if senders.contains_key(hash) {
                continue;
            }
            match registered.get(hash) {
                Some(slot) => awaited.push((at, Awaited { slot: slot.clone() })),
                None => {
                    let (sender, slot) = watch::channel(None);
                    registered.insert(*hash, slot);
                    senders.insert(*hash, sender);
                }
            }
        }
        (
            Registered {
                in_flight: self,
                senders,
            },
            awaited,
        )
    }
}

impl Registered<'_> {
    pub fn owns(&self, hash: &Hash) -> bool {
        self.senders.contains_key(hash)
    }

    /// Hands `vector` to every batch waiting for `hash`, now and until this
    /// registration is dropped.
    pub fn publish(&self, hash: &Hash, vector: &[f32]) {
        if let Some(sender) = self.senders.get(hash) {
            sender.send_replace(Some(vector.to_vec()));
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut registered = self
            .in_flight
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for hash in self.senders.keys() {
            registered.remove(hash);
        }
    }
}

impl Awaited {
    /// The vector, once the batch that registered the text first publishes it; `None`
    /// when that batch unregistered it without one.
    pub async fn vector(mut self) -> Option<Vec<f32>> {
        // Closed without a value: the registration was dropped unpublished.
        let published = self.slot.wait_for(Option::is_some).await.ok()?;
        published.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_second_batch_gets_the_first_batchs_vector() {
        let in_flight = TextsInFlight::default();
        let (first, awaited) = in_flight.register(&[[1; 32], [2; 32]]);
        assert!(awaited.is_empty());
        let (second, mut awaited) = in_flight.register(&[[3; 32], [2; 32]]);
        assert!(second.owns(&[3; 32]) && !second.owns(&[2; 32]));
        assert_eq!(awaited.len(), 1);
        let (at, waiting) = awaited.pop().unwrap();
        assert_eq!(at, 1);
        let waiter = tokio::spawn(waiting.vector());
        first.publish(&[2; 32], &[0.5, 0.25]);
        assert_eq!(waiter.await.unwrap(), Some(vec![0.5, 0.25]));
    }

    #[tokio::test]
    async fn a_text_never_published_is_the_waiters_to_embed_and_is_unregistered() {
        let in_flight = TextsInFlight::default();
        let (first, _) = in_flight.register(&[[1; 32]]);
        let (_second, mut awaited) = in_flight.register(&[[1; 32]]);
        let waiter = tokio::spawn(awaited.pop().unwrap().1.vector());
        drop(first);
        assert_eq!(waiter.await.unwrap(), None);
        let (third, awaited) = in_flight.register(&[[1; 32]]);
        assert!(awaited.is_empty() && third.owns(&[1; 32]));
    }

    #[tokio::test]
    async fn a_vector_published_before_the_waiter_asks_is_still_handed_over() {
        let in_flight = TextsInFlight::default();
        let (first, _) = in_flight.register(&[[1; 32]]);
        let (_second, mut awaited) = in_flight.register(&[[1; 32]]);
        first.publish(&[1; 32], &[1.0]);
        drop(first);
        assert_eq!(awaited.pop().unwrap().1.vector().await, Some(vec![1.0]));
    }

    #[test]
    fn a_hash_twice_in_one_batch_is_registered_once() {
        let in_flight = TextsInFlight::default();
        let (first, awaited) = in_flight.register(&[[1; 32], [1; 32]]);
        assert!(awaited.is_empty() && first.owns(&[1; 32]));
    }
}
