//! Test support: a fresh PostgreSQL database per test, and the `kbsync` binary run
//! against it, and an OpenAI-compatible embeddings server. Tests need a real
//! PostgreSQL with pgvector; `just test` starts one.

mod cluster;
mod daemon;
pub mod demo_state;
mod fronts;

pub use cluster::PrivateCluster;
pub use fronts::{PgBouncer, PoolMode, TestCa, TlsFront};
mod installed;
mod openai_server;

pub use installed::Installed;

pub use daemon::{
    DaemonProcess, TEST_API_KEY, local_model_config, sync_config, sync_config_from,
    sync_config_with_max_wait, wait_for, wait_for_daemon,
};

pub use openai_server::{FakeOpenAi, Fault, deterministic_vector};

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// The config shipped at the repository root (the four demo sources, local model).
pub fn shipped_config() -> PathBuf {
    repo_root().join("kbsync.toml")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// The output README.md shows under `$ command` (the lines after it up to the end of
/// its code block, less the indentation of the `$ command` line: a block in a numbered
/// list is indented).
pub fn shown_in_readme(command: &str) -> String {
    let readme = readme();
    let mut lines = readme.lines();
    let prompt = format!("$ {command}");
    let indent = lines
        .by_ref()
        .find(|line| line.trim_start() == prompt)
        .map(|line| line.len() - line.trim_start().len())
        .unwrap_or_else(|| panic!("README.md shows no `{prompt}`"));
    lines
        .take_while(|line| !line.trim_start().starts_with("```"))
        .map(|line| line.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The code block of README.md whose first line is `first_line`, that line included.
pub fn readme_block_starting(first_line: &str) -> String {
    let readme = readme();
    let after = readme
        .split_once(&format!("```toml\n{first_line}\n"))
        .unwrap_or_else(|| panic!("README.md has no toml block starting with {first_line}"))
        .1;
    let body = after
        .split_once("```")
        .expect("the end of the code block")
        .0;
    format!("{first_line}\n{body}")
}

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).expect("README.md")
}

/// The admin URL of the test server, from `DATABASE_URL`. Panics, with the command
/// that fixes it, when it is not set: a test that needs PostgreSQL never skips.
pub fn admin_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "DATABASE_URL is not set: these tests need PostgreSQL with pgvector. Run them with `just test` \
             (it starts a throwaway server), or run `just db` and export the DATABASE_URL it prints"
        ),
    }
}

/// A connection to `url`, driven on its own task; panics with the fix when it fails.
pub async fn connect_url(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to {url}: {e}. Is the test server up? `just db` starts it")
        });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database created for one test, named by a UUID, dropped when the value is dropped.
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let admin = admin_url();
        let name = format!("kbsync_test_{}", uuid::Uuid::new_v4().simple());
        let client = connect_url(&admin).await;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        let mut url = url::Url::parse(&admin).expect("DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        Self {
            name,
            url: url.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn client(&self) -> Client {
        connect_url(&self.url).await
    }

    /// Create the demo tables (the shipped config's sources).
    pub async fn with_demo_schema(self) -> Self {
        self.kbsync(&["demo", "schema"]).assert_success();
        self
    }

    /// Run the kbsync binary against this database with the shipped config.
    pub fn kbsync(&self, args: &[&str]) -> CommandOutput {
        self.kbsync_with_config(&shipped_config(), args)
    }

    pub fn kbsync_with_config(&self, config: &Path, args: &[&str]) -> CommandOutput {
        run_kbsync(config, args, &[("DATABASE_URL", self.url.as_str())])
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = admin_url();
        let name = self.name.clone();
        // Drop runs outside async; use a private runtime on a plain thread.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for dropping the test database");
            rt.block_on(async {
                let client = connect_url(&admin).await;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("warning: could not drop test database {}: {e}", self.name);
        }
    }
}

/// Path of the built `kbsync` binary (built by `cargo test`/`nextest` for the workspace).
pub fn kbsync_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests live in target/<profile>/deps, binaries (the benchmarks) in target/<profile>.
    let mut dir = exe.parent().expect("executable has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let bin = dir.join("kbsync");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p kbsync` (`just test` does)",
        bin.display()
    );
    bin
}

pub struct CommandOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    fn from(output: Output) -> Self {
        Self {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "kbsync failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(
            !self.status.success(),
            "kbsync succeeded but should have failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// libpq's connection variables, which kbsync reads as psql does: never inherited by a
/// test's kbsync from the developer's shell.
pub const LIBPQ_VARIABLES: &[&str] = &[
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
];

/// Run kbsync with a clean environment for the variables it reads.
pub fn run_kbsync(config: &Path, args: &[&str], env: &[(&str, &str)]) -> CommandOutput {
    let mut cmd = std::process::Command::new(kbsync_bin());
    cmd.arg("--config").arg(config).args(args);
    for var in [
        "DATABASE_URL",
        "KBSYNC_DATABASE_URL",
        "KBSYNC_CONFIG",
        "OPENAI_API_KEY",
        "RUST_LOG",
    ]
    .iter()
    .chain(LIBPQ_VARIABLES)
    {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    CommandOutput::from(cmd.output().expect("running the kbsync binary"))
}

/// The edit (for `TempConfig::edited`/`shipped_with`) that switches a config from the
/// shipped trigger capture to logical capture.
pub const LOGICAL_CAPTURE: (&str, &str) = ("mode = \"triggers\"", "mode = \"logical\"");

/// A config file in a temporary directory (removed when dropped).
pub struct TempConfig {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl TempConfig {
    pub fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("kbsync.toml");
        std::fs::write(&path, text).expect("writing the temporary config");
        Self { _dir: dir, path }
    }

    /// The shipped config with `from` replaced by `to` (each must occur).
    pub fn shipped_with(edits: &[(&str, &str)]) -> Self {
        let shipped = shipped_config();
        let mut text = std::fs::read_to_string(&shipped).expect("reading kbsync.toml");
        for (from, to) in edits {
            assert!(text.contains(from), "kbsync.toml has no {from:?}");
            text = text.replacen(from, to, 1);
        }
        // The copy lives elsewhere: its model directory stays the checkout's.
        let checkout = shipped.parent().expect("kbsync.toml has a directory");
        text = text.replace(
            "model_dir = \".kbsync/",
            &format!("model_dir = \"{}/.kbsync/", checkout.display()),
        );
        Self::new(&text)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A copy of this config with `from` replaced by `to` (each must occur).
    pub fn edited(&self, edits: &[(&str, &str)]) -> Self {
        let mut text = std::fs::read_to_string(&self.path).expect("reading the test config");
        for (from, to) in edits {
            assert!(text.contains(from), "the test config has no {from:?}");
            text = text.replacen(from, to, 1);
        }
        Self::new(&text)
    }
}

/// A LISTENing connection that collects notifications, for tests of the wake-ups.
pub struct Listener {
    pub client: Client,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
}

impl Listener {
    pub async fn start(url: &str, channel: &str) -> Self {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("listener connection");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Notifications arrive only through poll_message.
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .expect("LISTEN");
        Self { client, rx }
    }

    /// Every notification that arrives until `quiet` passes without one.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<(String, String)> {
        let mut got = Vec::new();
        while let Ok(Some(n)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            got.push(n);
        }
        got
    }
}
