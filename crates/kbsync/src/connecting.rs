//! How every command reaches the database: the configured URL, with errors that say
//! where it came from and what to do.

use kbsync_core::config::Config;

/// Connect to the configured database, with an error that says where the URL comes from.
pub(crate) async fn connect(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let url = config
        .database_url()
        .ok_or(kbsync_core::db::DbError::NoUrl)?;
    match kbsync_core::db::connect(&url).await {
        Ok((client, _connection)) => Ok(client),
        // `just db`'s throwaway server, not running: say how to start it.
        Err(e) if url.contains(":54329/") && !e.is_fatal() => Err(anyhow::Error::new(e)
            .context("the project's local server is not running; `just db` starts it")),
        Err(e) => Err(e.into()),
    }
}

/// `connect`, for commands that need kbsync's schema as this kbsync knows it.
pub(crate) async fn connect_installed(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let client = connect(config).await?;
    if !kbsync_core::schema::install::schema_is_current(&client).await? {
        anyhow::bail!(
            "kbsync's schema is missing or out of date in this database: run `kbsync install` first"
        );
    }
    Ok(client)
}
