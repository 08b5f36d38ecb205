//! One claimed batch of one source, start to finish: read the current rows, chunk
//! them, compare chunk hashes with what is stored, embed only chunks whose text is
//! new (deduplicated across the batch), and write everything in one transaction
//! fenced on the claim.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use pgvector::Vector;
use thiserror::Error;
use tokio_postgres::Client;
use uuid::Uuid;

use kbsync_core::config::{Config, Source};
use kbsync_core::db;
use kbsync_core::model::migration;
use kbsync_core::outbox::{self, Claimed, Failure, FailurePolicy, Scope};
use kbsync_core::sync::chunk::Chunker;
use kbsync_core::sync::embed::{EmbedError, InputOutcome, Provider};
use kbsync_core::sync::knowledge::{self, ChunkWrite};
use kbsync_core::sync::source_rows::{SourceQuery, SourceRow};

use crate::batch_plan::{self, Assembled, Writing};
use crate::model_switch::ActiveModels;

#[derive(Debug, Error)]
pub enum BatchError {
    #[error("database error: {}", kbsync_core::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Provider(#[from] EmbedError),
    /// The chunking thread panicked: a bug, reported as such.
    #[error("chunking failed: {0}")]
    Chunking(String),
    /// A model cut-over or rollback committed while the batch embedded with the model
    /// active before it: nothing was written.
    #[error("the embedding model switched during the batch")]
    ModelChanged,
}

/// A source with everything prepared once at start-up.
pub struct SourcePipeline {
    pub source: Source,
    query: SourceQuery,
    chunker: Arc<Chunker>,
    orphan_sql: String,
}

