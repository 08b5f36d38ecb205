//! A client for OpenAI-compatible `/v1/embeddings` servers (OpenAI, Azure-style
//! gateways, Ollama, vLLM, text-embeddings-inference).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use base64::Engine;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::{EmbedError, InputOutcome};
use crate::config::{Config, EncodingFormat, OPENAI_TOKEN_LIMIT};
use crate::sync::chunk::TokenCounter;
use crate::sync::rate_limit::SharedRateLimit;

/// Longest server-directed wait we honour before retrying.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// An API key that cannot be printed.
#[derive(Clone)]
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

#[derive(Debug)]
pub struct OpenAiClient {
    http: reqwest::Client,
    url: String,
    model: String,
    dimensions: usize,
    send_dimensions: bool,
    key: ApiKey,
    key_origin: String,
    max_inputs: usize,
    max_tokens: usize,
    counter: TokenCounter,
    permits: Arc<Semaphore>,
    encoding_format: EncodingFormat,
    /// `max_concurrency`: requests of one `embed` call in flight at once.
    concurrency: usize,
    /// Shared by every worker of the process: no request goes out before this instant,
    /// set from the server's `x-ratelimit-*` headers when a budget is used up.
    not_before: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// requests/tokens per minute for all daemons together, if configured.
    rate_limit: Option<SharedRateLimit>,
    /// What this client sent: requests (retries included), inputs and their tokens.
    requests_sent: AtomicU64,
    inputs_sent: AtomicU64,
    tokens_sent: AtomicU64,
}

/// One request's failure, before retries are decided.
#[derive(Debug)]
enum RequestError {
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    Transport(String),
    /// Not JSON, or not the expected shape: a glitch worth retrying.
    Malformed(String),
    /// Well-formed but wrong (vector count, order or dimension): retrying will not help.
    Mismatch(String),
}

impl RequestError {
    fn retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => matches!(status, 408 | 409 | 429) || *status >= 500,
            Self::Transport(_) | Self::Malformed(_) => true,
            Self::Mismatch(_) => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The server rejects the content of the inputs (not the request as a whole).
    fn rejects_input(&self) -> bool {
        matches!(
            self,
            Self::Status {
                status: 400 | 413 | 422,
                ..
            }
        )
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status {
                status, message, ..
            } => write!(f, "HTTP {status}: {message}"),
            Self::Transport(e) => write!(f, "{e}"),
            Self::Malformed(e) => write!(f, "malformed response: {e}"),
            Self::Mismatch(e) => write!(f, "{e}"),
        }
    }
}

#[derive(Deserialize)]
struct EmbeddingResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

