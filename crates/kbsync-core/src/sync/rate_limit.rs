//! The provider's requests/min and tokens/min, held for all daemons together: a token
//! bucket in `kbsync.rate_budget`, refilled continuously, from which each request
//! reserves its share in one UPDATE (the row lock orders the daemons). A reservation
//! may run the bucket into debt; the caller then waits until the debt is repaid, so
//! the rate holds however many daemons there are.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

#[derive(Debug)]
pub struct SharedRateLimit {
    url: String,
    /// The budget's row: one per model, so that a model migration's second model has
    /// a budget of its own.
    budget: String,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
    client: Mutex<Option<Client>>,
}

/// Per second, and the burst allowed on top (one second's worth, at least one unit),
/// so that no minute sees more than the limit plus one second's worth.
fn rate_and_burst(per_minute: Option<f64>) -> (f64, f64) {
    match per_minute {
        Some(n) => (n / 60.0, (n / 60.0).max(1.0)),
        None => (1e15, 1e15),
    }
}

impl SharedRateLimit {
    pub fn new(
        url: String,
        model: &str,
        requests_per_minute: Option<u32>,
        tokens_per_minute: Option<u64>,
    ) -> Self {
        Self {
            url,
            budget: format!("model {model}"),
            requests_per_minute,
            tokens_per_minute,
            client: Mutex::new(None),
        }
    }

    /// Wait until one request of `tokens` tokens fits the shared budget.
    pub async fn acquire(&self, tokens: u64) -> Result<(), String> {
        let wait = self.reserve(tokens).await?;
        if !wait.is_zero() {
            tracing::debug!(?wait, "shared rate limit: waiting for budget");
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    async fn reserve(&self, tokens: u64) -> Result<Duration, String> {
        let (request_rate, request_burst) = rate_and_burst(self.requests_per_minute.map(f64::from));
        let (token_rate, token_burst) = rate_and_burst(self.tokens_per_minute.map(|t| t as f64));
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            let (client, _conn) = crate::db::connect(&self.url)
                .await
                .map_err(|e| format!("rate limit: {e}"))?;
            *slot = Some(client);
        }
        let Some(client) = slot.as_ref() else {
            return Err("rate limit: no database connection".into());
        };
        let cost = tokens as f64;
        let row = client
            .query_one(
                "INSERT INTO kbsync.rate_budget AS b (name, requests, tokens, updated_at)
                 VALUES ($1::text, $2::float8 - 1, $3::float8 - $6::float8, clock_timestamp())
                 ON CONFLICT (name) DO UPDATE SET
                    requests = LEAST($2::float8, b.requests + $4::float8 * EXTRACT(EPOCH FROM clock_timestamp() - b.updated_at)::float8) - 1,
                    tokens = LEAST($3::float8, b.tokens + $5::float8 * EXTRACT(EPOCH FROM clock_timestamp() - b.updated_at)::float8) - $6::float8,
                    updated_at = clock_timestamp()
                 RETURNING requests, tokens",
                &[&self.budget, &request_burst, &token_burst, &request_rate, &token_rate, &cost],
            )
            .await;
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                *slot = None;
                return Err(format!("rate limit: {}", crate::db::describe(&e)));
            }
        };
        let (requests, tokens_left): (f64, f64) = (row.get(0), row.get(1));
        let wait = (-requests / request_rate)
            .max(-tokens_left / token_rate)
            .max(0.0);
        Ok(Duration::from_secs_f64(wait))
    }
}
