//! Writing `tenant_knowledge`: what is stored for a set of keys, and the idempotent
//! upsert/delete of a batch, inside the caller's transaction.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use pgvector::Vector;
use tokio_postgres::GenericClient;

use crate::config::Source;

/// A chunk as stored.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub index: i32,
    pub hash: Vec<u8>,
    pub embedding: Option<Vector>,
    pub model: Option<String>,
    pub tenant: String,
    pub metadata: serde_json::Value,
    pub source_text_hash: Option<Vec<u8>>,
    pub chunking: Option<String>,
    pub chunk_count: Option<i32>,
    /// The 64-bit hashes the reconcile sweep compares (migration 0006); None for a
    /// chunk written before them, which is then rewritten (its embedding reused).
    pub source_text_hash64: Option<i64>,
    pub has_content_hash64: bool,
    /// The content still hashes to `hash`. A chunk altered behind kbsync's back is
    /// neither reused nor left as it is.
    pub intact: bool,
}

/// Where a vector of `model` ($2) for one of these content hashes ($1) may be taken
/// from, whichever key or tenant holds it (a vector depends on the text and the model
/// only): stored chunks' `column` first (`embedding`, or during a model migration the
/// other model's column, a name from `OtherColumn`, never input), then
/// what `kbsync adopt` took over from an earlier table. A chunk whose text no longer
/// matches its hash (edited by hand) is never a source. Read as `vector` whatever the
/// column stores (a halfvec is widened exactly; writing it back narrows it again).
fn reusable_sql(column: &str) -> String {
    format!(
        "SELECT content_hash, {column}::vector AS embedding, 0 AS preference
           FROM public.tenant_knowledge
          WHERE content_hash = ANY($1) AND {column}_model = $2 AND {column} IS NOT NULL
            AND content_hash = sha256(convert_to(content, 'UTF8'))
         UNION ALL
         SELECT content_hash, embedding, 1
           FROM kbsync.adopted_embeddings
          WHERE content_hash = ANY($1) AND embedding_model = $2"
    )
}

/// One reusable vector per content hash (`reusable_sql`), stored ones first.
pub(crate) fn vectors_by_hash_sql(column: &str) -> String {
    format!(
        "SELECT DISTINCT ON (content_hash) content_hash, embedding
           FROM ({}) found
          ORDER BY content_hash, preference",
        reusable_sql(column)
    )
}

static REUSABLE_EMBEDDINGS: LazyLock<String> = LazyLock::new(|| reusable_sql("embedding"));

/// Built once: `embeddings_by_hash` runs in every batch.
static EMBEDDINGS_BY_HASH: LazyLock<String> = LazyLock::new(|| vectors_by_hash_sql("embedding"));

/// Reusable embeddings of `model` for these content hashes (`REUSABLE_EMBEDDINGS`).
pub async fn embeddings_by_hash(
    client: &impl GenericClient,
    model: &str,
    hashes: &[&[u8]],
) -> Result<HashMap<Vec<u8>, Vector>, tokio_postgres::Error> {
    let rows = client
        .query(EMBEDDINGS_BY_HASH.as_str(), &[&hashes, &model])
        .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Which of these content hashes have a reusable embedding of `model`, without
/// reading the vectors (asked `HASHES_PER_STATEMENT` at a time).
pub async fn hashes_with_embeddings(
    client: &impl GenericClient,
    model: &str,
    hashes: &[[u8; 32]],
) -> Result<HashSet<[u8; 32]>, tokio_postgres::Error> {
    const HASHES_PER_STATEMENT: usize = 10_000;
    let statement = format!(
        "SELECT DISTINCT content_hash FROM ({}) found",
        REUSABLE_EMBEDDINGS.as_str()
    );
    let mut found = HashSet::new();
    for part in hashes.chunks(HASHES_PER_STATEMENT) {
        let part: Vec<&[u8]> = part.iter().map(|h| h.as_slice()).collect();
        for row in client.query(&statement, &[&part, &model]).await? {
            if let Ok(hash) = <[u8; 32]>::try_from(row.get::<_, &[u8]>(0)) {
                found.insert(hash);
            }
        }
    }
    Ok(found)
}

/// Stored chunks of `keys`, by key.
pub async fn stored_chunks(
    client: &impl GenericClient,
    source: &str,
    keys: &[String],
) -> Result<HashMap<String, Vec<StoredChunk>>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT source_key, chunk_index, content_hash, embedding::vector, embedding_model, tenant_id, metadata,
                    source_text_hash, chunking, chunk_count,
                    content_hash = sha256(convert_to(content, 'UTF8')),
                    source_text_hash64, content_hash64 IS NOT NULL
               FROM public.tenant_knowledge WHERE source = $1 AND source_key = ANY($2)
              ORDER BY source_key, chunk_index",
            &[&source, &keys],
        )
        .await?;
    let mut by_key: HashMap<String, Vec<StoredChunk>> = HashMap::new();
    for r in rows {
        by_key.entry(r.get(0)).or_default().push(StoredChunk {
            index: r.get(1),
            hash: r.get(2),
            embedding: r.get(3),
            model: r.get(4),
            tenant: r.get(5),
            metadata: r.get(6),
            source_text_hash: r.get(7),
            chunking: r.get(8),
            chunk_count: r.get(9),
            intact: r.get(10),
            source_text_hash64: r.get(11),
            has_content_hash64: r.get(12),
        });
    }
    Ok(by_key)
}

