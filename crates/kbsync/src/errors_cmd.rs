//! `kbsync errors`: the parked keys with their errors; `kbsync errors retry` puts
//! them back into the outbox (the triggers' path) once the cause is fixed. A dead
//! letter is removed when its key is written; if it fails again it is parked again.

use anyhow::bail;

use kbsync_core::config::Config;
use kbsync_core::outbox;

/// Which dead letters to replay.
pub enum Selection {
    Ids(Vec<i64>),
    Source(String),
    All,
}

pub async fn list(config: &Config, json: bool) -> anyhow::Result<()> {
    let client = crate::connecting::connect(config).await?;
    let rows = client
        .query(
            "SELECT d.id, d.source, d.source_key, d.attempts, d.retries, d.error,
                    d.last_failed_at, d.next_retry_at,
                    EXISTS (SELECT 1 FROM kbsync.outbox o WHERE o.source = d.source
                               AND o.scope = 'row' AND o.source_key = d.source_key)
               FROM kbsync.dead_letters d ORDER BY d.id",
            &[],
        )
        .await?;
    type When = chrono::DateTime<chrono::Utc>;
    if json {
        let letters: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.get::<_, i64>(0), "source": r.get::<_, String>(1),
                    "key": r.get::<_, String>(2), "attempts": r.get::<_, i32>(3),
                    "retries": r.get::<_, i32>(4), "error": r.get::<_, String>(5),
                    "last_failed_at": r.get::<_, When>(6).to_rfc3339(),
                    "next_retry_at": r.get::<_, Option<When>>(7).map(|t| t.to_rfc3339()),
                    "queued": r.get::<_, bool>(8),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&letters)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:>5}  {:<10} {:<38} {:>8} {:>7}  {:<22} error",
        "id", "source", "key", "attempts", "retries", "next sweep retry"
    );
    for r in &rows {
        let next = match (r.get::<_, Option<When>>(7), r.get::<_, bool>(8)) {
            (_, true) => "queued now".to_owned(),
            (Some(t), false) => t.format("%Y-%m-%d %H:%M UTC").to_string(),
            (None, false) => "none (retries used up)".to_owned(),
        };
        println!(
            "{:>5}  {:<10} {:<38} {:>8} {:>7}  {:<22} {}",
            r.get::<_, i64>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i32>(3),
            r.get::<_, i32>(4),
            next,
            r.get::<_, String>(5)
        );
    }
    println!(
        "\nreplay with `kbsync errors retry --id N | --source NAME | --all` once the cause is fixed"
    );
    Ok(())
}

pub async fn retry(config: &Config, selection: Selection) -> anyhow::Result<()> {
    let client = crate::connecting::connect(config).await?;
    let (ids, source, all): (Option<Vec<i64>>, Option<String>, bool) = match selection {
        Selection::Ids(ids) => (Some(ids), None, false),
        Selection::Source(s) => (None, Some(s), false),
        Selection::All => (None, None, true),
    };
    let sources = config.sources();
    if let Some(name) = &source {
        config.source_named(name).map_err(anyhow::Error::msg)?;
    }
    let rows = client
        .query(
            "SELECT id, source, source_key FROM kbsync.dead_letters
              WHERE $3 OR id = ANY($1) OR source = $2 ORDER BY id",
            &[&ids.clone().unwrap_or_default(), &source, &all],
        )
        .await?;
    if let Some(ids) = &ids {
        let found: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !found.contains(id))
            .map(ToString::to_string)
            .collect();
        if !missing.is_empty() {
            bail!(
                "no dead letter with id {} (`kbsync errors` lists them)",
                missing.join(", ")
            );
        }
    }
    let mut queued = 0;
    for source in sources {
        let ids: Vec<i64> = rows
            .iter()
            .filter(|r| r.get::<_, &str>(1) == source.name)
            .map(|r| r.get(0))
            .collect();
        if ids.is_empty() {
            continue;
        }
        // The sweep's rule: one statement, the replay counted.
        queued += outbox::replay_dead_letters(&client, source, &ids).await?;
    }
    let unknown: Vec<String> = rows
        .iter()
        .map(|r| r.get::<_, String>(1))
        .filter(|s| !sources.iter().any(|c| &c.name == s))
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "warning: {} dead letters belong to sources the config no longer declares ({}); not replayed",
            unknown.len(),
            unknown.join(", ")
        );
    }
    println!(
        "{queued} of {} dead letters replayed: their keys are queued for the daemon (or were already waiting), and each is removed once its key is written",
        rows.len()
    );
    Ok(())
}
