//! The rules of each section of `kbsync.toml`, one `check` per section; `Config::validate`
//! runs them in the file's order and names the section and field of the first problem.

use std::str::FromStr;
use std::time::Duration;

use super::file::{
    CaptureConfig, DaemonConfig, EmbeddingConfig, IndexConfig, MAX_BATCH_SIZE,
    MAX_INDEXED_DIMENSIONS, MAX_INDEXED_HALFVEC_DIMENSIONS, ProviderKind, ReconcileConfig,
    SchedulingConfig, SearchConfig, VectorType,
};

/// A problem in one section: the field within it, and what is wrong and what to do.
pub(super) type Problem = (&'static str, String);

fn problem(field: &'static str, text: impl Into<String>) -> Result<(), Problem> {
    Err((field, text.into()))
}

impl EmbeddingConfig {
    /// `chunk_limit`: the provider's model input limit; `chunk_tokens`: the chunk size in
    /// effect (set or the provider's default).
    pub(super) fn check(&self, chunk_limit: usize, chunk_tokens: usize) -> Result<(), Problem> {
        if self.model.trim().is_empty() {
            return problem("model", "must not be empty");
        }
        if self.dimensions == 0 || self.dimensions > MAX_INDEXED_HALFVEC_DIMENSIONS {
            return problem(
                "dimensions",
                format!(
                    "{} is out of range: 1..={MAX_INDEXED_HALFVEC_DIMENSIONS} (pgvector's HNSW index limit, for halfvec; text-embedding-3 models can be shortened with send_dimensions = true)",
                    self.dimensions
                ),
            );
        }
        if self.vector_type == Some(VectorType::Vector) && self.dimensions > MAX_INDEXED_DIMENSIONS
        {
            return problem(
                "vector_type",
                format!(
                    "\"vector\" indexes at most {MAX_INDEXED_DIMENSIONS} dimensions and embedding.dimensions is {}: use \"halfvec\" (up to {MAX_INDEXED_HALFVEC_DIMENSIONS}), or leave vector_type out to get it",
                    self.dimensions
                ),
            );
        }
        if let Some(n) = self.max_chunk_tokens
            && (n == 0 || n > chunk_limit)
        {
            return problem(
                "max_chunk_tokens",
                format!("{n} is out of range: 1..={chunk_limit} for this provider's model"),
            );
        }
        match self.provider {
            ProviderKind::Local => self.check_local()?,
            ProviderKind::Openai => self.check_openai()?,
        }
        if self.max_inputs_per_request == 0 || self.max_inputs_per_request > 2048 {
            return problem(
                "max_inputs_per_request",
                format!("{} is out of range: 1..=2048", self.max_inputs_per_request),
            );
        }
        if self.max_tokens_per_request < chunk_tokens {
            return problem(
                "max_tokens_per_request",
                format!(
                    "{} is smaller than one chunk ({chunk_tokens} tokens)",
                    self.max_tokens_per_request
                ),
            );
        }
        if self.requests_per_minute == Some(0) || self.tokens_per_minute == Some(0) {
            return problem(
                "requests_per_minute",
                "limits must be at least 1 (remove them for no limit)",
            );
        }
        if self.max_concurrency == 0 {
            return problem("max_concurrency", "must be at least 1");
        }
        Ok(())
    }

    fn check_local(&self) -> Result<(), Problem> {
        if self.model_dir.is_none() {
            return problem(
                "model_dir",
                "required for provider \"local\": the directory with model.safetensors, tokenizer.json and config.json (`just model` fetches it)",
            );
        }
        if self.dimensions != 384 {
            return problem(
                "dimensions",
                format!(
                    "provider \"local\" (all-MiniLM-L6-v2) gives 384 dimensions, not {}",
                    self.dimensions
                ),
            );
        }
        for (field, set) in [
            ("base_url", self.base_url.is_some()),
            ("api_key_env", self.api_key_env.is_some()),
            ("api_key_file", self.api_key_file.is_some()),
        ] {
            if set {
                return problem(
                    field,
                    "only meaningful for provider \"openai\"; remove it or set provider = \"openai\"",
                );
            }
        }
        if self.requests_per_minute.is_some() || self.tokens_per_minute.is_some() {
            return problem(
                "requests_per_minute",
                "rate limits apply to provider \"openai\" only; the local model has none",
            );
        }
        Ok(())
    }

    fn check_openai(&self) -> Result<(), Problem> {
        let Some(base) = &self.base_url else {
            return problem(
                "base_url",
                "required for provider \"openai\", e.g. \"https://api.openai.com/v1\" or \"http://localhost:11434/v1\" for Ollama",
            );
        };
        match url::Url::parse(base) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => return problem("base_url", format!("{base:?} is not an http(s) URL")),
        }
        if self.api_key_env.is_some() && self.api_key_file.is_some() {
            return problem(
                "api_key_file",
                "set either api_key_env or api_key_file, not both",
            );
        }
        if self.model_dir.is_some() {
            return problem("model_dir", "only meaningful for provider \"local\"");
        }
        Ok(())
    }
}

