//! `kbsync.toml`: every field, its default, and the checks that turn a bad file into an
//! error naming the file, the field and what is wrong.

pub mod sql_ident;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::sql_ident::{Ident, SqlLiteral, TableName};

/// Environment variables that override the config file.
pub const ENV_DATABASE_URL: &str = "KBSYNC_DATABASE_URL";
pub const ENV_DATABASE_URL_FALLBACK: &str = "DATABASE_URL";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {error}")]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}: {field}: {problem}")]
    Invalid {
        file: PathBuf,
        field: String,
        problem: String,
    },
}

/// The largest `daemon.batch_size`: a batch is written, fenced and acknowledged in one
/// transaction, and its keys travel as statement parameters.
pub const MAX_BATCH_SIZE: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub database: DatabaseConfig,
    pub embedding: EmbeddingConfig,
    /// The model to move to (`kbsync model plan`): the same fields as `[embedding]`,
    /// its own provider and limits. Leave it out when no change of model is planned.
    #[serde(default)]
    pub next_embedding: Option<EmbeddingConfig>,
    #[serde(default)]
    pub capture: CaptureConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub scheduling: SchedulingConfig,
    #[serde(default)]
    pub index: IndexConfig,
    #[serde(default)]
    pub search: SearchConfig,
    /// Sources by name; the name is the chunk type stored in `tenant_knowledge.source`.
    pub sources: BTreeMap<String, SourceConfig>,
    /// The section `embedding` was read from, for messages: "embedding", or
    /// "next_embedding" in `with_next_model`'s copy.
    #[serde(skip, default = "defaults::embedding_section")]
    pub(crate) embedding_section: &'static str,
    /// `sources`, validated once by `parse` (for this config's model: chunk limits
    /// follow it).
    #[serde(skip)]
    validated_sources: Vec<Source>,
    /// This config with `[next_embedding]` as its model, validated by `parse`.
    #[serde(skip)]
    next_model: Option<Box<Config>>,
}

/// Retrieval for applications: `kbsync.search()` in SQL, `POST /v1/search` on the
/// daemon's HTTP endpoint, `kbsync search`, and optional row-level security.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// Chunks each ranking (vector, full-text) contributes before they are fused.
    /// Default 100.
    #[serde(default = "defaults::candidates")]
    pub candidates: u32,
    /// The constant of reciprocal rank fusion: a chunk scores 1 / (rrf_k + rank) in
    /// each ranking it is in; larger values flatten the difference between ranks.
    /// Default 60 (Cormack et al.).
    #[serde(default = "defaults::rrf_k")]
    pub rrf_k: u32,
    /// Longest query `POST /v1/search` accepts, in characters. Default 2000.
    #[serde(default = "defaults::max_query_chars")]
    pub max_query_chars: usize,
    /// Environment variable holding the bearer tokens `POST /v1/search` accepts
    /// (comma-separated). Without it (or `api_tokens_file`) the endpoint is off.
    pub api_tokens_env: Option<String>,
    /// File holding those tokens, one a line (instead of `api_tokens_env`).
    pub api_tokens_file: Option<PathBuf>,
    /// `kbsync install` enables row-level security on tenant_knowledge: a role that
    /// is not its owner sees only the rows of the tenant in the session setting
    /// `kbsync.tenant` (`SET kbsync.tenant = '42'`). Default false.
    #[serde(default)]
    pub row_level_security: bool,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            candidates: defaults::candidates(),
            rrf_k: defaults::rrf_k(),
            max_query_chars: defaults::max_query_chars(),
            api_tokens_env: None,
            api_tokens_file: None,
            row_level_security: false,
        }
    }
}

impl SearchConfig {
    /// The bearer tokens `POST /v1/search` accepts; `None` when no token source is
    /// configured (the endpoint is off). A configured source that yields no token is
    /// an error, never an open endpoint.
    pub fn api_tokens(&self) -> Result<Option<Vec<String>>, String> {
        let (text, origin) = match (&self.api_tokens_env, &self.api_tokens_file) {
            (Some(var), _) => (
                std::env::var(var).map_err(|_| {
                    format!("environment variable {var} (search.api_tokens_env) is not set: export the search API's tokens there, comma-separated")
                })?,
                format!("${var}"),
            ),
            (None, Some(path)) => (
                std::fs::read_to_string(path).map_err(|e| {
                    format!("cannot read search.api_tokens_file {}: {e}", path.display())
                })?,
                format!("the file {}", path.display()),
            ),
            (None, None) => return Ok(None),
        };
        let tokens: Vec<String> = text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if tokens.is_empty() {
            return Err(format!("{origin} holds no search API token"));
        }
        Ok(Some(tokens))
    }
}

/// Which tenants' work goes first. Work is always shared fairly (round-robin) among
/// tenants; priority tenants' ready work is claimed before anyone else's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulingConfig {
    /// Tenant ids (as text, like tenant_knowledge.tenant_id). Default none.
    #[serde(default)]
    pub priority_tenants: Vec<String>,
    /// A query returning priority tenant ids in its first column, e.g.
    /// "SELECT id::text FROM accounts_user WHERE plan = 'enterprise'". Run read-only at
    /// start (a failing query stops the start) and every `priority_refresh`.
    pub priority_tenants_sql: Option<String>,
    /// Default 1m.
    #[serde(default = "defaults::priority_refresh", with = "humantime_serde")]
    pub priority_refresh: Duration,
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self {
            priority_tenants: Vec::new(),
            priority_tenants_sql: None,
            priority_refresh: defaults::priority_refresh(),
        }
    }
}

/// How changes to the source tables are captured (per database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// Statement-level triggers append to `kbsync.changes` in the writer's
    /// transaction. Works on every PostgreSQL. The default.
    #[default]
    Triggers,
    /// No trigger: the daemon decodes the WAL through a publication and a logical
    /// replication slot (pgoutput). Needs `wal_level = logical`.
    Logical,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// "triggers" (default) or "logical".
    #[serde(default)]
    pub mode: CaptureMode,
    /// Replication slot name (logical mode). Default "kbsync_<database oid>": slots
    /// are cluster-wide, so each database gets its own.
    pub slot: Option<String>,
    /// Logical mode: WAL the slot may hold back before `/readyz` says not ready and
    /// `kbsync status` warns, in MiB. Default 1024.
    #[serde(default = "defaults::max_retained_wal_mb")]
    pub max_retained_wal_mb: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            mode: CaptureMode::default(),
            slot: None,
            max_retained_wal_mb: defaults::max_retained_wal_mb(),
        }
    }
}

/// The daemon's HTTP endpoint: /healthz, /readyz, /metrics, /api/chunking-health.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on, e.g. "127.0.0.1:9187" ("127.0.0.1:0": any free port,
    /// logged at start). Default: none, no HTTP server. Nothing on it is
    /// authenticated: keep it on localhost or a private network.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL. Overridden by `KBSYNC_DATABASE_URL`, then `DATABASE_URL`.
    /// Prefer the environment for URLs that carry a password.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// all-MiniLM-L6-v2 on the CPU, offline.
    Local,
    /// Any OpenAI-compatible `/v1/embeddings` server.
    Openai,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Base64,
    Float,
}