impl SourcePipeline {
    pub async fn prepare(
        client: &Client,
        source: Source,
        config: &Config,
        provider: &Provider,
    ) -> Result<Self, String> {
        let unusable = |e: tokio_postgres::Error| {
            format!(
                "sources.{}: {}; correct the source in the config (or the table), check it with `kbsync config check`, then run `kbsync install`",
                source.name,
                kbsync_core::db::describe(&e)
            )
        };
        let query = SourceQuery::prepare(client, &source)
            .await
            .map_err(unusable)?;
        query.verify(client).await.map_err(unusable)?;
        // The config's limit, not the provider's: the sweep computes the same chunking
        // fingerprint from the config alone.
        let chunker = Chunker::new(
            &source,
            provider.token_counter(),
            config.model_token_limit(),
        )
        .map_err(|e| format!("source {}: {e}", source.name))?;
        let orphan_sql = SourceQuery::orphan_delete_sql(&query.rows);
        Ok(Self {
            source,
            query,
            chunker: Arc::new(chunker),
            orphan_sql,
        })
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct BatchReport {
    pub inputs_embedded: usize,
    pub chunks_written: u64,
    pub chunks_deleted: u64,
    pub failed: usize,
    pub dead_lettered: u64,
    /// Time spent waiting for a remote provider's answers: its latency and rate
    /// limits, which a smaller batch would not shorten per key.
    pub remote_embedding_time: std::time::Duration,
}

/// Process one claimed batch. A statement PostgreSQL rejects (a constraint, a trigger,
/// a statement timeout, a value it cannot take) is pinned on the keys it belongs to:
/// the batch is redone key by key, the keys that fail alone count an attempt (and are
/// dead-lettered after `max_attempts`), the others are written. Only a lost connection
/// or an unavailable server fails the batch as a whole (`BatchError::Db`).
pub async fn process(
    client: &mut Client,
    pipeline: &SourcePipeline,
    models: &ActiveModels,
    policy: &FailurePolicy,
    token: Uuid,
    claimed: &[Claimed],
) -> Result<BatchReport, BatchError> {
    let source = &pipeline.source;
    let provider = models.active.as_ref();
    let in_flight = &models.texts_in_flight;
    let model = provider.model().to_owned();
    let row_claims: Vec<&Claimed> = claimed.iter().filter(|c| c.scope == Scope::Row).collect();
    let whole_source = claimed.iter().find(|c| c.scope == Scope::Source);
    let keys: Vec<String> = row_claims.iter().map(|c| c.key.clone()).collect();

    // Rows are read with the config's identifiers only: a failure here is the
    // database's or the schema's, not one row's, and fails the batch as a whole.
    let rows = pipeline.query.load(&*client, &keys).await?;
    let stored = knowledge::stored_chunks(&*client, &source.name, &keys).await?;
    let rows: HashMap<String, SourceRow> = rows.into_iter().map(|r| (r.key.clone(), r)).collect();

    // Chunking is CPU work (seconds for a page of megabytes): off the async threads,
    // so that the lease renewals, the listener and the other workers go on meanwhile.
    let chunker = Arc::clone(&pipeline.chunker);
    // A text the chunker panics on fails its key alone (retried, then dead-lettered):
    // one bad row must not take the daemon down again at every restart.
    let (rows, chunked) = tokio::task::spawn_blocking(move || {
        let chunked = chunk_each(&rows, |text| chunker.chunk(text));
        (rows, chunked)
    })
    .await
    .map_err(|e| BatchError::Chunking(e.to_string()))?;
    let writing = Writing {
        model: &model,
        chunking: pipeline.chunker.fingerprint(),
    };
    let planned = batch_plan::plan(&keys, &rows, chunked, &stored, &writing);
    let (inputs, hashes) = (&planned.inputs, &planned.hashes);

    // Texts another batch of this daemon is embedding right now are waited for; of
    // the rest, those another key (or an earlier batch) already has embedded with
    // this model are read back. Registered first, looked up second, unregistered
    // after this batch's write has committed (the end of this function): see
    // texts_in_flight.
    let registration = in_flight.register(hashes);
    let mut awaited = registration.1;
    let registration = registration.0;
    let mut outcomes: Vec<Option<InputOutcome>> = vec![None; inputs.len()];
    let owned: Vec<&[u8]> = hashes
        .iter()
        .filter(|h| registration.owns(h))
        .map(|h| h.as_slice())
        .collect();
    if !owned.is_empty() {
        let known = knowledge::embeddings_by_hash(&*client, &model, &owned).await?;
        for (outcome, hash) in outcomes.iter_mut().zip(hashes) {
            if let Some(vector) = known.get(hash.as_slice()) {
                registration.publish(hash, vector.as_slice());
                *outcome = Some(Ok(vector.to_vec()));
            }
        }
    }
    let waiting: HashSet<usize> = awaited.iter().map(|(at, _)| *at).collect();
    let embedding_started = std::time::Instant::now();
    let mut sent = 0;
    let own_inputs: Vec<usize> = (0..inputs.len())
        .filter(|at| outcomes[*at].is_none() && !waiting.contains(at))
        .collect();
    embed_into(provider, inputs, &own_inputs, &mut outcomes, &mut sent).await?;
    for at in &own_inputs {
        if let Some(Ok(vector)) = &outcomes[*at] {
            registration.publish(&hashes[*at], vector);
        }
    }
    // Only after publishing its own: two batches waiting for each other's texts
    // both get theirs.
    for (at, text) in awaited.drain(..) {
        outcomes[at] = text.vector().await.map(Ok);
    }
    let unpublished: Vec<usize> = (0..inputs.len())
        .filter(|at| outcomes[*at].is_none())
        .collect();
    embed_into(provider, inputs, &unpublished, &mut outcomes, &mut sent).await?;
    metrics::counter!("kbsync_embeddings_reused_total", "source" => source.name.clone())
        .increment((inputs.len() - sent) as u64);
    // The local model's time is CPU work per text, which a smaller batch does shorten.
    let remote_embedding_time = match provider {
        Provider::OpenAi(_) => embedding_started.elapsed(),
        Provider::Local(_) => std::time::Duration::ZERO,
    };
    // Every input has an outcome by now: stored, published, or embedded here.
    let outcomes: Vec<InputOutcome> = outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err("no vector was obtained for this text".into())))
        .collect();

    let Assembled {
        writes,
        lengths,
        failures,
    } = batch_plan::assemble(&keys, planned, &outcomes, &writing);

    // During a model migration every chunk written gets the other model's vector too.
    let other_vectors = match &models.other {
        Some((column, other, _)) => {
            Some(other_model_vectors(&*client, *column, other, &writes).await?)
        }
        None => None,
    };
    let other = match (&models.other, &other_vectors) {
        (Some((column, provider, _)), Some(vectors)) => Some(knowledge::OtherVectors {
            column: *column,
            model: provider.model(),
            vectors,
        }),
        _ => None,
    };
    let other = other.as_ref();
    let prepared = Prepared {
        writes,
        lengths,
        failures,
        versions: row_claims
            .iter()
            .map(|c| (c.key.clone(), c.version))
            .collect(),
    };
    let generation = models.generation;
    let fence = Fence {
        token,
        generation,
        other,
    };
    let written = commit(client, pipeline, policy, &fence, &prepared, whole_source);
    let committed = match written.await {
        Ok(Some(committed)) => committed,
        Ok(None) => return Err(BatchError::ModelChanged),
        Err(e) if db::connection_failed(client, &e) => return Err(e.into()),
        Err(e) => {
            tracing::warn!(
                source = %source.name,
                keys = keys.len(),
                error = %db::describe(&e),
                "PostgreSQL rejected the batch's write; writing its keys one at a time"
            );
            isolate_rejected_writes(client, pipeline, policy, &fence, prepared, whole_source)
                .await?
                .ok_or(BatchError::ModelChanged)?
        }
    };
    Ok(BatchReport {
        inputs_embedded: sent,
        remote_embedding_time,
        ..committed
    })
}

