//! `kbsync status`: what is behind and why — per source, eligible rows against rows
//! with chunks, chunks without an embedding, the outbox backlog and its oldest change,
//! parked keys; the capture (in logical mode the slot and the WAL it holds back); then
//! the latest reconcile sweeps.

use kbsync_core::config::{CaptureMode, Config};
use kbsync_core::replication;
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
    let capture = capture_status(&client, config).await?;
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
                "sources": cover.sources, "capture": capture.json, "reconcile_runs": runs,
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
    println!("capture: {}", capture.line);
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

struct CaptureStatus {
    line: String,
    json: serde_json::Value,
}

async fn capture_status(
    client: &tokio_postgres::Client,
    config: &Config,
) -> anyhow::Result<CaptureStatus> {
    if config.capture.mode == CaptureMode::Triggers {
        return Ok(CaptureStatus {
            line: "triggers".to_owned(),
            json: serde_json::json!({"mode": "triggers"}),
        });
    }
    let slot = replication::slot_name(client, config).await?;
    let Some(state) = replication::slot_state(client, &slot).await? else {
        return Ok(CaptureStatus {
            line: format!(
                "logical, slot {slot} MISSING: nothing is being captured; run `kbsync install` to create it, then `kbsync reconcile`"
            ),
            json: serde_json::json!({"mode": "logical", "slot": slot, "exists": false}),
        });
    };
    let size = |b: i64| {
        if b < 1024 * 1024 {
            format!("{:.1} KiB", b as f64 / 1024.0)
        } else {
            format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
        }
    };
    let limit = config.capture.max_retained_wal_mb;
    let over = state.over_limit(limit);
    let line = format!(
        "logical, slot {slot} {}, WAL retained {}{}, not yet confirmed {}{}",
        if state.active {
            "(a daemon is decoding)"
        } else {
            "(NO daemon is decoding: WAL accumulates)"
        },
        size(state.retained_bytes),
        if over {
            format!(" (OVER capture.max_retained_wal_mb = {limit})")
        } else {
            String::new()
        },
        size(state.unconfirmed_bytes),
        if state.wal_status.is_empty() {
            String::new()
        } else {
            format!(", wal_status {}", state.wal_status)
        },
    );
    Ok(CaptureStatus {
        line,
        json: serde_json::json!({
            "mode": "logical", "slot": slot, "exists": true, "active": state.active,
            "retained_bytes": state.retained_bytes, "unconfirmed_bytes": state.unconfirmed_bytes,
            "wal_status": state.wal_status, "over_limit": over,
        }),
    })
}