impl EncodingFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            EncodingFormat::Base64 => "base64",
            EncodingFormat::Float => "float",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingConfig {
    pub provider: ProviderKind,
    /// Model name, recorded with every chunk; a change marks chunks stale.
    pub model: String,
    /// Vector dimension, 1 to 4000; `tenant_knowledge.embedding` is
    /// `vector(dimensions)` or `halfvec(dimensions)` (see `vector_type`).
    pub dimensions: u32,
    /// The embedding column's type: `vector` (4-byte floats; pgvector indexes up to
    /// 2000 dimensions) or `halfvec` (2-byte floats, up to 4000, pgvector 0.7.0 and
    /// later; half the index at the same dimensions). Default: `vector` up to 2000
    /// dimensions, `halfvec` above.
    pub vector_type: Option<VectorType>,
    /// Largest chunk in the model's tokens. Default: 200 for `local` (all-MiniLM-L6-v2
    /// reads at most 256 word pieces), 512 for `openai`.
    pub max_chunk_tokens: Option<usize>,
    /// `local`: directory with model.safetensors, tokenizer.json, config.json.
    pub model_dir: Option<PathBuf>,
    /// `openai`: base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: Option<String>,
    /// `openai`: environment variable that holds the API key. Default `OPENAI_API_KEY`.
    pub api_key_env: Option<String>,
    /// `openai`: file that holds the API key (instead of `api_key_env`).
    pub api_key_file: Option<PathBuf>,
    /// `openai`: send `dimensions` in requests (text-embedding-3 models can shorten).
    #[serde(default)]
    pub send_dimensions: bool,
    /// `openai`: how vectors come back: `base64` (little-endian f32, a third of the
    /// bytes of JSON floats and no float parsing; what OpenAI's own clients ask for) or
    /// `float`, for a server that refuses base64. An answer in either form is read.
    /// Default base64.
    #[serde(default)]
    pub encoding_format: EncodingFormat,
    /// `openai`: at most this many inputs per request. Default 2048 (OpenAI's cap;
    /// text-embeddings-inference defaults to 32).
    #[serde(default = "defaults::max_inputs_per_request")]
    pub max_inputs_per_request: usize,
    /// `openai`: at most this many tokens per request. Default 300000.
    #[serde(default = "defaults::max_tokens_per_request")]
    pub max_tokens_per_request: usize,
    /// `openai`: per-request timeout. Default 60s.
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests in flight at once, per process. Default 4.
    #[serde(default = "defaults::max_concurrency")]
    pub max_concurrency: usize,
    /// Requests per minute to the provider, for all daemons together (shared through
    /// the database). Default: no limit of kbsync's own (the server's 429s still count).
    pub requests_per_minute: Option<u32>,
    /// Input tokens per minute, for all daemons together. Default: no limit.
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Read the outbox at least this often even without a NOTIFY. Default 5s.
    #[serde(default = "defaults::fallback_poll", with = "humantime_serde")]
    pub fallback_poll: Duration,
    /// A claimed key not written within this time may be taken by another daemon.
    /// Default 5m.
    #[serde(default = "defaults::claim_lease", with = "humantime_serde")]
    pub claim_lease: Duration,
    /// Keys processed per batch at most. Default 256, at most `MAX_BATCH_SIZE`.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Claims are sized so that a batch takes about this long (each worker measures its
    /// keys per second, a remote provider's response time included; in whole requests
    /// of `max_inputs_per_request`, at least two when the provider's time is most of a
    /// key's cost), between 1 key and `batch_size`. A new edit then waits for at most
    /// one batch in progress, however large the backlog it arrives behind. Default
    /// 200ms.
    #[serde(default = "defaults::batch_duration", with = "humantime_serde")]
    pub batch_duration: Duration,
    /// Failed attempts before a key is parked in the dead-letter table. Default 5.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// On SIGTERM, in-flight batches get this long to finish. Default 30s.
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// A source whose statements fail in a way waiting alone does not fix (a column it
    /// names is missing, no privilege on its table) is marked broken — in `kbsync
    /// status`, `/readyz` and `kbsync_source_broken` — and tried again this often, not
    /// in a loop. Default 1m.
    #[serde(default = "defaults::broken_source_retry", with = "humantime_serde")]
    pub broken_source_retry: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            fallback_poll: defaults::fallback_poll(),
            claim_lease: defaults::claim_lease(),
            batch_size: defaults::batch_size(),
            batch_duration: defaults::batch_duration(),
            max_attempts: defaults::max_attempts(),
            drain_timeout: defaults::drain_timeout(),
            broken_source_retry: defaults::broken_source_retry(),
        }
    }
}

/// The HNSW index on `tenant_knowledge.embedding`, which the daemon drops for a large
/// backlog and builds back in bulk once the backlog is worked off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// A backlog of at least this many outbox entries, and at least half the chunks
    /// stored, is written without the index; it is rebuilt (concurrently) when fewer
    /// than a tenth of this are left. 0: the daemon never touches the index. Default
    /// 10000.
    #[serde(default = "defaults::defer_above")]
    pub defer_above: u64,
    /// `maintenance_work_mem` for the build, in MB: the HNSW graph must fit (about
    /// 4 × dimensions + 300 bytes per chunk), or pgvector builds far slower. Default 1024.
    #[serde(default = "defaults::build_memory_mb")]
    pub build_memory_mb: u64,
    /// `max_parallel_maintenance_workers` for the build. Default 1 (with the leader,
    /// two processes).
    #[serde(default = "defaults::build_workers")]
    pub build_workers: u32,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            defer_above: defaults::defer_above(),
            build_memory_mb: defaults::build_memory_mb(),
            build_workers: defaults::build_workers(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Run the sweep inside `kbsync run` on this schedule. Default true.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Cron expression in UTC, seconds first (6 or 7 fields; weekdays Sun=1).
    /// Default `0 0 3 * * *`: daily at 03:00 UTC.
    #[serde(default = "defaults::reconcile_schedule")]
    pub schedule: String,
    /// A sweep that would delete more than this share of a source's chunks stops and
    /// asks for `--force`. Default 0.5.
    #[serde(default = "defaults::max_delete_fraction")]
    pub max_delete_fraction: f64,
    /// Source rows (and chunks) examined per query; each range is one short
    /// statement, so the sweep never holds the table in memory. Default 5000.
    #[serde(default = "defaults::reconcile_range_size")]
    pub range_size: usize,
    /// A parked key becomes due for a retry by the sweep this long after it was
    /// parked. Default 6h.
    #[serde(
        default = "defaults::dead_letter_retry_after",
        with = "humantime_serde"
    )]
    pub dead_letter_retry_after: Duration,
    /// How many times the sweep retries a parked key before it is reported as
    /// permanently failing (`kbsync errors retry` still replays it). Default 3.
    #[serde(default = "defaults::dead_letter_retries")]
    pub dead_letter_retries: u32,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            schedule: defaults::reconcile_schedule(),
            max_delete_fraction: defaults::max_delete_fraction(),
            range_size: defaults::reconcile_range_size(),
            dead_letter_retry_after: defaults::dead_letter_retry_after(),
            dead_letter_retries: defaults::dead_letter_retries(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Source table, `table` or `schema.table`.
    pub table: String,
    /// Key column (unique per row).
    pub key: String,
    /// Where the tenant id comes from.
    pub tenant: TenantConfig,
    /// Related tables, one level, by foreign key: `[sources.NAME.related.page]`. Their
    /// columns are named `page.column` in the text, the filter, the metadata and
    /// `tenant.via`; a change to one re-syncs the rows that reference it.
    #[serde(default)]
    pub related: BTreeMap<String, RelatedConfig>,
    /// Rows must pass all rules to have chunks; rows that stop passing lose them.
    #[serde(default)]
    pub filter: Vec<FilterRule>,
    /// Text to embed, with `{column}` and `{related.column}` placeholders (`{{`/`}}`
    /// for braces). NULL is "".
    pub text: String,
    /// Columns copied into each chunk's `metadata` (`related.column` allowed; the key
    /// is the name as written).
    #[serde(default)]
    pub metadata: Vec<String>,
    /// Changes are collected this long after the last edit of a key. Default 5s.
    #[serde(default = "defaults::debounce", with = "humantime_serde")]
    pub debounce: Duration,
    /// A key edited without pause is still processed at least this often. Default 60s.
    #[serde(default = "defaults::max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Window for deletes (and rows leaving the filter). Default 2s.
    #[serde(default = "defaults::delete_debounce", with = "humantime_serde")]
    pub delete_debounce: Duration,
    /// One chunk per row (split only if it exceeds the model's limit). Default false.
    #[serde(default)]
    pub single_chunk: bool,
    /// Chunk size in model tokens. Default: `embedding.max_chunk_tokens`.
    pub chunk_tokens: Option<usize>,
    /// Tokens shared by neighbouring chunks. Default: chunk size / 8.
    pub chunk_overlap: Option<usize>,
    /// PostgreSQL text search configuration of the chunks' full-text index: `simple`
    /// (words as written, any language, product codes intact) or a language such as
    /// `english` (stemmed, stop words dropped). Default simple.
    #[serde(default = "defaults::text_search")]
    pub text_search: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant id column: on the source table, or on the related table `via` names.
    pub column: String,
    /// Reach the tenant through a related table (e.g. QAPair → page → user): the name
    /// of a `related` table, or the join itself (`{ table, foreign_key, references }`).
    pub via: Option<TenantVia>,
}