/// What every write of a batch is fenced on, and writes besides its chunks.
struct Fence<'a> {
    /// The claim: only entries still claimed with it are written and acknowledged.
    token: Uuid,
    /// The model migration's generation its vectors were made in.
    generation: i64,
    /// During a model migration, the other model's vectors.
    other: Option<&'a knowledge::OtherVectors<'a>>,
}

/// What a batch (or one key of it) writes, computed before its transaction.
#[derive(Default)]
struct Prepared {
    writes: Vec<ChunkWrite>,
    /// Per key, its new number of chunks (0: none, the row is gone or filtered out).
    lengths: Vec<(String, i32)>,
    failures: Vec<Failure>,
    /// Every claimed row entry, with the version that was read.
    versions: Vec<(String, i64)>,
}

impl Prepared {
    /// One `Prepared` per key, in claim order.
    fn split_by_key(self) -> Vec<Prepared> {
        let mut parts: Vec<Prepared> = Vec::with_capacity(self.versions.len());
        let mut at: HashMap<String, usize> = HashMap::new();
        for (key, version) in self.versions {
            at.insert(key.clone(), parts.len());
            parts.push(Prepared {
                versions: vec![(key, version)],
                ..Prepared::default()
            });
        }
        for w in self.writes {
            if let Some(&i) = at.get(&w.key) {
                parts[i].writes.push(w);
            }
        }
        for l in self.lengths {
            if let Some(&i) = at.get(&l.0) {
                parts[i].lengths.push(l);
            }
        }
        for f in self.failures {
            if let Some(&i) = at.get(&f.key) {
                parts[i].failures.push(f);
            }
        }
        parts
    }
}

impl BatchReport {
    fn add(&mut self, other: BatchReport) {
        self.inputs_embedded += other.inputs_embedded;
        self.chunks_written += other.chunks_written;
        self.chunks_deleted += other.chunks_deleted;
        self.failed += other.failed;
        self.dead_lettered += other.dead_lettered;
        self.remote_embedding_time += other.remote_embedding_time;
    }
}

/// One transaction: fence on our claim (a weak lock: new changes of the keys still
/// fold in meanwhile), write, lock the entries for acknowledging, record failures,
/// acknowledge; and the
/// source-wide clean-up after a TRUNCATE if `whole_source` is claimed. None, with
/// nothing written, when the model migration is no longer at `generation`: the
/// vectors were made by a model that is no longer the one in `embedding`.
async fn commit(
    client: &mut Client,
    pipeline: &SourcePipeline,
    policy: &FailurePolicy,
    fence: &Fence<'_>,
    prepared: &Prepared,
    whole_source: Option<&Claimed>,
) -> Result<Option<BatchReport>, tokio_postgres::Error> {
    let (token, generation, other) = (fence.token, fence.generation, fence.other);
    let source = &pipeline.source.name;
    let keys: Vec<String> = prepared.versions.iter().map(|(k, _)| k.clone()).collect();
    let tx = client.transaction().await?;
    if migration::locked_generation(&tx).await? != generation {
        return Ok(None);
    }
    let ours: HashSet<String> = outbox::fence(&tx, source, token, Scope::Row, &keys)
        .await?
        .into_iter()
        .collect();
    let is_ours = |k: &String| ours.contains(k);
    // Usually every key is still ours: then nothing is copied.
    let all_ours = ours.len() == keys.len();
    let writes = only_ours(&prepared.writes, all_ours, |w| is_ours(&w.key));
    let lengths = only_ours(&prepared.lengths, all_ours, |(k, _)| is_ours(k));
    let failures = only_ours(&prepared.failures, all_ours, |f| is_ours(&f.key));
    let (chunks_written, mut chunks_deleted) =
        knowledge::write_batch(&tx, &pipeline.source, &writes, &lengths, other).await?;
    outbox::lock_for_acknowledge(&tx, source, token, Scope::Row, &keys).await?;
    let dead_lettered = outbox::record_failures(&tx, source, token, &failures, policy).await?;
    let done: Vec<(String, i64)> = prepared
        .versions
        .iter()
        .filter(|(k, _)| is_ours(k) && !failures.iter().any(|f| &f.key == k))
        .cloned()
        .collect();
    let acknowledged = outbox::acknowledge(&tx, source, token, Scope::Row, &done).await?;
    if let Some(truncate) = whole_source {
        let ours = outbox::fence(
            &tx,
            source,
            token,
            Scope::Source,
            std::slice::from_ref(&truncate.key),
        )
        .await?;
        if !ours.is_empty() {
            chunks_deleted += tx.execute(&pipeline.orphan_sql, &[source]).await?;
            outbox::lock_for_acknowledge(&tx, source, token, Scope::Source, &ours).await?;
            outbox::acknowledge(
                &tx,
                source,
                token,
                Scope::Source,
                &[(truncate.key.clone(), truncate.version)],
            )
            .await?;
        }
    }
    tx.commit().await?;
    record_metrics(
        source,
        &acknowledged,
        chunks_written,
        chunks_deleted,
        dead_lettered,
    );
    Ok(Some(BatchReport {
        inputs_embedded: 0,
        chunks_written,
        chunks_deleted,
        failed: failures.len(),
        dead_lettered,
        remote_embedding_time: std::time::Duration::ZERO,
    }))
}

