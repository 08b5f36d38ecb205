//! Logical capture (`capture.mode = "logical"`): no trigger on the source tables. The
//! decoder reads the publication's changes from the replication slot (pgoutput, over
//! pgwire-replication) and appends to `kbsync.changes` what the trigger would have
//! (`capture::decoded_changes_sql`: the same filters, relevant columns and tenant),
//! folds them into the outbox in the same transaction (`outbox::collect`, as the
//! collector does in trigger mode) and wakes the workers.
//!
//! Its cost lands on the same server as the application's writes, so it is paid per
//! batch, not per commit: changes that arrive within `GATHER` of each other go in one
//! transaction of prepared statements.
//!
//! Nothing is lost on a crash: the slot's confirmed position is raised only after the
//! transaction that appended a change has committed, so whatever was not appended is
//! sent again when the decoder reconnects (appended twice at worst, which the fold
//! merges). One daemon at a time holds the slot; the others stand by and take over
//! when it goes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use serde_json::{Map, Value as Json};
use thiserror::Error;
use tokio::sync::watch;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use kbsync_core::capture;
use kbsync_core::capture::logical::{self, SlotState};
use kbsync_core::config::{Config, Source};
use kbsync_core::db;
use kbsync_core::outbox;

use crate::health::Health;
use crate::pgoutput::{self, Message, OldRow, Value};

/// Appended in one transaction at most this many changes (a huge transaction is
/// appended in pieces; its position is confirmed after the last).
const MAX_PENDING: usize = 5_000;
/// A lone change waits this long for others to share its transaction.
const GATHER: Duration = Duration::from_millis(5);
/// The longest a decoded change waits to be appended while more keep arriving.
const MAX_DELAY: Duration = Duration::from_millis(20);
/// How often the slot's retained WAL is measured (metric, readiness).
const SLOT_CHECK: Duration = Duration::from_secs(5);
/// A standing-by daemon tries to take the slot this often.
const STANDBY_RETRY: Duration = Duration::from_secs(2);
/// Seconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_SECONDS: f64 = 946_684_800.0;

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("{}", db::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("replication stream: {0}")]
    Stream(#[from] pgwire_replication::PgWireError),
    #[error(transparent)]
    Parse(#[from] pgoutput::ParseError),
    #[error(
        "replication slot {slot} does not exist (dropped by hand?): nothing is being captured. Run `kbsync install` to create it again, then `kbsync reconcile` for the changes committed meanwhile"
    )]
    SlotMissing { slot: String },
    #[error(
        "the server has wal_level = {0}; logical capture needs wal_level = logical (ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)"
    )]
    WalLevel(String),
    #[error("sources.{0}: its table is gone from the database")]
    TableGone(String),
}

/// A source as the decoder appends its changes.
struct Target {
    source: String,
    schema: String,
    table: String,
    /// `capture::decoded_changes_sql`, prepared on the decoder's connection.
    append: Statement,
}

/// The statements per source (its table's, then one per related table), resolved
/// against the catalog.
async fn targets(client: &Client, sources: &[Source]) -> Result<Vec<Target>, DecodeError> {
    let resolve = |text: String| async move {
        client
            .query_opt(
                "SELECT n.nspname::text, c.relname::text, format('%I.%I', n.nspname, c.relname)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = to_regclass($1)",
                &[&text],
            )
            .await
            .map(|r| {
                r.map(|r| {
                    (
                        r.get::<_, String>(0),
                        r.get::<_, String>(1),
                        r.get::<_, String>(2),
                    )
                })
            })
    };
    let mut out = Vec::new();
    for source in sources {
        let (schema, table, qualified) = resolve(source.table.regclass_text())
            .await?
            .ok_or_else(|| DecodeError::TableGone(source.name.clone()))?;
        let mut related = Vec::new();
        for r in &source.related {
            related.push(
                resolve(r.table.regclass_text())
                    .await?
                    .ok_or_else(|| DecodeError::TableGone(source.name.clone()))?,
            );
        }
        let related_tables: Vec<String> = related.iter().map(|(_, _, q)| q.clone()).collect();
        let sql = capture::decoded_changes_sql(source, &qualified, &related_tables);
        out.push(Target {
            source: source.name.clone(),
            schema,
            table,
            append: client.prepare(&sql).await?,
        });
        // A related table's changes queue the rows that reference the changed rows.
        for (i, (schema, table, _)) in related.into_iter().enumerate() {
            let sql = capture::decoded_dependents_sql(source, i, &qualified, &related_tables);
            out.push(Target {
                source: source.name.clone(),
                schema,
                table,
                append: client.prepare(&sql).await?,
            });
        }
    }
    Ok(out)
}

