//! Connecting to PostgreSQL and the one SQLSTATE → retryable/fatal mapping.

use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, Error)]
pub enum DbError {
    #[error(
        "no database URL: set KBSYNC_DATABASE_URL or DATABASE_URL, database.url in the config, or libpq's PGHOST / PGDATABASE / PGUSER variables"
    )]
    NoUrl,
    #[error("the database URL is not valid ({url}): {problem}")]
    BadUrl { url: String, problem: String },
    /// The server's or the socket's own message is in `cause`, once.
    #[error("cannot connect to PostgreSQL at {target}: {cause}{hint}")]
    Connect {
        target: String,
        cause: String,
        hint: String,
        kind: ErrorKind,
    },
    #[error("database error: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

impl DbError {
    /// Waiting cannot fix it: a bad URL, password, role or database name.
    pub fn is_fatal(&self) -> bool {
        match self {
            DbError::NoUrl | DbError::BadUrl { .. } => true,
            DbError::Connect { kind, .. } => *kind == ErrorKind::Fatal,
            DbError::Postgres(e) => classify(e) == ErrorKind::Fatal,
        }
    }
}

/// What to do about a failed database call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection or the server is gone or refusing work (connection lost, server
    /// shutting down or starting, too many connections, out of resources). Reconnect
    /// with backoff; the data is not at fault, so no attempt is counted against it.
    Unavailable,
    /// A statement on a live connection lost a race or ran out of time (serialization
    /// failure, deadlock, lock or statement timeout). Run it again.
    Retryable,
    /// The statement or the data is wrong (constraint violation, bad value, missing
    /// object, permission); retrying gives the same answer.
    Fatal,
}

pub fn classify(err: &tokio_postgres::Error) -> ErrorKind {
    let Some(code) = err.code() else {
        // No SQLSTATE: I/O error, closed connection, timeout.
        return ErrorKind::Unavailable;
    };
    let unavailable = [
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::TOO_MANY_CONNECTIONS,
    ];
    let retryable = [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::QUERY_CANCELED,
    ];
    let class = &code.code()[..2];
    // 08 connection exception, 53 insufficient resources.
    if unavailable.contains(code) || class == "08" || class == "53" {
        ErrorKind::Unavailable
    } else if retryable.contains(code) {
        ErrorKind::Retryable
    } else {
        ErrorKind::Fatal
    }
}

/// The failure is the connection's or the server's, not the statement's: `client`
/// must reconnect before anything else is tried.
pub fn connection_failed(client: &Client, err: &tokio_postgres::Error) -> bool {
    client.is_closed() || classify(err) == ErrorKind::Unavailable
}

/// Delays between attempts to reach the database again: 200 ms doubling to 10 s, with
/// jitter, without end (the caller stops on cancellation). Used by every reconnect loop.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The connection settings `url` gives, with what it leaves out filled in as libpq
/// would (`PG*` variables, the password file, the local socket).
pub fn connection_config(url: &str) -> Result<tokio_postgres::Config, DbError> {
    let bad_url = |problem: String| DbError::BadUrl {
        url: crate::config::redact_url(url),
        problem,
    };
    let env = crate::connection_defaults::Environment::from_process();
    let (config, warnings) = crate::connection_defaults::resolve(url, &env).map_err(bad_url)?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

/// Connect and drive the connection on a task. The task ends when the client is
/// dropped or the connection fails; callers notice through the client's errors.
pub async fn connect(url: &str) -> Result<(Client, JoinHandle<()>), DbError> {
    let mut config = connection_config(url)?;
    config
        .application_name("kbsync")
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        let kind = match classify(&e) {
            // tokio-postgres refuses a config without a password the server asks for.
            _ if e.to_string().starts_with("invalid configuration") => ErrorKind::Fatal,
            kind => kind,
        };
        DbError::Connect {
            target: crate::connection_defaults::describe_target(&config),
            hint: connect_hint(&e).unwrap_or_default().to_owned(),
            cause: describe(&e),
            kind,
        }
    })?;
    let handle = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe(&e), "database connection ended");
        }
    });
    Ok((client, handle))
}

/// What to do about a connection failure whose message alone does not say.
fn connect_hint(err: &tokio_postgres::Error) -> Option<&'static str> {
    if err.to_string().contains("password missing") {
        return Some(
            " (the server asks for a password: put it in the URL, PGPASSWORD or ~/.pgpass)",
        );
    }
    let code = err.code()?;
    if *code == SqlState::INVALID_PASSWORD {
        Some(" (check the user name and password in the URL, PGPASSWORD or ~/.pgpass)")
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        Some(" (check the database name in the URL; `\\l` in psql lists them)")
    } else {
        None
    }
}

/// The whole story of a database error: tokio-postgres' own Display says only
/// "db error" and keeps the server's message in the source.
pub fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut text = format!("{} ({}): {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