/// `tenant.via`: a declared related table by name, or a join written in place (the
/// older form, kept: it is a related table named `via`).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TenantVia {
    Related(String),
    Join(RelatedConfig),
}

impl<'de> Deserialize<'de> for TenantVia {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TenantVia;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("the name of a related table, or { table, foreign_key, references }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TenantVia, E> {
                Ok(TenantVia::Related(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TenantVia, A::Error> {
                RelatedConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(TenantVia::Join)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A related table: the source's `foreign_key` column references its `references`
/// column, which must be unique there (a primary key or a unique index of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelatedConfig {
    pub table: String,
    /// Column on the source table that references `table`.
    pub foreign_key: String,
    /// Column of `table` that `foreign_key` points at.
    pub references: String,
}

/// One condition on a column of the source table; exactly one operator is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterRule {
    pub column: String,
    pub equals: Option<String>,
    pub not_equals: Option<String>,
    pub one_of: Option<Vec<String>>,
    pub is_null: Option<bool>,
}

mod defaults {
    use std::time::Duration;
    pub fn embedding_section() -> &'static str {
        "embedding"
    }
    pub fn text_search() -> String {
        "simple".into()
    }
    pub fn candidates() -> u32 {
        100
    }
    pub fn rrf_k() -> u32 {
        60
    }
    pub fn max_query_chars() -> usize {
        2_000
    }
    pub fn yes() -> bool {
        true
    }
    pub fn max_inputs_per_request() -> usize {
        2048
    }
    pub fn max_tokens_per_request() -> usize {
        300_000
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_concurrency() -> usize {
        4
    }
    pub fn max_retained_wal_mb() -> u64 {
        1024
    }
    pub fn fallback_poll() -> Duration {
        Duration::from_secs(5)
    }
    pub fn claim_lease() -> Duration {
        Duration::from_secs(300)
    }
    pub fn batch_size() -> usize {
        256
    }
    pub fn batch_duration() -> Duration {
        Duration::from_millis(200)
    }
    pub fn max_attempts() -> u32 {
        5
    }
    pub fn defer_above() -> u64 {
        10_000
    }
    pub fn build_memory_mb() -> u64 {
        1024
    }
    pub fn build_workers() -> u32 {
        1
    }
    pub fn broken_source_retry() -> Duration {
        Duration::from_secs(60)
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn reconcile_schedule() -> String {
        "0 0 3 * * *".to_owned()
    }
    pub fn priority_refresh() -> Duration {
        Duration::from_secs(60)
    }
    pub fn reconcile_range_size() -> usize {
        5000
    }
    pub fn dead_letter_retry_after() -> Duration {
        Duration::from_secs(6 * 3600)
    }
    pub fn dead_letter_retries() -> u32 {
        3
    }
    pub fn max_delete_fraction() -> f64 {
        0.5
    }
    pub fn debounce() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_wait() -> Duration {
        Duration::from_secs(60)
    }
    pub fn delete_debounce() -> Duration {
        Duration::from_secs(2)
    }
}

/// Largest `vector` pgvector can index with HNSW.
pub const MAX_INDEXED_DIMENSIONS: u32 = crate::db::server_versions::MAX_VECTOR_INDEX_DIMENSIONS;
/// Largest `halfvec` pgvector (0.7.0 and later) can index with HNSW.
pub const MAX_INDEXED_HALFVEC_DIMENSIONS: u32 = 4000;

/// The pgvector type of an embedding column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VectorType {
    Vector,
    Halfvec,
}

impl VectorType {
    /// The type's SQL name, as `pg_type.typname` spells it.
    pub fn sql_name(self) -> &'static str {
        match self {
            VectorType::Vector => "vector",
            VectorType::Halfvec => "halfvec",
        }
    }

    /// The type of a `typname`, if it is one of these.
    pub fn from_sql_name(name: &str) -> Option<Self> {
        match name {
            "vector" => Some(VectorType::Vector),
            "halfvec" => Some(VectorType::Halfvec),
            _ => None,
        }
    }

    /// The HNSW operator class for cosine distance on this type.
    pub fn cosine_ops(self) -> &'static str {
        match self {
            VectorType::Vector => "vector_cosine_ops",
            VectorType::Halfvec => "halfvec_cosine_ops",
        }
    }

    /// Largest dimension pgvector indexes with HNSW for this type.
    pub fn max_indexed_dimensions(self) -> u32 {
        match self {
            VectorType::Vector => MAX_INDEXED_DIMENSIONS,
            VectorType::Halfvec => MAX_INDEXED_HALFVEC_DIMENSIONS,
        }
    }
}

impl EmbeddingConfig {
    /// The column type this model's vectors are stored as: `vector_type`, else
    /// `vector` up to 2000 dimensions and `halfvec` above.
    pub fn vector_type(&self) -> VectorType {
        self.vector_type
            .unwrap_or(if self.dimensions > MAX_INDEXED_DIMENSIONS {
                VectorType::Halfvec
            } else {
                VectorType::Vector
            })
    }

