//! Every distinct chunk text the configured sources produce today, read and cut as the
//! daemon does (the same row reads, the same chunker): what `kbsync adopt` can take over,
//! and what `kbsync model plan` prices for another model.

use std::collections::HashMap;

use thiserror::Error;
use tokio_postgres::Client;

use crate::config::Config;
use crate::progress::Progress;
use crate::sync::chunk::{ChunkError, Chunker};
use crate::sync::embed::{EmbedError, Provider};
use crate::sync::source_rows::SourceQuery;

/// Rows read per page while chunking a source.
const PAGE: i64 = 1_000;

#[derive(Debug, Error)]
pub enum ChunkTextsError {
    #[error("database error: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

/// A source's distinct chunk texts (sha256 → length in the model's tokens).
pub type Texts = HashMap<[u8; 32], usize>;

/// Per source (by name), the distinct chunk texts each of `configs` cuts from today's
/// rows with its model (tokenizer and chunk limits); the rows are read once for all of
/// them. The configs differ in their model only (`Config::with_next_model`). A text
/// two sources produce is in both.
pub async fn chunk_texts_by_source(
    client: &Client,
    configs: &[&Config],
    progress: &dyn Progress,
) -> Result<Vec<(String, Vec<Texts>)>, ChunkTextsError> {
    let Some(first) = configs.first() else {
        return Ok(Vec::new());
    };
    // Each config's chunker for each source, in the sources' (name) order.
    let mut chunkers: Vec<Vec<Chunker>> = Vec::with_capacity(configs.len());
    for config in configs {
        let counter = Provider::token_counter_for(config)?;
        chunkers.push(
            config
                .sources()
                .iter()
                .map(|source| Chunker::new(source, counter.clone(), config.model_token_limit()))
                .collect::<Result<_, _>>()?,
        );
    }
    let mut by_source = Vec::new();
    for (at, source) in first.sources().iter().enumerate() {
        let query = SourceQuery::prepare(client, source).await?;
        // The planner's row count: a good estimate for nothing (-1: never analysed).
        let estimate: i64 = client
            .query_one(
                "SELECT coalesce((SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)), -1)",
                &[&source.table.regclass_text()],
            )
            .await?
            .get(0);
        // -1 (never analysed) is "no estimate": the bar then counts without a total.
        progress.step(&source.name, "rows", u64::try_from(estimate).ok());
        let mut texts: Vec<Texts> = vec![HashMap::new(); configs.len()];
        let mut after: Option<String> = None;
        loop {
            let rows = query.load_page(client, after.as_deref(), PAGE).await?;
            let Some(last) = rows.last() else { break };
            after = Some(last.key.clone());
            progress.advance(rows.len() as u64);
            for (cut, chunkers) in texts.iter_mut().zip(&chunkers) {
                for row in &rows {
                    cut.extend(
                        chunkers[at]
                            .chunk(&row.text)
                            .into_iter()
                            .map(|c| (c.hash, c.tokens)),
                    );
                }
            }
        }
        by_source.push((source.name.clone(), texts));
    }
    progress.finish();
    Ok(by_source)
}

/// The distinct chunk texts of all sources together, cut with `config`'s model.
pub async fn distinct_chunk_texts(
    client: &Client,
    config: &Config,
    progress: &dyn Progress,
) -> Result<Texts, ChunkTextsError> {
    Ok(chunk_texts_by_source(client, &[config], progress)
        .await?
        .into_iter()
        .flat_map(|(_, mut cuts)| cuts.pop().unwrap_or_default())
        .collect())
}
