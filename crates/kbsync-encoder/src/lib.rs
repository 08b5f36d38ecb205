//! The BERT encoder behind the local provider (all-MiniLM-L6-v2), written for how
//! kbsync embeds: many sequences per pass, packed end to end without padding (a row of
//! every matrix is one real token, attention runs per sequence over its own tokens),
//! matrix products on `matrixmultiply` through ndarray, everything else in plain loops
//! the compiler vectorises. The arithmetic is the reference's (BertModel in
//! transformers): absolute positions, exact GELU (erf), LayerNorm, softmax attention;
//! then sentence-transformers' mean pooling and L2 normalisation.
//!
//! Why not candle's BertModel: it pads every batch to its longest text, runs the
//! elementwise steps on one core and allocates a tensor per step; it embedded 0.48×
//! PyTorch's chunks/s on this machine's 2 cores (`just bench model`).

use std::path::Path;

use ndarray::linalg::general_mat_mul;
use std::ops::Range;

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, Axis, Slice};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

/// The parts of a transformers `config.json` the encoder reads; anything else in the
/// file (dropout, initialisation) does not change inference.
#[derive(Debug, Deserialize)]
struct ConfigJson {
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    layer_norm_eps: f32,
    hidden_act: String,
    #[serde(default = "absolute")]
    position_embedding_type: String,
}

fn absolute() -> String {
    "absolute".to_owned()
}

/// y = x·Wᵀ + b, with W as transformers stores it: [out, in].
struct Linear {
    weight: Array2<f32>,
    bias: Array1<f32>,
}

impl Linear {
    fn apply(&self, input: &ArrayView2<f32>, out: &mut Array2<f32>) {
        for mut row in out.rows_mut() {
            row.assign(&self.bias);
        }
        general_mat_mul(1.0, input, &self.weight.t(), 1.0, out);
    }
}

struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl LayerNorm {
    /// Normalises every row of `x` in place.
    fn apply(&self, x: &mut Array2<f32>, eps: f32) {
        let width = self.gamma.len();
        let data = x
            .as_slice_mut()
            .expect("the encoder's activations are contiguous");
        for row in data.chunks_exact_mut(width) {
            let mean = sum(row) / width as f32;
            let mut lanes = [0.0_f32; LANES];
            for chunk in row.chunks(LANES) {
                for (lane, v) in lanes.iter_mut().zip(chunk) {
                    *lane += (v - mean) * (v - mean);
                }
            }
            let variance = sum(&lanes) / width as f32;
            let scale = 1.0 / (variance + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
                *v = (*v - mean) * scale * g + b;
            }
        }
    }
}

