//! `kbsync`: the daemon and its command-line interface.

mod config_cmd;
mod demo_cmd;
mod embed_cmd;
mod install_cmd;
mod run_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
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
    /// Create or upgrade kbsync's schema and the capture triggers of the configured sources.
    Install {
        /// Print the SQL that would run and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Accept a change of embedding dimension: clears every embedding (chunk texts
        /// are kept) so that `kbsync reconcile` re-embeds them with the new model.
        #[arg(long)]
        reset_embeddings: bool,
    },
    /// Run the daemon: capture changes from the outbox and keep tenant_knowledge in sync.
    Run,
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
enum ConfigCommand {
    /// Validate the config, print it with secrets redacted, and the next reconcile times.
    Check,
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
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check,
        } => config_cmd::check(&cli.config),
        Command::Install {
            dry_run,
            reset_embeddings,
        } => install_cmd::install(&load(&cli.config)?, dry_run, reset_embeddings).await,
        Command::Run => run_cmd::run(load(&cli.config)?).await,
        Command::Embed { text } => embed_cmd::embed(&load(&cli.config)?, &text).await,
        Command::Demo { command } => {
            let config = load(&cli.config)?;
            match command {
                DemoCommand::Schema => demo_cmd::schema(&config).await,
                DemoCommand::Data => demo_cmd::data(&config).await,
            }
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

/// Connect to the configured database, with an error that says where the URL comes from.
async fn connect(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let url = config
        .database_url()
        .ok_or(kbsync_core::db::DbError::NoUrl)?;
    let (client, _connection) = kbsync_core::db::connect(&url)
        .await
        .context("connecting to the database (is it running? `just db` starts a local one)")?;
    Ok(client)
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
