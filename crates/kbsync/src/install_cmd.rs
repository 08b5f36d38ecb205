//! `kbsync install`: the schema and the capture, then the rows that existed before the
//! capture did, queued for the daemon.

use kbsync_core::config::Config;
use kbsync_core::schema::install::{self, InstallOptions};
use kbsync_reconcile::{Options, Origin, ReconcileError, Report};
use tokio_util::sync::CancellationToken;

use crate::progress_bar::Bar;

pub async fn install(config: &Config, dry_run: bool, reset_embeddings: bool) -> anyhow::Result<()> {
    let mut client = crate::connecting::connect(config).await?;
    let options = InstallOptions { reset_embeddings };
    const NOTHING: &str = "the database is up to date; nothing to do";
    if dry_run {
        let plan = install::plan(&client, config, options).await?;
        print_dry_run("install", &plan, NOTHING);
        println!(
            "-- then: every eligible source row without up-to-date chunks is queued for the daemon (`kbsync reconcile --dry-run` counts them)"
        );
        return Ok(());
    }
    let plan = install::apply(&mut client, config, options).await?;
    print_applied("install", &plan, NOTHING);
    queue_existing_rows(&mut client, config).await
}

/// `kbsync COMMAND --dry-run`'s output: the plan as SQL, or `nothing`.
pub(crate) fn print_dry_run(command: &str, plan: &install::InstallPlan, nothing: &str) {
    print_warnings(command, plan);
    if plan.steps.is_empty() {
        println!("-- kbsync {command}: {nothing}");
    } else {
        println!(
            "-- kbsync {command} --dry-run: {} change(s); nothing was executed",
            plan.steps.len()
        );
        print!("{}", plan.script());
    }
}

/// What `kbsync COMMAND` applied, a line a step, or `nothing`.
pub(crate) fn print_applied(command: &str, plan: &install::InstallPlan, nothing: &str) {
    print_warnings(command, plan);
    if plan.steps.is_empty() {
        println!("kbsync {command}: {nothing}");
    } else {
        println!("kbsync {command}: {} change(s) applied:", plan.steps.len());
        for step in &plan.steps {
            println!("  - {}", step.description);
        }
    }
}

/// What works but costs the application, on stderr: it stays visible when the plan is
/// piped to a file.
fn print_warnings(command: &str, plan: &install::InstallPlan) {
    for warning in &plan.warnings {
        eprintln!("kbsync {command}: warning: {warning}");
    }
}

/// Rows written before their source was captured (or before its text, filter or
/// tenant changed) reach the outbox only through a sweep: run one now (rows to chunks
/// only: it queues, it deletes nothing), so that they are synced as soon as a daemon
/// runs, not at the next scheduled sweep. A source already in sync costs one statement.
async fn queue_existing_rows(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> anyhow::Result<()> {
    let options = Options {
        dry_run: false,
        force: false,
        sources: Vec::new(),
        tenant: None,
        origin: Origin::Install,
        queue_only: true,
    };
    let report = match kbsync_reconcile::sweep(
        client,
        config,
        &options,
        &Bar::new(),
        &CancellationToken::new(),
    )
    .await
    {
        Ok(report) => report,
        Err(ReconcileError::Busy) => {
            eprintln!(
                "kbsync install: a reconcile sweep is running, so rows that existed before the capture were not queued by this install; run `kbsync reconcile` once it has finished"
            );
            return Ok(());
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(
                "kbsync install applied its changes, but queueing the rows that existed before them failed; fix the cause, then run `kbsync reconcile`",
            ));
        }
    };
    print!("{}", existing_rows_summary(&report));
    Ok(())
}

/// What the install's sweep found and queued, a line per source.
fn existing_rows_summary(report: &Report) -> String {
    let mut out = String::from("existing rows (reconcile run ");
    out.push_str(&format!("{}):\n", report.run_id));
    for s in &report.sources {
        let drift = s.missing + s.stale.total() + s.missing_embeddings;
        out.push_str(&format!(
            "  {:<12} {} eligible rows; {}\n",
            s.source,
            s.rows,
            if drift == 0 {
                "all have up-to-date chunks".to_owned()
            } else {
                format!(
                    "{drift} without up-to-date chunks: {} queued for the daemon{}",
                    s.queued,
                    if s.already_queued > 0 {
                        format!(", {} already queued", s.already_queued)
                    } else {
                        String::new()
                    }
                )
            }
        ));
    }
    if report.sources.iter().any(|s| s.queued > 0) {
        out.push_str("  the daemon (`kbsync run`) embeds and writes them; `kbsync status` shows how far it is\n");
    }
    out
}
