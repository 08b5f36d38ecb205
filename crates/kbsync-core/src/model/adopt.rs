//! `kbsync adopt`: take over the embeddings an earlier system already paid for, so that
//! the first sync embeds only what is new or different.
//!
//! Every text kbsync's chunking produces from today's source rows is hashed (the same
//! row reads and the same chunker as the daemon). A row of the old table whose content
//! is exactly one of those texts, made with the configured model and of the configured
//! dimension, is copied into `kbsync.adopted_embeddings`, where the daemon's lookup by
//! text (`knowledge::embeddings_by_hash`) finds it. Nothing else is trusted: a vector of
//! another model or dimension, or of a text kbsync would not produce, is left where it is.

use std::collections::HashSet;

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use crate::config::Config;
use crate::config::sql_ident::{Ident, TableName};
use crate::sync::chunk_texts::{ChunkTextsError, distinct_chunk_texts};
use crate::sync::knowledge;
/// Hashes sent per statement into the temporary table.
const HASHES_PER_STATEMENT: usize = 10_000;

/// Where the earlier system kept its chunks and vectors.
#[derive(Debug, Clone)]
pub struct OldTable {
    pub table: TableName,
    /// The chunk text.
    pub content: Ident,
    /// A pgvector `vector` column.
    pub embedding: Ident,
    pub model: ModelOf,
}

/// How the old table says which model made a vector.
#[derive(Debug, Clone)]
pub enum ModelOf {
    /// A column naming each row's model.
    Column(Ident),
    /// The table records none; the operator states that every vector was made with
    /// this model (it must be the configured one).
    Every(String),
}

#[derive(Debug, Serialize)]
pub struct AdoptReport {
    pub table: String,
    pub model: String,
    pub dimensions: u32,
    pub dry_run: bool,
    /// Distinct chunk texts the configured sources produce today.
    pub texts: u64,
    /// Of those, texts kbsync already has a vector of this model for (in
    /// tenant_knowledge, or adopted before).
    pub already_embedded: u64,
    /// Texts whose vector was adopted now.
    pub adopted: u64,
    /// Texts the first sync will send to the provider.
    pub to_embed: u64,
    /// Rows of the old table, and why those not taken were left.
    pub old_rows: u64,
    pub skipped_no_embedding: u64,
    pub skipped_other_model: u64,
    pub skipped_other_dimension: u64,
    /// Rows of the model and dimension whose text no chunk has today (edited or
    /// deleted since, or cut differently), or whose text is already embedded.
    pub skipped_text_not_needed: u64,
}

#[derive(Debug, Error)]
pub enum AdoptError {
    #[error("{0}")]
    Input(String),
    #[error("database error: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Texts(#[from] ChunkTextsError),
}

