//! Changing the embedding model blue/green: `kbsync model start`, `cutover`,
//! `rollback`, `finish`, with the state in `kbsync.model_migration` (migration 0010).
//!
//! While a migration runs, every chunk carries two vectors: the active model's in
//! `embedding`, which applications and `kbsync.search()` read, and the other model's in
//! a second column of its own dimension: `embedding_next` before the cut-over (the
//! model migrated to, being filled in), `embedding_previous` after it (the model
//! migrated from, kept current so that a rollback costs nothing). A cut-over and a
//! rollback rename the two columns, their model columns and their indexes in one
//! transaction: a search sees one model or the other, never a NULL vector.
//!
//! Both models embed the same chunks, cut as `[embedding]` cuts them: one set of rows
//! keeps the full-text terms, metadata filters and row-level security as they are, and
//! `start` refuses a new model that cannot read those chunks whole. The chunking moves
//! to the new model's only when the config names it in `[embedding]` after `finish`;
//! the texts that cuts differently (`kbsync model plan` counts them) are embedded then.
//!
//! The daemon fills the other column (`kbsync_daemon::model_fill`): a chunk whose text
//! changes loses its other vector (a trigger) and gets it again within seconds. The
//! active model's vector is written with the chunk, as always. A text already embedded
//! with a model, in any chunk or in `kbsync.adopted_embeddings`, is never sent again.

use std::collections::HashMap;

use pgvector::Vector;
use serde::Serialize;
use thiserror::Error;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, GenericClient};

use crate::config::Config;
use crate::search::index::HNSW_INDEX;
use crate::sync::embed::SentTotals;
use crate::sync::knowledge::OtherColumn;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Applications read the old model; the new model's vectors are being filled in.
    Filling,
    /// Applications read the new model; the old model's are kept current.
    CutOver,
    /// The old model's vectors are gone.
    Finished,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Filling => "filling",
            Phase::CutOver => "cut_over",
            Phase::Finished => "finished",
        }
    }
}

/// The phase column as stored. Its CHECK constraint (migration 0010) admits only the
/// three phases; anything else is reported as a conversion error of the read, never
/// read as some phase (a kbsync older than the schema would otherwise guess).
impl<'a> FromSql<'a> for Phase {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        match <&str as FromSql>::from_sql(ty, raw)? {
            "filling" => Ok(Phase::Filling),
            "cut_over" => Ok(Phase::CutOver),
            "finished" => Ok(Phase::Finished),
            other => Err(format!(
                "kbsync.model_migration.phase is {other:?}, a phase this kbsync does not know: run the kbsync that wrote it, or a newer one"
            )
            .into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

/// The row of `kbsync.model_migration`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationState {
    pub from_model: String,
    pub from_dimensions: i32,
    pub to_model: String,
    pub to_dimensions: i32,
    pub phase: Phase,
    pub generation: i64,
    pub seconds_since_start: f64,
    pub seconds_since_change: f64,
    /// Texts, tokens and requests sent to fill the other column, per model.
    pub to_texts: i64,
    pub to_tokens: i64,
    pub to_requests: i64,
    pub from_texts: i64,
    pub from_tokens: i64,
    pub from_requests: i64,
}

impl MigrationState {
    /// The phase in words, with the model applications read.
    pub fn phase_words(&self) -> String {
        match self.phase {
            Phase::Filling => format!("filling: applications read {}", self.from_model),
            Phase::CutOver => format!(
                "cut over: applications read {}; {} kept current for a rollback",
                self.to_model, self.from_model
            ),
            Phase::Finished => format!("finished: {} only", self.to_model),
        }
    }

    /// The model whose vectors are in `embedding`.
    pub fn active_model(&self) -> &str {
        match self.phase {
            Phase::Filling => &self.from_model,
            Phase::CutOver | Phase::Finished => &self.to_model,
        }
    }