    /// The column's SQL type, e.g. `halfvec(3072)`; the dimension is validated.
    pub fn column_type(&self) -> String {
        format!("{}({})", self.vector_type().sql_name(), self.dimensions)
    }
}
/// all-MiniLM-L6-v2 reads at most 256 word pieces, two of them special tokens.
pub const LOCAL_MODEL_TOKEN_LIMIT: usize = 254;
/// OpenAI's per-input limit.
pub const OPENAI_TOKEN_LIMIT: usize = 8191;

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            file: path.to_owned(),
            error,
        })?;
        let mut config = Self::parse(&text, path)?;
        if let Some(base) = path.parent() {
            config.resolve_paths_against(base);
        }
        Ok(config)
    }

    /// Parse and validate config text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |field: String, problem: String| ConfigError::Invalid {
            file: path.to_owned(),
            field,
            problem,
        };
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| invalid("(syntax)".into(), one_line(&e.to_string())))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                "(top level)".to_owned()
            } else {
                field
            };
            invalid(field, one_line(&e.inner().to_string()))
        })?;
        let mut config = config;
        config
            .validate()
            .map_err(|(field, problem)| invalid(field, problem))?;
        Ok(config)
    }

    /// The database URL: environment first, then the file; with neither, an empty URL
    /// when libpq's `PGHOST`/`PGDATABASE`/... variables are set (they fill it in, as for
    /// psql).
    pub fn database_url(&self) -> Option<String> {
        // A variable that is not UTF-8 is passed on as it reads (the connection then
        // fails on it, naming it), not skipped for the next source of a URL.
        let from_env = |name: &str| {
            std::env::var_os(name)
                .map(|value| value.to_string_lossy().into_owned())
                .filter(|url| !url.is_empty())
        };
        from_env(ENV_DATABASE_URL)
            .or_else(|| from_env(ENV_DATABASE_URL_FALLBACK))
            .or_else(|| self.database.url.clone())
            .or_else(|| {
                crate::db::connection_defaults::Environment::from_process()
                    .has_libpq_variables()
                    .then(|| "postgresql://".to_owned())
            })
    }

    pub fn max_chunk_tokens(&self) -> usize {
        self.embedding
            .max_chunk_tokens
            .unwrap_or(match self.embedding.provider {
                ProviderKind::Local => 200,
                ProviderKind::Openai => 512,
            })
    }

    pub fn model_token_limit(&self) -> usize {
        match self.embedding.provider {
            ProviderKind::Local => LOCAL_MODEL_TOKEN_LIMIT,
            ProviderKind::Openai => OPENAI_TOKEN_LIMIT,
        }
    }

    /// The reconcile schedule, parsed.
    pub fn reconcile_schedule(&self) -> Result<cron::Schedule, String> {
        let expression = &self.reconcile.schedule;
        let fields = expression.split_whitespace().count();
        if !(6..=7).contains(&fields) {
            return Err(format!(
                "{expression:?} has {fields} fields; kbsync wants 6 or 7: second minute hour day-of-month month day-of-week [year], in UTC, e.g. \"0 0 3 * * *\" for daily at 03:00{}",
                if fields == 5 {
                    " (a 5-field crontab line: put \"0 \" in front of it)"
                } else {
                    ""
                }
            ));
        }
        cron::Schedule::from_str(expression).map_err(|e| {
            // The cron crate words an inclusive maximum as "less than" (hours: 23).
            let problem = e.to_string().replace(" must be less than ", " must be at most ");
            format!(
                "{expression:?} is not a valid cron expression: {problem} Fields: second minute hour day-of-month month day-of-week [year], in UTC"
            )
        })
    }

    /// Each problem as (field path, what is wrong and what to do).
    /// Check every section, and keep the validated sources and the next model's
    /// config for `sources` and `with_next_model`.
    fn validate(&mut self) -> Result<(), (String, String)> {
        let e = &self.embedding;
        if e.model.trim().is_empty() {
            return Err(("embedding.model".into(), "must not be empty".into()));
        }
        if e.dimensions == 0 || e.dimensions > MAX_INDEXED_HALFVEC_DIMENSIONS {
            return Err((
                "embedding.dimensions".into(),
                format!(
                    "{} is out of range: 1..={MAX_INDEXED_HALFVEC_DIMENSIONS} (pgvector's HNSW index limit, for halfvec; text-embedding-3 models can be shortened with send_dimensions = true)",
                    e.dimensions
                ),
            ));
        }
        if e.vector_type == Some(VectorType::Vector) && e.dimensions > MAX_INDEXED_DIMENSIONS {
            return Err((
                "embedding.vector_type".into(),
                format!(
                    "\"vector\" indexes at most {MAX_INDEXED_DIMENSIONS} dimensions and embedding.dimensions is {}: use \"halfvec\" (up to {MAX_INDEXED_HALFVEC_DIMENSIONS}), or leave vector_type out to get it",
                    e.dimensions
                ),
            ));
        }
        let chunk_limit = self.model_token_limit();
        if let Some(n) = e.max_chunk_tokens
            && (n == 0 || n > chunk_limit)
        {
            return Err((
                "embedding.max_chunk_tokens".into(),
                format!("{n} is out of range: 1..={chunk_limit} for this provider's model"),
            ));
        }
        match e.provider {
            ProviderKind::Local => {
                if e.model_dir.is_none() {
                    return Err((
                        "embedding.model_dir".into(),
                        "required for provider \"local\": the directory with model.safetensors, tokenizer.json and config.json (`just model` fetches it)".into(),
                    ));
                }
                if e.dimensions != 384 {
                    return Err((
                        "embedding.dimensions".into(),
                        format!(
                            "provider \"local\" (all-MiniLM-L6-v2) gives 384 dimensions, not {}",
                            e.dimensions
                        ),
                    ));
                }
                for (field, set) in [
                    ("base_url", e.base_url.is_some()),
                    ("api_key_env", e.api_key_env.is_some()),
                    ("api_key_file", e.api_key_file.is_some()),
                ] {
                    if set {
                        return Err((
                            format!("embedding.{field}"),
                            "only meaningful for provider \"openai\"; remove it or set provider = \"openai\"".into(),
                        ));
                    }
                }
            }
            ProviderKind::Openai => {
                let Some(base) = &e.base_url else {
                    return Err((
                        "embedding.base_url".into(),
                        "required for provider \"openai\", e.g. \"https://api.openai.com/v1\" or \"http://localhost:11434/v1\" for Ollama".into(),
                    ));
                };
                match url::Url::parse(base) {
                    Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                    _ => {
                        return Err((
                            "embedding.base_url".into(),
                            format!("{base:?} is not an http(s) URL"),
                        ));
                    }
                }
                if e.api_key_env.is_some() && e.api_key_file.is_some() {
                    return Err((
                        "embedding.api_key_file".into(),
                        "set either api_key_env or api_key_file, not both".into(),
                    ));
                }
                if e.model_dir.is_some() {
                    return Err((
                        "embedding.model_dir".into(),
                        "only meaningful for provider \"local\"".into(),
                    ));
                }
            }
        }
        if e.max_inputs_per_request == 0 || e.max_inputs_per_request > 2048 {
            return Err((
                "embedding.max_inputs_per_request".into(),
                format!("{} is out of range: 1..=2048", e.max_inputs_per_request),
            ));
        }
        if e.max_tokens_per_request < self.max_chunk_tokens() {
            return Err((
                "embedding.max_tokens_per_request".into(),
                format!(
                    "{} is smaller than one chunk ({} tokens)",
                    e.max_tokens_per_request,
                    self.max_chunk_tokens()
                ),
            ));
        }
        if e.requests_per_minute == Some(0) || e.tokens_per_minute == Some(0) {
            return Err((
                "embedding.requests_per_minute".into(),
                "limits must be at least 1 (remove them for no limit)".into(),
            ));
        }
        if e.provider == ProviderKind::Local
            && (e.requests_per_minute.is_some() || e.tokens_per_minute.is_some())
        {
            return Err((
                "embedding.requests_per_minute".into(),
                "rate limits apply to provider \"openai\" only; the local model has none".into(),
            ));
        }
        if e.max_concurrency == 0 {
            return Err((
                "embedding.max_concurrency".into(),
                "must be at least 1".into(),
            ));
        }
        if self.daemon.batch_size == 0 || self.daemon.batch_size > MAX_BATCH_SIZE {
            return Err((
                "daemon.batch_size".into(),
                format!("must be between 1 and {MAX_BATCH_SIZE} (keys written in one transaction)"),
            ));
        }
        if let Some(slot) = &self.capture.slot
            && (slot.is_empty()
                || slot.len() > 63
                || !slot
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        {
            return Err((
                "capture.slot".into(),
                format!("{slot:?} is not a replication slot name: 1 to 63 of a-z, 0-9 and _"),
            ));
        }
        if self.capture.max_retained_wal_mb == 0 {
            return Err((
                "capture.max_retained_wal_mb".into(),
                "must be at least 1".into(),
            ));
        }
        if !(1..=1024 * 1024).contains(&self.index.build_memory_mb) {
            return Err((
                "index.build_memory_mb".into(),
                "must be between 1 and 1048576 (maintenance_work_mem for the index build, in MB)"
                    .into(),
            ));
        }
        if self.index.build_workers > 64 {
            return Err((
                "index.build_workers".into(),
                "must be at most 64 (max_parallel_maintenance_workers)".into(),
            ));
        }
        if !(1..=10_000).contains(&self.search.candidates) {
            return Err((
                "search.candidates".into(),
                "must be between 1 and 10000".into(),
            ));
        }
        if !(1..=10_000).contains(&self.search.rrf_k) {
            return Err(("search.rrf_k".into(), "must be between 1 and 10000".into()));
        }
        if self.search.max_query_chars == 0 {
            return Err(("search.max_query_chars".into(), "must be at least 1".into()));
        }
        if self.search.api_tokens_env.is_some() && self.search.api_tokens_file.is_some() {
            return Err((
                "search.api_tokens_file".into(),
                "set either api_tokens_env or api_tokens_file, not both".into(),
            ));
        }
        if self.daemon.max_attempts == 0 {
            return Err(("daemon.max_attempts".into(), "must be at least 1".into()));
        }
        if self.daemon.batch_duration.is_zero() {
            return Err((
                "daemon.batch_duration".into(),
                "must be more than 0s (batches are sized to take about this long)".into(),
            ));
        }
        if self.daemon.fallback_poll.is_zero() {
            return Err(("daemon.fallback_poll".into(), "must be more than 0s".into()));
        }
        if self.daemon.claim_lease < Duration::from_secs(10) {
            return Err((
                "daemon.claim_lease".into(),
                "must be at least 10s: a lease shorter than one embedding call makes daemons take each other's work".into(),
            ));
        }
        self.reconcile_schedule()
            .map_err(|problem| ("reconcile.schedule".to_owned(), problem))?;
        let fraction = self.reconcile.max_delete_fraction;
        if !(0.0..=1.0).contains(&fraction) {
            return Err((
                "reconcile.max_delete_fraction".into(),
                format!("{fraction} is out of range: 0.0..=1.0"),
            ));
        }
        if self.scheduling.priority_refresh < Duration::from_secs(1) {
            return Err((
                "scheduling.priority_refresh".into(),
                "must be at least 1s".into(),
            ));
        }
        if let Some(sql) = &self.scheduling.priority_tenants_sql
            && sql.trim().is_empty()
        {
            return Err((
                "scheduling.priority_tenants_sql".into(),
                "is empty: remove it or give a query returning tenant ids".into(),
            ));
        }
        if self.reconcile.range_size == 0 {
            return Err(("reconcile.range_size".into(), "must be at least 1".into()));
        }
        if self.sources.is_empty() {
            return Err((
                "sources".into(),
                "no sources declared: add at least one [sources.NAME] table".into(),
            ));
        }
        let mut sources = Vec::with_capacity(self.sources.len());
        for (name, source) in &self.sources {
            sources.push(
                Source::from_config(name, source, self)
                    .map_err(|(field, problem)| (format!("sources.{name}{field}"), problem))?,
            );
        }
        self.validated_sources = sources;
        self.next_model = None;
        if let Some(next) = self.next_embedding.clone() {
            let mut next = Config {
                embedding: next,
                next_embedding: None,
                embedding_section: "next_embedding",
                validated_sources: Vec::new(),
                next_model: None,
                ..self.clone()
            };
            if next.embedding.model == self.embedding.model {
                return Err((
                    "next_embedding.model".into(),
                    format!(
                        "{:?} is embedding.model already; the next model needs another name (each chunk records its model by name)",
                        self.embedding.model
                    ),
                ));
            }
            // The same rules as [embedding], the sources' chunk limits included.
            next.validate()
                .map_err(|(field, problem)| match field.strip_prefix("embedding.") {
                    Some(rest) => (format!("next_embedding.{rest}"), problem),
                    None => (
                        field,
                        format!("{problem} (with the [next_embedding] model)"),
                    ),
                })?;
            self.next_model = Some(Box::new(next));
        }
        Ok(())
    }

    /// Validate again after a test changed fields of a parsed config.
    #[cfg(test)]
    pub(crate) fn revalidated(mut self) -> Self {
        self.validate().expect("the changed test config is valid");
        self
    }

    /// Relative paths in the file (model directories, the token file) are relative to
    /// the config file, not to the working directory.
    fn resolve_paths_against(&mut self, base: &Path) {
        let resolve = |path: &mut Option<PathBuf>| {
            if let Some(p) = path.as_mut()
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.embedding.model_dir);
        if let Some(next) = self.next_embedding.as_mut() {
            resolve(&mut next.model_dir);
        }
        resolve(&mut self.search.api_tokens_file);
        if let Some(next) = self.next_model.as_mut() {
            next.resolve_paths_against(base);
        }
    }

    /// This config with `[next_embedding]` as its model (its provider, tokenizer and
    /// chunk limits); None without one.
    pub fn with_next_model(&self) -> Option<Config> {
        self.next_model.as_deref().cloned()
    }

    /// The section this config's `embedding` came from, for messages.
    pub fn embedding_section(&self) -> &'static str {
        self.embedding_section
    }

    /// This config with `embedding` as its model for what embeds queries or judges
    /// stored vectors; its sources (their chunking) stay this config's.
    pub fn with_embedding(&self, embedding: EmbeddingConfig) -> Config {
        Config {
            embedding,
            ..self.clone()
        }
    }

    /// The validated sources (validated once, by `parse`).
    pub fn sources(&self) -> Vec<Source> {
        self.validated_sources.clone()
    }

    /// A copy safe to print: the password of the database URL replaced.
    /// The source called `name`, or an error that lists the declared ones.
    pub fn source_named(&self, name: &str) -> Result<Source, String> {
        let all = self.sources();
        let known: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        let message = format!(
            "unknown source {name:?}: the config declares {}",
            known.join(", ")
        );
        all.into_iter().find(|s| s.name == name).ok_or(message)
    }

    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        copy.database.url = copy.database.url.as_deref().map(crate::db::redact_url);
        copy
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How a source's text is assembled from its columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextPart {
    Literal(SqlLiteral),
    Column(ColumnRef),
}

