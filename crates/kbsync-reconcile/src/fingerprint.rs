//! The sweep's first pass: one statement compares a whole source with its chunks by
//! fingerprint, two parallel scans and no join. Only a source whose fingerprints
//! differ is compared key by key ([`crate::missing_and_stale`], [`crate::orphans`]),
//! so a sweep that finds nothing costs about one read of both tables.
//!
//! Each eligible row with text contributes F(x) to a sum, where x mixes the 64-bit
//! hashes of its key, tenant, text and metadata (migration 0006) and F is a 64-bit
//! hash of x. Each chunk contributes what the row expects of it: chunk 0 contributes
//! F(x) of the values it recorded; the chunks of a key cut into n > 1 contribute
//! c·n(n−1)/2 (chunk 0) and −c·i (chunk i), c a hash of (x, n), which sum to zero
//! exactly when every chunk records the same x and n and indexes 0..n−1 are all
//! there (the unique index forbids duplicates, and a chunk with i ≥ n counts as
//! bad). A chunk that is bad by itself (content altered, other model or chunking,
//! no embedding, no 64-bit hashes) is counted. The source is in sync when the
//! counts and sums agree; a drift that left them equal would need a 64-bit
//! collision.

use kbsync_core::config::Source;
use kbsync_core::sync::source_rows::RowSql;
use tokio_postgres::GenericClient;

use crate::text_present::has_text;

/// $1 tenant (NULL: all), $2 source name, $3 chunking fingerprint, $4 model →
/// eligible rows, chunks, in sync.
pub(crate) struct FingerprintScan {
    compare: String,
}

/// The fingerprint of a source.
pub(crate) struct Fingerprint {
    pub rows: u64,
    pub chunks: u64,
    pub in_sync: bool,
}

/// `x` for one row or chunk: its key, tenant, text hash and metadata, mixed.
fn mix(key: &str, tenant: &str, text_hash64: &str, metadata: &str) -> String {
    format!(
        "hashtextextended({key} COLLATE \"C\", 0) # hashtextextended({tenant} COLLATE \"C\", 1)
           # {text_hash64} # jsonb_hash_extended({metadata}, 2)"
    )
}

impl FingerprintScan {
    pub(crate) fn new(rows: &RowSql) -> Self {
        let row_x = mix(
            &format!("{}::text", rows.key),
            &format!("{}::text", rows.tenant),
            &rows.text_hash64(),
            &rows.metadata,
        );
        let chunk_x = mix(
            "k.source_key",
            "k.tenant_id",
            "k.source_text_hash64",
            "k.metadata",
        );
        let compare = format!(
            "WITH source_rows AS (
                SELECT count(*) AS eligible, count(*) FILTER (WHERE has_text) AS with_text,
                       COALESCE(sum(hashint8extended(x, 3)) FILTER (WHERE has_text), 0) AS sum
                  FROM (SELECT {row_x} AS x, {has_text} AS has_text
                          FROM {from}
                         WHERE {eligible} AND ($1::text IS NULL OR {tenant}::text = $1)) r),
             chunks AS (
                SELECT count(*) AS chunks, count(*) FILTER (WHERE chunk_index = 0) AS firsts,
                       count(*) FILTER (WHERE NOT valid) AS bad,
                       COALESCE(sum(first), 0) AS sum, COALESCE(sum(chunk_set), 0) AS chunk_set
                  FROM (SELECT k.chunk_index,
                               COALESCE(k.content_hash64 = hashtextextended(k.content COLLATE \"C\", 0)
                                        AND k.source_text_hash64 IS NOT NULL
                                        AND k.chunking = $3 AND k.embedding_model = $4
                                        AND k.embedding IS NOT NULL AND k.chunk_index < k.chunk_count,
                                        false) AS valid,
                               CASE WHEN k.chunk_index = 0 THEN hashint8extended(x, 3) END AS first,
                               CASE WHEN k.chunk_count = 1 THEN NULL
                                    WHEN k.chunk_index = 0
                                      THEN (hashint8extended(x # k.chunk_count, 4) >> 16)::numeric
                                           * k.chunk_count * (k.chunk_count - 1) / 2
                                    ELSE -(hashint8extended(x # k.chunk_count, 4) >> 16)::numeric * k.chunk_index
                               END AS chunk_set
                          FROM public.tenant_knowledge k, LATERAL (SELECT {chunk_x} AS x) h
                         WHERE k.source = $2 AND ($1::text IS NULL OR k.tenant_id = $1)) c)
             SELECT r.eligible, c.chunks,
                    r.with_text = c.firsts AND r.sum = c.sum AND c.chunk_set = 0 AND c.bad = 0
               FROM source_rows r, chunks c",
            has_text = has_text(&rows.text),
            from = rows.from,
            eligible = rows.eligible,
            tenant = rows.tenant,
        );
        Self { compare }
    }
}

pub(crate) async fn compare(
    client: &impl GenericClient,
    source: &Source,
    scan: &FingerprintScan,
    tenant: Option<&str>,
    chunking: &str,
    model: &str,
) -> Result<Fingerprint, tokio_postgres::Error> {
    let row = client
        .query_one(&scan.compare, &[&tenant, &source.name, &chunking, &model])
        .await?;
    let (rows, chunks): (i64, i64) = (row.get(0), row.get(1));
    Ok(Fingerprint {
        rows: rows as u64,
        chunks: chunks as u64,
        in_sync: row.get(2),
    })
}
