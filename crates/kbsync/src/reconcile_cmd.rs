//! `kbsync reconcile`: one sweep, a summary table (or JSON), a progress bar on a
//! terminal, and an exit code a timer or a script can act on.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use kbsync_core::config::Config;
use kbsync_reconcile::{Options, ReconcileError, Report};

use crate::progress_bar::Bar;

/// A safety stop: some orphans were not deleted; everything else was repaired.
pub const EXIT_SAFETY_STOP: u8 = 3;
/// Another sweep holds the lock; this one did nothing.
pub const EXIT_BUSY: u8 = 4;

/// One sweep with `options`; `json` prints the report as JSON instead of a table.
pub async fn reconcile(config: &Config, options: Options, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = crate::connecting::connect(config).await?;
    let progress = Bar::new();
    // Ctrl-C stops between ranges and records the run as cancelled.
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let report =
        match kbsync_reconcile::sweep(&mut client, config, &options, &progress, &cancel).await {
            Ok(report) => report,
            Err(ReconcileError::Busy) => {
                eprintln!("error: {}", ReconcileError::Busy);
                return Ok(ExitCode::from(EXIT_BUSY));
            }
            Err(e) => return Err(e.into()),
        };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let daemon_running =
            kbsync_core::db::advisory_locks::held(&client, kbsync_core::db::advisory_locks::DAEMON)
                .await?;
        print!("{}", summary(&report, daemon_running));
    }
    if report.safety_stops().next().is_some() {
        return Ok(ExitCode::from(EXIT_SAFETY_STOP));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human summary: one line per source, then whatever needs attention.
pub fn summary(report: &Report, daemon_running: bool) -> String {
    let mut out = format!(
        "reconcile run {}{} in {:.1} s\n",
        report.run_id,
        if report.dry_run {
            " (dry run: nothing changed; counts are what a real run would do)"
        } else {
            ""
        },
        report.duration_ms as f64 / 1000.0
    );
    let header = [
        "source",
        "rows",
        "chunks",
        "missing",
        "stale",
        "no-embedding",
        "queued",
        "pending",
        "orphans",
        "deleted",
        "retried",
        "failing",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for s in &report.sources {
        table.push(vec![
            s.source.clone(),
            s.rows.to_string(),
            s.chunks.to_string(),
            s.missing.to_string(),
            s.stale.total().to_string(),
            s.missing_embeddings.to_string(),
            s.queued.to_string(),
            s.already_queued.to_string(),
            s.orphan_chunks.to_string(),
            s.deleted_chunks.to_string(),
            s.dead_letters_retried.to_string(),
            s.dead_letters_permanent.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c == 0 {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for s in &report.sources {
        let st = &s.stale;
        let reasons: Vec<String> = [
            ("text changed", st.text),
            ("chunking changed", st.chunking),
            ("model changed", st.model),
            ("tenant changed", st.tenant),
            ("metadata changed", st.metadata),
            ("chunks missing or extra", st.chunk_set),
            ("written before the sweep's 64-bit hashes", st.hashes),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what} {n}"))
        .collect();
        if !reasons.is_empty() {
            out.push_str(&format!("stale {}: {}\n", s.source, reasons.join(", ")));
        }
    }
    for (source, stop) in report.safety_stops() {
        out.push_str(&format!(
            "SAFETY STOP {source}: its orphans are {:.0}% of its chunks (limit {:.0}%, reconcile.max_delete_fraction); nothing was deleted there. Check the source's table and filter; if they are right, rerun with --force\n",
            stop.share * 100.0,
            stop.limit * 100.0
        ));
    }
    for s in &report.sources {
        for f in &s.permanent_examples {
            out.push_str(&format!(
                "failing {} {}: {} (attempts {}, sweep retries {}); fix the cause, then `kbsync errors retry`\n",
                s.source, f.key, f.error, f.attempts, f.retries
            ));
        }
    }
    for u in &report.unknown_sources {
        out.push_str(&format!(
            "unknown source {:?}: {} chunks in tenant_knowledge under a source the config does not declare; not deleted (delete them by hand if that source is gone for good)\n",
            u.source, u.chunks
        ));
    }
    if !report.found_drift() {
        out.push_str("in sync: nothing to repair\n");
    } else if !report.dry_run && report.sources.iter().any(|s| s.queued > 0) {
        out.push_str(if daemon_running {
            "queued keys are processed by the running daemon\n"
        } else {
            "queued keys wait for a daemon: none is running; start one (`kbsync run`, or the systemd unit)\n"
        });
    }
    out
}