/// Embeds `inputs[at]` for every `at` in `which` into `outcomes[at]`, counting the
/// texts sent.
async fn embed_into(
    provider: &Provider,
    inputs: &[String],
    which: &[usize],
    outcomes: &mut [Option<InputOutcome>],
    sent: &mut usize,
) -> Result<(), EmbedError> {
    if which.is_empty() {
        return Ok(());
    }
    let texts: Vec<String> = which.iter().map(|at| inputs[*at].clone()).collect();
    let mut embedded = provider.embed(&texts).await?.into_iter();
    for at in which {
        outcomes[*at] = Some(
            embedded
                .next()
                .unwrap_or_else(|| Err("the provider returned fewer vectors than inputs".into())),
        );
    }
    *sent += which.len();
    Ok(())
}

fn only_ours<T: Clone>(items: &[T], all_ours: bool, keep: impl Fn(&T) -> bool) -> Cow<'_, [T]> {
    if all_ours {
        Cow::Borrowed(items)
    } else {
        Cow::Owned(items.iter().filter(|i| keep(i)).cloned().collect())
    }
}

/// The batch's write was rejected: write each key in a transaction of its own, so the
/// keys PostgreSQL accepts are written and each rejected one fails alone. The
/// embeddings are already paid for and are not asked for again.
async fn isolate_rejected_writes(
    client: &mut Client,
    pipeline: &SourcePipeline,
    policy: &FailurePolicy,
    fence: &Fence<'_>,
    prepared: Prepared,
    whole_source: Option<&Claimed>,
) -> Result<Option<BatchReport>, tokio_postgres::Error> {
    let token = fence.token;
    let mut total = BatchReport::default();
    for part in prepared.split_by_key() {
        match commit(client, pipeline, policy, fence, &part, None).await {
            Ok(Some(committed)) => total.add(committed),
            Ok(None) => return Ok(None),
            Err(e) if db::connection_failed(client, &e) => return Err(e),
            Err(e) => {
                let key = part.versions[0].0.clone();
                total.add(reject_key(client, pipeline, policy, token, key, &e).await?);
            }
        }
    }
    if whole_source.is_some() {
        let nothing = Prepared::default();
        match commit(client, pipeline, policy, fence, &nothing, whole_source).await? {
            Some(committed) => total.add(committed),
            None => return Ok(None),
        }
    }
    Ok(Some(total))
}

/// The other model's vectors for the texts of `writes`: those it has already (any
/// chunk's, or adopted), and the rest embedded now. When its provider fails, the
/// chunks are written without it and the daemon's fill gives them one: a migration
/// must not hold up the live edits of the model applications read.
async fn other_model_vectors(
    client: &Client,
    column: kbsync_core::sync::knowledge::OtherColumn,
    provider: &Provider,
    writes: &[ChunkWrite],
) -> Result<HashMap<Vec<u8>, Vector>, tokio_postgres::Error> {
    let model = provider.model();
    let mut texts: HashMap<&[u8], &str> = HashMap::new();
    for w in writes {
        texts.insert(w.hash.as_slice(), w.content.as_str());
    }
    let hashes: Vec<&[u8]> = texts.keys().copied().collect();
    let mut found = migration::reusable(client, column, model, &hashes).await?;
    let missing: Vec<(&[u8], &str)> = texts
        .into_iter()
        .filter(|(h, _)| !found.contains_key(*h))
        .collect();
    if missing.is_empty() {
        return Ok(found);
    }
    let inputs: Vec<String> = missing.iter().map(|(_, t)| (*t).to_owned()).collect();
    match provider.embed(&inputs).await {
        Ok(outcomes) => {
            for ((hash, _), outcome) in missing.iter().zip(outcomes) {
                match outcome {
                    Ok(vector) => {
                        found.insert(hash.to_vec(), Vector::from(vector));
                    }
                    Err(why) => {
                        tracing::warn!(model, error = %why, "the other model refused a chunk's text; it is written without that model's vector");
                    }
                }
            }
            metrics::counter!("kbsync_model_dual_write_texts_total", "model" => model.to_owned())
                .increment(inputs.len() as u64);
        }
        Err(e) => {
            tracing::warn!(model, error = %e, texts = inputs.len(), "the other model's provider failed; these chunks are written without its vector and the background fill gives them one");
        }
    }
    Ok(found)
}

