//! The outbox's life cycle on the daemon's side: collect what the capture triggers
//! appended to `kbsync.changes` into one entry per key, claim ready keys (the
//! debounce windows are evaluated here, in the database's clock), keep the claim
//! alive while working, then in the write transaction fence, acknowledge, or record
//! a failure.
//!
//! The application's writes only ever append to `kbsync.changes`: they never touch an
//! outbox entry, so they never wait for anything the daemon holds. A claim is a token
//! plus a lease on outbox rows, not a held row lock.

use std::time::Duration;

use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::config::Source;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One row of the source.
    Row,
    /// The whole source (after a TRUNCATE).
    Source,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Row => "row",
            Scope::Source => "source",
        }
    }
}

/// A claimed outbox entry.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub scope: Scope,
    pub key: String,
    pub version: i64,
    pub attempts: i32,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// The readiness test, on outbox row `o`. FOR UPDATE checks it again on the row it
// locks when a concurrent claim has changed the row meanwhile (another daemon's).
const READY: &str = "(o.claimed_until IS NULL OR o.claimed_until < now())
                   AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
                   AND (o.last_changed_at <= now() - make_interval(secs => CASE WHEN o.deleted THEN $2::float8 ELSE $3::float8 END)
                        OR o.first_changed_at <= now() - make_interval(secs => $4::float8))";
/// The claim statement, built once (it runs on every worker pass).
static CLAIM_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH RECURSIVE tenants AS (
                -- The distinct tenants with entries, by skipping through the index.
                (SELECT o.tenant FROM kbsync.outbox o WHERE o.source = $1 ORDER BY o.tenant LIMIT 1)
                UNION ALL
                SELECT (SELECT o.tenant FROM kbsync.outbox o
                         WHERE o.source = $1 AND o.tenant > t.tenant ORDER BY o.tenant LIMIT 1)
                  FROM tenants t WHERE t.tenant IS NOT NULL),
             wanted AS (
                SELECT tenant FROM tenants
                 WHERE tenant IS NOT NULL AND ($8::text[] IS NULL OR tenant = ANY($8))),
             share AS (
                SELECT CEIL($5::bigint / GREATEST(count(*), 1)::float8)::bigint AS n FROM wanted),
             candidates AS (
                -- Locked here, where each tenant's oldest entries are picked: workers
                -- claiming at the same moment then take the next entries instead of
                -- all picking the same ones and coming away with nothing.
                SELECT c.scope, c.source_key, c.last_changed_at,
                       row_number() OVER (PARTITION BY w.tenant ORDER BY c.last_changed_at) AS turn
                  FROM wanted w CROSS JOIN share
                  CROSS JOIN LATERAL (
                       SELECT o.scope, o.source_key, o.last_changed_at FROM kbsync.outbox o
                        WHERE o.source = $1 AND o.tenant = w.tenant AND {READY}
                        ORDER BY o.last_changed_at LIMIT share.n
                        FOR UPDATE OF o SKIP LOCKED) c),
             ready AS (
                SELECT c.scope, c.source_key FROM candidates c
                 ORDER BY c.turn, c.last_changed_at
                 LIMIT $5)
         UPDATE kbsync.outbox o
            SET claim_token = $6, claimed_until = now() + make_interval(secs => $7::float8)
           FROM ready
          WHERE o.source = $1 AND o.scope = ready.scope AND o.source_key = ready.source_key
      RETURNING o.scope, o.source_key, o.version, o.attempts"
    )
});