    /// The column of the model that is not active, and that model; None once finished.
    pub fn other(&self) -> Option<(OtherColumn, &str)> {
        match self.phase {
            Phase::Filling => Some((OtherColumn::Next, &self.to_model)),
            Phase::CutOver => Some((OtherColumn::Previous, &self.from_model)),
            Phase::Finished => None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ModelMigrationError {
    #[error("database error: {}", crate::db::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "no [next_embedding] in the config: add the model to move to as [next_embedding] (the fields of [embedding]) and run `kbsync model plan` to see what it costs"
    )]
    NoNextModel,
    #[error(
        "a migration from {from} to {to} is already {phase}: see `kbsync model status`; `kbsync model rollback` abandons it"
    )]
    AlreadyRunning {
        from: String,
        to: String,
        phase: &'static str,
    },
    #[error("no model migration is running: `kbsync model start` begins one")]
    NotRunning,
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Column(#[from] crate::search::index::ColumnTypeError),
    #[error(
        "the database is migrating from {from} to {to} ({phase}), but the config has [embedding] {embedding} and [next_embedding] {next}: keep [embedding] = {from} and [next_embedding] = {to} until `kbsync model finish`, then put {to}'s settings in [embedding]"
    )]
    ConfigMismatch {
        from: String,
        to: String,
        phase: &'static str,
        embedding: String,
        next: String,
    },
}

/// The migration row, if any.
pub async fn state(
    client: &impl GenericClient,
) -> Result<Option<MigrationState>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT from_model, from_dimensions, to_model, to_dimensions, phase, generation,
                    extract(epoch FROM now() - started_at)::float8, extract(epoch FROM now() - changed_at)::float8,
                    to_texts, to_tokens, to_requests, from_texts, from_tokens, from_requests
               FROM kbsync.model_migration",
            &[],
        )
        .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    Ok(Some(MigrationState {
        from_model: r.get(0),
        from_dimensions: r.get(1),
        to_model: r.get(2),
        to_dimensions: r.get(3),
        phase: r.try_get(4)?,
        generation: r.get(5),
        seconds_since_start: r.get(6),
        seconds_since_change: r.get(7),
        to_texts: r.get(8),
        to_tokens: r.get(9),
        to_requests: r.get(10),
        from_texts: r.get(11),
        from_tokens: r.get(12),
        from_requests: r.get(13),
    }))
}

/// The migration's generation, 0 without one, locked against a cut-over or rollback
/// until the caller's transaction ends (`FOR KEY SHARE`: the fill's counter updates do
/// not wait for it). A write of vectors embedded with the model that was active at
/// generation G checks that G is still current, in its own transaction, first.
pub async fn locked_generation(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT generation FROM kbsync.model_migration FOR KEY SHARE",
            &[],
        )
        .await?
        .map_or(0, |r| r.get(0)))
}

/// Which model is active, and the other one being kept, as one daemon sees them.
#[derive(Debug, Clone)]
pub struct Models {
    pub generation: i64,
    /// The config section of the model in `embedding`.
    pub active: crate::config::EmbeddingConfig,
    /// The other column and the config section of its model.
    pub other: Option<(OtherColumn, crate::config::EmbeddingConfig)>,
}

/// The models as the database's migration state and the config name them. Without a
/// migration, `[embedding]` is active. During one, `[embedding]` must be the model
/// migrated from and `[next_embedding]` the one migrated to. After `finish` either that
/// or `[embedding]` = the new model.
pub fn models(
    config: &Config,
    state: Option<&MigrationState>,
) -> Result<Models, ModelMigrationError> {
    let Some(state) = state else {
        return Ok(Models {
            generation: 0,
            active: config.embedding.clone(),
            other: None,
        });
    };
    let next = config.next_embedding.as_ref();
    let mismatch = || ModelMigrationError::ConfigMismatch {
        from: state.from_model.clone(),
        to: state.to_model.clone(),
        phase: state.phase.as_str(),
        embedding: config.embedding.model.clone(),
        next: next.map_or("(none)".to_owned(), |n| n.model.clone()),
    };
    let as_started = config.embedding.model == state.from_model
        && next.is_some_and(|n| n.model == state.to_model);
    match state.phase {
        Phase::Finished if config.embedding.model == state.to_model => Ok(Models {
            generation: state.generation,
            active: config.embedding.clone(),
            other: None,
        }),
        _ if !as_started => Err(mismatch()),
        Phase::Filling => Ok(Models {
            generation: state.generation,
            active: config.embedding.clone(),
            other: next.map(|n| (OtherColumn::Next, n.clone())),
        }),
        Phase::CutOver => Ok(Models {
            generation: state.generation,
            active: next.cloned().ok_or_else(mismatch)?,
            other: Some((OtherColumn::Previous, config.embedding.clone())),
        }),
        Phase::Finished => Ok(Models {
            generation: state.generation,
            active: next.cloned().ok_or_else(mismatch)?,
            other: None,
        }),
    }
}

