//! What one sweep is asked to do (`Options`, `Origin`), what its steps share
//! (`Scope`), and how it can fail (`ReconcileError`).

use thiserror::Error;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error(
        "another reconcile sweep is running (one at a time across all daemons and hosts); this one did nothing. Try again when it has finished; `kbsync status` shows it"
    )]
    Busy,
    #[error(
        "kbsync's schema is missing or out of date in this database: run `kbsync install` first"
    )]
    SchemaNotInstalled,
    #[error("{0}")]
    UnknownSource(String),
    #[error(
        "sources.{source_name}: table {table} does not exist (check the config, or create the table)"
    )]
    MissingTable { source_name: String, table: String },
    #[error(
        "sources.{source_name}: tenant_knowledge holds chunks whose source_key is not a valid key of the source table, so kbsync did not write them ({detail}); inspect and delete them by hand"
    )]
    ForeignChunks { source_name: String, detail: String },
    #[error("the sweep was cancelled before it finished; what it did so far stays done")]
    Cancelled,
    #[error("database error: {}", kbsync_core::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    ModelMigration(#[from] kbsync_core::model::migration::ModelMigrationError),
}

/// Who started the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `kbsync reconcile` (by hand, `just reconcile`, or the systemd timer).
    Cli,
    /// The schedule inside `kbsync run`.
    Schedule,
    /// `kbsync install`, for the rows that existed before their capture did.
    Install,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Cli => "cli",
            Origin::Schedule => "schedule",
            Origin::Install => "install",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Report what would be done; change nothing (the run is still recorded).
    pub dry_run: bool,
    /// Delete orphans even past `reconcile.max_delete_fraction`.
    pub force: bool,
    /// Only these sources (empty: all).
    pub sources: Vec<String>,
    /// Only this tenant's rows and chunks.
    pub tenant: Option<String>,
    pub origin: Origin,
    /// Only queue the rows whose chunks are missing or stale; leave orphaned chunks and
    /// parked keys to a full sweep (what `kbsync install` does for the rows that existed
    /// before their capture).
    pub queue_only: bool,
}

/// What every step of one sweep shares.
pub(crate) struct Scope<'a> {
    pub dry_run: bool,
    pub force: bool,
    pub tenant: Option<&'a str>,
    pub range_size: usize,
    pub max_delete_fraction: f64,
    pub cancel: &'a CancellationToken,
}
