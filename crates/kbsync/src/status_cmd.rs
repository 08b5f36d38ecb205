//! `kbsync status`: what is behind and why — per source, eligible rows against rows
//! with chunks, chunks without an embedding, the outbox backlog and its oldest change,
//! parked keys; the capture (in logical mode the slot and the WAL it holds back); the
//! embedding index (valid, deferred for a backlog, building); whether a daemon runs,
//! how fast it syncs and when it catches up; broken sources and rows nobody queued,
//! with what to run; then the latest reconcile sweeps.

use kbsync_core::capture::logical;
use kbsync_core::config::{CaptureMode, Config};
use kbsync_core::db::advisory_locks;
use kbsync_core::model::migration;
use kbsync_core::search::index::{self, IndexState};
use kbsync_core::sync::source_problems::{self, SourceProblem};
use kbsync_reconcile::coverage::SourceCoverage;
use kbsync_reconcile::coverage::coverage;
use kbsync_reconcile::{Report, recent_runs};

/// Rows written per minute, measured over this window.
const RATE_WINDOW_SECONDS: f64 = 60.0;

/// Per source, the keys whose chunks were written in the last minute.
async fn recent_rates(
    client: &tokio_postgres::Client,
) -> anyhow::Result<std::collections::HashMap<String, i64>> {
    Ok(client
        .query(
            "SELECT source, count(DISTINCT source_key) FROM public.tenant_knowledge
              WHERE updated_at > now() - make_interval(secs => $1) GROUP BY source",
            &[&RATE_WINDOW_SECONDS],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// What needs doing, in words: broken sources, rows nobody queued, no daemon.
/// `undecoded`: logical capture has changes in the slot no daemon has decoded yet.
fn attention(
    sources: &[SourceCoverage],
    problems: &[SourceProblem],
    daemons: i64,
    undecoded: bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    for p in problems {
        lines.push(format!(
            "{}: BROKEN since {}: {}. Fix: {}",
            p.source,
            p.since.format("%Y-%m-%d %H:%M:%S UTC"),
            p.error,
            p.fix
        ));
    }
    for s in sources {
        let unsynced = s.eligible_rows - s.rows_with_chunks;
        // Changes still in the replication slot reach the outbox when a daemon decodes
        // them: those rows are not lost.
        if unsynced > 0
            && s.backlog == 0
            && s.uncollected_changes == 0
            && !undecoded
            && !problems.iter().any(|p| p.source == s.source)
        {
            lines.push(format!(
                "{}: {} no chunks and none is queued (rows written before the capture, or missed): `kbsync reconcile` queues them",
                s.source,
                if unsynced == 1 {
                    "1 eligible row has".to_owned()
                } else {
                    format!("{unsynced} eligible rows have")
                }
            ));
        }
    }
    let waiting = sources
        .iter()
        .any(|s| s.backlog > 0 || s.uncollected_changes > 0);
    if daemons == 0 {
        lines.push(format!(
            "no daemon is running{}: start one (`kbsync run`, or `systemctl start kbsync`)",
            if waiting {
                ", so the backlog is not being worked off"
            } else if undecoded {
                ", so the changes waiting in the replication slot are not decoded"
            } else {
                ", so new changes are not synced"
            }
        ));
    }
    lines
}

/// Time to work off `backlog` at `per_minute`, for people.
fn catch_up(backlog: i64, per_minute: i64) -> String {
    match (backlog, per_minute) {
        (0, _) => "-".to_owned(),
        (_, 0) => "?".to_owned(),
        (b, r) => {
            let seconds = b as f64 / r as f64 * 60.0;
            if seconds < 90.0 {
                format!("{seconds:.0} s")
            } else if seconds < 5400.0 {
                format!("{:.0} min", seconds / 60.0)
            } else {
                format!("{:.1} h", seconds / 3600.0)
            }
        }
    }
}

pub async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let client = crate::connecting::connect_installed(config).await?;
    let cover = coverage(&client, config).await?;
    let daemons = advisory_locks::holders(&client, advisory_locks::DAEMON).await?;
    let problems = source_problems::list(&client).await?;
    let rates = recent_rates(&client).await?;
    let runs = recent_runs(&client, 5).await?;
    let capture = capture_status(&client, config).await?;
    let undecoded = capture.json["unconfirmed_bytes"]
        .as_i64()
        .is_some_and(|bytes| bytes > 0);
    let notes = attention(&cover.sources, &problems, daemons, undecoded);
    let index = index_status(&client, config).await?;
    let migration = migration::progress_if_any(&client).await?;
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
                "sources": cover.sources, "capture": capture.json, "index": index.json,
                "model_migration": migration, "reconcile_runs": runs,
                "daemons_running": daemons,
                "rows_synced_last_minute": rates,
                "broken_sources": problems.iter().map(|p| serde_json::json!({
                    "source": p.source, "error": p.error, "fix": p.fix,
                    "since": p.since.to_rfc3339(), "checked_at": p.checked_at.to_rfc3339(),
                })).collect::<Vec<_>>(),
                "attention": notes,
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<12} {:>9} {:>12} {:>9} {:>8} {:>13} {:>8} {:>12} {:>11} {:>13} {:>9} {:>9}",
        "source",
        "eligible",
        "with chunks",
        "coverage",
        "chunks",
        "no embedding",
        "backlog",
        "uncollected",
        "oldest (s)",
        "dead letters",
        "rows/min",
        "catch-up"
    );
    for s in &cover.sources {
        let per_minute = rates.get(&s.source).copied().unwrap_or(0);
        println!(
            "{:<12} {:>9} {:>12} {:>8.1}% {:>8} {:>13} {:>8} {:>12} {:>11.1} {:>13} {:>9} {:>9}",
            s.source,
            s.eligible_rows,
            s.rows_with_chunks,
            s.coverage * 100.0,
            s.chunks,
            s.chunks_without_embedding,
            s.backlog,
            s.uncollected_changes,
            s.oldest_pending_seconds,
            s.dead_letters,
            per_minute,
            catch_up(s.backlog + s.uncollected_changes, per_minute)
        );
    }
    println!();
    println!(
        "daemons: {}",
        match daemons {
            0 => "none running".to_owned(),
            n => format!("{n} running"),
        }
    );
    for note in &notes {
        println!("attention: {note}");
    }
    println!();
    println!("capture: {}", capture.line);
    println!("embedding index: {}", index.line);
    if let Some(p) = &migration {
        println!("model migration: {}", migration_line(p));
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
        let report = serde_json::from_value::<Report>(run.counts.clone());
        let outcome = match (&run.error, &report, run.finished_at) {
            (Some(e), _, _) => format!("error: {e}"),
            (None, _, None) => "running, or its process died".to_owned(),
            (None, Ok(r), Some(_)) => {
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
            // Recorded by another version of kbsync: say so rather than show nothing.
            (None, Err(e), Some(_)) => {
                format!("finished (its counts are in a form this kbsync does not read: {e})")
            }
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

/// One line of the report and its JSON form.
struct StatusPart {
    line: String,
    json: serde_json::Value,
}

/// One line on the model migration (`kbsync model status` has the whole of it).
fn migration_line(p: &migration::Progress) -> String {
    let s = &p.state;
    let phase = s.phase_words();
    match (p.filling_column, &p.filling_model) {
        (Some(column), Some(model)) => format!(
            "{} -> {}: {phase}; {column} ({model}) missing for {} of {} chunks ({} texts){}",
            s.from_model,
            s.to_model,
            p.chunks_missing,
            p.chunks,
            p.texts_missing,
            p.eta_seconds
                .filter(|_| p.texts_missing > 0)
                .map(|eta| format!(", about {eta:.0} s left"))
                .unwrap_or_default()
        ),
        _ => format!("{} -> {}: {phase}", s.from_model, s.to_model),
    }
}

/// The HNSW index's state, and what the index keeper will do next.
async fn index_status(
    client: &tokio_postgres::Client,
    config: &Config,
) -> anyhow::Result<StatusPart> {
    let state = index::state(client).await?;
    let managed = index::managed_by_a_daemon(client).await?;
    let defer_above = config.index.defer_above;
    let build_below = index::build_below(defer_above);
    let keeper = if defer_above == 0 {
        "index.defer_above = 0: kbsync leaves it to you"
    } else if managed {
        "kept by a running daemon"
    } else {
        "no daemon is keeping it"
    };
    let line = match &state {
        IndexState::Valid => format!("valid ({keeper})"),
        IndexState::Building { phase, .. } => format!(
            "building, {}{phase}; search is an exact scan until it is valid",
            state
                .percent()
                .map(|p| format!("{p:.0}% of "))
                .unwrap_or_default()
        ),
        IndexState::Missing if defer_above > 0 => {
            let backlog = index::backlog(client, build_below).await?;
            format!(
                "none: deferred for the backlog; built when fewer than {build_below} entries are pending (now {}{backlog}); search is an exact scan meanwhile ({keeper})",
                if backlog >= build_below {
                    "at least "
                } else {
                    ""
                }
            )
        }
        IndexState::Missing => format!("none: search is an exact scan ({keeper})"),
        IndexState::Invalid => format!(
            "INVALID (an interrupted build): maintained on every write, used by no query; a daemon keeping the index drops and rebuilds it ({keeper})"
        ),
    };
    Ok(StatusPart {
        line,
        json: serde_json::json!({
            "state": state.name(), "percent": state.percent(), "kept_by_a_daemon": managed,
            "defer_above": defer_above,
        }),
    })
}

async fn capture_status(
    client: &tokio_postgres::Client,
    config: &Config,
) -> anyhow::Result<StatusPart> {
    if config.capture.mode == CaptureMode::Triggers {
        return Ok(StatusPart {
            line: "triggers".to_owned(),
            json: serde_json::json!({"mode": "triggers"}),
        });
    }
    let slot = logical::slot_name(client, config).await?;
    let Some(state) = logical::slot_state(client, &slot).await? else {
        return Ok(StatusPart {
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
    Ok(StatusPart {
        line,
        json: serde_json::json!({
            "mode": "logical", "slot": slot, "exists": true, "active": state.active,
            "retained_bytes": state.retained_bytes, "unconfirmed_bytes": state.unconfirmed_bytes,
            "wal_status": state.wal_status, "over_limit": over,
        }),
    })
}