/// A run of a text template's literal text: it is also written into SQL (the sweep
/// builds the text there), so it must be a valid literal.
fn template_literal(text: &str) -> Result<TextPart, String> {
    SqlLiteral::new(text)
        .map(TextPart::Literal)
        .map_err(|e| e.to_string())
}

/// A related table of a source, validated: `foreign_key` on the source row points at
/// `references` (unique) in `table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Related {
    /// The name its columns go by (`page` in `{page.title}`).
    pub name: String,
    pub table: TableName,
    pub foreign_key: Ident,
    pub references: Ident,
}

/// A column a source reads: of its own row (`related` None) or of the row of
/// `Source::related[i]` its foreign key points at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ColumnRef {
    pub related: Option<usize>,
    pub column: Ident,
}

/// Where a statement has a source row's columns: its own under the prefix `own`
/// (`t.`, `n.`, `(c.n).`), related row `i` under the alias `{related}{i}` (`t_r0`).
#[derive(Debug, Clone, Copy)]
pub struct RowAlias<'a> {
    pub own: &'a str,
    pub related: &'a str,
}

impl RowAlias<'_> {
    /// The source row as `t` with its related rows as `t_r0`, `t_r1`, …: the aliases of
    /// the statements that read rows (`source_rows::RowSql`).
    pub const TABLE: RowAlias<'static> = RowAlias {
        own: "t.",
        related: "t_r",
    };
}

impl ColumnRef {
    /// This column in a statement whose rows are named as `at` says.
    pub fn sql(&self, at: RowAlias) -> String {
        match self.related {
            None => format!("{}{}", at.own, self.column),
            Some(i) => format!("{}{i}.{}", at.related, self.column),
        }
    }