/// Move every change the capture triggers appended to `kbsync.changes` (and that is
/// visible now) into the outbox, one entry per key: a key's changes fold into its entry
/// (version + their number, the latest change time, a new change clears its retry
/// state), as the triggers' upsert did before. Changes another daemon is moving are
/// skipped. All at once, not in pieces: the log has no index and no order, so a piece
/// taken by position could pass over an old change again and again while writers refill
/// the pages before it. Entries are upserted in key order, the order
/// `lock_for_acknowledge` locks them in, so that a fold and a batch's acknowledgement
/// never deadlock. Returns the changes moved.
///
/// Changes moved are announced on the channel once the move has committed: every
/// daemon's collector races for the same NOTIFY, and those that lose find the log
/// empty; without this their workers slept until the fallback poll while the winner's
/// backlog waited (a second daemon joined a backlog 1.2 s late, `just bench
/// concurrency`).
pub async fn collect(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "WITH taken AS (
                DELETE FROM kbsync.changes c
                 WHERE c.ctid = ANY (ARRAY(SELECT ctid FROM kbsync.changes FOR UPDATE SKIP LOCKED))
             RETURNING c.source, c.scope, c.source_key, c.deleted, c.tenant, c.changed_at),
             folded AS (
                SELECT DISTINCT ON (source, scope, source_key)
                       source, scope, source_key, deleted, tenant,
                       min(changed_at) OVER k AS first_changed_at,
                       max(changed_at) OVER k AS last_changed_at,
                       count(*) OVER k AS changes
                  FROM taken
                WINDOW k AS (PARTITION BY source, scope, source_key)
                 ORDER BY source, scope, source_key, changed_at DESC),
             moved AS (
                INSERT INTO kbsync.outbox AS o
                       (source, scope, source_key, deleted, tenant, first_changed_at, last_changed_at, version)
                SELECT source, scope, source_key, deleted, tenant, first_changed_at, last_changed_at, changes
                  FROM folded ORDER BY source, scope, source_key
                    ON CONFLICT (source, scope, source_key) DO UPDATE
                   SET deleted = EXCLUDED.deleted,
                       last_changed_at = GREATEST(o.last_changed_at, EXCLUDED.last_changed_at),
                       version = o.version + EXCLUDED.version, attempts = 0, next_attempt_at = NULL,
                       tenant = EXCLUDED.tenant)
             SELECT count(*) FROM taken",
            &[],
        )
        .await?;
    let moved: i64 = row.get(0);
    if moved > 0 {
        client
            .execute(
                "SELECT pg_notify($1, 'outbox')",
                &[&crate::capture::CHANNEL],
            )
            .await?;
    }
    Ok(moved)
}

/// Claim up to `limit` entries of `source` whose window has closed: the last change
/// is older than the source's debounce (delete window for deletes), or the first
/// change older than max_wait. Entries claimed by someone whose lease ran out, and
/// entries whose retry time has come, are ready too.
///
/// Fair across tenants: each tenant with ready work gets an equal share of the batch
/// (its oldest entries), and the batch is filled round-robin — tenant A's 50,000-row
/// import cannot hold up tenant B's one edit. `only_tenants` restricts the claim to
/// those tenants (priority tenants are claimed first this way).
pub async fn claim(
    client: &impl GenericClient,
    source: &Source,
    token: Uuid,
    lease: Duration,
    limit: i64,
    only_tenants: Option<&[String]>,
) -> Result<Vec<Claimed>, tokio_postgres::Error> {
    let only: Option<Vec<String>> = only_tenants.map(<[String]>::to_vec);
    let rows = client
        .query(
            CLAIM_SQL.as_str(),
            &[
                &source.name,
                &secs(source.delete_debounce),
                &secs(source.debounce),
                &secs(source.max_wait),
                &limit,
                &token,
                &secs(lease),
                &only,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Claimed {
            scope: if r.get::<_, &str>(0) == "source" {
                Scope::Source
            } else {
                Scope::Row
            },
            key: r.get(1),
            version: r.get(2),
            attempts: r.get(3),
        })
        .collect())
}

/// Seconds until the next entry of any of `sources` may become ready (negative: one
/// is overdue; None: nothing pending). One statement for all sources: idle workers ask
/// this at every wake-up.
pub async fn seconds_until_ready(
    client: &impl GenericClient,
    sources: &[&Source],
) -> Result<Option<f64>, tokio_postgres::Error> {
    let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
    let delete_debounce: Vec<f64> = sources.iter().map(|s| secs(s.delete_debounce)).collect();
    let debounce: Vec<f64> = sources.iter().map(|s| secs(s.debounce)).collect();
    let max_wait: Vec<f64> = sources.iter().map(|s| secs(s.max_wait)).collect();
    let row = client
        .query_one(
            "SELECT EXTRACT(EPOCH FROM min(GREATEST(
                        LEAST(o.last_changed_at + make_interval(secs => CASE WHEN o.deleted THEN s.delete_debounce ELSE s.debounce END),
                              o.first_changed_at + make_interval(secs => s.max_wait)),
                        COALESCE(o.claimed_until, '-infinity'),
                        COALESCE(o.next_attempt_at, '-infinity'))) - now())::float8
               FROM unnest($1::text[], $2::float8[], $3::float8[], $4::float8[])
                        AS s(name, delete_debounce, debounce, max_wait)
               JOIN kbsync.outbox o ON o.source = s.name",
            &[&names, &delete_debounce, &debounce, &max_wait],
        )
        .await?;
    Ok(row.get(0))
}

