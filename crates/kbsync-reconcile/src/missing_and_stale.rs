//! Source rows → chunks: walk a source's rows in key ranges and, per range, find in
//! one statement the eligible rows whose chunks are missing, stale or lack an
//! embedding. Those keys go into the outbox the triggers write, so the daemon's one
//! processing path repairs them (re-reading the row, reusing unchanged embeddings).

use kbsync_core::config::Source;
use kbsync_core::outbox;
use kbsync_core::sync::source_rows::RowSql;
use tokio_postgres::GenericClient;

use crate::report::SourceReport;
use crate::scope::{ReconcileError, Scope};
use crate::text_present::has_text;
use kbsync_core::progress::Progress;

/// The statements for one source.
pub(crate) struct RowScan {
    /// $1 lower bound (exclusive, NULL: start) → the upper bound of a range of
    /// `$2 + 1` keys, NULL when fewer remain.
    range_end: String,
    /// $1 lower bound (exclusive), $2 upper bound (inclusive, NULL: end), $3 tenant,
    /// $4 source name, $5 chunking fingerprint, $6 model → eligible row count and the
    /// drifting keys with their reason.
    detect: String,
}

impl RowScan {
    pub(crate) fn new(rows: &RowSql) -> Self {
        let range_end = format!(
            "SELECT {key}::text FROM {table} t WHERE ($1::text IS NULL OR {after}) ORDER BY {key} OFFSET $2 LIMIT 1",
            key = rows.key,
            table = rows.table,
            after = rows.key_compare(">", "$1", false),
        );
        let detect = format!(
            "WITH cur AS (
                SELECT {key}::text AS key, {tenant}::text AS tenant, {metadata} AS metadata,
                       {text_hash64} AS text_hash64, {has_text} AS has_text
                  FROM {from}
                 WHERE ($1::text IS NULL OR {after}) AND ($2::text IS NULL OR {upto})
                   AND {eligible} AND ($3::text IS NULL OR {tenant}::text = $3)),
             judged AS (
                SELECT cur.key,
                       CASE
                         WHEN k.n IS NULL THEN CASE WHEN cur.has_text THEN 'missing' END
                         WHEN NOT cur.has_text THEN 'text'
                         WHEN k.old_hashes THEN 'hashes'
                         WHEN k.bad_text THEN 'text'
                         WHEN k.bad_chunking THEN 'chunking'
                         WHEN k.bad_model THEN 'model'
                         WHEN k.bad_tenant THEN 'tenant'
                         WHEN k.bad_metadata THEN 'metadata'
                         WHEN k.bad_set THEN 'chunk_set'
                         WHEN k.null_embedding THEN 'embedding'
                       END AS reason
                  FROM cur
                  LEFT JOIN LATERAL (
                       SELECT count(*) AS n,
                              bool_or(k.source_text_hash64 IS NULL OR k.content_hash64 IS NULL) AS old_hashes,
                              bool_or(k.source_text_hash64 <> cur.text_hash64
                                      OR k.content_hash64 <> hashtextextended(k.content COLLATE \"C\", 0)) AS bad_text,
                              bool_or(k.chunking IS DISTINCT FROM $5) AS bad_chunking,
                              bool_or(k.embedding_model IS DISTINCT FROM $6) AS bad_model,
                              bool_or(k.tenant_id <> cur.tenant) AS bad_tenant,
                              bool_or(k.metadata <> cur.metadata) AS bad_metadata,
                              COALESCE(min(k.chunk_count) <> max(k.chunk_count)
                                       OR count(*) <> max(k.chunk_count)
                                       OR max(k.chunk_index) <> count(*) - 1, true) AS bad_set,
                              bool_or(k.embedding IS NULL) AS null_embedding
                         FROM public.tenant_knowledge k
                        WHERE k.source = $4 AND k.source_key = cur.key
                       HAVING count(*) > 0) k ON true)
             SELECT count(*),
                    COALESCE(array_agg(key) FILTER (WHERE reason IS NOT NULL), '{{}}'),
                    COALESCE(array_agg(reason) FILTER (WHERE reason IS NOT NULL), '{{}}')
               FROM judged",
            key = rows.key,
            tenant = rows.tenant,
            metadata = rows.metadata,
            text_hash64 = rows.text_hash64(),
            has_text = has_text(&rows.text),
            from = rows.from,
            after = rows.key_compare(">", "$1", false),
            upto = rows.key_compare("<=", "$2", false),
            eligible = rows.eligible,
        );
        Self { range_end, detect }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn sweep(
    client: &impl GenericClient,
    source: &Source,
    scan: &RowScan,
    scope: &Scope<'_>,
    chunking: &str,
    model: &str,
    report: &mut SourceReport,
    progress: &dyn Progress,
) -> Result<(), ReconcileError> {
    let range = scope.range_size as i64;
    let mut lower: Option<String> = None;
    loop {
        if scope.cancel.is_cancelled() {
            return Err(ReconcileError::Cancelled);
        }
        let upper: Option<String> = client
            .query_opt(&scan.range_end, &[&lower, &(range - 1)])
            .await?
            .map(|r| r.get(0));
        let row = client
            .query_one(
                &scan.detect,
                &[
                    &lower,
                    &upper,
                    &scope.tenant,
                    &source.name,
                    &chunking,
                    &model,
                ],
            )
            .await?;
        let eligible: i64 = row.get(0);
        let keys: Vec<String> = row.get(1);
        let reasons: Vec<String> = row.get(2);
        report.rows += eligible as u64;
        for reason in &reasons {
            match reason.as_str() {
                "missing" => report.missing += 1,
                "text" => report.stale.text += 1,
                "chunking" => report.stale.chunking += 1,
                "model" => report.stale.model += 1,
                "tenant" => report.stale.tenant += 1,
                "metadata" => report.stale.metadata += 1,
                "chunk_set" => report.stale.chunk_set += 1,
                "hashes" => report.stale.hashes += 1,
                _ => report.missing_embeddings += 1,
            }
        }
        if !keys.is_empty() {
            let queued = if scope.dry_run {
                let waiting = outbox::waiting(client, &source.name, &keys).await?;
                (keys.len() - waiting.len()) as u64
            } else {
                outbox::enqueue(client, source, &keys).await?.len() as u64
            };
            report.queued += queued;
            report.already_queued += keys.len() as u64 - queued;
        }
        // Eligible rows, as the step's estimate counts them (a range also walks the
        // rows the filter leaves out).
        progress.advance(eligible as u64);
        match upper {
            Some(u) => lower = Some(u),
            None => return Ok(()),
        }
    }
}
