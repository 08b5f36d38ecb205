//! Filling the other model's column during a model migration
//! (`kbsync_core::model::migration`): before the cut-over the new model's vectors for
//! every chunk, after it the old model's for every chunk written since. The most
//! recently written chunks go first, so live edits get both vectors within seconds while
//! the backlog is worked through.
//!
//! One daemon fills at a time: the one holding `FILL_LOCK` on this task's session. A
//! daemon killed mid-fill loses the lock with its connection and another (or the
//! restarted one) goes on where the column says: only the texts of the request in
//! flight at the kill can be sent again. A text already embedded with the model (in
//! any chunk, or adopted) is reused, not sent. The provider is `[next_embedding]`'s (or
//! `[embedding]`'s after the cut-over) with its own limits: its `max_concurrency` and
//! rate limits are the share of the provider's budget the fill may use.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kbsync_core::db;
use kbsync_core::model::migration::{self, ModelMigrationError};
use kbsync_core::sync::embed::{Provider, SentTotals};
use pgvector::Vector;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::model_switch::ModelSwitch;

/// Held by the daemon that fills.
pub const FILL_LOCK: i64 = kbsync_core::db::advisory_locks::MODEL_FILL;

/// How often the migration state is read when there is nothing to fill.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Texts per round: requests of the provider's size, several of them overlapping.
fn round_size(provider: &Provider, max_inputs: usize, max_concurrency: usize) -> usize {
    match provider {
        Provider::OpenAi(_) => (max_inputs * max_concurrency).max(1),
        Provider::Local(_) => 64,
    }
}

/// Why filling stopped.
enum Stop {
    /// Retried after a pause: the database or the provider.
    Transient(String),
    /// The database's migration names models this daemon's config does not: it can
    /// neither fill nor write the active model. The daemon stops, saying so.
    Config(String),
}

impl From<String> for Stop {
    fn from(e: String) -> Self {
        Stop::Transient(e)
    }
}

