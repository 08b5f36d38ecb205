//! `kbsync status`: what is behind and why — per source, eligible rows against rows
//! with chunks, chunks without an embedding, the outbox backlog and its oldest change,
//! parked keys; then the latest reconcile sweeps.

use kbsync_core::config::Config;
use kbsync_reconcile::coverage::coverage;
use kbsync_reconcile::{Report, recent_runs};

pub async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let client = crate::connect(config).await?;
    if !kbsync_core::install::schema_is_current(&client).await? {
        anyhow::bail!(
            "kbsync's schema is missing or out of date in this database: run `kbsync install` first"
        );
    }
    let cover = coverage(&client, config).await?;
    let runs = recent_runs(&client, 5).await?;
    if json {
        let runs: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "started_at": r.started_at.to_rfc3339(),
                    "finished_at": r.finished_at.map(|t| t.to_rfc3339()),
                    "origin": r.origin, "dry_run": r.dry_run, "options": r.options,
                    "report": r.counts, "error": r.error,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "sources": cover.sources, "reconcile_runs": runs,
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<12} {:>9} {:>12} {:>9} {:>8} {:>13} {:>8} {:>12} {:>11} {:>13}",
        "source",
        "eligible",
        "with chunks",
        "coverage",
        "chunks",
        "no embedding",
        "backlog",
        "uncollected",
        "oldest (s)",
        "dead letters"
    );
    for s in &cover.sources {
        println!(
            "{:<12} {:>9} {:>12} {:>8.1}% {:>8} {:>13} {:>8} {:>12} {:>11.1} {:>13}",
            s.source,
            s.eligible_rows,
            s.rows_with_chunks,
            s.coverage * 100.0,
            s.chunks,
            s.chunks_without_embedding,
            s.backlog,
            s.uncollected_changes,
            s.oldest_pending_seconds,
            s.dead_letters
        );
    }
    println!();
    println!("reconcile sweeps (latest first)");
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
