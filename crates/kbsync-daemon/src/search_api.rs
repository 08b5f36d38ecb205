//! `POST /v1/search`: retrieval for the application's backend, on the daemon's HTTP
//! endpoint. Bearer tokens (`search.api_tokens_env` / `api_tokens_file`) are required;
//! the tenant is required and a request only ever reads that tenant's chunks
//! (`kbsync.search()` filters by it). The query is embedded with the daemon's own
//! provider of the active model, so it is always the model the chunks' `embedding`
//! holds, also across a model cut-over (`model_switch`).
//!
//! Request: `{"tenant": "42", "query": "...", "k": 10, "mode": "hybrid",
//! "sources": ["faq"], "metadata": {"category": "Shelter"}}` (only tenant and query
//! are required). Response 200: `{"tenant", "mode", "model", "results": [hit...]}`;
//! errors: `{"error": "..."}` with 400 (the request), 401 (the token), 502 (the
//! embedding provider) or 503 (the database).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use pgvector::Vector;
use serde::Deserialize;
use tokio_postgres::Client;

use kbsync_core::config::Config;
use kbsync_core::db;
use kbsync_core::search::{self, MAX_K, Mode};
use kbsync_core::sync::embed::EmbedOneError;

use crate::model_switch::ModelSwitch;

/// A search request's database work gives up after this long.
const SEARCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Database connections the requests share: tokio-postgres pipelines concurrent
/// queries on one connection, and a few connections let requests run side by side.
/// Each is made on first use and made again once it has closed (a restart, a
/// terminated backend), so no request pays for connecting but the first.
pub struct Connections {
    url: String,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
}

impl Connections {
    pub fn new(url: String, count: usize) -> Self {
        Self {
            url,
            slots: (0..count.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    async fn get(&self) -> Result<Arc<Client>, String> {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[at].lock().await;
        if let Some(client) = slot.as_ref()
            && !client.is_closed()
        {
            return Ok(client.clone());
        }
        let (client, _task) = db::connect(&self.url).await.map_err(|e| e.to_string())?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }
}

/// What the endpoint needs besides the config.
pub struct SearchApi {
    pub tokens: Vec<String>,
    pub models: Arc<ModelSwitch>,
    pub config: Config,
    pub connections: Connections,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    tenant: Option<String>,
    query: Option<String>,
    k: Option<i64>,
    mode: Option<String>,
    sources: Option<Vec<String>>,
    metadata: Option<serde_json::Value>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// Equal, in time that does not depend on where they differ.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

fn authorized(api: &SearchApi, headers: &HeaderMap) -> bool {
    // A header that is not text is no token: refused with 401, like a missing one.
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Every token is compared, so the time does not tell which one nearly matched.
    api.tokens
        .iter()
        .map(|t| same_secret(token.trim().as_bytes(), t.as_bytes()))
        .fold(false, |any, ok| any | ok)
}

/// The request, checked; or the 400 that says what is wrong.
fn parse(api: &SearchApi, body: &[u8]) -> Result<search::Query, String> {
    let request: Request = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not a search request: {e}"))?;
    let tenant = request
        .tenant
        .filter(|t| !t.is_empty())
        .ok_or("tenant is required: the tenant whose chunks are searched")?;
    let text = request
        .query
        .filter(|q| !q.trim().is_empty())
        .ok_or("query is required")?;
    let limit = api.config.search.max_query_chars;
    let length = text.chars().count();
    if length > limit {
        return Err(format!(
            "query is {length} characters, more than search.max_query_chars ({limit})"
        ));
    }
    let k = request.k.unwrap_or(10);
    if !(1..=i64::from(MAX_K)).contains(&k) {
        return Err(format!("k must be between 1 and {MAX_K}, not {k}"));
    }
    let mode: Mode = match request.mode {
        Some(m) => m.parse()?,
        None => Mode::default(),
    };
    if let Some(sources) = &request.sources {
        for name in sources {
            api.config.source_named(name)?;
        }
    }
    if let Some(metadata) = &request.metadata
        && !metadata.is_object()
    {
        return Err("metadata must be a JSON object (chunks whose metadata contains it)".into());
    }
    Ok(search::Query {
        tenant,
        text,
        vector: None,
        k: k as i32,
        mode,
        sources: request.sources,
        metadata: request.metadata,
    })
}

pub async fn handle(
    State(api): State<Arc<SearchApi>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&api, &headers) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required (Authorization: Bearer <token>)",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer".parse().expect("a header value"),
        );
        return response;
    }
    let mut query = match parse(&api, &body) {
        Ok(q) => q,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    // A cut-over (or rollback) between embedding the query and searching makes the
    // search fail or compare two models: then the query is embedded again with the
    // model active now, once.
    let mut attempts = 0;
    let (found, model) = loop {
        attempts += 1;
        // The migration's state as of now (one small read), so that the query is not
        // embedded with a model the chunks no longer hold.
        if query.mode.needs_vector()
            && let Ok(client) = api.connections.get().await
            && let Err(e) = api.models.refresh(&*client).await
        {
            tracing::warn!(error = %e, "reading the model migration for a search failed");
        }
        let models = api.models.current();
        if query.mode.needs_vector() {
            query.vector = match models.active.embed_one(&query.text).await {
                Ok(vector) => Some(Vector::from(vector)),
                Err(EmbedOneError::Refused(refused)) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("the embedding provider refused the query: {refused}"),
                    );
                }
                Err(EmbedOneError::Provider(e)) => {
                    return error(
                        StatusCode::BAD_GATEWAY,
                        format!("embedding the query failed: {e}"),
                    );
                }
            };
        }
        let found = tokio::time::timeout(SEARCH_TIMEOUT, async {
            let client = api.connections.get().await?;
            let found = search::search(&*client, &query)
                .await
                .map_err(|e| db::describe(&e));
            if found.is_err()
                && let Err(e) = api.models.refresh(&*client).await
            {
                // The search's own error goes back to the caller; this one only
                // explains why a model switch was not noticed.
                tracing::warn!(error = %e, "after a failed search, reading the model migration's state failed");
            }
            found
        })
        .await
        .unwrap_or_else(|_| Err("the search timed out".to_owned()));
        if found.is_err() && attempts == 1 && api.models.current().generation != models.generation {
            continue;
        }
        break (found, models.active.model().to_owned());
    };
    match found {
        Ok(results) => Json(serde_json::json!({
            "tenant": query.tenant,
            "mode": query.mode,
            "model": model,
            "results": results,
        }))
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "a search request failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("searching failed: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_by_every_byte() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3crex"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
    }
}