/// `models` read from the database now.
pub async fn current_models(
    client: &impl GenericClient,
    config: &Config,
) -> Result<Models, ModelMigrationError> {
    models(config, state(client).await?.as_ref())
}

/// This config with the active model as `[embedding]`, for what embeds queries or
/// judges stored vectors (search, reconcile); chunking stays `config`'s.
pub fn with_model(config: &Config, models: &Models) -> Config {
    config.with_embedding(models.active.clone())
}

/// Progress of the fill of the other column.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub state: MigrationState,
    /// The column being filled, when one is.
    pub filling_column: Option<&'static str>,
    pub filling_model: Option<String>,
    pub chunks: i64,
    pub chunks_missing: i64,
    pub texts_missing: i64,
    /// Texts embedded for the model being filled per second since the phase began.
    pub texts_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
    /// The index the other column has (built by `cutover`), if any.
    pub other_index_valid: Option<bool>,
}

/// `progress`, or None when no migration has been started.
pub async fn progress_if_any(
    client: &impl GenericClient,
) -> Result<Option<Progress>, ModelMigrationError> {
    match progress(client).await {
        Ok(p) => Ok(Some(p)),
        Err(ModelMigrationError::NotRunning) => Ok(None),
        Err(e) => Err(e),
    }
}

pub async fn progress(client: &impl GenericClient) -> Result<Progress, ModelMigrationError> {
    let state = state(client)
        .await?
        .ok_or(ModelMigrationError::NotRunning)?;
    let chunks: i64 = client
        .query_one("SELECT count(*) FROM public.tenant_knowledge", &[])
        .await?
        .get(0);
    let (mut chunks_missing, mut texts_missing) = (0, 0);
    let (mut filling_column, mut filling_model, mut rate, mut eta, mut index_valid) =
        (None, None, None, None, None);
    if let Some((column, model)) = state.other() {
        let row = client.query_one(&column.sql().remaining, &[]).await?;
        (chunks_missing, texts_missing) = (row.get(0), row.get(1));
        filling_column = Some(column.sql().column);
        filling_model = Some(model.to_owned());
        let texts = if column == OtherColumn::Next {
            state.to_texts
        } else {
            state.from_texts
        };
        let seconds = if column == OtherColumn::Next {
            state.seconds_since_start
        } else {
            state.seconds_since_change
        };
        if texts > 0 && seconds > 0.0 {
            let per_second = texts as f64 / seconds;
            rate = Some(per_second);
            eta = Some(texts_missing as f64 / per_second);
        }
        index_valid = client
            .query_opt(
                "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
                &[&other_index(column)],
            )
            .await?
            .map(|r| r.get(0));
    }
    Ok(Progress {
        state,
        filling_column,
        filling_model,
        chunks,
        chunks_missing,
        texts_missing,
        texts_per_second: rate,
        eta_seconds: eta,
        other_index_valid: index_valid,
    })
}

fn other_index(column: OtherColumn) -> &'static str {
    match column {
        OtherColumn::Next => "public.tenant_knowledge_embedding_next_hnsw",
        OtherColumn::Previous => "public.tenant_knowledge_embedding_previous_hnsw",
    }
}