/// Fill while a migration runs. Returns only on cancellation or when the config no
/// longer matches the database's migration (then the daemon stops with that error).
pub async fn run(url: String, switch: Arc<ModelSwitch>, cancel: CancellationToken) {
    let mut failures: i32 = 0;
    // What the other model's provider had sent when last counted, per generation: the
    // fill's requests and live sync's second vectors both go through it. Kept across
    // reconnections, so that nothing is counted twice.
    let mut counted: Option<(i64, SentTotals)> = None;
    loop {
        let connected = std::time::Instant::now();
        let result = fill_while_connected(&url, &switch, &mut counted, &cancel).await;
        // A connection that worked for a while starts the backoff afresh.
        if connected.elapsed() > Duration::from_secs(60) {
            failures = 0;
        }
        if cancel.is_cancelled() {
            return;
        }
        if let Err(Stop::Config(e)) = result {
            tracing::error!(error = %e, "the model migration does not match this daemon's config; stopping");
            return;
        }
        if let Err(Stop::Transient(e)) = result {
            failures += 1;
            let delay = kbsync_core::outbox::retry_delay(failures).min(Duration::from_secs(30));
            tracing::error!(error = %e, ?delay, "filling the other embedding model's vectors failed; retrying");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

async fn fill_while_connected(
    url: &str,
    switch: &ModelSwitch,
    counted: &mut Option<(i64, SentTotals)>,
    cancel: &CancellationToken,
) -> Result<(), Stop> {
    let (mut client, _connection) = db::connect(url).await.map_err(|e| e.to_string())?;
    let mut holds_lock = false;
    // Texts the provider refused (too long, empty): left without a vector and logged,
    // not asked for again by this daemon.
    let mut refused: HashSet<Vec<u8>> = HashSet::new();
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        match switch.refresh(&client).await {
            Ok(()) => {}
            Err(e @ ModelMigrationError::ConfigMismatch { .. }) => {
                return Err(Stop::Config(e.to_string()));
            }
            Err(e) => return Err(format!("reading the model migration: {e}").into()),
        }
        let models = switch.current();
        let mut idle = true;
        if let Some((column, provider, settings)) = &models.other {
            if !holds_lock {
                holds_lock = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&FILL_LOCK])
                    .await
                    .map_err(|e| db::describe(&e))?
                    .get(0);
            }
            let sent = provider.sent();
            let since = match *counted {
                Some((generation, before)) if generation == models.generation => before,
                // A new phase: its other provider served live sync until now.
                Some(_) => sent,
                // This daemon's start: its other provider has served only the migration.
                None => SentTotals::default(),
            };
            let new = sent.since(since);
            if new != SentTotals::default() {
                migration::add_sent(&client, models.generation, *column, new)
                    .await
                    .map_err(|e| db::describe(&e))?;
            }
            *counted = Some((models.generation, sent));
            if holds_lock {
                let size = round_size(
                    provider,
                    settings.max_inputs_per_request,
                    settings.max_concurrency,
                );
                idle = !fill_round(
                    &mut client,
                    models.generation,
                    *column,
                    provider,
                    size,
                    &mut refused,
                )
                .await?;
            }
        } else if holds_lock {
            client
                .query_one("SELECT pg_advisory_unlock($1)", &[&FILL_LOCK])
                .await
                .map_err(|e| db::describe(&e))?;
            holds_lock = false;
        }
        if idle {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }
}

/// One round: up to `size` distinct texts without a vector in `column`. False when
/// there was nothing to do.
async fn fill_round(
    client: &mut Client,
    generation: i64,
    column: kbsync_core::sync::knowledge::OtherColumn,
    provider: &Provider,
    size: usize,
    refused: &mut HashSet<Vec<u8>>,
) -> Result<bool, String> {
    let model = provider.model().to_owned();
    let skip: Vec<&[u8]> = refused.iter().map(Vec::as_slice).collect();
    // Rows, newest first; a text several chunks share comes once.
    let rows = client
        .query(&column.sql().pending, &[&((size * 4) as i64), &skip])
        .await
        .map_err(|e| db::describe(&e))?;
    let mut seen = HashSet::new();
    let mut texts: Vec<(Vec<u8>, String)> = Vec::new();
    for row in rows {
        let hash: Vec<u8> = row.get(0);
        if texts.len() < size && seen.insert(hash.clone()) {
            texts.push((hash, row.get(1)));
        }
    }
    if texts.is_empty() {
        return Ok(false);
    }
    let hashes: Vec<&[u8]> = texts.iter().map(|(h, _)| h.as_slice()).collect();
    let mut vectors = migration::reusable(&*client, column, &model, &hashes)
        .await
        .map_err(|e| db::describe(&e))?;
    let reused = vectors.len();
    let to_send: Vec<&(Vec<u8>, String)> = texts
        .iter()
        .filter(|(h, _)| !vectors.contains_key(h))
        .collect();
    let mut embedded = 0u64;
    if !to_send.is_empty() {
        let inputs: Vec<String> = to_send.iter().map(|(_, t)| t.clone()).collect();
        let outcomes = provider
            .embed(&inputs)
            .await
            .map_err(|e| format!("embedding with {model}: {e}"))?;
        for ((hash, _), outcome) in to_send.iter().zip(outcomes) {
            match outcome {
                Ok(vector) => {
                    embedded += 1;
                    vectors.insert(hash.clone(), Vector::from(vector));
                }
                Err(why) => {
                    tracing::error!(model = %model, error = %why, "the provider refused a chunk's text; it stays without this model's vector, and `kbsync model cutover` waits for it");
                    refused.insert(hash.clone());
                }
            }
        }
        // This task is the only user of the other model's provider.
    }
    let written = migration::fill(client, generation, column, &model, &vectors)
        .await
        .map_err(|e| db::describe(&e))?;
    if written {
        metrics::counter!("kbsync_model_fill_texts_total", "model" => model.clone())
            .increment(embedded);
        metrics::counter!("kbsync_model_fill_reused_total", "model" => model)
            .increment(reused as u64);
    }
    Ok(true)
}