    /// `column` or `related.column`, as the config writes it.
    pub fn written(&self, related: &[Related]) -> String {
        match self.related.and_then(|i| related.get(i)) {
            None => self.column.as_str().to_owned(),
            Some(r) => format!("{}.{}", r.name, self.column.as_str()),
        }
    }
}

/// `column` or `related.column` against the declared related tables.
fn column_ref(text: &str, related: &[Related]) -> Result<ColumnRef, String> {
    let text = text.trim();
    match text.split_once('.') {
        None => Ok(ColumnRef {
            related: None,
            column: Ident::new(text).map_err(|e| e.to_string())?,
        }),
        Some((name, column)) => {
            let Some(i) = related.iter().position(|r| r.name == name) else {
                let declared: Vec<&str> = related.iter().map(|r| r.name.as_str()).collect();
                return Err(format!(
                    "{text:?} names the related table {name:?}, which is not declared ({}); declare it as [sources.NAME.related.{name}] with table, foreign_key and references",
                    if declared.is_empty() {
                        "none is".to_owned()
                    } else {
                        format!("declared: {}", declared.join(", "))
                    }
                ));
            };
            if column.contains('.') {
                return Err(format!(
                    "{text:?} reaches past the related table {name:?}: one level only; declare the table you need as a related table of the source itself"
                ));
            }
            Ok(ColumnRef {
                related: Some(i),
                column: Ident::new(column).map_err(|e| e.to_string())?,
            })
        }
    }
}

pub fn parse_text_template(template: &str, related: &[Related]) -> Result<Vec<TextPart>, String> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => return Err(format!("unclosed placeholder {{{name}")),
                    }
                }
                let column = column_ref(&name, related)
                    .map_err(|e| format!("placeholder {{{name}}}: {e}"))?;
                if !literal.is_empty() {
                    parts.push(template_literal(&std::mem::take(&mut literal))?);
                }
                parts.push(TextPart::Column(column));
            }
            '}' => return Err("a lone `}`; write `}}` for a brace".into()),
            other => literal.push(other),
        }
    }
    if !literal.is_empty() {
        parts.push(template_literal(&literal)?);
    }
    if !parts.iter().any(|p| matches!(p, TextPart::Column(_))) {
        return Err("names no column: use {column} placeholders".into());
    }
    Ok(parts)
}

/// A filter rule, validated: SQL over a row whose columns are where a `RowAlias` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub column: ColumnRef,
    pub condition: FilterCondition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterCondition {
    Equals(SqlLiteral),
    NotEquals(SqlLiteral),
    OneOf(Vec<SqlLiteral>),
    IsNull(bool),
}

impl Filter {
    /// This rule as SQL over the row at `at`; NULL counts as "does not pass".
    pub fn to_sql(&self, at: RowAlias) -> String {
        let col = self.column.sql(at);
        match &self.condition {
            FilterCondition::Equals(v) => format!("{col} = {v}"),
            FilterCondition::NotEquals(v) => format!("{col} IS DISTINCT FROM {v}"),
            FilterCondition::OneOf(vs) => format!(
                "{col} IN ({})",
                vs.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            FilterCondition::IsNull(true) => format!("{col} IS NULL"),
            FilterCondition::IsNull(false) => format!("{col} IS NOT NULL"),
        }
    }
}

/// A source, validated, with its names ready to be quoted into SQL.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    /// The name as a SQL literal (trigger functions carry it).
    pub name_literal: SqlLiteral,
    pub table: TableName,
    pub key: Ident,
    /// Its related tables, each used by at least one column reference.
    pub related: Vec<Related>,
    pub tenant: ColumnRef,
    pub filters: Vec<Filter>,
    pub text: Vec<TextPart>,
    /// (key in the chunk's metadata, column).
    pub metadata: Vec<(String, ColumnRef)>,
    pub debounce: Duration,
    pub max_wait: Duration,
    pub delete_debounce: Duration,
    pub single_chunk: bool,
    pub chunk_tokens: usize,
    pub chunk_overlap: usize,
    /// The text search configuration of this source's chunks (a regconfig name).
    pub text_search: Ident,
}

/// A relation name: lowercase letters, digits and single underscores (it names
/// triggers, `kbsync_{source}__{related}_upd`, where `__` separates the two).
fn valid_related_name(name: &str) -> bool {
    name.len() <= 20
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.contains("__")
        && !name.ends_with('_')
}