/// The trigger function that takes a chunk's other vector away when its text changes
/// and the writer did not give it the new text's (a daemon's batch does; any other
/// writer leaves it to the fill), for the column the phase keeps. Its search path has
/// `public` for pgvector's `=`, as kbsync.search()'s has for `<=>`.
fn reset_function_sql(column: OtherColumn) -> String {
    let column = column.sql().column;
    format!(
        "CREATE OR REPLACE FUNCTION kbsync.model_other_reset() RETURNS trigger
         LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
         BEGIN
             IF NEW.{column} IS NOT DISTINCT FROM OLD.{column} THEN
                 NEW.{column} := NULL;
                 NEW.{column}_model := NULL;
             END IF;
             RETURN NEW;
         END $$"
    )
}

/// What `start` did.
#[derive(Debug)]
pub enum Started {
    /// The migration began now.
    Began(MigrationState),
    /// It was running already, to the same model (its index checked).
    AlreadyFilling(MigrationState),
}

/// Begin a migration to `[next_embedding]`: the second column and the trigger that
/// resets it on edits (one short transaction), then the index of the chunks still
/// without a vector there, built concurrently: a plain build would keep the table
/// locked against searches while it reads every row. Filling is the daemon's. Run
/// again while filling to the same model, it only makes sure that index is there.
pub async fn start(client: &mut Client, config: &Config) -> Result<Started, ModelMigrationError> {
    let next = config
        .next_embedding
        .as_ref()
        .ok_or(ModelMigrationError::NoNextModel)?;
    if let Some(s) = state(&*client).await? {
        if s.phase == Phase::Filling
            && s.from_model == config.embedding.model
            && s.to_model == next.model
        {
            ensure_pending_index(client, OtherColumn::Next, "embedding_next").await?;
            return Ok(Started::AlreadyFilling(s));
        }
        if s.phase != Phase::Finished {
            return Err(ModelMigrationError::AlreadyRunning {
                from: s.from_model,
                to: s.to_model,
                phase: s.phase.as_str(),
            });
        }
        if config.embedding.model != s.to_model {
            return Err(ModelMigrationError::Refused(format!(
                "the last migration finished on {}, but [embedding] is {}: put {}'s settings in [embedding] first",
                s.to_model, config.embedding.model, s.to_model
            )));
        }
    }
    // halfvec (above 2,000 dimensions, or chosen) needs pgvector 0.7.0.
    let versions = crate::db::server_versions::ServerVersions::read(&*client).await?;
    if let Some(problem) = versions.unsupported([next]) {
        return Err(ModelMigrationError::Refused(problem));
    }
    let next_config = config
        .with_next_model()
        .ok_or(ModelMigrationError::NoNextModel)?;
    let limit = next_config.model_token_limit();
    if let Some(source) = config.sources().iter().find(|s| s.chunk_tokens > limit) {
        return Err(ModelMigrationError::Refused(format!(
            "sources.{}.chunk_tokens = {}, but {} reads at most {limit} tokens: both models embed the chunks [embedding] cuts, so lower chunk_tokens to {limit} or less first (`kbsync reconcile` re-cuts the chunks; `kbsync model plan` shows the cost)",
            source.name, source.chunk_tokens, next.model
        )));
    }
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO kbsync.model_migration (from_model, from_dimensions, to_model, to_dimensions, phase)
         VALUES ($1, $2, $3, $4, 'filling')
         ON CONFLICT (singleton) DO UPDATE
            SET from_model = EXCLUDED.from_model, from_dimensions = EXCLUDED.from_dimensions,
                to_model = EXCLUDED.to_model, to_dimensions = EXCLUDED.to_dimensions, phase = 'filling',
                generation = nextval('kbsync.model_migration_generation'), started_at = now(), changed_at = now(),
                to_texts = 0, to_tokens = 0, to_requests = 0, from_texts = 0, from_tokens = 0, from_requests = 0",
        &[
            &config.embedding.model,
            &(config.embedding.dimensions as i32),
            &next.model,
            &(next.dimensions as i32),
        ],
    )
    .await?;
    // The type is validated (vector or halfvec, 1..=4000 dimensions): DDL takes no
    // parameters.
    tx.batch_execute(&format!(
        "ALTER TABLE public.tenant_knowledge
             ADD COLUMN embedding_next {column_type}, ADD COLUMN embedding_next_model text;
         {reset};
         CREATE TRIGGER kbsync_model_other_reset BEFORE UPDATE ON public.tenant_knowledge
             FOR EACH ROW WHEN (NEW.content_hash IS DISTINCT FROM OLD.content_hash)
             EXECUTE FUNCTION kbsync.model_other_reset();",
        column_type = next.column_type(),
        reset = reset_function_sql(OtherColumn::Next),
    ))
    .await?;
    tx.commit().await?;
    ensure_pending_index(client, OtherColumn::Next, "embedding_next")
        .await
        .map_err(|e| {
            ModelMigrationError::Refused(format!(
                "the migration began, but building the index of the chunks to fill failed ({}); run `kbsync model start` again to build it",
                crate::db::describe(&e)
            ))
        })?;
    Ok(Started::Began(
        state(&*client)
            .await?
            .ok_or(ModelMigrationError::NotRunning)?,
    ))
}

