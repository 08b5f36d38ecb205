//! The daemon's HTTP endpoint (off unless `http.listen` is set):
//! `/healthz` the process answers; `/readyz` database, listener and provider are
//! healthy as the workers last saw them; `/metrics` Prometheus text;
//! `/api/chunking-health` per-source coverage as JSON; `POST /v1/search` (only with
//! search API tokens configured; see `search_api`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use kbsync_core::config::Config;
use kbsync_core::db;

use crate::health::Health;
use crate::search_api::{self, SearchApi};
use crate::telemetry;

/// Database reads made for a request give up after this long.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct HttpState {
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
    pub config: Config,
    pub url: String,
    /// The search API, when tokens for it are configured.
    pub search: Option<Arc<SearchApi>>,
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    cancel: CancellationToken,
) -> Result<(), std::io::Error> {
    let search = state.search.clone();
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/chunking-health", get(chunking_health))
        .with_state(state);
    if let Some(api) = search {
        app = app.merge(
            Router::new()
                .route("/v1/search", post(search_api::handle))
                .with_state(api),
        );
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    let readiness = state.health.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    let names: Vec<String> = state
        .config
        .sources()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    // Backlog gauges are read now; when the database is down they keep their last
    // values and readiness (below) says why.
    let refreshed = tokio::time::timeout(QUERY_TIMEOUT, async {
        let (client, _conn) = db::connect(&state.url).await.map_err(|e| e.to_string())?;
        telemetry::refresh_backlog(&client, &names)
            .await
            .map_err(|e| db::describe(&e))?;
        telemetry::refresh_index(&client)
            .await
            .map_err(|e| db::describe(&e))?;
        telemetry::refresh_model_migration(&client)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    match refreshed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "/metrics: could not read the backlog"),
        Err(_) => tracing::warn!("/metrics: reading the backlog timed out"),
    }
    metrics::gauge!("kbsync_ready").set(if state.health.readiness().ready {
        1.0
    } else {
        0.0
    });
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn chunking_health(State(state): State<Arc<HttpState>>) -> Response {
    let result = tokio::time::timeout(QUERY_TIMEOUT * 6, async {
        let (client, _conn) = db::connect(&state.url).await.map_err(|e| e.to_string())?;
        let coverage = kbsync_reconcile::coverage::coverage(&client, &state.config)
            .await
            .map_err(|e| e.to_string())?;
        let migration = kbsync_core::model::migration::progress_if_any(&client)
            .await
            .map_err(|e| e.to_string())?;
        let mut body = serde_json::to_value(coverage).map_err(|e| e.to_string())?;
        if let Some(object) = body.as_object_mut() {
            object.insert(
                "model_migration".into(),
                serde_json::to_value(migration).map_err(|e| e.to_string())?,
            );
        }
        Ok(body)
    })
    .await
    .unwrap_or_else(|_| Err("timed out reading the database".to_owned()));
    match result {
        Ok(coverage) => Json(coverage).into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": error })),
        )
            .into_response(),
    }
}