/// Decoded changes not yet appended, and the stream position they reach.
#[derive(Default)]
struct Pending {
    /// Per target, the changes as `decoded_changes_sql` reads them.
    changes: Vec<Vec<Json>>,
    count: usize,
    /// relation id → (indexes of the targets on that table, column names), for
    /// captured tables only (two sources may read one table, as source or related).
    relations: HashMap<u32, (Vec<usize>, Vec<String>)>,
    /// When the oldest change not yet appended arrived.
    since: Option<Instant>,
    in_transaction: bool,
    commit_at: f64,
    /// End of the last transaction whose changes are all in `changes` or appended.
    complete_up_to: Option<Lsn>,
}

fn row_json(columns: &[String], values: &[Value], fill_from: Option<&[Value]>) -> Json {
    let mut row = Map::new();
    for (i, (name, value)) in columns.iter().zip(values).enumerate() {
        let value = match value {
            Value::Null => Json::Null,
            Value::Text(text) => Json::String(text.clone()),
            // Unchanged: the old row has it (REPLICA IDENTITY FULL), else it is left
            // out (NULL), which the SQL treats as "cannot compare".
            Value::UnchangedToast => match fill_from.and_then(|old| old.get(i)) {
                Some(Value::Text(text)) => Json::String(text.clone()),
                _ => continue,
            },
        };
        row.insert(name.clone(), value);
    }
    Json::Object(row)
}

impl Pending {
    fn new(targets: usize) -> Self {
        Self {
            changes: vec![Vec::new(); targets],
            ..Self::default()
        }
    }

    fn push(&mut self, targets: &[usize], change: Json) {
        for &target in targets {
            self.changes[target].push(change.clone());
            self.count += 1;
        }
        self.since.get_or_insert_with(Instant::now);
    }

    /// Under a steady stream the channel is never empty: append at least this often.
    fn overdue(&self) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= MAX_DELAY)
    }

    /// When to append if nothing more arrives.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.since
            .map(|t| tokio::time::Instant::from_std(t + GATHER))
    }

    /// Take in one decoded message.
    fn take(&mut self, targets: &[Target], message: Message) {
        let change = |op: &str, at: f64, old: Option<(&OldRow, &[String])>, new: Option<Json>| {
            let (full_old, old) = match old {
                Some((OldRow::Full(values), columns)) => (true, row_json(columns, values, None)),
                Some((OldRow::Key(values), columns)) => (false, row_json(columns, values, None)),
                None => (false, Json::Null),
            };
            serde_json::json!({"op": op, "at": at, "full_old": full_old, "old": old, "new": new})
        };
        let at = self.commit_at;
        match message {
            Message::Relation(rel) => {
                let indexes: Vec<usize> = (0..targets.len())
                    .filter(|&i| targets[i].schema == rel.schema && targets[i].table == rel.name)
                    .collect();
                if indexes.is_empty() {
                    self.relations.remove(&rel.id);
                } else {
                    self.relations.insert(rel.id, (indexes, rel.columns));
                }
            }
            Message::Insert { relation, new } => {
                if let Some((indexes, columns)) = self.relations.get(&relation) {
                    let c = change("I", at, None, Some(row_json(columns, &new, None)));
                    let indexes = indexes.clone();
                    self.push(&indexes, c);
                }
            }
            Message::Update { relation, old, new } => {
                if let Some((indexes, columns)) = self.relations.get(&relation) {
                    let fill = match &old {
                        Some(OldRow::Full(values)) => Some(values.as_slice()),
                        _ => None,
                    };
                    let new = row_json(columns, &new, fill);
                    let c = change(
                        "U",
                        at,
                        old.as_ref().map(|o| (o, columns.as_slice())),
                        Some(new),
                    );
                    let indexes = indexes.clone();
                    self.push(&indexes, c);
                }
            }
            Message::Delete { relation, old } => {
                if let Some((indexes, columns)) = self.relations.get(&relation) {
                    let c = change("D", at, Some((&old, columns.as_slice())), None);
                    let indexes = indexes.clone();
                    self.push(&indexes, c);
                }
            }
            Message::Truncate { relations } => {
                for relation in relations {
                    if let Some((indexes, _)) = self.relations.get(&relation) {
                        let indexes = indexes.clone();
                        self.push(&indexes, change("T", at, None, None));
                    }
                }
            }
            Message::Other => {}
        }
    }
}

