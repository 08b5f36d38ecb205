//! `kbsync config check`: what would break the daemon, found before it starts — the
//! file, the embedding models' files, keys and variables, and, with a reachable
//! database, every table and column the sources use and whether the installed capture
//! is this config's.

use std::path::Path;

use anyhow::bail;
use kbsync_core::config::Config;
use kbsync_core::db::redact_url;
use kbsync_core::sync::embed::Provider;

/// What the check of the database found.
enum DatabaseCheck {
    /// Every source's statement compiles against the database.
    Checked {
        /// What `kbsync install` would still change in the capture (empty: installed).
        capture_drift: Vec<String>,
        schema_current: bool,
    },
    /// Not checked, and why.
    Unchecked(String),
}

pub async fn check(path: &Path, quiet: bool) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // The same code the daemon starts with: a model directory, a key file or a
    // variable that is not there fails here.
    Provider::from_config(&config).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Some(next) = config.with_next_model() {
        Provider::from_config(&next).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    config
        .search
        .api_tokens()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let schedule = config
        .reconcile_schedule()
        .map_err(|e| anyhow::anyhow!("{}: reconcile.schedule: {e}", path.display()))?;
    let database = check_database(&config).await?;

    let sources = config.sources();
    if quiet {
        println!(
            "{}: OK ({} sources; {})",
            path.display(),
            sources.len(),
            database_words(&database)
        );
        return Ok(());
    }
    println!("# {}: OK", path.display());
    match config.database_url() {
        Some(url) => println!(
            "# database: {} (from {}); {}",
            redact_url(&url),
            url_origin(&config),
            database_words(&database)
        ),
        None => println!("# database: {}", database_words(&database)),
    }
    println!("# sources:");
    for source in sources {
        let list = |columns: Vec<kbsync_core::config::sql_ident::Ident>| {
            columns
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "#   {:<10} {} (chunk {} tokens, overlap {})",
            source.name, source.table, source.chunk_tokens, source.chunk_overlap
        );
        println!(
            "#     watches {}: {}",
            source.table,
            list(source.relevant_columns())
        );
        for (i, related) in source.related.iter().enumerate() {
            println!(
                "#     watches {} (related {}, by {}): {}",
                related.table,
                related.name,
                related.foreign_key.as_str(),
                list(source.related_columns(i))
            );
        }
    }
    println!(
        "# reconcile schedule {:?} (UTC){}; next runs:",
        config.reconcile.schedule,
        if config.reconcile.enabled {
            ""
        } else {
            " [disabled]"
        }
    );
    for time in schedule.upcoming(chrono::Utc).take(3) {
        println!("#   {}", time.format("%Y-%m-%d %H:%M:%S UTC"));
    }
    println!();
    print!("{}", toml::to_string_pretty(&config.redacted())?);
    Ok(())
}

fn url_origin(config: &Config) -> &'static str {
    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty());
    if set("KBSYNC_DATABASE_URL") {
        "KBSYNC_DATABASE_URL"
    } else if set("DATABASE_URL") {
        "DATABASE_URL"
    } else if config.database.url.is_some() {
        "database.url"
    } else {
        "libpq's PG* variables"
    }
}

fn database_words(check: &DatabaseCheck) -> String {
    match check {
        DatabaseCheck::Unchecked(why) => format!("NOT CHECKED against the database: {why}"),
        DatabaseCheck::Checked {
            schema_current: false,
            ..
        } => "every table and column the sources use exists; kbsync is not installed there yet: run `kbsync install`".to_owned(),
        DatabaseCheck::Checked { capture_drift, .. } if capture_drift.is_empty() => {
            "every table and column the sources use exists; the installed capture is this config's".to_owned()
        }
        DatabaseCheck::Checked { capture_drift, .. } => format!(
            "every table and column the sources use exists; the installed capture is NOT this config's, so the daemon will refuse to start until `kbsync install` has run ({})",
            capture_drift.join("; ")
        ),
    }
}

/// Every source's statement, planned by the database itself: a column typo in a text
/// template, a filter or a tenant fails here, not in the first batch.
async fn check_database(config: &Config) -> anyhow::Result<DatabaseCheck> {
    let Some(url) = config.database_url() else {
        return Ok(DatabaseCheck::Unchecked(
            "no database URL (KBSYNC_DATABASE_URL, DATABASE_URL, database.url or PGHOST...)"
                .to_owned(),
        ));
    };
    let client = match kbsync_core::db::connect(&url).await {
        Ok((client, _connection)) => client,
        // A wrong password or database name is the config's fault.
        Err(e) if e.is_fatal() => return Err(e.into()),
        // A database that is down now may be up when the daemon starts (it waits).
        Err(e) => return Ok(DatabaseCheck::Unchecked(e.to_string())),
    };
    let problems = kbsync_core::sync::source_rows::unusable_sources(&client, config).await;
    if !problems.is_empty() {
        bail!(
            "the database does not have what the sources use; correct the config or the tables:\n  {}",
            problems.join("\n  ")
        );
    }
    let schema_current = kbsync_core::schema::install::schema_is_current(&client).await?;
    let capture_drift = kbsync_core::schema::install::capture_drift(&client, config).await?;
    Ok(DatabaseCheck::Checked {
        capture_drift,
        schema_current,
    })
}