/// Make sure `index` (in `public`) exists and is valid, built with `create`, a
/// `CREATE INDEX CONCURRENTLY` (it blocks neither writes nor searches); an invalid
/// one, left by an interrupted build, is dropped and built again.
async fn ensure_valid_index(
    client: &Client,
    index: &str,
    create: &str,
) -> Result<(), tokio_postgres::Error> {
    let qualified = format!("public.{index}");
    let valid: Option<bool> = client
        .query_opt(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
            &[&qualified],
        )
        .await?
        .map(|r| r.get(0));
    if valid == Some(false) {
        client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY {qualified}"))
            .await?;
    }
    if valid != Some(true) {
        client.batch_execute(create).await?;
    }
    Ok(())
}

/// The HNSW index of the column the cut-over makes active.
async fn build_next_index(client: &Client) -> Result<(), ModelMigrationError> {
    // Its own statement: several in one simple query form a transaction block, which
    // CREATE INDEX CONCURRENTLY refuses.
    client
        .batch_execute("SET maintenance_work_mem = '512MB'")
        .await?;
    let (vector_type, _) = crate::search::index::column_type(client, "embedding_next")
        .await?
        .ok_or_else(|| ModelMigrationError::Refused(
            "tenant_knowledge has no column embedding_next: no migration is filling (`kbsync model status`)".into(),
        ))?;
    Ok(ensure_valid_index(
        client,
        "tenant_knowledge_embedding_next_hnsw",
        &format!(
            "CREATE INDEX CONCURRENTLY tenant_knowledge_embedding_next_hnsw
                 ON public.tenant_knowledge USING hnsw (embedding_next {}) WITH ({})",
            vector_type.cosine_ops(),
            crate::search::index::HNSW_OPTIONS
        ),
    )
    .await?)
}

/// The renames that swap the roles of the two vector columns and their indexes.
fn swap_sql(from: OtherColumn) -> String {
    let (other, now) = match from {
        // Cut-over: next becomes active, active becomes previous.
        OtherColumn::Next => ("embedding_next", "embedding_previous"),
        // Rollback: previous becomes active, active becomes next.
        OtherColumn::Previous => ("embedding_previous", "embedding_next"),
    };
    format!(
        "ALTER TABLE public.tenant_knowledge RENAME COLUMN embedding TO {now};
         ALTER TABLE public.tenant_knowledge RENAME COLUMN embedding_model TO {now}_model;
         ALTER TABLE public.tenant_knowledge RENAME COLUMN {other} TO embedding;
         ALTER TABLE public.tenant_knowledge RENAME COLUMN {other}_model TO embedding_model;
         ALTER INDEX IF EXISTS public.{HNSW_INDEX} RENAME TO tenant_knowledge_{now}_hnsw;
         ALTER INDEX IF EXISTS public.tenant_knowledge_{other}_hnsw RENAME TO {HNSW_INDEX};
         DROP INDEX public.tenant_knowledge_{other}_pending;
         {reset};",
        reset = reset_function_sql(match from {
            OtherColumn::Next => OtherColumn::Previous,
            OtherColumn::Previous => OtherColumn::Next,
        }),
    )
}

