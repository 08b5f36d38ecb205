//! What a sweep found and did, per source. Serialised as is for `--json` and into
//! `kbsync.reconcile_runs.counts`.

use serde::{Deserialize, Serialize};

/// Keys whose chunks are there but no longer what today's row and config produce,
/// by the first reason found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleKeys {
    /// The row's text changed (or a chunk's content no longer matches its hash).
    pub text: u64,
    /// Chunk size, overlap, tokenizer or splitter changed.
    pub chunking: u64,
    /// The embedding model changed.
    pub model: u64,
    /// The row now belongs to another tenant.
    pub tenant: u64,
    /// The metadata columns' values changed.
    pub metadata: u64,
    /// Some of the key's chunks are missing (or left over from a longer text).
    pub chunk_set: u64,
    /// Chunks written before migration 0006, without the 64-bit hashes the sweep
    /// compares: queued once, and the daemon rewrites them reusing their embeddings.
    #[serde(default)]
    pub hashes: u64,
}

impl StaleKeys {
    pub fn total(&self) -> u64 {
        self.text
            + self.chunking
            + self.model
            + self.tenant
            + self.metadata
            + self.chunk_set
            + self.hashes
    }
}

/// The sweep refused to delete a source's orphans: there were too many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SafetyStop {
    /// Orphaned chunks / chunks of the source (in the sweep's scope).
    pub share: f64,
    /// `reconcile.max_delete_fraction`.
    pub limit: f64,
}

/// A parked key the sweep will not retry any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermanentFailure {
    pub key: String,
    pub error: String,
    pub attempts: i32,
    pub retries: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceReport {
    pub source: String,
    /// The whole source matched its fingerprint ([`crate::fingerprint`]), so no
    /// key-by-key comparison was needed.
    #[serde(default)]
    pub in_sync_by_fingerprint: bool,
    /// Eligible source rows examined.
    pub rows: u64,
    /// Chunks examined.
    pub chunks: u64,
    /// Eligible rows with text but no chunks.
    pub missing: u64,
    pub stale: StaleKeys,
    /// Keys otherwise in sync with a chunk whose embedding is NULL.
    pub missing_embeddings: u64,
    /// Keys put into the outbox for the daemon (in a dry run: that would be).
    pub queued: u64,
    /// Keys found drifting that already had a pending outbox entry.
    pub already_queued: u64,
    /// Keys whose chunks have no eligible row any more, and their chunks.
    pub orphan_keys: u64,
    pub orphan_chunks: u64,
    /// Orphaned chunks deleted (0 in a dry run or after a safety stop).
    pub deleted_chunks: u64,
    pub safety_stop: Option<SafetyStop>,
    /// Parked keys whose retry time had come, put back into the outbox (in a dry
    /// run: that would be).
    pub dead_letters_retried: u64,
    /// Parked keys with no retry left.
    pub dead_letters_permanent: u64,
    /// Up to five of those, for the summary.
    pub permanent_examples: Vec<PermanentFailure>,
}

impl SourceReport {
    pub fn new(source: &str) -> Self {
        Self {
            source: source.to_owned(),
            ..Self::default()
        }
    }

    /// Whether the sweep found anything to repair in this source.
    pub fn found_drift(&self) -> bool {
        self.missing + self.stale.total() + self.missing_embeddings + self.orphan_chunks > 0
            || self.dead_letters_retried > 0
    }
}

/// Chunks stored under a source name the config does not declare. Reported, never
/// deleted: a source removed from the config by mistake must not wipe its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnknownSource {
    pub source: String,
    pub chunks: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Row id in `kbsync.reconcile_runs`.
    pub run_id: i64,
    pub dry_run: bool,
    pub duration_ms: u64,
    pub sources: Vec<SourceReport>,
    pub unknown_sources: Vec<UnknownSource>,
}

impl Report {
    pub fn found_drift(&self) -> bool {
        self.sources.iter().any(SourceReport::found_drift)
    }

    /// Sources whose orphans were not deleted because there were too many.
    pub fn safety_stops(&self) -> impl Iterator<Item = (&str, &SafetyStop)> {
        self.sources
            .iter()
            .filter_map(|s| s.safety_stop.as_ref().map(|stop| (s.source.as_str(), stop)))
    }
}