/// A chunk to write.
#[derive(Debug, Clone)]
pub struct ChunkWrite {
    pub tenant: String,
    pub key: String,
    pub index: i32,
    pub content: String,
    pub hash: Vec<u8>,
    pub embedding: Vector,
    pub model: String,
    pub metadata: serde_json::Value,
    /// What the key's chunks were cut from and how (see the 0002 migration).
    pub source_text_hash: Vec<u8>,
    /// `SourceRow::text_hash64` (the content's own 64-bit hash is computed in SQL).
    pub source_text_hash64: i64,
    pub chunking: String,
    pub chunk_count: i32,
}

/// The upsert of a batch's chunks; during a model migration with the other model's
/// vector column too (`$15` its vectors, NULL where none was obtained, `$16` its model).
/// The column names come from a closed set (`OtherColumn`).
fn upsert_sql(other: Option<&str>) -> String {
    let (columns, values, updates) = match other {
        Some(o) => (
            format!(", {o}, {o}_model"),
            ", w.other, CASE WHEN w.other IS NULL THEN NULL ELSE $16 END".to_owned(),
            format!(", {o} = EXCLUDED.{o}, {o}_model = EXCLUDED.{o}_model"),
        ),
        None => (String::new(), String::new(), String::new()),
    };
    let (other_array, other_name) = match other {
        Some(_) => (", $15::vector[]", ", other"),
        None => ("", ""),
    };
    format!(
        "INSERT INTO public.tenant_knowledge AS k
                (source, tenant_id, source_key, chunk_index, content, content_hash, embedding, embedding_model, metadata,
                 source_text_hash, chunking, chunk_count, source_text_hash64, content_hash64, text_search_config{columns})
         SELECT $1, w.tenant_id, w.source_key, w.chunk_index, w.content, w.content_hash, w.embedding, w.embedding_model,
                w.metadata, w.source_text_hash, w.chunking, w.chunk_count, w.source_text_hash64,
                hashtextextended(w.content COLLATE \"C\", 0), $14::text::regconfig{values}
           FROM unnest($2::text[], $3::text[], $4::int[], $5::text[], $6::bytea[], $7::vector[], $8::text[], $9::jsonb[],
                       $10::bytea[], $11::text[], $12::int[], $13::bigint[]{other_array})
                AS w(tenant_id, source_key, chunk_index, content, content_hash, embedding, embedding_model, metadata,
                     source_text_hash, chunking, chunk_count, source_text_hash64{other_name})
         ON CONFLICT (source, source_key, chunk_index) DO UPDATE
            SET tenant_id = EXCLUDED.tenant_id, content = EXCLUDED.content,
                content_hash = EXCLUDED.content_hash, embedding = EXCLUDED.embedding,
                embedding_model = EXCLUDED.embedding_model, metadata = EXCLUDED.metadata,
                source_text_hash = EXCLUDED.source_text_hash, chunking = EXCLUDED.chunking,
                chunk_count = EXCLUDED.chunk_count, source_text_hash64 = EXCLUDED.source_text_hash64,
                content_hash64 = EXCLUDED.content_hash64,
                text_search_config = EXCLUDED.text_search_config, updated_at = now(){updates}"
    )
}

static UPSERT: LazyLock<String> = LazyLock::new(|| upsert_sql(None));
static UPSERT_WITH_NEXT: LazyLock<String> = LazyLock::new(|| upsert_sql(Some("embedding_next")));
static UPSERT_WITH_PREVIOUS: LazyLock<String> =
    LazyLock::new(|| upsert_sql(Some("embedding_previous")));

/// The other model's vectors for a batch's chunks during a model migration.
pub struct OtherVectors<'a> {
    pub column: OtherColumn,
    pub model: &'a str,
    /// By content hash; a chunk whose text has none is written with NULL there (the
    /// daemon's fill gives it one).
    pub vectors: &'a HashMap<Vec<u8>, Vector>,
}