/// Append what is pending and fold it into the outbox, in one transaction, and wake
/// the workers; returns the position that may now be confirmed.
async fn append(
    client: &mut Client,
    targets: &[Target],
    pending: &mut Pending,
    wake_workers: &watch::Sender<u64>,
) -> Result<Option<Lsn>, tokio_postgres::Error> {
    if pending.count > 0 {
        let tx = client.transaction().await?;
        for (target, changes) in targets.iter().zip(pending.changes.iter_mut()) {
            if changes.is_empty() {
                continue;
            }
            let batch = Json::Array(std::mem::take(changes));
            let appended = tx.execute(&target.append, &[&batch]).await?;
            metrics::counter!("kbsync_changes_decoded_total", "source" => target.source.clone())
                .increment(appended);
        }
        let moved = outbox::collect(&tx).await?;
        tx.commit().await?;
        pending.count = 0;
        if moved > 0 {
            metrics::counter!("kbsync_changes_collected_total").increment(moved as u64);
            wake_workers.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
    pending.since = None;
    Ok(pending.complete_up_to.take())
}

/// Connection settings of the replication session, from the database URL.
fn replication_config(url: &str, slot: &str) -> Result<ReplicationConfig, DecodeError> {
    let settings = db::connection_settings(url)?;
    let parsed = &settings.config;
    let port = parsed.get_ports().first().copied().unwrap_or(5432);
    let user = parsed.get_user().unwrap_or_default().to_owned();
    let password = parsed
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = parsed.get_dbname().unwrap_or(&user).to_owned();
    let config = match parsed.get_hosts().first() {
        Some(tokio_postgres::config::Host::Unix(dir)) => ReplicationConfig::unix(
            dir.to_string_lossy(),
            port,
            user,
            password,
            database,
            slot,
            logical::PUBLICATION,
        ),
        tcp => ReplicationConfig::new(
            match tcp {
                Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
                _ => "localhost".to_owned(),
            },
            user,
            password,
            database,
            slot,
            logical::PUBLICATION,
        )
        .with_port(port)
        .with_tls(replication_tls(&settings.tls)),
    };
    Ok(config
        .with_application_name("kbsync-decoder")
        // Confirmations reach the server within this; the slot's WAL is freed then.
        .with_status_interval(Duration::from_secs(1)))
}

/// The replication stream's TLS, as libpq's parameters ask for the other connections.
/// `sslrootcert=system` verifies against Mozilla's roots (webpki-roots, compiled in),
/// the replication client's only trust store besides a file.
fn replication_tls(tls: &kbsync_core::db::tls::TlsSettings) -> pgwire_replication::TlsConfig {
    use kbsync_core::db::tls::{RootCerts, SslMode};
    use pgwire_replication::SslMode as Wire;
    let root_file = match &tls.root_certs {
        Some(RootCerts::File(path)) => Some(path.clone()),
        Some(RootCerts::System) | None => None,
    };
    let mode = match (tls.mode, &root_file) {
        (SslMode::Disable, _) => Wire::Disable,
        (SslMode::Allow | SslMode::Prefer, _) => Wire::Prefer,
        // libpq verifies the chain of a `require` connection when it has a root file.
        (SslMode::Require, Some(_)) | (SslMode::VerifyCa, _) => Wire::VerifyCa,
        (SslMode::Require, None) => Wire::Require,
        (SslMode::VerifyFull, _) => Wire::VerifyFull,
    };
    pgwire_replication::TlsConfig {
        mode,
        ca_pem_path: root_file,
        sni_hostname: None,
        client_cert_pem_path: tls.client_cert.clone(),
        client_key_pem_path: tls.client_key.clone(),
    }
}

/// The slot is held by another session (another daemon): stand by.
fn slot_in_use(e: &pgwire_replication::PgWireError) -> bool {
    let text = e.to_string();
    text.contains("55006") || text.contains("is active for PID")
}

fn slot_missing(e: &pgwire_replication::PgWireError) -> bool {
    let text = e.to_string();
    text.contains("42704") || (text.contains("replication slot") && text.contains("does not exist"))
}

fn record_slot(state: &SlotState, limit_mb: u64, health: &Health) {
    metrics::gauge!("kbsync_replication_slot_retained_bytes").set(state.retained_bytes as f64);
    metrics::gauge!("kbsync_replication_slot_unconfirmed_bytes")
        .set(state.unconfirmed_bytes as f64);
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
    if state.over_limit(limit_mb) {
        health.capture_failed(&format!(
            "replication slot {} holds back {:.1} MiB of WAL (capture.max_retained_wal_mb = {}; wal_status {}): decoding is behind",
            state.name,
            mib(state.retained_bytes),
            limit_mb,
            state.wal_status
        ));
    } else {
        health.capture_ok(&format!(
            "decoding slot {}: {:.1} MiB of WAL retained",
            state.name,
            mib(state.retained_bytes)
        ));
    }
}

/// Decode until cancelled, reconnecting after errors. Never returns an error: capture
/// trouble is reported through the health (`/readyz`), the log and the metrics, while
/// the workers carry on with what is in the outbox.
pub async fn run(
    url: String,
    config: Arc<Config>,
    health: Arc<Health>,
    wake_workers: Arc<watch::Sender<u64>>,
    cancel: CancellationToken,
) {
    let mut delays = db::reconnect_backoff();
    loop {
        match decode(&url, &config, &health, &wake_workers, &cancel).await {
            Ok(()) => return,
            Err(e) => {
                health.capture_failed(&e.to_string());
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::error!(error = %e, ?delay, "logical capture stopped; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn decode(
    url: &str,
    config: &Config,
    health: &Health,
    wake_workers: &watch::Sender<u64>,
    cancel: &CancellationToken,
) -> Result<(), DecodeError> {
    let (mut client, _connection) = db::connect(url).await?;
    let level = logical::wal_level(&client).await?;
    if level != "logical" {
        return Err(DecodeError::WalLevel(level));
    }
    let slot = logical::slot_name(&client, config).await?;
    let targets = targets(&client, config.sources()).await?;
    let limit_mb = config.capture.max_retained_wal_mb;
    let mut stream = loop {
        let Some(state) = logical::slot_state(&client, &slot).await? else {
            return Err(DecodeError::SlotMissing { slot });
        };
        record_slot(&state, limit_mb, health);
        let mut stream = ReplicationClient::connect(replication_config(url, &slot)?).await?;
        match stream.wait_started().await {
            Ok(()) => break stream,
            Err(e) if slot_in_use(&e) => {
                health.capture_ok(&format!(
                    "standing by: another kbsync daemon decodes slot {slot}"
                ));
                tracing::debug!(slot, "another daemon holds the slot; standing by");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(STANDBY_RETRY) => {}
                }
            }
            Err(e) if slot_missing(&e) => return Err(DecodeError::SlotMissing { slot }),
            Err(e) => return Err(e.into()),
        }
    };
    tracing::info!(
        slot,
        publication = logical::PUBLICATION,
        "decoding changes (logical capture)"
    );
    let mut pending = Pending::new(targets.len());
    let mut last_check = Instant::now();
    let result = loop {
        if last_check.elapsed() >= SLOT_CHECK {
            last_check = Instant::now();
            match logical::slot_state(&client, &slot).await? {
                Some(state) => record_slot(&state, limit_mb, health),
                None => break Err(DecodeError::SlotMissing { slot: slot.clone() }),
            }
        }
        // Append when nothing more came for GATHER (or, under a steady stream, every
        // MAX_DELAY): a burst of commits goes in one transaction.
        let event = tokio::select! {
            biased;
            _ = cancel.cancelled() => break Ok(()),
            event = stream.recv() => event,
            _ = tokio::time::sleep_until(pending.due().unwrap_or_else(tokio::time::Instant::now)),
                if pending.due().is_some() => {
                if let Some(lsn) = append(&mut client, &targets, &mut pending, wake_workers).await? {
                    stream.update_applied_lsn(lsn);
                }
                continue;
            }
            _ = tokio::time::sleep(SLOT_CHECK) => continue,
        };
        let event = match event {
            Ok(Some(event)) => event,
            Ok(None) => break Ok(()),
            Err(e) if slot_missing(&e) => {
                break Err(DecodeError::SlotMissing { slot: slot.clone() });
            }
            Err(e) => break Err(e.into()),
        };
        match event {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                pending.in_transaction = true;
                pending.commit_at = commit_time_micros as f64 / 1e6 + PG_EPOCH_UNIX_SECONDS;
            }
            ReplicationEvent::XLogData { data, .. } => {
                pending.take(&targets, pgoutput::parse(&data)?);
                if pending.count >= MAX_PENDING {
                    // Mid-transaction: appended, but confirmed only after its commit.
                    let complete = pending.complete_up_to.take();
                    append(&mut client, &targets, &mut pending, wake_workers).await?;
                    if let Some(lsn) = complete {
                        stream.update_applied_lsn(lsn);
                    }
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                pending.in_transaction = false;
                pending.complete_up_to = Some(end_lsn);
                pending.since.get_or_insert_with(Instant::now);
                if pending.overdue()
                    && let Some(lsn) =
                        append(&mut client, &targets, &mut pending, wake_workers).await?
                {
                    stream.update_applied_lsn(lsn);
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Idle and caught up: everything before wal_end has been seen, so the
                // slot may let go of WAL written by other databases and tables.
                if !pending.in_transaction && pending.count == 0 && pending.complete_up_to.is_none()
                {
                    stream.update_applied_lsn(wal_end);
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
    };
    stream.stop();
    result
}