/// Whether row key `k` of source `$1` is already waiting to be processed: it has an
/// outbox entry, or a change recorded in the change log that the collector has not
/// folded yet (the daemon is stopped, say). The one answer to "is this key queued?".
const WAITING: &str = "(EXISTS (SELECT 1 FROM kbsync.outbox w
                       WHERE w.source = $1 AND w.scope = 'row' AND w.source_key = k)
        OR EXISTS (SELECT 1 FROM kbsync.changes c
                    WHERE c.source = $1 AND c.scope = 'row' AND c.source_key = k))";

/// Queue the keys `k` of `keys_from` for source `$1`, ready at once (their first change
/// is `$3` seconds, the source's `max_wait`, ago) but sorted after the live edits
/// already waiting; keys already `WAITING` are left as they are (the row is read again
/// when they are processed anyway). One statement for every way kbsync queues repairs.
fn queue_sql(keys_from: &str) -> String {
    format!(
        "INSERT INTO kbsync.outbox AS o (source, scope, source_key, first_changed_at, last_changed_at)
         SELECT $1, 'row', k, now() - make_interval(secs => $3::float8), now() FROM {keys_from}
          WHERE NOT {WAITING}
         ON CONFLICT (source, scope, source_key) DO NOTHING"
    )
}

/// Wake the daemons after queueing work of `source`; without it they find it at their
/// fallback poll.
async fn wake(client: &impl GenericClient, source: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_notify($1, $2)",
            &[&crate::capture::CHANNEL, &source],
        )
        .await?;
    Ok(())
}

/// Which of `keys` of source `source` are already waiting (`WAITING`).
pub async fn waiting(
    client: &impl GenericClient,
    source: &str,
    keys: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!("SELECT k FROM unnest($2::text[]) k WHERE {WAITING}"),
            &[&source, &keys],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Queue `keys` of `source` for processing (`queue_sql`). Used by the reconcile sweep:
/// repairs take the triggers' path. Returns the keys queued.
pub async fn enqueue(
    client: &impl GenericClient,
    source: &Source,
    keys: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "{} RETURNING o.source_key",
                queue_sql("unnest($2::text[]) k")
            ),
            &[&source.name, &keys, &secs(source.max_wait)],
        )
        .await?;
    if !rows.is_empty() {
        wake(client, &source.name).await?;
    }
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Extend the lease of everything claimed with `token`. Entries locked by the batch's
/// own write transaction are skipped, not waited for: they are being acknowledged.
pub async fn renew(
    client: &impl GenericClient,
    token: Uuid,
    lease: Duration,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE kbsync.outbox o SET claimed_until = now() + make_interval(secs => $2::float8)
               FROM (SELECT source, scope, source_key FROM kbsync.outbox
                      WHERE claim_token = $1 FOR UPDATE SKIP LOCKED) mine
              WHERE o.source = mine.source AND o.scope = mine.scope AND o.source_key = mine.source_key",
            &[&token, &secs(lease)],
        )
        .await
}