impl DaemonConfig {
    pub(super) fn check(&self) -> Result<(), Problem> {
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return problem(
                "batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE} (keys written in one transaction)"),
            );
        }
        if self.max_attempts == 0 {
            return problem("max_attempts", "must be at least 1");
        }
        if self.batch_duration.is_zero() {
            return problem(
                "batch_duration",
                "must be more than 0s (batches are sized to take about this long)",
            );
        }
        if self.fallback_poll.is_zero() {
            return problem("fallback_poll", "must be more than 0s");
        }
        if self.claim_lease < Duration::from_secs(10) {
            return problem(
                "claim_lease",
                "must be at least 10s: a lease shorter than one embedding call makes daemons take each other's work",
            );
        }
        Ok(())
    }
}

impl CaptureConfig {
    pub(super) fn check(&self) -> Result<(), Problem> {
        if let Some(slot) = &self.slot
            && (slot.is_empty()
                || slot.len() > 63
                || !slot
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        {
            return problem(
                "slot",
                format!("{slot:?} is not a replication slot name: 1 to 63 of a-z, 0-9 and _"),
            );
        }
        if self.max_retained_wal_mb == 0 {
            return problem("max_retained_wal_mb", "must be at least 1");
        }
        Ok(())
    }
}

impl IndexConfig {
    pub(super) fn check(&self) -> Result<(), Problem> {
        if !(1..=1024 * 1024).contains(&self.build_memory_mb) {
            return problem(
                "build_memory_mb",
                "must be between 1 and 1048576 (maintenance_work_mem for the index build, in MB)",
            );
        }
        if self.build_workers > 64 {
            return problem(
                "build_workers",
                "must be at most 64 (max_parallel_maintenance_workers)",
            );
        }
        Ok(())
    }
}

impl SearchConfig {
    pub(super) fn check(&self) -> Result<(), Problem> {
        if !(1..=10_000).contains(&self.candidates) {
            return problem("candidates", "must be between 1 and 10000");
        }
        if !(1..=10_000).contains(&self.rrf_k) {
            return problem("rrf_k", "must be between 1 and 10000");
        }
        if self.max_query_chars == 0 {
            return problem("max_query_chars", "must be at least 1");
        }
        if self.api_tokens_env.is_some() && self.api_tokens_file.is_some() {
            return problem(
                "api_tokens_file",
                "set either api_tokens_env or api_tokens_file, not both",
            );
        }
        Ok(())
    }
}

impl ReconcileConfig {
    pub(super) fn check(&self) -> Result<(), Problem> {
        self.parsed_schedule().map_err(|p| ("schedule", p))?;
        let fraction = self.max_delete_fraction;
        if !(0.0..=1.0).contains(&fraction) {
            return problem(
                "max_delete_fraction",
                format!("{fraction} is out of range: 0.0..=1.0"),
            );
        }
        if self.range_size == 0 {
            return problem("range_size", "must be at least 1");
        }
        Ok(())
    }

    /// The schedule, parsed; the error says what a 6-field expression looks like.
    pub(super) fn parsed_schedule(&self) -> Result<cron::Schedule, String> {
        let expression = &self.schedule;
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
}

impl SchedulingConfig {
    pub(super) fn check(&self) -> Result<(), Problem> {
        if self.priority_refresh < Duration::from_secs(1) {
            return problem("priority_refresh", "must be at least 1s");
        }
        if let Some(sql) = &self.priority_tenants_sql
            && sql.trim().is_empty()
        {
            return problem(
                "priority_tenants_sql",
                "is empty: remove it or give a query returning tenant ids",
            );
        }
        Ok(())
    }
}
