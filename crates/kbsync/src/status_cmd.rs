//! `kbsync status`: what is behind and why — the outbox backlog per source, parked
//! keys, and the latest reconcile sweeps.

use kbsync_core::config::Config;
use kbsync_reconcile::{Report, recent_runs};

pub async fn status(config: &Config) -> anyhow::Result<()> {
    let client = crate::connect(config).await?;
    if !kbsync_core::install::schema_is_current(&client).await? {
        anyhow::bail!(
            "kbsync's schema is missing or out of date in this database: run `kbsync install` first"
        );
    }
    let names: Vec<String> = config.sources().into_iter().map(|s| s.name).collect();
    let backlog = client
        .query(
            "SELECT s.name,
                    count(o.source_key),
                    count(o.source_key) FILTER (WHERE o.claim_token IS NOT NULL AND o.claimed_until > now()),
                    count(o.source_key) FILTER (WHERE o.next_attempt_at > now()),
                    COALESCE(EXTRACT(EPOCH FROM now() - min(o.first_changed_at))::float8, 0),
                    (SELECT count(*) FROM kbsync.dead_letters d WHERE d.source = s.name)
               FROM unnest($1::text[]) AS s(name)
               LEFT JOIN kbsync.outbox o ON o.source = s.name
              GROUP BY s.name ORDER BY s.name",
            &[&names],
        )
        .await?;
    println!("outbox");
    println!(
        "  {:<12} {:>8} {:>8} {:>9} {:>12} {:>12}",
        "source", "pending", "claimed", "retrying", "oldest (s)", "dead letters"
    );
    for r in &backlog {
        println!(
            "  {:<12} {:>8} {:>8} {:>9} {:>12.1} {:>12}",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, f64>(4),
            r.get::<_, i64>(5)
        );
    }
    println!("reconcile sweeps (latest first)");
    let runs = recent_runs(&client, 5).await?;
    if runs.is_empty() {
        println!(
            "  none yet: `kbsync reconcile` runs one; `kbsync run` runs them on reconcile.schedule"
        );
    }
    for run in runs {
        let duration = match run.finished_at {
            Some(end) => format!(
                "{:.1} s",
                (end - run.started_at).num_milliseconds() as f64 / 1000.0
            ),
            None => "unfinished".to_owned(),
        };
        let report: Option<Report> = serde_json::from_value(run.counts.clone()).ok();
        let outcome = match (&run.error, &report, run.finished_at) {
            (Some(e), _, _) => format!("error: {e}"),
            (None, _, None) => "running, or its process died".to_owned(),
            (None, Some(r), Some(_)) => {
                let sum = |f: fn(&kbsync_reconcile::SourceReport) -> u64| {
                    r.sources.iter().map(f).sum::<u64>()
                };
                let stops: Vec<&str> = r.safety_stops().map(|(s, _)| s).collect();
                let mut text = format!(
                    "missing {}, stale {}, no-embedding {}, queued {}, orphans {}, deleted {}, dead letters retried {}",
                    sum(|s| s.missing),
                    sum(|s| s.stale.total()),
                    sum(|s| s.missing_embeddings),
                    sum(|s| s.queued),
                    sum(|s| s.orphan_chunks),
                    sum(|s| s.deleted_chunks),
                    sum(|s| s.dead_letters_retried),
                );
                if !stops.is_empty() {
                    text.push_str(&format!("; SAFETY STOP in {}", stops.join(", ")));
                }
                text
            }
            (None, None, Some(_)) => "finished".to_owned(),
        };
        println!(
            "  #{:<5} {} {:>10} {:<8}{} {}",
            run.id,
            run.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            duration,
            run.origin,
            if run.dry_run { " dry-run" } else { "" },
            outcome
        );
    }
    Ok(())
}
