//! Embedding providers. `embed` takes the texts of many keys at once and returns an
//! outcome per input, so that one input the provider rejects fails only its own key.

pub mod local;
pub mod openai;

use std::sync::Arc;

use thiserror::Error;

use crate::config::{Config, LOCAL_MODEL_TOKEN_LIMIT, ProviderKind};
use crate::sync::chunk::TokenCounter;

/// An input's vector, or why the provider refused that input.
pub type InputOutcome = Result<Vec<f32>, String>;

/// Why one text (a query, `kbsync embed`) got no vector.
#[derive(Debug, Error)]
pub enum EmbedOneError {
    #[error(transparent)]
    Provider(#[from] EmbedError),
    #[error("the provider refused the text: {0}")]
    Refused(String),
}

/// A failure of the provider as a whole (not of one input): nothing is written and
/// the keys are retried later without counting against them.
#[derive(Debug, Error)]
pub enum EmbedError {
    #[error("embedding provider refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("embedding provider unavailable after retries: {0}")]
    Unavailable(String),
    #[error("embedding provider answered something unusable: {0}")]
    Protocol(String),
    #[error("embedding provider misconfigured: {0}")]
    Config(String),
}

/// Requests, inputs and tokens a provider client sent since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentTotals {
    pub requests: u64,
    pub inputs: u64,
    pub tokens: u64,
}

impl SentTotals {
    /// What was sent since `earlier`.
    pub fn since(self, earlier: SentTotals) -> SentTotals {
        SentTotals {
            requests: self.requests.saturating_sub(earlier.requests),
            inputs: self.inputs.saturating_sub(earlier.inputs),
            tokens: self.tokens.saturating_sub(earlier.tokens),
        }
    }
}

pub enum Provider {
    OpenAi(Box<openai::OpenAiClient>),
    Local(Arc<local::LocalModel>),
}

impl Provider {
    pub fn from_config(config: &Config) -> Result<Self, EmbedError> {
        match config.embedding.provider {
            ProviderKind::Openai => Ok(Self::OpenAi(Box::new(openai::OpenAiClient::from_config(
                config,
            )?))),
            ProviderKind::Local => {
                let dir = config.embedding.model_dir.as_deref().ok_or_else(|| {
                    EmbedError::Config(format!(
                        "{}.model_dir is required for provider \"local\"",
                        config.embedding_section()
                    ))
                })?;
                Ok(Self::Local(Arc::new(local::LocalModel::load(
                    dir,
                    &config.embedding.model,
                )?)))
            }
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Self::OpenAi(c) => c.model(),
            Self::Local(m) => m.model(),
        }
    }

    /// The configured model's token counter without loading the model itself (the
    /// local model's tokenizer file only): for chunking without embedding.
    pub fn token_counter_for(config: &Config) -> Result<TokenCounter, EmbedError> {
        match config.embedding.provider {
            ProviderKind::Openai => Ok(TokenCounter::cl100k()),
            ProviderKind::Local => {
                let dir = config.embedding.model_dir.as_deref().ok_or_else(|| {
                    EmbedError::Config(format!(
                        "{}.model_dir is required for provider \"local\"",
                        config.embedding_section()
                    ))
                })?;
                Ok(TokenCounter::WordPiece(Arc::new(
                    local::counting_tokenizer(dir)?,
                )))
            }
        }
    }

    pub fn token_counter(&self) -> TokenCounter {
        match self {
            Self::OpenAi(_) => TokenCounter::cl100k(),
            Self::Local(m) => TokenCounter::WordPiece(m.counter()),
        }
    }

    /// What this provider embedded so far: requests sent (none for the local model),
    /// texts and tokens.
    pub fn sent(&self) -> SentTotals {
        match self {
            Self::OpenAi(c) => c.sent(),
            Self::Local(m) => m.sent(),
        }
    }

    /// Longest input the model reads, in its tokens.
    pub fn token_limit(&self) -> usize {
        match self {
            Self::OpenAi(c) => c.token_limit(),
            Self::Local(_) => LOCAL_MODEL_TOKEN_LIMIT,
        }
    }

    /// One text's vector.
    pub async fn embed_one(&self, text: &str) -> Result<Vec<f32>, EmbedOneError> {
        match self.embed(&[text.to_owned()]).await?.pop() {
            Some(Ok(vector)) => Ok(vector),
            Some(Err(refused)) => Err(EmbedOneError::Refused(refused)),
            None => Err(EmbedError::Protocol("the provider returned no vector".into()).into()),
        }
    }

    pub async fn embed(&self, inputs: &[String]) -> Result<Vec<InputOutcome>, EmbedError> {
        match self {
            Self::OpenAi(c) => c.embed(inputs).await,
            Self::Local(m) => {
                // CPU-bound: keep it off the async workers.
                let model = m.clone();
                let inputs = inputs.to_vec();
                tokio::task::spawn_blocking(move || model.embed_blocking(&inputs))
                    .await
                    .map_err(|e| EmbedError::Protocol(format!("local model task: {e}")))?
            }
        }
    }
}