/// Upsert `writes`, then cut every key in `lengths` down to its new number of chunks
/// (0 deletes the key's chunks).
pub async fn write_batch(
    client: &impl GenericClient,
    source: &Source,
    writes: &[ChunkWrite],
    lengths: &[(String, i32)],
    other: Option<&OtherVectors<'_>>,
) -> Result<(u64, u64), tokio_postgres::Error> {
    let text_search = source.text_search.as_str();
    let source = source.name.as_str();
    let mut written = 0;
    if !writes.is_empty() {
        let tenants: Vec<&str> = writes.iter().map(|w| w.tenant.as_str()).collect();
        let keys: Vec<&str> = writes.iter().map(|w| w.key.as_str()).collect();
        let indexes: Vec<i32> = writes.iter().map(|w| w.index).collect();
        let contents: Vec<&str> = writes.iter().map(|w| w.content.as_str()).collect();
        let hashes: Vec<&[u8]> = writes.iter().map(|w| w.hash.as_slice()).collect();
        let embeddings: Vec<&Vector> = writes.iter().map(|w| &w.embedding).collect();
        let models: Vec<&str> = writes.iter().map(|w| w.model.as_str()).collect();
        let metadata: Vec<&serde_json::Value> = writes.iter().map(|w| &w.metadata).collect();
        let text_hashes: Vec<&[u8]> = writes
            .iter()
            .map(|w| w.source_text_hash.as_slice())
            .collect();
        let text_hashes64: Vec<i64> = writes.iter().map(|w| w.source_text_hash64).collect();
        let chunkings: Vec<&str> = writes.iter().map(|w| w.chunking.as_str()).collect();
        let counts: Vec<i32> = writes.iter().map(|w| w.chunk_count).collect();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &source,
            &tenants,
            &keys,
            &indexes,
            &contents,
            &hashes,
            &embeddings,
            &models,
            &metadata,
            &text_hashes,
            &chunkings,
            &counts,
            &text_hashes64,
            &text_search,
        ];
        let other_vectors: Vec<Option<&Vector>>;
        let statement = match other {
            None => UPSERT.as_str(),
            Some(other) => {
                other_vectors = writes.iter().map(|w| other.vectors.get(&w.hash)).collect();
                params.push(&other_vectors);
                params.push(&other.model);
                match other.column {
                    OtherColumn::Next => UPSERT_WITH_NEXT.as_str(),
                    OtherColumn::Previous => UPSERT_WITH_PREVIOUS.as_str(),
                }
            }
        };
        written = client.execute(statement, &params).await?;
    }
    let mut deleted = 0;
    if !lengths.is_empty() {
        let keys: Vec<&str> = lengths.iter().map(|(k, _)| k.as_str()).collect();
        let counts: Vec<i32> = lengths.iter().map(|(_, n)| *n).collect();
        deleted = client
            .execute(
                "DELETE FROM public.tenant_knowledge k
                  USING unnest($2::text[], $3::int[]) AS cut(source_key, keep)
                  WHERE k.source = $1 AND k.source_key = cut.source_key AND k.chunk_index >= cut.keep",
                &[&source, &keys, &counts],
            )
            .await?;
    }
    Ok((written, deleted))
}

/// The second vector column, named for its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherColumn {
    /// `embedding_next`: the model migrated to, before the cut-over.
    Next,
    /// `embedding_previous`: the model migrated from, after it.
    Previous,
}

/// The statements that read and fill one other column. Its identifiers come from this
/// closed set of two names, never from input.
pub struct ColumnSql {
    pub column: &'static str,
    /// `$1` = at most this many rows, `$2` = content hashes to pass over: (content_hash,
    /// content) of chunks without a vector here, the most recently written first (live
    /// edits before the backlog).
    pub pending: String,
    /// `$1` = content hashes, `$2` = the model: vectors of it already stored for them,
    /// in this column of any chunk or adopted.
    pub reusable: String,
    /// `$1` = content hashes, `$2` = their vectors, `$3` = the model: set them on every
    /// chunk with that text and no vector here yet.
    pub fill: String,
    /// Chunks without a vector here, and their distinct texts.
    pub remaining: String,
}

impl ColumnSql {
    fn for_column(column: &'static str) -> ColumnSql {
        ColumnSql {
            column,
            pending: format!(
                "SELECT content_hash, content FROM public.tenant_knowledge
                  WHERE {column} IS NULL AND NOT (content_hash = ANY($2))
                  ORDER BY updated_at DESC LIMIT $1"
            ),
            reusable: vectors_by_hash_sql(column),
            fill: format!(
                "UPDATE public.tenant_knowledge t SET {column} = v.vector, {column}_model = $3
                   FROM unnest($1::bytea[], $2::vector[]) AS v(content_hash, vector)
                  WHERE t.content_hash = v.content_hash AND t.{column} IS NULL
                    AND t.content_hash = sha256(convert_to(t.content, 'UTF8'))"
            ),
            remaining: format!(
                "SELECT count(*), count(DISTINCT content_hash) FROM public.tenant_knowledge WHERE {column} IS NULL"
            ),
        }
    }
}

static NEXT_SQL: LazyLock<ColumnSql> = LazyLock::new(|| ColumnSql::for_column("embedding_next"));
static PREVIOUS_SQL: LazyLock<ColumnSql> =
    LazyLock::new(|| ColumnSql::for_column("embedding_previous"));

impl OtherColumn {
    pub fn sql(self) -> &'static ColumnSql {
        match self {
            OtherColumn::Next => &NEXT_SQL,
            OtherColumn::Previous => &PREVIOUS_SQL,
        }
    }
}