impl OpenAiClient {
    pub fn from_config(config: &Config) -> Result<Self, EmbedError> {
        let e = &config.embedding;
        let base = e.base_url.as_deref().ok_or_else(|| {
            EmbedError::Config(format!(
                "{}.base_url is required for provider \"openai\"",
                config.embedding_section()
            ))
        })?;
        let (key, key_origin) = match &e.api_key_file {
            Some(path) => {
                let key = std::fs::read_to_string(path).map_err(|err| {
                    EmbedError::Config(format!(
                        "cannot read {}.api_key_file {}: {err}",
                        config.embedding_section(),
                        path.display()
                    ))
                })?;
                (
                    key.trim().to_owned(),
                    format!("the file {}", path.display()),
                )
            }
            None => {
                let var = e
                    .api_key_env
                    .clone()
                    .unwrap_or_else(|| "OPENAI_API_KEY".to_owned());
                let key = match std::env::var(&var) {
                    Ok(key) => key,
                    Err(std::env::VarError::NotPresent) => String::new(),
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(EmbedError::Config(format!(
                            "environment variable {var} ({}.api_key_env) is not valid UTF-8; export the API key there as plain text",
                            config.embedding_section()
                        )));
                    }
                };
                if key.is_empty() {
                    return Err(EmbedError::Config(format!(
                        "environment variable {var} ({}.api_key_env) is not set; export the API key there (servers without keys, like Ollama, accept any value)",
                        config.embedding_section()
                    )));
                }
                (key, format!("${var}"))
            }
        };
        let rate_limit = match (e.requests_per_minute, e.tokens_per_minute) {
            (None, None) => None,
            (rpm, tpm) => {
                let url = config.database_url().ok_or_else(|| {
                    EmbedError::Config(
                        "embedding.requests_per_minute / tokens_per_minute are shared by all daemons through the database: set KBSYNC_DATABASE_URL or DATABASE_URL".into(),
                    )
                })?;
                Some(SharedRateLimit::new(url, &e.model, rpm, tpm))
            }
        };
        let http = reqwest::Client::builder()
            .timeout(e.request_timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| EmbedError::Config(format!("HTTP client: {err}")))?;
        Ok(Self {
            http,
            url: format!("{}/embeddings", base.trim_end_matches('/')),
            model: e.model.clone(),
            dimensions: e.dimensions as usize,
            send_dimensions: e.send_dimensions,
            key: ApiKey(key),
            key_origin,
            max_inputs: e.max_inputs_per_request,
            max_tokens: e.max_tokens_per_request,
            counter: TokenCounter::cl100k(),
            permits: Arc::new(Semaphore::new(e.max_concurrency)),
            concurrency: e.max_concurrency,
            encoding_format: e.encoding_format,
            not_before: std::sync::Mutex::new(None),
            rate_limit,
            requests_sent: AtomicU64::new(0),
            inputs_sent: AtomicU64::new(0),
            tokens_sent: AtomicU64::new(0),
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// What this client sent so far.
    pub fn sent(&self) -> super::SentTotals {
        super::SentTotals {
            requests: self.requests_sent.load(Ordering::Relaxed),
            inputs: self.inputs_sent.load(Ordering::Relaxed),
            tokens: self.tokens_sent.load(Ordering::Relaxed),
        }
    }

    pub fn token_limit(&self) -> usize {
        OPENAI_TOKEN_LIMIT
    }

    /// Embed `inputs`, in requests within the input and token caps. Inputs the model
    /// cannot read whole (over 8191 tokens) or that are empty are refused per input,
    /// never sent (chunking keeps them from happening).
    pub async fn embed(&self, inputs: &[String]) -> Result<Vec<InputOutcome>, EmbedError> {
        let mut outcomes: Vec<Option<InputOutcome>> = vec![None; inputs.len()];
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut current: Vec<usize> = Vec::new();
        let mut current_tokens = 0;
        for (i, input) in inputs.iter().enumerate() {
            let tokens = self.counter.count(input);
            if input.trim().is_empty() {
                outcomes[i] = Some(Err("empty input is not embedded".into()));
                continue;
            }
            if tokens > OPENAI_TOKEN_LIMIT {
                outcomes[i] = Some(Err(format!(
                    "input has {tokens} tokens; the model reads at most {OPENAI_TOKEN_LIMIT}"
                )));
                continue;
            }
            if !current.is_empty()
                && (current.len() >= self.max_inputs || current_tokens + tokens > self.max_tokens)
            {
                batches.push(std::mem::take(&mut current));
                current_tokens = 0;
            }
            current.push(i);
            current_tokens += tokens;
            metrics::counter!("kbsync_embedding_tokens_total").increment(tokens as u64);
            self.inputs_sent.fetch_add(1, Ordering::Relaxed);
            self.tokens_sent.fetch_add(tokens as u64, Ordering::Relaxed);
        }
        if !current.is_empty() {
            batches.push(current);
        }
        // The requests overlap, up to max_concurrency (the permits bound all of this
        // daemon's requests together): with 50 ms per request, one after the other
        // would leave the provider idle most of the time.
        let mut requests = futures_util::stream::iter(batches)
            .map(|batch| self.embed_isolating(inputs, batch))
            .buffer_unordered(self.concurrency);
        while let Some(done) = requests.next().await {
            for (i, outcome) in done? {
                outcomes[i] = Some(outcome);
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err("not embedded".into())))
            .collect())
    }

    /// Send one batch; when the server rejects its content, split it in halves until
    /// the rejected inputs stand alone, so only their keys fail.
    async fn embed_isolating(
        &self,
        inputs: &[String],
        batch: Vec<usize>,
    ) -> Result<Vec<(usize, InputOutcome)>, EmbedError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut pending = vec![batch];
        while let Some(batch) = pending.pop() {
            let texts: Vec<&str> = batch.iter().map(|&i| inputs[i].as_str()).collect();
            match self.request_with_retries(&texts).await {
                Ok(vectors) => {
                    outcomes.extend(batch.iter().zip(vectors).map(|(&i, v)| (i, Ok(v))));
                }
                Err(e) if e.rejects_input() && batch.len() > 1 => {
                    let (a, b) = batch.split_at(batch.len() / 2);
                    pending.push(b.to_vec());
                    pending.push(a.to_vec());
                }
                Err(e) if e.rejects_input() => {
                    outcomes.push((batch[0], Err(e.to_string())));
                }
                Err(RequestError::Status {
                    status, message, ..
                }) if matches!(status, 401 | 403) => {
                    return Err(EmbedError::Refused {
                        status,
                        message: format!("{message} — check the API key in {}", self.key_origin),
                    });
                }
                Err(RequestError::Status {
                    status, message, ..
                }) if !matches!(status, 408 | 409 | 429) && status < 500 => {
                    return Err(EmbedError::Refused {
                        status,
                        message: format!(
                            "{message} — check embedding.base_url ({}) and embedding.model ({})",
                            self.url, self.model
                        ),
                    });
                }
                Err(RequestError::Mismatch(e)) => return Err(EmbedError::Protocol(e)),
                Err(e) => return Err(EmbedError::Unavailable(e.to_string())),
            }
        }
        Ok(outcomes)
    }

