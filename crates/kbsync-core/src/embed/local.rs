//! all-MiniLM-L6-v2 on the CPU with candle: WordPiece tokens (up to 256, as
//! sentence-transformers reads them, not the 128 the shipped tokenizer.json pads and
//! truncates to), BERT forward pass, mean pooling over real tokens only (the
//! attention mask), L2 normalisation. Loaded from a directory; no network.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{EmbedError, InputOutcome};

/// Word pieces the model reads, special tokens included (sentence_bert_config.json).
const MAX_SEQ_LEN: usize = 256;
/// Inputs per forward pass.
const BATCH: usize = 32;
/// From this many tokens a batch is split across the cores. `just bench model`: ~217
/// tokens, 6 chunks/s whole and 8-9 split; ~25 tokens, 100 whole and 87-96 split
/// (halves of a short batch are too small for the matrix products).
const SPLIT_FROM_TOKENS: usize = 64;

pub struct LocalModel {
    model: BertModel,
    /// Pads to the longest input of a batch, truncates at 256.
    tokenizer: Tokenizer,
    /// No padding, no truncation: for counting tokens while chunking.
    counter: Arc<Tokenizer>,
    model_name: String,
    device: Device,
}

fn config_error(dir: &Path, what: impl std::fmt::Display) -> EmbedError {
    EmbedError::Config(format!(
        "cannot load the local model from {}: {what} (`just model` fetches it)",
        dir.display()
    ))
}

impl LocalModel {
    pub fn load(dir: &Path, model_name: &str) -> Result<Self, EmbedError> {
        let read = |file: &str| {
            std::fs::read(dir.join(file)).map_err(|e| config_error(dir, format!("{file}: {e}")))
        };
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| config_error(dir, format!("config.json: {e}")))?;
        let device = Device::Cpu;
        let weights =
            VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DType::F32, &device)
                .map_err(|e| config_error(dir, format!("model.safetensors: {e}")))?;
        let model = BertModel::load(weights, &config)
            .map_err(|e| config_error(dir, format!("weights: {e}")))?;
        let base = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| config_error(dir, format!("tokenizer.json: {e}")))?;
        let mut tokenizer = base.clone();
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_SEQ_LEN,
                ..TruncationParams::default()
            }))
            .map_err(|e| config_error(dir, format!("tokenizer truncation: {e}")))?;
        let mut counter = base;
        counter.with_padding(None);
        counter
            .with_truncation(None)
            .map_err(|e| config_error(dir, format!("tokenizer truncation: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            counter: Arc::new(counter),
            model_name: model_name.to_owned(),
            device,
        })
    }

    pub fn model(&self) -> &str {
        &self.model_name
    }

    pub fn counter(&self) -> Arc<Tokenizer> {
        self.counter.clone()
    }

    /// Embed on the calling thread (CPU-bound: call from a blocking task).
    pub fn embed_blocking(&self, inputs: &[String]) -> Result<Vec<InputOutcome>, EmbedError> {
        // Texts of like length batched together: a batch is padded to its longest
        // text, and attention costs the square of that. Tokenizing twice is cheap
        // (about 1/300 of the forward pass, `just bench model`).
        let mut order: Vec<(usize, usize)> = inputs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let tokens = self
                    .counter
                    .encode(text.as_str(), true)
                    .map_or(0, |e| e.len());
                (tokens.min(MAX_SEQ_LEN), i)
            })
            .collect();
        order.sort_unstable();
        let mut out: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
        for batch in order.chunks(BATCH) {
            let texts: Vec<String> = batch.iter().map(|(_, i)| inputs[*i].clone()).collect();
            let longest = batch.last().map_or(0, |(tokens, _)| *tokens);
            let vectors = if longest >= SPLIT_FROM_TOKENS {
                self.forward_on_every_core(&texts)?
            } else {
                self.forward(&texts)?
            };
            for ((_, i), v) in batch.iter().zip(vectors) {
                out[*i] = Some(v);
            }
        }
        Ok(out
            .into_iter()
            .map(|v| {
                v.ok_or_else(|| "the local model returned no vector for this input".to_owned())
            })
            .collect())
    }

    /// One batch split into a part per core, each run on its own thread: candle runs
    /// most of a forward pass (GELU, softmax, layer norm, the attention's many small
    /// matrix products) on one thread, so one pass at a time left the other core idle.
    fn forward_on_every_core(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let part = texts.len().div_ceil(cores).max(1);
        if cores == 1 || texts.len() < 2 {
            return self.forward(texts);
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = texts
                .chunks(part)
                .map(|part| scope.spawn(move || self.forward(part)))
                .collect();
            let mut out = Vec::with_capacity(texts.len());
            for handle in handles {
                let vectors = handle.join().map_err(|_| {
                    EmbedError::Protocol("local model: a forward-pass thread panicked".into())
                })??;
                out.extend(vectors);
            }
            Ok(out)
        })
    }

    fn forward(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            EmbedError::Protocol(format!("local model {what}: {e}"))
        };
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| failed("tokenizer", &e))?;
        let tokens: u32 = encodings
            .iter()
            .map(|e| e.get_attention_mask().iter().sum::<u32>())
            .sum();
        metrics::counter!("kbsync_embedding_requests_total", "provider" => "local").increment(1);
        metrics::counter!("kbsync_embedding_inputs_total").increment(texts.len() as u64);
        metrics::counter!("kbsync_embedding_tokens_total").increment(u64::from(tokens));
        let ids: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_ids(), &self.device))
            .collect::<Result<_, _>>()
            .map_err(|e| failed("input", &e))?;
        let masks: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_attention_mask(), &self.device))
            .collect::<Result<_, _>>()
            .map_err(|e| failed("input", &e))?;
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = Tensor::stack(&ids, 0)?;
            let mask = Tensor::stack(&masks, 0)?;
            let types = ids.zeros_like()?;
            let hidden = self.model.forward(&ids, &types, Some(&mask))?; // [b, s, 384]
            // Mean over real tokens only: padding must not dilute the average.
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [b, s, 1]
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // [b, 384]
            let counts = mask.sum(1)?; // [b, 1]
            let mean = summed.broadcast_div(&counts)?;
            let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
            mean.broadcast_div(&norms)?.to_vec2::<f32>()
        };
        run().map_err(|e| failed("forward pass", &e))
    }
}