/// Adopt what `old` holds for the configured model; with `dry_run`, count only.
/// Reading the sources' rows is reported to `progress`.
pub async fn adopt(
    client: &mut Client,
    config: &Config,
    old: &OldTable,
    dry_run: bool,
    progress: &dyn crate::progress::Progress,
) -> Result<AdoptReport, AdoptError> {
    let model = config.embedding.model.clone();
    let dimensions = config.embedding.dimensions;
    check_old_table(client, old, &model, dimensions).await?;
    let mut needed: HashSet<[u8; 32]> = distinct_chunk_texts(client, config, progress)
        .await?
        .into_keys()
        .collect();
    let texts = needed.len() as u64;
    // Texts the daemon would reuse a vector for already need nothing from the old table.
    let all: Vec<[u8; 32]> = needed.iter().copied().collect();
    for known in knowledge::hashes_with_embeddings(&*client, &model, &all).await? {
        needed.remove(&known);
    }
    let already_embedded = texts - needed.len() as u64;

    let tx = client.transaction().await?;
    tx.batch_execute(
        "CREATE TEMPORARY TABLE kbsync_adopt_texts (content_hash bytea PRIMARY KEY) ON COMMIT DROP",
    )
    .await?;
    let hashes: Vec<&[u8]> = needed.iter().map(|h| h.as_slice()).collect();
    for part in hashes.chunks(HASHES_PER_STATEMENT) {
        tx.execute(
            "INSERT INTO kbsync_adopt_texts SELECT unnest($1::bytea[])",
            &[&part],
        )
        .await?;
    }

    let model_expr = match &old.model {
        ModelOf::Column(column) => format!("o.{column}::text"),
        ModelOf::Every(_) => "$1::text".to_owned(),
    };
    // The old rows, one pass, each with what decides whether it is taken.
    let old_rows = format!(
        "SELECT o.{embedding} AS embedding,
                {model_expr} AS model,
                sha256(convert_to(o.{content}::text, 'UTF8')) AS content_hash
           FROM {table} o",
        embedding = old.embedding,
        content = old.content,
        table = old.table,
    );
    let takeable = "o.embedding IS NOT NULL AND o.model = $1 AND vector_dims(o.embedding) = $2";
    let dims = i32::try_from(dimensions)
        .map_err(|_| AdoptError::Input(format!("{dimensions} dimensions")))?;
    let counts = tx
        .query_one(
            &format!(
                "SELECT count(*),
                        count(*) FILTER (WHERE o.embedding IS NULL),
                        count(*) FILTER (WHERE o.embedding IS NOT NULL AND o.model IS DISTINCT FROM $1),
                        count(*) FILTER (WHERE o.embedding IS NOT NULL AND o.model = $1
                                           AND vector_dims(o.embedding) <> $2),
                        count(*) FILTER (WHERE {takeable} AND n.content_hash IS NULL)
                   FROM ({old_rows}) o
                   LEFT JOIN kbsync_adopt_texts n ON n.content_hash = o.content_hash"
            ),
            &[&model, &dims],
        )
        .await?;
    let adopted = tx
        .execute(
            &format!(
                "INSERT INTO kbsync.adopted_embeddings (embedding_model, content_hash, embedding, adopted_from)
                 SELECT DISTINCT ON (o.content_hash) $1, o.content_hash, o.embedding, $3
                   FROM ({old_rows}) o
                   JOIN kbsync_adopt_texts n ON n.content_hash = o.content_hash
                  WHERE {takeable}
                 ON CONFLICT (embedding_model, content_hash) DO NOTHING"
            ),
            &[&model, &dims, &old.table.to_string()],
        )
        .await?;
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    let count = |i: usize| counts.get::<_, i64>(i) as u64;
    Ok(AdoptReport {
        table: old.table.to_string(),
        model,
        dimensions,
        dry_run,
        texts,
        already_embedded,
        adopted,
        to_embed: texts - already_embedded - adopted,
        old_rows: count(0),
        skipped_no_embedding: count(1),
        skipped_other_model: count(2),
        skipped_other_dimension: count(3),
        skipped_text_not_needed: count(4),
    })
}

/// Forget every adopted embedding (once the first sync has stored them as chunks, or
/// to undo an adoption). The number removed.
pub async fn clear(client: &Client) -> Result<u64, tokio_postgres::Error> {
    client
        .execute("DELETE FROM kbsync.adopted_embeddings", &[])
        .await
}

/// The old table exists, its columns are there, its vectors are pgvector's and, where
/// the column type says, of the configured dimension; a stated model is the configured one.
async fn check_old_table(
    client: &Client,
    old: &OldTable,
    model: &str,
    dimensions: u32,
) -> Result<(), AdoptError> {
    if let ModelOf::Every(stated) = &old.model
        && stated != model
    {
        return Err(AdoptError::Input(format!(
            "the old vectors were made with {stated:?}, the configured model is {model:?}: a vector of another model is never adopted (embed with {stated:?}, or adopt nothing)"
        )));
    }
    let columns = client
        .query(
            "SELECT a.attname::text, t.typname::text, a.atttypmod
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&old.table.regclass_text()],
        )
        .await?;
    if columns.is_empty() {
        return Err(AdoptError::Input(format!(
            "table {} not found (name it as `table` or `schema.table`)",
            old.table
        )));
    }
    let column = |name: &Ident| {
        columns
            .iter()
            .find(|c| c.get::<_, String>(0) == name.as_str())
            .map(|c| (c.get::<_, String>(1), c.get::<_, i32>(2)))
            .ok_or_else(|| AdoptError::Input(format!("table {} has no column {name}", old.table)))
    };
    column(&old.content)?;
    if let ModelOf::Column(name) = &old.model {
        column(name)?;
    }
    let (kind, typmod) = column(&old.embedding)?;
    if crate::config::VectorType::from_sql_name(&kind).is_none() {
        return Err(AdoptError::Input(format!(
            "column {} of {} is of type {kind}, not pgvector's vector or halfvec",
            old.embedding, old.table
        )));
    }
    // vector(n) and halfvec(n) record n as their type modifier; a bare `vector` column is
    // checked row by row.
    if typmod > 0 && typmod as u32 != dimensions {
        return Err(AdoptError::Input(format!(
            "column {} of {} holds vectors of {typmod} dimensions, the configured model {model:?} has {dimensions}: a vector of another dimension is never adopted",
            old.embedding, old.table
        )));
    }
    Ok(())
}