    async fn request_with_retries(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, RequestError> {
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(6)
            .with_jitter();
        (|| self.request(texts))
            .retry(policy)
            .when(RequestError::retryable)
            .adjust(|e, backoff| {
                backoff.map(|d| {
                    e.retry_after()
                        .map(|ra| ra.min(MAX_RETRY_AFTER))
                        .unwrap_or(d)
                })
            })
            .notify(|e, delay| {
                metrics::counter!("kbsync_embedding_retries_total").increment(1);
                tracing::warn!(error = %e, ?delay, "embedding request failed; retrying")
            })
            .await
    }

    /// One request, counted: requests, inputs, duration, and errors by kind.
    async fn request(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, RequestError> {
        if let Some(limit) = &self.rate_limit {
            let tokens: usize = texts.iter().map(|t| self.counter.count(t)).sum();
            limit
                .acquire(tokens as u64)
                .await
                .map_err(RequestError::Transport)?;
        }
        metrics::counter!("kbsync_embedding_requests_total", "provider" => "openai").increment(1);
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("kbsync_embedding_inputs_total").increment(texts.len() as u64);
        let started = std::time::Instant::now();
        let result = self.send(texts).await;
        metrics::histogram!("kbsync_embedding_request_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            let kind = match e {
                RequestError::Status { status: 429, .. } => "rate_limited",
                RequestError::Status { status, .. } if *status >= 500 => "server_error",
                RequestError::Status { .. } => "refused",
                RequestError::Transport(_) => "transport",
                RequestError::Malformed(_) => "malformed",
                RequestError::Mismatch(_) => "mismatch",
            };
            metrics::counter!("kbsync_embedding_errors_total", "kind" => kind).increment(1);
        }
        result
    }

    async fn send(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, RequestError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| RequestError::Transport(e.to_string()))?;
        // Slow down before the server has to say 429.
        let wait_until = *self.not_before.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = wait_until {
            tokio::time::sleep_until(at).await;
        }
        let mut body = serde_json::json!({
            "model": self.model,
            "input": texts,
            "encoding_format": self.encoding_format.as_str(),
        });
        if self.send_dimensions {
            body["dimensions"] = serde_json::json!(self.dimensions);
        }
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.key.0)
            .json(&body)
            .send()
            .await
            .map_err(|e| RequestError::Transport(without_url(&e)))?;
        let status = response.status().as_u16();
        if let Some(pause) = rate_limit_pause(response.headers()) {
            tracing::info!(
                ?pause,
                "embedding provider's rate limit is used up; pausing requests"
            );
            let at = tokio::time::Instant::now() + pause.min(MAX_RETRY_AFTER);
            let mut slot = self.not_before.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(slot.map_or(at, |old| old.max(at)));
        }
        if !response.status().is_success() {
            let retry_after = retry_after(response.headers());
            let text = response
                .text()
                .await
                .unwrap_or_else(|e| format!("(the response body could not be read: {e})"));
            return Err(RequestError::Status {
                status,
                message: error_message(&text),
                retry_after,
            });
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| RequestError::Transport(without_url(&e)))?;
        let parsed: EmbeddingResponse =
            serde_json::from_slice(&bytes).map_err(|e| RequestError::Malformed(e.to_string()))?;
        self.check(parsed, texts.len())
            .map_err(RequestError::Mismatch)
    }

    /// Count, order and dimension of the vectors must match the request.
    fn check(&self, response: EmbeddingResponse, expected: usize) -> Result<Vec<Vec<f32>>, String> {
        if response.data.len() != expected {
            return Err(format!(
                "{} vectors for {expected} inputs",
                response.data.len()
            ));
        }
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
        for item in response.data {
            let v = match item.embedding {
                EmbeddingValue::Float(v) => v,
                EmbeddingValue::Base64(s) => decode_base64(&s)?,
            };
            if v.len() != self.dimensions {
                return Err(format!(
                    "a vector has {} dimensions, embedding.dimensions is {}",
                    v.len(),
                    self.dimensions
                ));
            }
            let slot = vectors
                .get_mut(item.index)
                .ok_or_else(|| format!("index {} out of range", item.index))?;
            if slot.replace(v).is_some() {
                return Err(format!("index {} appears twice", item.index));
            }
        }
        vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| v.ok_or_else(|| format!("no vector for input {i}")))
            .collect()
    }
}