impl Source {
    fn from_config(
        name: &str,
        cfg: &SourceConfig,
        config: &Config,
    ) -> Result<Self, (String, String)> {
        let field = |f: &str| {
            if f.is_empty() {
                String::new()
            } else {
                format!(".{f}")
            }
        };
        let valid_name = name.len() <= 40
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !name.contains("__");
        if !valid_name {
            return Err((
                String::new(),
                format!(
                    "source name {name:?} must be lowercase letters, digits and single underscores, start with a letter, at most 40 characters"
                ),
            ));
        }
        let table = TableName::parse(&cfg.table).map_err(|e| (field("table"), e.to_string()))?;
        let key = Ident::new(&cfg.key).map_err(|e| (field("key"), e.to_string()))?;
        let mut related = Vec::new();
        for (rel_name, rel) in &cfg.related {
            let at = |f: &str| field(&format!("related.{rel_name}{f}"));
            related.push(Self::related_from_config(rel_name, rel, &at)?);
        }
        // `tenant.via` written in place is a related table named `via`.
        let tenant_related = match &cfg.tenant.via {
            None => None,
            Some(TenantVia::Related(rel_name)) => Some(
                related
                    .iter()
                    .position(|r| &r.name == rel_name)
                    .ok_or_else(|| {
                        (
                            field("tenant.via"),
                            format!(
                                "names the related table {rel_name:?}, which is not declared: add [sources.{name}.related.{rel_name}] with table, foreign_key and references"
                            ),
                        )
                    })?,
            ),
            Some(TenantVia::Join(join)) => {
                let at = |f: &str| field(&format!("tenant.via{f}"));
                let via = Self::related_from_config("via", join, &at)?;
                match related.iter().position(|r| r.name == "via") {
                    Some(i) if related[i] == via => Some(i),
                    Some(_) => {
                        return Err((
                            field("tenant.via"),
                            "a different related table is already named \"via\": write tenant.via = \"<name>\" to use a declared one".into(),
                        ));
                    }
                    None => {
                        related.push(via);
                        Some(related.len() - 1)
                    }
                }
            }
        };
        let tenant = ColumnRef {
            related: tenant_related,
            column: Ident::new(&cfg.tenant.column)
                .map_err(|e| (field("tenant.column"), e.to_string()))?,
        };
        let mut filters = Vec::new();
        for (i, rule) in cfg.filter.iter().enumerate() {
            let at = |f: &str| field(&format!("filter[{i}]{f}"));
            let column = column_ref(&rule.column, &related).map_err(|e| (at(".column"), e))?;
            let literal = |v: &str| SqlLiteral::new(v).map_err(|e| (at(""), e.to_string()));
            let mut conditions = Vec::new();
            if let Some(v) = &rule.equals {
                conditions.push(FilterCondition::Equals(literal(v)?));
            }
            if let Some(v) = &rule.not_equals {
                conditions.push(FilterCondition::NotEquals(literal(v)?));
            }
            if let Some(vs) = &rule.one_of {
                if vs.is_empty() {
                    return Err((at(".one_of"), "must list at least one value".into()));
                }
                conditions.push(FilterCondition::OneOf(
                    vs.iter().map(|v| literal(v)).collect::<Result<_, _>>()?,
                ));
            }
            if let Some(b) = rule.is_null {
                conditions.push(FilterCondition::IsNull(b));
            }
            if conditions.len() != 1 {
                return Err((
                    at(""),
                    "needs exactly one of equals, not_equals, one_of, is_null".into(),
                ));
            }
            let condition = conditions.remove(0);
            filters.push(Filter { column, condition });
        }
        let text = parse_text_template(&cfg.text, &related).map_err(|e| (field("text"), e))?;
        let metadata = cfg
            .metadata
            .iter()
            .map(|m| {
                column_ref(m, &related)
                    .map(|c| (c.written(&related), c))
                    .map_err(|e| (field("metadata"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if cfg.max_wait < cfg.debounce {
            return Err((
                field("max_wait"),
                format!(
                    "{} is shorter than debounce ({}); max_wait bounds how long a busy key may wait, so it must be at least the debounce window",
                    humantime_serde::re::humantime::format_duration(cfg.max_wait),
                    humantime_serde::re::humantime::format_duration(cfg.debounce)
                ),
            ));
        }
        let limit = config.model_token_limit();
        let chunk_tokens = cfg.chunk_tokens.unwrap_or(config.max_chunk_tokens());
        if chunk_tokens == 0 || chunk_tokens > limit {
            return Err((
                field("chunk_tokens"),
                format!(
                    "{chunk_tokens} is out of range: 1..={limit} for the configured embedding model"
                ),
            ));
        }
        let chunk_overlap = cfg.chunk_overlap.unwrap_or(chunk_tokens / 8);
        if chunk_overlap >= chunk_tokens {
            return Err((
                field("chunk_overlap"),
                format!("{chunk_overlap} must be smaller than the chunk size ({chunk_tokens})"),
            ));
        }
        let text_search = Ident::new(&cfg.text_search).map_err(|_| {
            (
                field("text_search"),
                format!(
                    "{:?} is not a text search configuration name (`SELECT cfgname FROM pg_ts_config` lists them; e.g. \"simple\", \"english\")",
                    cfg.text_search
                ),
            )
        })?;
        // The name checks above admit no NUL byte: this cannot fail.
        let name_literal = SqlLiteral::new(name).map_err(|e| (String::new(), e.to_string()))?;
        let source = Self {
            text_search,
            name: name.to_owned(),
            name_literal,
            table,
            key,
            related,
            tenant,
            filters,
            text,
            metadata,
            debounce: cfg.debounce,
            max_wait: cfg.max_wait,
            delete_debounce: cfg.delete_debounce,
            single_chunk: cfg.single_chunk,
            chunk_tokens,
            chunk_overlap,
        };
        // A related table nothing reads would be watched for nothing.
        for (i, rel) in source.related.iter().enumerate() {
            if source.related_columns(i).len() <= 1 {
                return Err((
                    field(&format!("related.{}", rel.name)),
                    format!(
                        "is declared but nothing reads it: name its columns as {{{0}.column}} in the text, in a filter or the metadata, or take the tenant through it (tenant.via = \"{0}\"); or remove it",
                        rel.name
                    ),
                ));
            }
        }
        Ok(source)
    }

    fn related_from_config(
        name: &str,
        cfg: &RelatedConfig,
        at: &dyn Fn(&str) -> String,
    ) -> Result<Related, (String, String)> {
        if !valid_related_name(name) {
            return Err((
                at(""),
                format!(
                    "related table name {name:?} must be lowercase letters, digits and single underscores, start with a letter, at most 20 characters"
                ),
            ));
        }
        Ok(Related {
            name: name.to_owned(),
            table: TableName::parse(&cfg.table).map_err(|e| (at(".table"), e.to_string()))?,
            foreign_key: Ident::new(&cfg.foreign_key)
                .map_err(|e| (at(".foreign_key"), e.to_string()))?,
            references: Ident::new(&cfg.references)
                .map_err(|e| (at(".references"), e.to_string()))?,
        })
    }

    /// Every column reference of the source: text, filter, metadata, tenant.
    pub fn column_refs(&self) -> Vec<ColumnRef> {
        let mut refs: Vec<ColumnRef> = self
            .text
            .iter()
            .filter_map(|p| match p {
                TextPart::Column(c) => Some(c.clone()),
                TextPart::Literal(_) => None,
            })
            .collect();
        refs.extend(self.filters.iter().map(|f| f.column.clone()));
        refs.extend(self.metadata.iter().map(|(_, c)| c.clone()));
        refs.push(self.tenant.clone());
        refs
    }

    /// Columns of the source table whose change can change this source's chunks:
    /// the key, its own columns of the text, filter, metadata and tenant, and the
    /// foreign key of each related table. Derived, so it cannot drift from the config.
    pub fn relevant_columns(&self) -> Vec<Ident> {
        let mut cols = vec![self.key.clone()];
        cols.extend(
            self.column_refs()
                .into_iter()
                .filter(|c| c.related.is_none())
                .map(|c| c.column),
        );
        cols.extend(self.related.iter().map(|r| r.foreign_key.clone()));
        dedup(cols)
    }

    /// Columns of related table `i` whose change can change the chunks of the rows
    /// that reference it: the referenced key first, then every column read from it.
    pub fn related_columns(&self, i: usize) -> Vec<Ident> {
        let mut cols: Vec<Ident> = self
            .related
            .get(i)
            .map(|r| r.references.clone())
            .into_iter()
            .collect();
        cols.extend(
            self.column_refs()
                .into_iter()
                .filter(|c| c.related == Some(i))
                .map(|c| c.column),
        );
        dedup(cols)
    }

    /// The related tables joined to the row at `at`, each as `{at.related}{i}`, from
    /// `tables` (the related tables' names as the statement must write them). A LEFT
    /// JOIN: a row whose related row is missing reads NULLs there (no tenant, a filter
    /// that fails, an empty placeholder), as the row loader and the sweep both do.
    pub fn joins_sql(&self, at: RowAlias, tables: &[String]) -> String {
        self.related
            .iter()
            .zip(tables)
            .enumerate()
            .map(|(i, (r, table))| {
                format!(
                    " LEFT JOIN {table} {alias}{i} ON {alias}{i}.{references} = {own}{fk}",
                    alias = at.related,
                    references = r.references,
                    own = at.own,
                    fk = r.foreign_key,
                )
            })
            .collect()
    }

    /// The related tables' names as written in the config (resolved by the session's
    /// search_path), for `joins_sql`.
    pub fn related_tables(&self) -> Vec<String> {
        self.related.iter().map(|r| r.table.to_string()).collect()
    }

    /// The tenant of the row at `at` (NULL when it has none).
    pub fn tenant_sql(&self, at: RowAlias) -> String {
        self.tenant.sql(at)
    }

    /// SQL that is true when the row at `at` passes the filter's rules on its own
    /// columns (never NULL): a row that fails them is not eligible whatever its related
    /// rows say.
    pub fn own_filter_sql(&self, at: RowAlias) -> String {
        let rules: Vec<String> = self
            .filters
            .iter()
            .filter(|f| f.column.related.is_none())
            .map(|f| f.to_sql(at))
            .collect();
        if rules.is_empty() {
            return "true".to_owned();
        }
        format!("COALESCE(({}), false)", rules.join(" AND "))
    }

    /// SQL that is true when the row at `at` passes the filter (never NULL).
    pub fn filter_sql(&self, at: RowAlias) -> String {
        if self.filters.is_empty() {
            return "true".to_owned();
        }
        let rules: Vec<String> = self.filters.iter().map(|f| f.to_sql(at)).collect();
        format!("COALESCE(({}), false)", rules.join(" AND "))
    }
}

fn dedup(mut cols: Vec<Ident>) -> Vec<Ident> {
    let mut seen = std::collections::BTreeSet::new();
    cols.retain(|c| seen.insert(c.clone()));
    cols
}

impl crate::db::server_versions::StoredModel for EmbeddingConfig {
    fn name(&self) -> &str {
        &self.model
    }
    fn dimensions(&self) -> u32 {
        self.dimensions
    }
    fn stored_as_halfvec(&self) -> bool {
        self.vector_type() == VectorType::Halfvec
    }
}

/// A config of one openai model ("m", 8 dimensions) and one source `s`, with extra
/// lines in each section: the unit tests' fixture.
#[cfg(test)]
pub(crate) fn for_tests(embedding_extra: &str, source_extra: &str) -> Config {
    let text = format!(
        "[embedding]\nprovider = \"openai\"\nmodel = \"m\"\ndimensions = 8\nbase_url = \"http://127.0.0.1:1/v1\"\n{embedding_extra}\n\
         [sources.s]\ntable = \"t\"\nkey = \"id\"\ntenant = {{ column = \"u\" }}\ntext = \"{{body}}\"\n{source_extra}\n"
    );
    Config::parse(&text, Path::new("test.toml")).expect("a valid test config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_model_dirs_and_token_files_are_relative_to_the_config_file() {
        let text = "[embedding]\nprovider = \"local\"\nmodel = \"a\"\ndimensions = 384\nmodel_dir = \"models/a\"\n\
                    [next_embedding]\nprovider = \"local\"\nmodel = \"b\"\ndimensions = 384\nmodel_dir = \"models/b\"\n\
                    [search]\napi_tokens_file = \"/etc/kbsync/tokens\"\n\
                    [sources.s]\ntable = \"t\"\nkey = \"id\"\ntenant = { column = \"u\" }\ntext = \"{body}\"\n";
        let mut config = Config::parse(text, Path::new("test.toml")).unwrap();
        config.resolve_paths_against(Path::new("/srv/kbsync"));
        assert_eq!(
            config.embedding.model_dir,
            Some("/srv/kbsync/models/a".into())
        );
        assert_eq!(
            config.next_embedding.clone().and_then(|n| n.model_dir),
            Some("/srv/kbsync/models/b".into())
        );
        // The next model's config, kept from validation, is resolved too.
        assert_eq!(
            config.with_next_model().and_then(|c| c.embedding.model_dir),
            Some("/srv/kbsync/models/b".into())
        );
        assert_eq!(
            config.search.api_tokens_file,
            Some("/etc/kbsync/tokens".into())
        );
    }

    #[test]
    fn text_template_parses_columns_literals_and_escapes() {
        let own = |c: &str| ColumnRef {
            related: None,
            column: Ident::new(c).unwrap(),
        };
        let parts = parse_text_template("Q: {question}\n{{A}}: { answer }", &[]).unwrap();
        assert_eq!(
            parts,
            vec![
                TextPart::Literal(SqlLiteral::new("Q: ").unwrap()),
                TextPart::Column(own("question")),
                TextPart::Literal(SqlLiteral::new("\n{A}: ").unwrap()),
                TextPart::Column(own("answer")),
            ]
        );
        assert!(parse_text_template("{question", &[]).is_err());
        assert!(parse_text_template("no columns", &[]).is_err());
        assert!(parse_text_template("{a; drop table x}", &[]).is_err());
        assert!(parse_text_template("a } b {c}", &[]).is_err());
        let page = Related {
            name: "page".into(),
            table: TableName::parse("pages").unwrap(),
            foreign_key: Ident::new("page_id").unwrap(),
            references: Ident::new("id").unwrap(),
        };
        let parts = parse_text_template("{page.title}: {q}", std::slice::from_ref(&page)).unwrap();
        assert_eq!(
            parts[0],
            TextPart::Column(ColumnRef {
                related: Some(0),
                column: Ident::new("title").unwrap()
            })
        );
        let undeclared = parse_text_template("{site.title}", &[page]).unwrap_err();
        assert!(undeclared.contains("declared: page"), "{undeclared}");
    }

    /// A config whose one source `s` (table `t`) has `source` as its lines.
    fn with_source(source: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[embedding]\nprovider = \"openai\"\nmodel = \"m\"\ndimensions = 8\nbase_url = \"http://127.0.0.1:1/v1\"\n\
             [sources.s]\ntable = \"t\"\nkey = \"id\"\n{source}\n"
        );
        Config::parse(&text, Path::new("test.toml"))
    }

    fn problem(source: &str) -> String {
        match with_source(source) {
            Ok(_) => panic!("accepted: {source}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn related_tables_are_named_by_their_columns_everywhere_a_column_goes() {
        let config = with_source(
            "related.page = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" }\n\
             tenant = { column = \"owner\", via = \"page\" }\n\
             filter = [{ column = \"page.status\", equals = \"live\" }, { column = \"state\", equals = \"done\" }]\n\
             text = \"{page.title}: {body}\"\nmetadata = [\"page.url\", \"kind\"]",
        )
        .unwrap();
        let source = &config.sources()[0];
        let names = |cols: Vec<Ident>| {
            cols.iter()
                .map(|c| c.as_str().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(source.relevant_columns()),
            ["id", "body", "state", "kind", "page_id"]
        );
        assert_eq!(
            names(source.related_columns(0)),
            ["id", "title", "status", "url", "owner"]
        );
        assert_eq!(source.metadata[0].0, "page.url");
        assert_eq!(source.tenant_sql(RowAlias::TABLE), "t_r0.\"owner\"");
        assert_eq!(
            source.own_filter_sql(RowAlias::TABLE),
            "COALESCE((t.\"state\" = 'done'), false)"
        );
        assert_eq!(
            source.joins_sql(RowAlias::TABLE, &source.related_tables()),
            " LEFT JOIN \"pages\" t_r0 ON t_r0.\"id\" = t.\"page_id\""
        );
    }

    #[test]
    fn the_older_inline_via_is_a_related_table_named_via() {
        let config = with_source(
            "tenant = { column = \"owner\", via = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" } }\ntext = \"{body}\"",
        )
        .unwrap();
        let source = &config.sources()[0];
        assert_eq!(source.related.len(), 1);
        assert_eq!(source.related[0].name, "via");
        assert_eq!(source.tenant.related, Some(0));
    }

    #[test]
    fn related_mistakes_name_the_field_and_the_fix() {
        let undeclared =
            problem("tenant = { column = \"owner\", via = \"page\" }\ntext = \"{body}\"");
        assert!(
            undeclared.contains("sources.s.tenant.via")
                && undeclared.contains("[sources.s.related.page]"),
            "{undeclared}"
        );
        let unknown = problem("tenant = { column = \"u\" }\ntext = \"{site.name}\"");
        assert!(
            unknown.contains("sources.s.text") && unknown.contains("not declared"),
            "{unknown}"
        );
        let unused = problem(
            "related.page = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" }\n\
             tenant = { column = \"u\" }\ntext = \"{body}\"",
        );
        assert!(
            unused.contains("sources.s.related.page") && unused.contains("nothing reads it"),
            "{unused}"
        );
        let deep = problem(
            "related.page = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" }\n\
             tenant = { column = \"u\" }\ntext = \"{page.site.name}\"",
        );
        assert!(deep.contains("one level only"), "{deep}");
        let bad_name = problem(
            "related.Page__x = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" }\n\
             tenant = { column = \"u\" }\ntext = \"{body}\"",
        );
        assert!(bad_name.contains("sources.s.related.Page__x"), "{bad_name}");
        let extra = problem(
            "related.page = { table = \"pages\", foreign_key = \"page_id\", reference = \"id\" }\n\
             tenant = { column = \"u\" }\ntext = \"{page.title}\"",
        );
        assert!(extra.contains("reference"), "{extra}");
    }
}
