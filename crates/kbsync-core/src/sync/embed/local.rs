//! all-MiniLM-L6-v2 on the CPU: WordPiece tokens (up to 256, as sentence-transformers
//! reads them, not the 128 the shipped tokenizer.json pads and truncates to), the BERT
//! encoder (the `kbsync-encoder` crate), mean pooling over each text's tokens, L2 normalisation.
//! Loaded from a directory; no network. The inputs of a call are shared out between
//! the cores by token count, and each core runs whole forward passes over its share.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokenizers::{Tokenizer, TruncationParams};

use super::{EmbedError, InputOutcome};
use kbsync_encoder::Bert;

/// Word pieces the model reads, special tokens included (sentence_bert_config.json).
const MAX_SEQ_LEN: usize = 256;
/// Tokens per forward pass of one core: the activations of a pass take about 15 KB a
/// token (1024 tokens: 15 MB), and matrix products over a few hundred rows already run
/// at full speed (`just bench model`).
const PASS_TOKENS: usize = 1024;

pub struct LocalModel {
    encoder: Bert,
    /// Truncates at 256, no padding: the encoder packs sequences instead.
    tokenizer: Tokenizer,
    /// No truncation: for counting tokens while chunking.
    counter: Arc<Tokenizer>,
    model_name: String,
    /// Texts embedded and their tokens (as read: at most 256 each), for what a model
    /// migration reports; no requests, no bill.
    inputs_embedded: AtomicU64,
    tokens_embedded: AtomicU64,
}

fn config_error(dir: &Path, what: impl std::fmt::Display) -> EmbedError {
    EmbedError::Config(format!(
        "cannot load the local model from {}: {what} (`just model` fetches it)",
        dir.display()
    ))
}

/// The model's tokenizer as chunking counts with it: no padding, no truncation.
pub fn counting_tokenizer(dir: &Path) -> Result<Tokenizer, EmbedError> {
    let mut counter = Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| config_error(dir, format!("tokenizer.json: {e}")))?;
    counter.with_padding(None);
    counter
        .with_truncation(None)
        .map_err(|e| config_error(dir, format!("tokenizer truncation: {e}")))?;
    Ok(counter)
}