/// The index of the chunks without a vector in `nullable` (the other column, or the
/// column that becomes it at a swap, today's `embedding`), named for `column`'s role:
/// the fill reads it newest first.
async fn ensure_pending_index(
    client: &Client,
    column: OtherColumn,
    nullable: &str,
) -> Result<(), tokio_postgres::Error> {
    let index = match column {
        OtherColumn::Next => "tenant_knowledge_embedding_next_pending",
        OtherColumn::Previous => "tenant_knowledge_embedding_previous_pending",
    };
    // `nullable` is one of this module's two column names, never input.
    debug_assert!(["embedding", "embedding_next"].contains(&nullable));
    ensure_valid_index(
        client,
        index,
        &format!(
            "CREATE INDEX CONCURRENTLY {index} ON public.tenant_knowledge (updated_at) WHERE {nullable} IS NULL"
        ),
    )
    .await
}

/// Swap the columns in one transaction, once the other column is complete: the
/// migration's row is locked first (so no daemon's write of the old roles commits
/// after it), then the table, then nothing may be missing.
async fn swap(
    client: &mut Client,
    from: OtherColumn,
    phase: Phase,
) -> Result<MigrationState, ModelMigrationError> {
    // The column that becomes the other one is today's `embedding`.
    let becomes_other = match from {
        OtherColumn::Next => OtherColumn::Previous,
        OtherColumn::Previous => OtherColumn::Next,
    };
    ensure_pending_index(client, becomes_other, "embedding").await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT 1 FROM kbsync.model_migration FOR UPDATE", &[])
        .await?;
    tx.batch_execute("LOCK TABLE public.tenant_knowledge IN ACCESS EXCLUSIVE MODE")
        .await?;
    let missing: i64 = tx.query_one(&from.sql().remaining, &[]).await?.get(0);
    if missing > 0 {
        return Err(ModelMigrationError::Refused(format!(
            "{missing} chunks have no vector in {} yet (written since the check): the daemon fills them within seconds; run it again",
            from.sql().column
        )));
    }
    tx.batch_execute(&swap_sql(from)).await?;
    tx.execute(
        "UPDATE kbsync.model_migration SET phase = $1, generation = nextval('kbsync.model_migration_generation'), changed_at = now()",
        &[&phase.as_str()],
    )
    .await?;
    tx.commit().await?;
    state(&*client)
        .await?
        .ok_or(ModelMigrationError::NotRunning)
}

/// The migration, when it is in `phase`; else why `kbsync model {command}` does not
/// apply now.
async fn in_phase(
    client: &Client,
    phase: Phase,
    command: &str,
) -> Result<MigrationState, ModelMigrationError> {
    let s = state(client)
        .await?
        .ok_or(ModelMigrationError::NotRunning)?;
    if s.phase != phase {
        return Err(ModelMigrationError::Refused(format!(
            "the migration to {} is {}: `kbsync model {command}` applies when it is {}",
            s.to_model,
            s.phase.as_str(),
            phase.as_str()
        )));
    }
    Ok(s)
}

/// Make the new model's vectors the ones applications read.
pub async fn cutover(client: &mut Client) -> Result<MigrationState, ModelMigrationError> {
    let s = in_phase(client, Phase::Filling, "cutover").await?;
    let (chunks, texts): (i64, i64) = {
        let row = client
            .query_one(&OtherColumn::Next.sql().remaining, &[])
            .await?;
        (row.get(0), row.get(1))
    };
    if chunks > 0 {
        return Err(ModelMigrationError::Refused(format!(
            "{chunks} chunks ({texts} distinct texts) have no {} vector yet: wait until `kbsync model status` shows none missing (a running daemon fills them)",
            s.to_model
        )));
    }
    build_next_index(client).await?;
    swap(client, OtherColumn::Next, Phase::CutOver).await
}

