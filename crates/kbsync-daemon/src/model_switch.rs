//! Which embedding model the daemon writes into `embedding` now, and which one it keeps
//! in the other column, as the database's model migration says
//! (`kbsync_core::model::migration`). Both configured models' providers are built once
//! at start; a cut-over or rollback switches between them without a restart.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kbsync_core::config::{Config, EmbeddingConfig};
use kbsync_core::model::migration::{self, ModelMigrationError, Models};
use kbsync_core::sync::embed::{EmbedError, Provider};
use kbsync_core::sync::knowledge::OtherColumn;
use tokio_postgres::GenericClient;

use crate::texts_in_flight::TextsInFlight;

/// The models of one migration generation.
pub struct ActiveModels {
    pub generation: i64,
    pub active: Arc<Provider>,
    pub other: Option<(OtherColumn, Arc<Provider>, EmbeddingConfig)>,
    /// Texts being embedded by this generation's batches: a vector of one model is
    /// never handed to a batch of the other.
    pub texts_in_flight: TextsInFlight,
}

pub struct ModelSwitch {
    config: Config,
    /// A provider per configured model, by model name.
    providers: HashMap<String, Arc<Provider>>,
    current: RwLock<Arc<ActiveModels>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error(transparent)]
    Provider(#[from] EmbedError),
    #[error(transparent)]
    Migration(#[from] ModelMigrationError),
}

impl ModelSwitch {
    /// The providers of `[embedding]` and `[next_embedding]`, and the models as the
    /// database says now.
    pub async fn new(client: &impl GenericClient, config: &Config) -> Result<Self, SwitchError> {
        let mut providers = HashMap::new();
        providers.insert(
            config.embedding.model.clone(),
            Arc::new(Provider::from_config(config)?),
        );
        if let Some(next) = config.with_next_model() {
            providers.insert(
                next.embedding.model.clone(),
                Arc::new(Provider::from_config(&next)?),
            );
        }
        let models = migration::current_models(client, config).await?;
        let current = RwLock::new(Arc::new(Self::assemble(&providers, models)));
        Ok(Self {
            config: config.clone(),
            providers,
            current,
        })
    }

    fn assemble(providers: &HashMap<String, Arc<Provider>>, models: Models) -> ActiveModels {
        // `models` names only configured models (migration::models checks it).
        let provider = |c: &EmbeddingConfig| providers[&c.model].clone();
        ActiveModels {
            generation: models.generation,
            active: provider(&models.active),
            other: models.other.map(|(column, c)| (column, provider(&c), c)),
            texts_in_flight: TextsInFlight::default(),
        }
    }

    /// The provider of `[embedding]`: the one whose tokenizer cuts the chunks.
    pub fn configured(&self) -> Arc<Provider> {
        // `new` built it first.
        self.providers[&self.config.embedding.model].clone()
    }

    pub fn current(&self) -> Arc<ActiveModels> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Read the migration state again; switch if its generation moved.
    pub async fn refresh(&self, client: &impl GenericClient) -> Result<(), ModelMigrationError> {
        let models = migration::current_models(client, &self.config).await?;
        if models.generation == self.current().generation {
            return Ok(());
        }
        let next = Arc::new(Self::assemble(&self.providers, models));
        tracing::info!(
            generation = next.generation,
            active = next.active.model(),
            other = next.other.as_ref().map(|(_, p, _)| p.model()),
            "embedding models switched"
        );
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(())
    }
}
