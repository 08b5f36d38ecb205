//! Connecting to PostgreSQL and the one SQLSTATE → retryable/fatal mapping.

pub mod advisory_locks;
pub mod connection_defaults;
pub mod server_versions;
pub mod tls;

use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

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
    #[error("TLS settings for {target}: {problem}")]
    Tls { target: String, problem: String },
    #[error("database error: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

impl DbError {
    /// Waiting cannot fix it: a bad URL, password, role or database name.
    pub fn is_fatal(&self) -> bool {
        match self {
            DbError::NoUrl | DbError::BadUrl { .. } | DbError::Tls { .. } => true,
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

/// The stream of a connection that may use TLS.
pub type TlsStream =
    <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
        tokio_postgres::Socket,
    >>::Stream;

/// Where and how to connect: tokio-postgres's settings and the TLS they use.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    pub config: tokio_postgres::Config,
    pub tls: crate::db::tls::TlsSettings,
}

impl ConnectionSettings {
    /// `user@host:port/database`, for messages.
    pub fn target(&self) -> String {
        crate::db::connection_defaults::describe_target(&self.config)
    }

    /// Connect with these settings. The caller drives the returned connection.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, TlsStream>,
        ),
        DbError,
    > {
        let connector = self.tls.connector().map_err(|problem| DbError::Tls {
            target: self.target(),
            problem,
        })?;
        self.config.connect(connector).await.map_err(|e| {
            let (kind, hint) = connect_failure(&e);
            DbError::Connect {
                target: self.target(),
                // No hint: the server's message says it all.
                hint: hint.unwrap_or_default().to_owned(),
                cause: describe(&e),
                kind,
            }
        })
    }
}

/// The connection settings `url` gives, with what it leaves out filled in as libpq
/// would (`PG*` and `PGSSL*` variables, the password file, the local socket), and its
/// TLS parameters with libpq's meaning.
pub fn connection_settings(url: &str) -> Result<ConnectionSettings, DbError> {
    let bad_url = |problem: String| DbError::BadUrl {
        url: redact_url(url),
        problem,
    };
    let env = crate::db::connection_defaults::Environment::from_process();
    let (rest, tls) = crate::db::tls::take_from_url(url, &env).map_err(bad_url)?;
    let rest =
        crate::db::connection_defaults::with_port_from_environment(&rest, &env).map_err(bad_url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| bad_url(describe(&e)))?;
    let warnings = crate::db::connection_defaults::apply(&mut config, &env).map_err(bad_url)?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    config.ssl_mode(tls.postgres_mode());
    Ok(ConnectionSettings { config, tls })
}

/// Connect and drive the connection on a task. The task ends when the client is
/// dropped or the connection fails; callers notice through the client's errors.
pub async fn connect(url: &str) -> Result<(Client, JoinHandle<()>), DbError> {
    let mut settings = connection_settings(url)?;
    settings
        .config
        .application_name("kbsync")
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    let (client, connection) = settings.connect().await?;
    let handle = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe(&e), "database connection ended");
        }
    });
    Ok((client, handle))
}

/// What to do about credentials the server (or a pooler) refused.
const CHECK_CREDENTIALS: &str =
    " (check the user name and password in the URL, PGPASSWORD or ~/.pgpass)";

/// Whether waiting can fix a failed connection, and what to do about it where the
/// message alone does not say.
fn connect_failure(err: &tokio_postgres::Error) -> (ErrorKind, Option<&'static str>) {
    let text = describe(err);
    let fatal = |hint: &'static str| (ErrorKind::Fatal, Some(hint));
    // tokio-postgres refuses a config without a password the server asks for.
    if text.contains("password missing") {
        return fatal(
            " (the server asks for a password: put it in the URL, PGPASSWORD or ~/.pgpass)",
        );
    }
    if ["UnknownIssuer", "unknown issuer", "BadSignature"]
        .iter()
        .any(|t| text.contains(t))
    {
        return fatal(
            " (the server's certificate is not signed by a CA in sslrootcert: name the CA that signed it, the one your provider publishes)",
        );
    }
    if text.contains("NotValidForName") || text.contains("not valid for name") {
        return fatal(
            " (the server's certificate does not name the host in the URL: connect by a name the certificate has, or use sslmode=verify-ca to check the CA only)",
        );
    }
    if text.contains("invalid peer certificate") {
        return fatal(" (the server's certificate does not pass sslmode's checks)");
    }
    if text.contains("SSL required") || text.contains("no encryption") {
        return fatal(
            " (the server accepts only TLS connections: add sslmode=verify-full and sslrootcert=<its CA file> to the URL, or sslmode=require)",
        );
    }
    // PostgreSQL says 28P01 (below); PgBouncer says 08P01 "SASL authentication failed",
    // which the SQLSTATE class alone would call a connection fault worth waiting for.
    if text.contains("authentication failed") {
        return fatal(CHECK_CREDENTIALS);
    }
    if text.contains("server does not support TLS") {
        return fatal(
            " (sslmode asks for TLS and this server offers none: connect to its TLS endpoint, or lower sslmode if the network is trusted)",
        );
    }
    let hint = match err.code() {
        Some(code) if *code == SqlState::INVALID_PASSWORD => Some(CHECK_CREDENTIALS),
        Some(code) if *code == SqlState::INVALID_CATALOG_NAME => {
            Some(" (check the database name in the URL; `\\l` in psql lists them)")
        }
        _ => None,
    };
    (classify(err), hint)
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

/// Replace the password in a PostgreSQL URL (or key=value string) with `***`.
pub fn redact_url(url: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
            // A URL with a password can always take another; should it not, print
            // nothing of it rather than the password.
            return "(a database URL; its password could not be hidden)".to_owned();
        }
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        if !pairs.is_empty() {
            parsed.query_pairs_mut().clear().extend_pairs(pairs);
        }
        return parsed.to_string();
    }
    // A URL too broken to parse may still carry `user:password@`: hide what lies
    // between the scheme's `//` and the last `@`, whatever it looks like.
    if let Some(start) = url.find("://").map(|i| i + 3)
        && let Some(at) = url[start..].rfind('@').map(|i| start + i)
    {
        let user = url[start..at].split(':').next().unwrap_or("");
        return format!("{}{user}:***{}", &url[..start], &url[at..]);
    }
    // key=value form: hide any password=... word.
    url.split_whitespace()
        .map(|word| {
            if word.starts_with("password=") {
                "password=***"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert!(!redact_url("postgres://db/app?password=s3cret").contains("s3cret"));
        assert_eq!(
            redact_url("host=db password=s3cret"),
            "host=db password=***"
        );
        let broken = redact_url("postgres://u:s3cret@[::1");
        assert!(!broken.contains("s3cret"), "{broken}");
    }
}