/// After a cut-over: the old model's vectors back at once (they were kept current).
/// Before one: abandon the migration; the new model's vectors are kept in
/// `kbsync.adopted_embeddings`, so a later `start` pays only for texts changed since.
pub async fn rollback(client: &mut Client) -> Result<Option<MigrationState>, ModelMigrationError> {
    let s = state(&*client)
        .await?
        .ok_or(ModelMigrationError::NotRunning)?;
    match s.phase {
        Phase::CutOver => Ok(Some(
            swap(client, OtherColumn::Previous, Phase::Filling).await?,
        )),
        Phase::Filling => {
            let tx = client.transaction().await?;
            tx.execute("SELECT 1 FROM kbsync.model_migration FOR UPDATE", &[])
                .await?;
            tx.execute(
                "INSERT INTO kbsync.adopted_embeddings (embedding_model, content_hash, embedding, adopted_from)
                 SELECT DISTINCT ON (content_hash) embedding_next_model, content_hash, embedding_next,
                        'kbsync model rollback (tenant_knowledge.embedding_next)'
                   FROM public.tenant_knowledge
                  WHERE embedding_next IS NOT NULL AND content_hash = sha256(convert_to(content, 'UTF8'))
                 ON CONFLICT (embedding_model, content_hash) DO NOTHING",
                &[],
            )
            .await?;
            tx.batch_execute(
                "DROP TRIGGER kbsync_model_other_reset ON public.tenant_knowledge;
                 DROP FUNCTION kbsync.model_other_reset();
                 ALTER TABLE public.tenant_knowledge DROP COLUMN embedding_next, DROP COLUMN embedding_next_model;
                 DELETE FROM kbsync.model_migration;",
            )
            .await?;
            tx.commit().await?;
            Ok(None)
        }
        Phase::Finished => Err(ModelMigrationError::Refused(format!(
            "the migration to {} is finished: the old model's vectors are gone; a migration back is a new `kbsync model start`",
            s.to_model
        ))),
    }
}

/// After a cut-over: drop the old model's vectors and index. One vector column is left.
pub async fn finish(client: &mut Client) -> Result<MigrationState, ModelMigrationError> {
    in_phase(client, Phase::CutOver, "finish").await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT 1 FROM kbsync.model_migration FOR UPDATE", &[])
        .await?;
    tx.batch_execute(
        "DROP TRIGGER kbsync_model_other_reset ON public.tenant_knowledge;
         DROP FUNCTION kbsync.model_other_reset();
         ALTER TABLE public.tenant_knowledge DROP COLUMN embedding_previous, DROP COLUMN embedding_previous_model;
         UPDATE kbsync.model_migration SET phase = 'finished', generation = nextval('kbsync.model_migration_generation'), changed_at = now();",
    )
    .await?;
    tx.commit().await?;
    state(&*client)
        .await?
        .ok_or(ModelMigrationError::NotRunning)
}

