//! The file format of `kbsync.toml`, section by section: every field and its
//! documented default (`Config` in mod.rs holds the sections and validates them).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

/// The largest `daemon.batch_size`: a batch is written, fenced and acknowledged in one
/// transaction, and its keys travel as statement parameters.
pub const MAX_BATCH_SIZE: usize = 10_000;

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

pub(crate) mod defaults {
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
