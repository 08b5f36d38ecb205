//! `kbsync`: the daemon and its command-line interface.

mod adopt_cmd;
mod config_cmd;
mod connecting;
mod demo_cmd;
mod embed_cmd;
mod errors_cmd;
mod install_cmd;
mod model_cmd;
mod progress_bar;
mod reconcile_cmd;
mod run_cmd;
mod search_cmd;
mod status_cmd;
mod uninstall_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kbsync_core::config::Config;

#[derive(Parser)]
#[command(
    name = "kbsync",
    version,
    about = "Keeps a per-tenant knowledge base (text chunks + pgvector embeddings) in sync with the PostgreSQL tables it is derived from",
    after_help = "The database URL comes from KBSYNC_DATABASE_URL, DATABASE_URL or database.url in the config."
)]
struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        env = "KBSYNC_CONFIG",
        default_value = "kbsync.toml"
    )]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade kbsync's schema and the capture of the configured sources: triggers, or (capture.mode = "logical") a publication and a replication slot. Switching modes here drops the other mode's objects.
    Install {
        /// Print the SQL that would run and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Accept a change of embedding dimension: clears every embedding (chunk texts
        /// are kept) so that `kbsync reconcile` re-embeds them with the new model.
        #[arg(long)]
        reset_embeddings: bool,
    },
    /// Remove what `kbsync install` made: the capture triggers, the publication and the
    /// replication slot, the kbsync schema (outbox, dead letters, sweeps, the search
    /// function). tenant_knowledge is kept unless --drop-knowledge. Stop the daemons first.
    Uninstall {
        /// Print the SQL that would run and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Drop tenant_knowledge too (every chunk and embedding).
        #[arg(long)]
        drop_knowledge: bool,
    },
    /// Reuse the embeddings an earlier system already paid for: every vector in an
    /// existing table whose text is exactly a chunk kbsync produces today, made with the
    /// configured model and of its dimension, is used by the first sync instead of a new
    /// embedding call. Run it after `kbsync install`, before the daemon's first sync.
    #[command(
        after_help = "Example (the old Django TenantKnowledge table):\n  kbsync adopt --table ai_model_tenantknowledge --content-column content --embedding-column embedding --model-column embedding_model"
    )]
    Adopt(adopt_cmd::AdoptArgs),
    /// Changing the embedding model blue/green: `plan` prices the move to the model in
    /// `[next_embedding]`, `start` has the daemon fill in its vectors beside the active
    /// ones, `cutover` makes them the ones applications read, `rollback` goes back at
    /// no cost, `finish` drops the old ones.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Run the daemon: capture changes from the outbox and keep tenant_knowledge in sync.
    /// SIGTERM/SIGINT drain and stop; SIGHUP reloads the config file.
    Run,
    /// One reconciliation sweep: delete orphaned chunks; queue missing and stale ones
    /// (and chunks without an embedding) for the daemon; retry parked keys that are due.
    #[command(
        after_help = "Exit status: 0 done; 1 error; 3 safety stop (some orphans not deleted, see the summary; everything else was done); 4 another sweep is running (nothing done)."
    )]
    Reconcile {
        /// Report what would be done and change nothing (the run is still recorded).
        #[arg(long)]
        dry_run: bool,
        /// Delete orphans even when they exceed reconcile.max_delete_fraction of a source.
        #[arg(long)]
        force: bool,
        /// Only this source (repeatable).
        #[arg(long = "source", value_name = "NAME")]
        sources: Vec<String>,
        /// Only this tenant's rows and chunks.
        #[arg(long)]
        tenant: Option<String>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What is behind and why: per source, eligible rows vs rows with chunks, chunks
    /// without embedding, outbox backlog and its oldest change, dead letters; the latest
    /// reconcile sweeps.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Search a tenant's knowledge through kbsync.search(): vector similarity (the
    /// question embedded with the model the chunks' vectors are of: [next_embedding]'s
    /// after a model cut-over), full-text relevance, or both fused (hybrid, the
    /// default). Only that tenant's chunks are ever searched.
    Search {
        /// The tenant whose chunks are searched (tenant_knowledge.tenant_id).
        #[arg(long)]
        tenant: String,
        /// The question.
        question: String,
        /// How many chunks to show.
        #[arg(short, default_value_t = 5)]
        k: i32,
        /// vector: paraphrases; text: exact terms (codes, names); hybrid: both, fused.
        #[arg(long, default_value = "hybrid")]
        mode: kbsync_core::search::Mode,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keys that kept failing (kbsync.dead_letters); `errors retry` replays them.
    Errors {
        #[command(subcommand)]
        command: Option<ErrorsCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Embed one text with the configured provider: dimension, norm, first values, latency.
    Embed {
        /// The text to embed.
        text: String,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Demo tables and rows shaped like the original Django models.
    Demo {
        #[command(subcommand)]
        command: DemoCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// What moving to the `[next_embedding]` model would cost: the chunk texts cut for
    /// it, those it has a vector for already, the tokens (its tokenizer) and requests
    /// to embed the rest, and the least time its rate limits allow. Only reads.
    Plan {
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Begin the migration: a second vector column of the new model's dimension, which
    /// the running daemon fills (newest chunks first) while live sync goes on.
    Start,
    /// Progress: chunks and texts still without the other model's vector, the rate,
    /// the time left, what was sent.
    Status {
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        /// Redraw every second until nothing is missing (Ctrl-C stops).
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Make the new model's vectors the ones applications read, in one transaction,
    /// once every chunk has one (its HNSW index is built first).
    Cutover,
    /// After a cut-over: back to the old model at once, no embedding spent. Before one:
    /// abandon the migration (the new model's vectors are kept for a later start).
    Rollback,
    /// After a cut-over: drop the old model's vectors and index.
    Finish,
}

#[derive(Subcommand)]
enum ErrorsCommand {
    /// Put dead letters back into the outbox once their cause is fixed.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "source", "all"])))]
    Retry {
        /// These dead letters (ids from `kbsync errors`; repeatable).
        #[arg(long)]
        id: Vec<i64>,
        /// Every dead letter of this source.
        #[arg(long)]
        source: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the config and what it names: the embedding models' directories, key
    /// files and variables; with a reachable database, every table and column the
    /// sources use and whether the installed capture is this config's. Prints the
    /// config with secrets redacted and the next reconcile times.
    Check {
        /// Print one line on success (for the systemd unit's ExecStartPre).
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Subcommand)]
enum DemoCommand {
    /// Create the demo tables (idempotent).
    Schema,
    /// Insert the deterministic demo rows (idempotent).
    Data,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A command whose reader went away (`kbsync status | head -1`) ends as other Unix
    // tools do, not with a panic. Not the daemon: a client that hangs up on its HTTP
    // endpoint must not kill it.
    if !matches!(cli.command, Command::Run) {
        sigpipe::reset();
    }
    if let Err(e) = init_logging(cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: tokio-postgres says only "db
/// error" and keeps the server's words in its source, so a database error is told
/// whole (severity, SQLSTATE, message, detail, hint) and the chain stops there.
fn report(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            let whole = kbsync_core::db::describe(pg);
            if !parts.last().is_some_and(|last| last.contains(&whole)) {
                parts.push(whole);
            }
            break;
        }
        let text = cause.to_string();
        if text == "db error" || parts.last().is_some_and(|last| last.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = &cli.config;
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { quiet },
        } => done(config_cmd::check(config, quiet).await),
        Command::Install {
            dry_run,
            reset_embeddings,
        } => done(install_cmd::install(&load(config)?, dry_run, reset_embeddings).await),
        Command::Uninstall {
            dry_run,
            drop_knowledge,
        } => done(uninstall_cmd::uninstall(&load(config)?, dry_run, drop_knowledge).await),
        Command::Adopt(args) => done(adopt_cmd::adopt(&load(config)?, args).await),
        Command::Model { command } => {
            let config = load(config)?;
            done(match command {
                ModelCommand::Plan { json } => model_cmd::plan(&config, json).await,
                ModelCommand::Start => model_cmd::start(&config).await,
                ModelCommand::Status { json, watch } => {
                    model_cmd::status(&config, json, watch).await
                }
                ModelCommand::Cutover => model_cmd::cutover(&config).await,
                ModelCommand::Rollback => model_cmd::rollback(&config).await,
                ModelCommand::Finish => model_cmd::finish(&config).await,
            })
        }
        Command::Run => done(run_cmd::run(config, load(config)?).await),
        Command::Reconcile {
            dry_run,
            force,
            sources,
            tenant,
            json,
        } => {
            let options = kbsync_reconcile::Options {
                dry_run,
                force,
                sources,
                tenant,
                origin: kbsync_reconcile::Origin::Cli,
                queue_only: false,
            };
            reconcile_cmd::reconcile(&load(config)?, options, json).await
        }
        Command::Status { json } => done(status_cmd::status(&load(config)?, json).await),
        Command::Search {
            tenant,
            question,
            k,
            mode,
            source,
            json,
        } => {
            let query = search_cmd::Query {
                tenant,
                text: question,
                k,
                source,
                mode,
                json,
            };
            done(search_cmd::search(&load(config)?, query).await)
        }
        Command::Errors { command, json } => {
            let config = load(config)?;
            done(match command {
                None => errors_cmd::list(&config, json).await,
                Some(ErrorsCommand::Retry { id, source, all }) => {
                    let selection = match (id.is_empty(), source, all) {
                        (false, _, _) => errors_cmd::Selection::Ids(id),
                        (true, Some(s), _) => errors_cmd::Selection::Source(s),
                        (true, None, _) => errors_cmd::Selection::All,
                    };
                    errors_cmd::retry(&config, selection).await
                }
            })
        }
        Command::Embed { text } => done(embed_cmd::embed(&load(config)?, &text).await),
        Command::Demo { command } => {
            let config = load(config)?;
            done(match command {
                DemoCommand::Schema => demo_cmd::schema(&config).await,
                DemoCommand::Data => demo_cmd::data(&config).await,
            })
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

/// Logging to stderr, filtered by `RUST_LOG` when it is set (a filter that does not
/// parse is an error, not a silent fall back to the default).
fn init_logging(format: LogFormat) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(text) if !text.trim().is_empty() => EnvFilter::try_new(&text).map_err(|e| {
            format!("RUST_LOG={text:?} is not a log filter ({e}); e.g. RUST_LOG=info or RUST_LOG=info,kbsync_daemon=debug")
        })?,
        Ok(_) | Err(std::env::VarError::NotPresent) => EnvFilter::new("info,tokio_postgres=warn"),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err("RUST_LOG is not valid UTF-8".to_owned());
        }
    };
    // Colours only for a person at a terminal, never in files or the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