/// In the write transaction: lock the claimed entries that are still ours and
/// return their keys. An entry taken over by another daemon (our lease ran out) is
/// not ours any more, and our possibly older result for it must not be written.
///
/// `FOR KEY SHARE`, the weakest row lock: it keeps other daemons' claims and lease
/// renewals off (they lock `FOR UPDATE`), but not an upsert of the same entry
/// (`FOR NO KEY UPDATE`), so a new change of a key being written never waits for the
/// batch's whole write; only for its last statements, which acknowledge.
pub async fn fence(
    client: &impl GenericClient,
    source: &str,
    token: Uuid,
    scope: Scope,
    keys: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT source_key FROM kbsync.outbox
              WHERE source = $1 AND scope = $2 AND claim_token = $3 AND source_key = ANY($4)
                FOR KEY SHARE",
            &[&source, &scope.as_str(), &token, &keys],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// In the write transaction, after the write and before failures are recorded and
/// entries acknowledged: lock the entries that are still ours `FOR UPDATE`, in key
/// order. Until here the fence's weak lock let new changes fold into them; from here to
/// the commit a fold of the same keys waits, and it takes its locks in the same order.
pub async fn lock_for_acknowledge(
    client: &impl GenericClient,
    source: &str,
    token: Uuid,
    scope: Scope,
    keys: &[String],
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT 1 FROM kbsync.outbox
              WHERE source = $1 AND scope = $2 AND claim_token = $3 AND source_key = ANY($4)
              ORDER BY source_key FOR UPDATE",
            &[&source, &scope.as_str(), &token, &keys],
        )
        .await?;
    Ok(())
}

/// An outbox entry removed because its change is written.
#[derive(Debug, Clone, Copy)]
pub struct Acknowledged {
    /// How many changes the entry folded (its version).
    pub version: i64,
    /// Seconds from its last change to now (the write), in the database's clock.
    pub lag_seconds: f64,
}

/// Remove entries whose version is still the one we processed; entries changed
/// meanwhile are released so their new change gets its own window. A key written
/// successfully is no longer a dead letter (if it was one).
pub async fn acknowledge(
    client: &impl GenericClient,
    source: &str,
    token: Uuid,
    scope: Scope,
    entries: &[(String, i64)],
) -> Result<Vec<Acknowledged>, tokio_postgres::Error> {
    let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    let versions: Vec<i64> = entries.iter().map(|(_, v)| *v).collect();
    let done = client
        .query(
            "WITH done AS (
                DELETE FROM kbsync.outbox o
                 USING unnest($4::text[], $5::bigint[]) AS done(source_key, version)
                 WHERE o.source = $1 AND o.scope = $2 AND o.claim_token = $3
                   AND o.source_key = done.source_key AND o.version = done.version
             RETURNING o.scope, o.source_key, o.version,
                       EXTRACT(EPOCH FROM clock_timestamp() - o.last_changed_at)::float8 AS lag),
             cleared AS (
                DELETE FROM kbsync.dead_letters d USING done
                 WHERE done.scope = 'row' AND d.source = $1 AND d.source_key = done.source_key)
             SELECT version, lag FROM done",
            &[&source, &scope.as_str(), &token, &keys, &versions],
        )
        .await?;
    client
        .execute(
            "UPDATE kbsync.outbox
                SET claim_token = NULL, claimed_until = NULL, first_changed_at = last_changed_at
              WHERE source = $1 AND scope = $2 AND claim_token = $3 AND source_key = ANY($4)",
            &[&source, &scope.as_str(), &token, &keys],
        )
        .await?;
    Ok(done
        .iter()
        .map(|r| Acknowledged {
            version: r.get(0),
            lag_seconds: r.get(1),
        })
        .collect())
}

/// Delay before the next attempt after `attempts` failures: 2 s doubling, at most 5 min.
pub fn retry_delay(attempts: i32) -> Duration {
    let exp = attempts.clamp(0, 8) as u32;
    Duration::from_secs(2u64.saturating_pow(exp + 1).min(300))
}

/// What happens to a key that keeps failing: retried with backoff, parked in the
/// dead-letter table after `max_attempts`, and replayed by the reconcile sweep
/// `retry_after` later, `sweep_retries` times, before it is reported as permanent.
#[derive(Debug, Clone, Copy)]
pub struct FailurePolicy {
    pub max_attempts: u32,
    pub retry_after: Duration,
    pub sweep_retries: u32,
}

impl FailurePolicy {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            max_attempts: config.daemon.max_attempts,
            retry_after: config.reconcile.dead_letter_retry_after,
            sweep_retries: config.reconcile.dead_letter_retries,
        }
    }
}

