//! `kbsync config check`.

use std::path::Path;

use anyhow::bail;
use kbsync_core::config::{Config, ProviderKind, redact_url};

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    if config.embedding.provider == ProviderKind::Openai && config.embedding.api_key_file.is_none()
    {
        let var = config
            .embedding
            .api_key_env
            .as_deref()
            .unwrap_or("OPENAI_API_KEY");
        if std::env::var(var).map(|v| v.is_empty()).unwrap_or(true) {
            bail!(
                "{}: embedding.api_key_env: environment variable {var} is not set; export the API key there (or set api_key_file)",
                path.display()
            );
        }
    }
    println!("# {}: OK", path.display());
    let url_source = if std::env::var("KBSYNC_DATABASE_URL").is_ok() {
        "KBSYNC_DATABASE_URL"
    } else if std::env::var("DATABASE_URL").is_ok() {
        "DATABASE_URL"
    } else if config.database.url.is_some() {
        "database.url"
    } else {
        "not set"
    };
    match config.database_url() {
        Some(url) => println!("# database: {} (from {url_source})", redact_url(&url)),
        None => println!("# database: not set: set KBSYNC_DATABASE_URL or DATABASE_URL"),
    }
    println!("# sources:");
    for source in config.sources() {
        let columns: Vec<String> = source
            .relevant_columns()
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect();
        println!(
            "#   {:<10} {} (watches {}; chunk {} tokens, overlap {})",
            source.name,
            source.table,
            columns.join(", "),
            source.chunk_tokens,
            source.chunk_overlap
        );
    }
    let schedule = config.reconcile_schedule().map_err(anyhow::Error::msg)?;
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
