//! Embedding providers. `embed` takes the texts of many keys at once and returns an
//! outcome per input, so that one input the provider rejects fails only its own key.

pub mod openai;

use thiserror::Error;

use crate::chunk::TokenCounter;
use crate::config::{Config, ProviderKind};

/// An input's vector, or why the provider refused that input.
pub type InputOutcome = Result<Vec<f32>, String>;

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

pub enum Provider {
    OpenAi(openai::OpenAiClient),
}

impl Provider {
    pub fn from_config(config: &Config) -> Result<Self, EmbedError> {
        match config.embedding.provider {
            ProviderKind::Openai => Ok(Self::OpenAi(openai::OpenAiClient::from_config(config)?)),
            ProviderKind::Local => Err(EmbedError::Config(
                "provider \"local\" (all-MiniLM-L6-v2 with candle) is not built yet; use provider = \"openai\" with any OpenAI-compatible server".into(),
            )),
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Self::OpenAi(c) => c.model(),
        }
    }

    pub fn token_counter(&self) -> TokenCounter {
        match self {
            Self::OpenAi(_) => TokenCounter::cl100k(),
        }
    }

    /// Longest input the model reads, in its tokens.
    pub fn token_limit(&self) -> usize {
        match self {
            Self::OpenAi(c) => c.token_limit(),
        }
    }

    pub async fn embed(&self, inputs: &[String]) -> Result<Vec<InputOutcome>, EmbedError> {
        match self {
            Self::OpenAi(c) => c.embed(inputs).await,
        }
    }
}