/// Count a failed attempt against `key` (it is retried with backoff, and parked in
/// the dead letters after `max_attempts`), with PostgreSQL's own message.
async fn reject_key(
    client: &mut Client,
    pipeline: &SourcePipeline,
    policy: &FailurePolicy,
    token: Uuid,
    key: String,
    error: &tokio_postgres::Error,
) -> Result<BatchReport, tokio_postgres::Error> {
    let source = &pipeline.source.name;
    let message = format!("PostgreSQL rejected this key: {}", db::describe(error));
    tracing::error!(source = %source, key = %key, error = %message, "a key failed; it is retried later and dead-lettered after max_attempts");
    metrics::counter!("kbsync_rejected_keys_total", "source" => source.clone()).increment(1);
    let failure = Failure {
        key,
        error: message,
    };
    let tx = client.transaction().await?;
    let dead_lettered = outbox::record_failures(&tx, source, token, &[failure], policy).await?;
    tx.commit().await?;
    metrics::counter!("kbsync_dead_lettered_total", "source" => source.clone())
        .increment(dead_lettered);
    Ok(BatchReport {
        failed: 1,
        dead_lettered,
        ..BatchReport::default()
    })
}

/// Each row's chunks, or the message of the panic its text caused.
fn chunk_each<T>(
    rows: &HashMap<String, SourceRow>,
    chunk: impl Fn(&str) -> T,
) -> HashMap<String, Result<T, String>> {
    rows.iter()
        .map(|(key, row)| {
            let chunks =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| chunk(&row.text)))
                    .map_err(|panic| panic_message(panic.as_ref()));
            (key.clone(), chunks)
        })
        .collect()
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_owned())
}

/// Counted only once the batch's transaction has committed.
fn record_metrics(
    source: &str,
    acknowledged: &[outbox::Acknowledged],
    written: u64,
    deleted: u64,
    dead_lettered: u64,
) {
    let source = source.to_owned();
    let changes: i64 = acknowledged.iter().map(|a| a.version).sum();
    metrics::counter!("kbsync_changes_total", "source" => source.clone()).increment(changes as u64);
    metrics::counter!("kbsync_keys_processed_total", "source" => source.clone())
        .increment(acknowledged.len() as u64);
    let lag = metrics::histogram!(crate::telemetry::SYNC_LAG, "source" => source.clone());
    for a in acknowledged {
        lag.record(a.lag_seconds);
    }
    metrics::counter!("kbsync_chunks_written_total", "source" => source.clone()).increment(written);
    metrics::counter!("kbsync_chunks_deleted_total", "source" => source.clone()).increment(deleted);
    metrics::counter!("kbsync_dead_lettered_total", "source" => source).increment(dead_lettered);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, text: &str) -> (String, SourceRow) {
        let row = SourceRow {
            key: key.to_owned(),
            tenant: "1".to_owned(),
            text: text.to_owned(),
            text_hash64: 0,
            metadata: serde_json::Value::Null,
        };
        (key.to_owned(), row)
    }

    #[test]
    fn a_text_the_chunker_panics_on_fails_alone() {
        let rows: HashMap<String, SourceRow> = [
            row("good", "fine text"),
            row("bad", "BOOM"),
            row("also", "more"),
        ]
        .into_iter()
        .collect();
        let chunked = chunk_each(&rows, |text| {
            assert!(!text.contains("BOOM"), "the chunker met BOOM");
            text.to_uppercase()
        });
        assert_eq!(chunked["good"].as_deref(), Ok("FINE TEXT"));
        assert_eq!(chunked["also"].as_deref(), Ok("MORE"));
        assert!(
            chunked["bad"]
                .as_ref()
                .unwrap_err()
                .contains("the chunker met BOOM"),
            "{:?}",
            chunked["bad"]
        );
    }
}
