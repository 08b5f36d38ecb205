//! Every distinct chunk text the configured sources produce today, read and cut as the
//! daemon does (the same row reads, the same chunker): what `kbsync adopt` can take over,
//! and what `kbsync model plan` prices for another model.

use std::collections::HashMap;

use thiserror::Error;
use tokio_postgres::Client;

use crate::chunk::{ChunkError, Chunker};
use crate::config::Config;
use crate::embed::{EmbedError, Provider};
use crate::source_rows::SourceQuery;

/// Rows read per page while chunking a source.
const PAGE: i64 = 1_000;

#[derive(Debug, Error)]
pub enum ChunkTextsError {
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

/// Per source (by name), the sha256 of every distinct chunk text, with
/// its length in the model's tokens, cut with `config`'s model (its tokenizer and chunk
/// limits). A text two sources produce is in both.
pub async fn chunk_texts_by_source(
    client: &Client,
    config: &Config,
) -> Result<Vec<(String, HashMap<[u8; 32], usize>)>, ChunkTextsError> {
    let counter = Provider::token_counter_for(config)?;
    let mut by_source = Vec::new();
    for source in config.sources() {
        let query = SourceQuery::prepare(client, &source).await?;
        let chunker = Chunker::new(&source, counter.clone(), config.model_token_limit())?;
        let mut texts = HashMap::new();
        let mut after: Option<String> = None;
        loop {
            let rows = query.load_page(client, after.as_deref(), PAGE).await?;
            let Some(last) = rows.last() else { break };
            after = Some(last.key.clone());
            for row in &rows {
                texts.extend(
                    chunker
                        .chunk(&row.text)
                        .into_iter()
                        .map(|c| (c.hash, c.tokens)),
                );
            }
        }
        by_source.push((source.name.clone(), texts));
    }
    Ok(by_source)
}

/// The distinct chunk texts of all sources together (see `chunk_texts_by_source`).
pub async fn distinct_chunk_texts(
    client: &Client,
    config: &Config,
) -> Result<HashMap<[u8; 32], usize>, ChunkTextsError> {
    Ok(chunk_texts_by_source(client, config)
        .await?
        .into_iter()
        .flat_map(|(_, texts)| texts)
        .collect())
}