fn decode_base64(s: &str) -> Result<Vec<f32>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("bad base64 embedding: {e}"))?;
    if bytes.len() % 4 != 0 {
        return Err("base64 embedding is not a whole number of f32".into());
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// A header's value as trimmed text, if present and ASCII. The provider's rate-limit
/// and retry headers are hints: one that does not parse (here or below) reads as
/// absent, and the retry policy's own backoff applies, so nothing is lost or retried
/// sooner for it.
fn header_text<'h>(headers: &'h reqwest::header::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// When the server reports a request or token budget used up
/// (`x-ratelimit-remaining-requests|tokens: 0`), how long until it resets
/// (`x-ratelimit-reset-requests|tokens`, e.g. `1s`, `6m0s`, `20ms`).
fn rate_limit_pause(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| header_text(headers, name);
    ["requests", "tokens"]
        .iter()
        .filter(|kind| {
            text(&format!("x-ratelimit-remaining-{kind}")).and_then(|v| v.parse::<f64>().ok())
                == Some(0.0)
        })
        .filter_map(|kind| text(&format!("x-ratelimit-reset-{kind}")).and_then(parse_reset))
        .max()
}

/// `1h2m3.5s`, `6m0s`, `20ms`, `1s`.
fn parse_reset(text: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

/// `retry-after-ms`, else `retry-after` in seconds or as an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| header_text(headers, name);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return (ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    // A date in the past: retry now.
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// The `error.message` of an OpenAI-style error body, else the body itself (short).
fn error_message(body: &str) -> String {
    let parsed: Option<String> = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        });
    let message = parsed.unwrap_or_else(|| body.to_owned());
    message.chars().take(500).collect()
}

/// reqwest errors print the URL; ours carries no secret, but keep messages short.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retry_after_reads_ms_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        let mut h = HeaderMap::new();
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        h.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        let wait = retry_after(&h).unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
    }

    #[test]
    fn rate_limit_resets_parse_and_pause_only_when_used_up() {
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(
            parse_reset("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_reset("soon"), None);
        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("3"),
        );
        h.insert("x-ratelimit-reset-requests", HeaderValue::from_static("2s"));
        assert_eq!(rate_limit_pause(&h), None);
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("0"),
        );
        h.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("1.5s"));
        assert_eq!(rate_limit_pause(&h), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn base64_vectors_decode_as_little_endian_f32() {
        let bytes: Vec<u8> = [1.0f32, -0.5]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        assert_eq!(decode_base64(&text).unwrap(), vec![1.0, -0.5]);
        assert!(decode_base64("AAA=").is_err());
    }
}