impl LocalModel {
    pub fn load(dir: &Path, model_name: &str) -> Result<Self, EmbedError> {
        let encoder = Bert::load(dir, MAX_SEQ_LEN).map_err(|e| config_error(dir, e))?;
        let counter = counting_tokenizer(dir)?;
        if counter.get_vocab_size(true) > encoder.vocab_size() {
            return Err(config_error(
                dir,
                format!(
                    "tokenizer.json has {} tokens, the model's embedding table {}",
                    counter.get_vocab_size(true),
                    encoder.vocab_size()
                ),
            ));
        }
        let mut tokenizer = counter.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_SEQ_LEN,
                ..TruncationParams::default()
            }))
            .map_err(|e| config_error(dir, format!("tokenizer truncation: {e}")))?;
        Ok(Self {
            encoder,
            tokenizer,
            counter: Arc::new(counter),
            model_name: model_name.to_owned(),
            inputs_embedded: AtomicU64::new(0),
            tokens_embedded: AtomicU64::new(0),
        })
    }

    /// Texts and tokens embedded so far; the local model sends no requests.
    pub fn sent(&self) -> super::SentTotals {
        super::SentTotals {
            requests: 0,
            inputs: self.inputs_embedded.load(Ordering::Relaxed),
            tokens: self.tokens_embedded.load(Ordering::Relaxed),
        }
    }

    pub fn model(&self) -> &str {
        &self.model_name
    }

    pub fn counter(&self) -> Arc<Tokenizer> {
        self.counter.clone()
    }

    /// Embed on the calling thread and the other cores (CPU-bound: call from a
    /// blocking task).
    pub fn embed_blocking(&self, inputs: &[String]) -> Result<Vec<InputOutcome>, EmbedError> {
        let encodings = self
            .tokenizer
            .encode_batch(inputs.to_vec(), true)
            .map_err(|e| EmbedError::Protocol(format!("local model tokenizer: {e}")))?;
        let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
        self.inputs_embedded
            .fetch_add(inputs.len() as u64, Ordering::Relaxed);
        self.tokens_embedded
            .fetch_add(ids.iter().map(|i| i.len() as u64).sum(), Ordering::Relaxed);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shares = shares_by_tokens(&ids, cores);
        let mut out: Vec<InputOutcome> =
            vec![Err("the local model returned no vector for this input".into()); inputs.len()];
        std::thread::scope(|scope| {
            let mut shares = shares.into_iter();
            let mine = shares.next().unwrap_or_default();
            let others: Vec<_> = shares
                .map(|share| {
                    let ids = &ids;
                    scope.spawn(move || self.embed_share(ids, share))
                })
                .collect();
            let mut done = vec![self.embed_share(&ids, mine)];
            for handle in others {
                done.push(handle.join().map_err(|_| {
                    EmbedError::Protocol("local model: a forward-pass thread panicked".into())
                })?);
            }
            for (i, vector) in done.into_iter().flatten() {
                out[i] = Ok(vector);
            }
            Ok::<(), EmbedError>(())
        })?;
        Ok(out)
    }

    /// The vectors of the inputs `share` names, in forward passes of up to
    /// PASS_TOKENS tokens.
    fn embed_share(&self, ids: &[&[u32]], share: Vec<usize>) -> Vec<(usize, Vec<f32>)> {
        let mut out = Vec::with_capacity(share.len());
        let mut pass: Vec<usize> = Vec::new();
        let mut tokens = 0;
        let mut run = |pass: &mut Vec<usize>, tokens: &mut usize| {
            if pass.is_empty() {
                return;
            }
            let sequences: Vec<&[u32]> = pass.iter().map(|&i| ids[i]).collect();
            metrics::counter!("kbsync_embedding_requests_total", "provider" => "local")
                .increment(1);
            metrics::counter!("kbsync_embedding_inputs_total").increment(pass.len() as u64);
            metrics::counter!("kbsync_embedding_tokens_total").increment(*tokens as u64);
            let started = std::time::Instant::now();
            out.extend(pass.drain(..).zip(self.encoder.embed(&sequences)));
            metrics::histogram!("kbsync_embedding_request_seconds")
                .record(started.elapsed().as_secs_f64());
            *tokens = 0;
        };
        for i in share {
            if tokens + ids[i].len() > PASS_TOKENS {
                run(&mut pass, &mut tokens);
            }
            tokens += ids[i].len();
            pass.push(i);
        }
        run(&mut pass, &mut tokens);
        out
    }
}

/// The inputs divided into at most `cores` shares of about equal token counts (the
/// cost of a pass is nearly linear in its tokens): longest first, each to the
/// lightest share so far.
fn shares_by_tokens(ids: &[&[u32]], cores: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
    let mut shares: Vec<(usize, Vec<usize>)> =
        vec![(0, Vec::new()); cores.clamp(1, ids.len().max(1))];
    for i in order {
        if let Some(lightest) = shares.iter_mut().min_by_key(|(tokens, _)| *tokens) {
            lightest.0 += ids[i].len();
            lightest.1.push(i);
        }
    }
    shares
        .into_iter()
        .map(|(_, share)| share)
        .filter(|share| !share.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_balance_tokens_and_cover_every_input_once() {
        let seqs: Vec<Vec<u32>> = [200, 10, 10, 180, 30, 5, 5, 60]
            .iter()
            .map(|&n| vec![1; n])
            .collect();
        let ids: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let shares = shares_by_tokens(&ids, 2);
        assert_eq!(shares.len(), 2);
        let mut all: Vec<usize> = shares.concat();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        let load = |s: &Vec<usize>| s.iter().map(|&i| ids[i].len()).sum::<usize>();
        assert!(load(&shares[0]).abs_diff(load(&shares[1])) <= 20);
        assert_eq!(
            shares_by_tokens(&ids[..1], 2).len(),
            1,
            "one input, one share"
        );
        assert!(shares_by_tokens(&[], 2).is_empty());
    }
}
