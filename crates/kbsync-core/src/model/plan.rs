//! `kbsync model plan`: what moving the knowledge base to the `[next_embedding]` model
//! would cost, before anything is spent. Every source row is read and cut as the daemon
//! would cut it for the new model (its tokenizer and chunk limits); texts already
//! embedded with the new model (stored, or adopted) are not paid again; the rest is
//! counted in the new model's tokens and in requests of its provider's limits, and
//! timed at its configured rate limits. Nothing is written and nothing is sent.

use std::collections::HashSet;

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use crate::config::{Config, EmbeddingConfig, ProviderKind};
use crate::sync::chunk_texts::{ChunkTextsError, Texts, chunk_texts_by_source};
use crate::sync::knowledge;

/// One source's share of the plan. A text two sources produce is counted in both here
/// and once in the totals (it is embedded once).
#[derive(Debug, Serialize, PartialEq)]
pub struct SourcePlan {
    pub source: String,
    pub texts: u64,
    pub to_embed: u64,
    pub tokens_to_embed: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ModelPlan {
    pub from_model: String,
    pub to_model: String,
    pub to_dimensions: u32,
    /// Distinct chunk texts the sources produce today, cut for the new model.
    pub texts: u64,
    /// Of those, texts the current model's chunking does not produce (chunks re-cut
    /// for the new model's limits or tokenizer).
    pub texts_recut: u64,
    /// Of those, texts with a vector of the new model already (stored or adopted).
    pub already_embedded: u64,
    /// Texts the migration would send to the new model's provider.
    pub to_embed: u64,
    /// Their length in the new model's tokens.
    pub tokens_to_embed: u64,
    /// Requests of at most `max_inputs_per_request` inputs and
    /// `max_tokens_per_request` tokens; None for the local model (no requests).
    pub requests: Option<u64>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    /// The least time the new provider's rate limits allow for it; None without
    /// limits (as fast as the provider answers).
    pub least_seconds_at_rate_limits: Option<f64>,
    /// Where the texts come from, source by source.
    pub sources: Vec<SourcePlan>,
}

#[derive(Debug, Error)]
pub enum ModelPlanError {
    #[error(
        "no [next_embedding] in the config: add the model to move to there (the same fields as [embedding]), then run kbsync model plan again"
    )]
    NoNextModel,
    #[error(transparent)]
    Texts(#[from] ChunkTextsError),
    #[error("database error: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// Price the move from `config.embedding` to `config.next_embedding`; reading the
/// sources' rows is reported to `progress`.
pub async fn plan(
    client: &Client,
    config: &Config,
    progress: &dyn crate::progress::Progress,
) -> Result<ModelPlan, ModelPlanError> {
    let next_config = config
        .with_next_model()
        .ok_or(ModelPlanError::NoNextModel)?;
    let next = &next_config.embedding;
    // Each source's rows, read once, cut for the new model and (to see what is
    // re-cut) for today's.
    let mut texts = Texts::new();
    let mut today: HashSet<[u8; 32]> = HashSet::new();
    let mut by_source: Vec<(String, Texts)> = Vec::new();
    for (source, mut cuts) in
        chunk_texts_by_source(client, &[&next_config, config], progress).await?
    {
        today.extend(cuts.pop().unwrap_or_default().into_keys());
        let cut = cuts.pop().unwrap_or_default();
        texts.extend(cut.iter().map(|(hash, tokens)| (*hash, *tokens)));
        by_source.push((source, cut));
    }
    let hashes: Vec<[u8; 32]> = texts.keys().copied().collect();
    let embedded = knowledge::hashes_with_embeddings(client, &next.model, &hashes).await?;
    // In the order of the texts' hashes: a stand-in for the order the backfill sends
    // them in, which packs requests no better or worse on average.
    let mut to_embed: Vec<([u8; 32], usize)> = texts
        .iter()
        .filter(|(hash, _)| !embedded.contains(*hash))
        .map(|(hash, tokens)| (*hash, *tokens))
        .collect();
    to_embed.sort_unstable();
    let tokens_to_embed: u64 = to_embed.iter().map(|(_, t)| *t as u64).sum();
    let requests = match next.provider {
        ProviderKind::Openai => Some(requests_for(next, to_embed.iter().map(|(_, t)| *t))),
        ProviderKind::Local => None,
    };
    let least_seconds_at_rate_limits = {
        let by_requests = next
            .requests_per_minute
            .zip(requests)
            .map(|(rpm, n)| n as f64 / f64::from(rpm) * 60.0);
        let by_tokens = next
            .tokens_per_minute
            .map(|tpm| tokens_to_embed as f64 / tpm as f64 * 60.0);
        match (by_requests, by_tokens) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    };
    Ok(ModelPlan {
        from_model: config.embedding.model.clone(),
        to_model: next.model.clone(),
        to_dimensions: next.dimensions,
        texts: texts.len() as u64,
        texts_recut: texts.keys().filter(|h| !today.contains(*h)).count() as u64,
        already_embedded: (texts.len() - to_embed.len()) as u64,
        to_embed: to_embed.len() as u64,
        tokens_to_embed,
        requests,
        requests_per_minute: next.requests_per_minute,
        tokens_per_minute: next.tokens_per_minute,
        least_seconds_at_rate_limits,
        sources: by_source
            .iter()
            .map(|(source, texts)| {
                let unpaid: Vec<usize> = texts
                    .iter()
                    .filter(|(hash, _)| !embedded.contains(*hash))
                    .map(|(_, tokens)| *tokens)
                    .collect();
                SourcePlan {
                    source: source.clone(),
                    texts: texts.len() as u64,
                    to_embed: unpaid.len() as u64,
                    tokens_to_embed: unpaid.iter().map(|t| *t as u64).sum(),
                }
            })
            .collect(),
    })
}

/// Requests to send inputs of these token lengths, filled in order up to the
/// provider's input and token limits per request.
fn requests_for(embedding: &EmbeddingConfig, tokens: impl Iterator<Item = usize>) -> u64 {
    let (mut requests, mut inputs, mut request_tokens) = (0u64, 0usize, 0usize);
    for t in tokens {
        if inputs == 0
            || inputs == embedding.max_inputs_per_request
            || request_tokens + t > embedding.max_tokens_per_request
        {
            requests += 1;
            inputs = 0;
            request_tokens = 0;
        }
        inputs += 1;
        request_tokens += t;
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedding(inputs: usize, tokens: usize) -> EmbeddingConfig {
        crate::config::for_tests(
            &format!("max_inputs_per_request = {inputs}\nmax_tokens_per_request = {tokens}"),
            "",
        )
        .embedding
    }

    #[test]
    fn requests_fill_up_to_the_input_limit() {
        assert_eq!(requests_for(&embedding(2, 10_000), [5; 5].into_iter()), 3);
        assert_eq!(requests_for(&embedding(2, 10_000), std::iter::empty()), 0);
    }

    #[test]
    fn requests_fill_up_to_the_token_limit() {
        // 600 + 600 > 1000: each input its own request; 300 + 300 + 300 fit one.
        assert_eq!(
            requests_for(&embedding(100, 1000), [600, 600].into_iter()),
            2
        );
        assert_eq!(
            requests_for(&embedding(100, 1000), [300, 300, 300, 300].into_iter()),
            2
        );
    }
}