/// Vectors of `model` already stored for these texts, in the other column or adopted.
pub async fn reusable(
    client: &impl GenericClient,
    column: OtherColumn,
    model: &str,
    hashes: &[&[u8]],
) -> Result<HashMap<Vec<u8>, Vector>, tokio_postgres::Error> {
    Ok(client
        .query(&column.sql().reusable, &[&hashes, &model])
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Write `vectors` of `model` into the other column, if the migration is still at
/// `generation` (else nothing is written and false is returned).
pub async fn fill(
    client: &mut Client,
    generation: i64,
    column: OtherColumn,
    model: &str,
    vectors: &HashMap<Vec<u8>, Vector>,
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    if locked_generation(&tx).await? != generation {
        return Ok(false);
    }
    let (hashes, values): (Vec<&[u8]>, Vec<&Vector>) =
        vectors.iter().map(|(h, v)| (h.as_slice(), v)).unzip();
    tx.execute(&column.sql().fill, &[&hashes, &values, &model])
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Add what was sent to the other model's provider (by the fill and by live sync's
/// second vectors) to the migration's counters of that model.
pub async fn add_sent(
    client: &impl GenericClient,
    generation: i64,
    column: OtherColumn,
    sent: SentTotals,
) -> Result<(), tokio_postgres::Error> {
    let counters = match column {
        OtherColumn::Next => {
            "UPDATE kbsync.model_migration
                SET to_texts = to_texts + $1, to_tokens = to_tokens + $2, to_requests = to_requests + $3
              WHERE generation = $4"
        }
        OtherColumn::Previous => {
            "UPDATE kbsync.model_migration
                SET from_texts = from_texts + $1, from_tokens = from_tokens + $2, from_requests = from_requests + $3
              WHERE generation = $4"
        }
    };
    client
        .execute(
            counters,
            &[
                &(sent.inputs as i64),
                &(sent.tokens as i64),
                &(sent.requests as i64),
                &generation,
            ],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_phase_reads_back_and_an_unknown_one_is_an_error_not_a_guess() {
        for phase in [Phase::Filling, Phase::CutOver, Phase::Finished] {
            let read = Phase::from_sql(&Type::TEXT, phase.as_str().as_bytes())
                .expect("a stored phase reads back");
            assert_eq!(read, phase);
        }
        let err = Phase::from_sql(&Type::TEXT, b"paused").expect_err("an unknown phase");
        assert!(err.to_string().contains("\"paused\""), "{err}");
    }

    fn state(phase: Phase) -> MigrationState {
        MigrationState {
            from_model: "old".into(),
            from_dimensions: 8,
            to_model: "new".into(),
            to_dimensions: 16,
            phase,
            generation: 3,
            seconds_since_start: 0.0,
            seconds_since_change: 0.0,
            to_texts: 0,
            to_tokens: 0,
            to_requests: 0,
            from_texts: 0,
            from_tokens: 0,
            from_requests: 0,
        }
    }

    fn config(embedding: &str, next: Option<&str>) -> Config {
        let mut config = crate::config::for_tests("", "");
        config.embedding.model = embedding.into();
        config.next_embedding = next.map(|n| crate::config::EmbeddingConfig {
            model: n.into(),
            ..config.embedding.clone()
        });
        config.revalidated()
    }

    #[test]
    fn the_active_model_follows_the_phase_and_the_config_must_match_it() {
        let both = config("old", Some("new"));
        let m = models(&both, Some(&state(Phase::Filling))).unwrap();
        assert_eq!(m.active.model, "old");
        assert!(matches!(&m.other, Some((OtherColumn::Next, c)) if c.model == "new"));
        let m = models(&both, Some(&state(Phase::CutOver))).unwrap();
        assert_eq!(m.active.model, "new");
        assert!(matches!(&m.other, Some((OtherColumn::Previous, c)) if c.model == "old"));
        assert_eq!(m.generation, 3);
        let m = models(&both, Some(&state(Phase::Finished))).unwrap();
        assert_eq!((m.active.model.as_str(), m.other.is_none()), ("new", true));
        let moved = config("new", None);
        let m = models(&moved, Some(&state(Phase::Finished))).unwrap();
        assert_eq!(m.active.model, "new");
        // During the migration the config must name both models as they were started.
        for phase in [Phase::Filling, Phase::CutOver] {
            assert!(matches!(
                models(&moved, Some(&state(phase))),
                Err(ModelMigrationError::ConfigMismatch { .. })
            ));
        }
        let m = models(&config("old", None), None).unwrap();
        assert_eq!((m.active.model.as_str(), m.generation), ("old", 0));
    }

    #[test]
    fn the_swap_renames_both_ways_symmetrically() {
        let cut = swap_sql(OtherColumn::Next);
        assert!(cut.contains("RENAME COLUMN embedding TO embedding_previous;"));
        assert!(cut.contains("RENAME COLUMN embedding_next TO embedding;"));
        assert!(cut.contains("NEW.embedding_previous := NULL"));
        let back = swap_sql(OtherColumn::Previous);
        assert!(back.contains("RENAME COLUMN embedding TO embedding_next;"));
        assert!(back.contains("RENAME COLUMN embedding_previous TO embedding;"));
        assert!(back.contains("NEW.embedding_next := NULL"));
    }
}