/// Replay the dead letters `ids` of `source`: the one rule for every replay, the
/// sweep's of the keys whose retry time has come and `kbsync errors retry`'s. In one
/// statement, each key is queued as `enqueue` queues one (unless already waiting), and
/// its dead letter counts the replay (`retries + 1`, against
/// `reconcile.dead_letter_retries`) and waits for no timed retry; it is removed when
/// the key is written. Returns how many dead letters were replayed.
pub async fn replay_dead_letters(
    client: &impl GenericClient,
    source: &Source,
    ids: &[i64],
) -> Result<u64, tokio_postgres::Error> {
    let replayed = client
        .execute(
            &format!(
                "WITH picked AS (
                    SELECT d.id, d.source_key FROM kbsync.dead_letters d
                     WHERE d.source = $1 AND d.id = ANY($2)
                       FOR UPDATE),
                 queued AS ({})
                 UPDATE kbsync.dead_letters d SET retries = d.retries + 1, next_retry_at = NULL
                   FROM picked WHERE d.id = picked.id",
                queue_sql("(SELECT source_key AS k FROM picked) p")
            ),
            &[&source.name, &ids, &secs(source.max_wait)],
        )
        .await?;
    if replayed > 0 {
        wake(client, &source.name).await?;
    }
    Ok(replayed)
}

/// A key that failed (for now: the provider refused one of its chunks). A refusal
/// may be the provider's passing fault as well as the input's, hence the retries.
#[derive(Debug, Clone)]
pub struct Failure {
    pub key: String,
    pub error: String,
}

/// Record failures of claimed row entries; returns how many were dead-lettered.
pub async fn record_failures(
    client: &impl GenericClient,
    source: &str,
    token: Uuid,
    failures: &[Failure],
    policy: &FailurePolicy,
) -> Result<u64, tokio_postgres::Error> {
    let sweep_retries = policy.sweep_retries as i32;
    let mut parked = 0;
    for failure in failures {
        let row = client
            .query_opt(
                "UPDATE kbsync.outbox SET attempts = attempts + 1, last_error = $4
                  WHERE source = $1 AND scope = 'row' AND source_key = $2 AND claim_token = $3
              RETURNING attempts",
                &[&source, &failure.key, &token, &failure.error],
            )
            .await?;
        let Some(row) = row else { continue };
        let attempts: i32 = row.get(0);
        if attempts as u32 >= policy.max_attempts {
            client
                .execute(
                    "INSERT INTO kbsync.dead_letters (source, source_key, error, attempts, next_retry_at)
                     VALUES ($1, $2, $3, $4, CASE WHEN $6 > 0 THEN now() + make_interval(secs => $5::float8) END)
                     ON CONFLICT (source, source_key) DO UPDATE
                        SET error = EXCLUDED.error, attempts = kbsync.dead_letters.attempts + EXCLUDED.attempts,
                            last_failed_at = now(),
                            next_retry_at = CASE WHEN kbsync.dead_letters.retries < $6
                                                 THEN now() + make_interval(secs => $5::float8) END",
                    &[&source, &failure.key, &failure.error, &attempts, &secs(policy.retry_after), &sweep_retries],
                )
                .await?;
            client
                .execute(
                    "DELETE FROM kbsync.outbox WHERE source = $1 AND scope = 'row' AND source_key = $2 AND claim_token = $3",
                    &[&source, &failure.key, &token],
                )
                .await?;
            parked += 1;
        } else {
            client
                .execute(
                    "UPDATE kbsync.outbox
                        SET claim_token = NULL, claimed_until = NULL,
                            next_attempt_at = now() + make_interval(secs => $4::float8)
                      WHERE source = $1 AND scope = 'row' AND source_key = $2 AND claim_token = $3",
                    &[&source, &failure.key, &token, &secs(retry_delay(attempts))],
                )
                .await?;
        }
    }
    Ok(parked)
}

/// Give back everything claimed with `token` without counting an attempt, to be
/// retried after `delay` (the provider or the database was unavailable: not the
/// rows' fault).
pub async fn postpone(
    client: &impl GenericClient,
    token: Uuid,
    delay: Duration,
    error: &str,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE kbsync.outbox
                SET claim_token = NULL, claimed_until = NULL, last_error = $3,
                    next_attempt_at = now() + make_interval(secs => $2::float8)
              WHERE claim_token = $1",
            &[&token, &secs(delay), &error],
        )
        .await
}