struct Layer {
    /// Query, key and value in one product: [3·hidden, hidden]. The query rows are
    /// pre-multiplied by 1/√head_dim, the scaling attention applies to its scores.
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct Bert {
    word_embeddings: Array2<f32>,
    position_embeddings: Array2<f32>,
    /// Every input is one segment: token type 0.
    token_type: Array1<f32>,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    eps: f32,
}

/// Why the model directory could not be used: the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(String);

struct Weights<'a> {
    tensors: SafeTensors<'a>,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let view = self
            .tensors
            .tensor(name)
            .map_err(|e| format!("model.safetensors: {name}: {e}"))?;
        if view.dtype() != Dtype::F32 || view.shape() != shape {
            return Err(format!(
                "model.safetensors: {name} is {:?} {:?}, expected F32 {shape:?} (config.json)",
                view.dtype(),
                view.shape()
            ));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>, String> {
        let data = self.get(name, &[rows, cols])?;
        Array2::from_shape_vec((rows, cols), data).map_err(|e| format!("{name}: {e}"))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Array1<f32>, String> {
        Ok(Array1::from_vec(self.get(name, &[len])?))
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear, String> {
        Ok(Linear {
            weight: self.matrix(&format!("{prefix}.weight"), out, inp)?,
            bias: self.vector(&format!("{prefix}.bias"), out)?,
        })
    }

    fn layer_norm(&self, prefix: &str, width: usize) -> Result<LayerNorm, String> {
        Ok(LayerNorm {
            gamma: self.get(&format!("{prefix}.weight"), &[width])?,
            beta: self.get(&format!("{prefix}.bias"), &[width])?,
        })
    }
}

impl Bert {
    /// Reads `config.json` and `model.safetensors` from `dir`; `max_tokens` is the
    /// longest sequence the caller will pass (checked against the position table).
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Self, LoadError> {
        Self::read(dir, max_tokens).map_err(LoadError)
    }

    fn read(dir: &Path, max_tokens: usize) -> Result<Self, String> {
        let read = |file: &str| std::fs::read(dir.join(file)).map_err(|e| format!("{file}: {e}"));
        let config: ConfigJson = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| format!("config.json: {e}"))?;
        if config.hidden_act != "gelu" || config.position_embedding_type != "absolute" {
            return Err(format!(
                "config.json: hidden_act {:?} with {:?} position embeddings; the local \
                 provider runs BERT models with \"gelu\" and \"absolute\" (all-MiniLM-L6-v2)",
                config.hidden_act, config.position_embedding_type
            ));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(format!(
                "config.json: hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            ));
        }
        if config.max_position_embeddings < max_tokens {
            return Err(format!(
                "config.json: max_position_embeddings {} is below the {max_tokens} tokens \
                 the local provider reads",
                config.max_position_embeddings
            ));
        }
        let bytes = read("model.safetensors")?;
        let weights = Weights {
            tensors: SafeTensors::deserialize(&bytes)
                .map_err(|e| format!("model.safetensors: {e}"))?,
        };
        let (h, ff) = (config.hidden_size, config.intermediate_size);
        let head_dim = h / config.num_attention_heads;
        let query_scale = 1.0 / (head_dim as f32).sqrt();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let query = weights.linear(&format!("{p}.attention.self.query"), h, h)?;
            let key = weights.linear(&format!("{p}.attention.self.key"), h, h)?;
            let value = weights.linear(&format!("{p}.attention.self.value"), h, h)?;
            let qkv = Linear {
                weight: ndarray::concatenate(
                    Axis(0),
                    &[
                        (&query.weight * query_scale).view(),
                        key.weight.view(),
                        value.weight.view(),
                    ],
                )
                .map_err(|e| format!("{p}: {e}"))?,
                bias: ndarray::concatenate(
                    Axis(0),
                    &[
                        (&query.bias * query_scale).view(),
                        key.bias.view(),
                        value.bias.view(),
                    ],
                )
                .map_err(|e| format!("{p}: {e}"))?,
            };
            layers.push(Layer {
                qkv,
                attention_out: weights.linear(&format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: weights
                    .layer_norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                intermediate: weights.linear(&format!("{p}.intermediate.dense"), ff, h)?,
                output: weights.linear(&format!("{p}.output.dense"), h, ff)?,
                output_norm: weights.layer_norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        Ok(Self {
            word_embeddings: weights.matrix(
                "embeddings.word_embeddings.weight",
                config.vocab_size,
                h,
            )?,
            position_embeddings: weights.matrix(
                "embeddings.position_embeddings.weight",
                config.max_position_embeddings,
                h,
            )?,
            token_type: weights
                .matrix("embeddings.token_type_embeddings.weight", 2, h)?
                .row(0)
                .to_owned(),
            embeddings_norm: weights.layer_norm("embeddings.LayerNorm", h)?,
            layers,
            hidden: h,
            heads: config.num_attention_heads,
            intermediate: ff,
            eps: config.layer_norm_eps,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.word_embeddings.nrows()
    }

    /// Unit-length mean-pooled embeddings of `sequences` (token ids, special tokens
    /// included, each non-empty and within the position table and vocabulary).
    pub fn embed(&self, sequences: &[&[u32]]) -> Vec<Vec<f32>> {
        let h = self.hidden;
        let total: usize = sequences.iter().map(|s| s.len()).sum();
        let longest = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut x = Array2::<f32>::zeros((total, h));
        let rows = x
            .as_slice_mut()
            .expect("a new array is contiguous")
            .chunks_exact_mut(h);
        let positions = sequences.iter().flat_map(|s| s.iter().enumerate());
        for (row, (position, &id)) in rows.zip(positions) {
            let word = self.word_embeddings.row(id as usize);
            let place = self.position_embeddings.row(position);
            for (j, v) in row.iter_mut().enumerate() {
                *v = word[j] + place[j] + self.token_type[j];
            }
        }
        self.embeddings_norm.apply(&mut x, self.eps);

        let mut qkv = Array2::<f32>::zeros((total, 3 * h));
        let mut context = Array2::<f32>::zeros((total, h));
        let mut projected = Array2::<f32>::zeros((total, h));
        let mut intermediate = Array2::<f32>::zeros((total, self.intermediate));
        let mut scores = Array2::<f32>::zeros((longest, longest));
        for layer in &self.layers {
            layer.qkv.apply(&x.view(), &mut qkv);
            self.attention(&qkv, sequences, &mut context, &mut scores);
            layer.attention_out.apply(&context.view(), &mut projected);
            x += &projected;
            layer.attention_norm.apply(&mut x, self.eps);
            layer.intermediate.apply(&x.view(), &mut intermediate);
            gelu(
                intermediate
                    .as_slice_mut()
                    .expect("the encoder's activations are contiguous"),
            );
            layer.output.apply(&intermediate.view(), &mut projected);
            x += &projected;
            layer.output_norm.apply(&mut x, self.eps);
        }

        let mut start = 0;
        sequences
            .iter()
            .map(|seq| {
                let tokens = x.slice_axis(Axis(0), Slice::from(start..start + seq.len()));
                start += seq.len();
                let mut mean = tokens.sum_axis(Axis(0)) / seq.len() as f32;
                let norm = mean.dot(&mean).sqrt();
                mean /= norm;
                mean.to_vec()
            })
            .collect()
    }

    /// Softmax attention of every head of every sequence over that sequence's own
    /// tokens, written into `context` (the heads side by side, as BERT concatenates).
    fn attention(
        &self,
        qkv: &Array2<f32>,
        sequences: &[&[u32]],
        context: &mut Array2<f32>,
        scores: &mut Array2<f32>,
    ) {
        let h = self.hidden;
        let d = h / self.heads;
        let mut start = 0;
        for seq in sequences {
            let (rows, len) = (start..start + seq.len(), seq.len());
            start += len;
            for head in 0..self.heads {
                let cols = head * d..(head + 1) * d;
                let q = block(qkv, &rows, cols.clone());
                let k = block(qkv, &rows, h + cols.start..h + cols.end);
                let v = block(qkv, &rows, 2 * h + cols.start..2 * h + cols.end);
                let mut weights = block_mut(scores, &(0..len), 0..len);
                general_mat_mul(1.0, &q, &k.t(), 0.0, &mut weights);
                for mut row in weights.rows_mut() {
                    softmax(row.as_slice_mut().expect("a score row is contiguous"));
                }
                let mut out = block_mut(context, &rows, cols);
                general_mat_mul(1.0, &weights, &v, 0.0, &mut out);
            }
        }
    }
}

/// Rows × columns of a matrix, as a view (ndarray's `s!` macro expands to an
/// `allow(unsafe_code)` this workspace forbids).
fn block<'a>(m: &'a Array2<f32>, rows: &Range<usize>, cols: Range<usize>) -> ArrayView2<'a, f32> {
    m.view()
        .slice_axis_move(Axis(0), Slice::from(rows.clone()))
        .slice_axis_move(Axis(1), Slice::from(cols))
}

fn block_mut<'a>(
    m: &'a mut Array2<f32>,
    rows: &Range<usize>,
    cols: Range<usize>,
) -> ArrayViewMut2<'a, f32> {
    m.view_mut()
        .slice_axis_move(Axis(0), Slice::from(rows.clone()))
        .slice_axis_move(Axis(1), Slice::from(cols))
}

fn softmax(row: &mut [f32]) {
    let max = max(row);
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let scale = 1.0 / sum(row);
    for v in row.iter_mut() {
        *v *= scale;
    }
}

/// GELU as BERT defines it, with erf (not the tanh approximation), in place.
fn gelu(values: &mut [f32]) {
    for v in values {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7, 5e-7 in f32), branch-free so that
/// the loop over a row vectorises; libm's erff did not, and took 9% of a pass.
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// e^x for x ≤ 88 (Cephes' expf: x = n·ln2 + r, a degree-6 polynomial in r, 2ⁿ in the
/// exponent bits), relative error about 2e-7, branch-free for the same reason.
fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa bits:
    // read from there, not with `as i32`, whose saturating checks do not vectorise.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let two_to_n = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(ROUND.to_bits())
            .wrapping_add(127)
            << 23,
    );
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    (p * r * r + r + 1.0) * two_to_n
}

/// Lanes of the sums and maxima below: eight partial results side by side vectorise,
/// where one running total (floating-point addition does not reassociate) does not.
const LANES: usize = 8;

fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0_f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = if *v > *lane { *v } else { *lane };
        }
    }
    lanes
        .iter()
        .chain(chunks.remainder())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in f64, converged to far below f32 precision on |x| ≤ 4.
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_1e_6_of_the_series_everywhere_gelu_reads_it() {
        let mut worst: f64 = 0.0;
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            worst = worst.max((f64::from(erf(x)) - erf_series(f64::from(x))).abs());
        }
        assert!(worst < 1e-6, "erf off by {worst}");
        // Beyond ±4 erf is ±1 to within 2e-8.
        assert!((erf(9.0) - 1.0).abs() < 1e-7 && (erf(-30.0) + 1.0).abs() < 1e-7);
    }

    #[test]
    fn exp_is_within_3e_7_relative_over_the_softmax_range() {
        let mut worst: f64 = 0.0;
        for i in -87_000..=20_000 {
            let x = i as f32 / 1000.0;
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(exp(x)) - want).abs() / want);
        }
        assert!(worst < 3e-7, "exp off by {worst} relative");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37, "far below the range clamps to ~0");
    }

    #[test]
    fn lane_sums_and_maxima_cover_every_element() {
        for len in [0, 1, 5, 8, 22, 384, 385] {
            let values: Vec<f32> = (0..len).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
            let want: f32 = values.iter().sum();
            assert_eq!(sum(&values), want, "sum of {len}");
            let want = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&values), want, "max of {len}");
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut row = [1.0, 3.0, 2.0, -50.0];
        softmax(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[1] > row[2] && row[2] > row[0] && row[0] > row[3]);
        let want = 1.0 / (1.0 + (-1.0f64).exp() + (-2.0f64).exp() + (-53.0f64).exp());
        assert!((f64::from(row[1]) - want).abs() < 1e-6);
    }
}
