//! Running `kbsync run` as a real process against a test database, and waiting with
//! deadlines (never bare sleeps) for the state a test expects.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::kbsync_process::kbsync_bin;
use crate::repo::shipped_config;
use crate::temp_config::TempConfig;

/// The model name `sync_config` gives the test server.
pub const TEST_MODEL: &str = "test-embedding";

/// The API key the daemon is given in tests; asserted never to appear in logs.
pub const TEST_API_KEY: &str = "sk-test-0123456789abcdef";

/// The shipped config pointed at an OpenAI-compatible server, every debounce window
/// set to `window` and the delete windows to `delete_window`, a short claim lease and
/// fallback poll so crash tests converge quickly, and 2 attempts before a key is parked.
pub fn sync_config(base_url: &str, dims: usize, window: &str, delete_window: &str) -> TempConfig {
    sync_config_with_max_wait(base_url, dims, window, delete_window, "30s")
}

/// `sync_config` with every source's max_wait set too.
pub fn sync_config_with_max_wait(
    base_url: &str,
    dims: usize,
    window: &str,
    delete_window: &str,
    max_wait: &str,
) -> TempConfig {
    test_config(
        &shipped_config(),
        &openai_section(base_url, dims),
        window,
        delete_window,
        max_wait,
    )
}

/// `sync_config` made from another config file than the shipped one (an example's).
pub fn sync_config_from(
    base: &Path,
    base_url: &str,
    dims: usize,
    window: &str,
    delete_window: &str,
) -> TempConfig {
    test_config(
        base,
        &openai_section(base_url, dims),
        window,
        delete_window,
        "30s",
    )
}

fn openai_section(base_url: &str, dims: usize) -> String {
    format!(
        "[embedding]\nprovider = \"openai\"\nmodel = \"{TEST_MODEL}\"\ndimensions = {dims}\nbase_url = \"{base_url}\"\nmax_inputs_per_request = 64\nrequest_timeout = \"10s\"\nmax_concurrency = 2\n\n"
    )
}

/// The shipped config with its offline local model (all-MiniLM-L6-v2, fetched by
/// `just model`) and the test windows, lease and poll of `sync_config`.
pub fn local_model_config(window: &str) -> TempConfig {
    let dir = crate::repo::repo_root().join(".kbsync/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run `just model` (`just test` does)",
        dir.display()
    );
    let embedding = format!(
        "[embedding]\nprovider = \"local\"\nmodel = \"all-MiniLM-L6-v2\"\ndimensions = 384\nmodel_dir = \"{}\"\n\n",
        dir.display()
    );
    test_config(&shipped_config(), &embedding, window, window, "30s")
}

/// The `base` config, line by line, with `embedding` as its [embedding] section.
fn test_config(
    base: &Path,
    embedding: &str,
    window: &str,
    delete_window: &str,
    max_wait: &str,
) -> TempConfig {
    let text =
        std::fs::read_to_string(base).unwrap_or_else(|e| panic!("reading {}: {e}", base.display()));
    let mut out = String::new();
    let mut skipping_embedding = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            skipping_embedding = trimmed == "[embedding]";
            if skipping_embedding {
                out.push_str(embedding);
                continue;
            }
        }
        if skipping_embedding {
            continue;
        }
        let line = if trimmed.starts_with("debounce =") {
            format!("debounce = \"{window}\"\nmax_wait = \"{max_wait}\"")
        } else if trimmed.starts_with("delete_debounce =") {
            format!("delete_debounce = \"{delete_window}\"")
        } else if trimmed.starts_with("claim_lease =") {
            "claim_lease = \"10s\"".to_owned()
        } else if trimmed.starts_with("fallback_poll =") {
            "fallback_poll = \"1s\"".to_owned()
        } else if trimmed.starts_with("max_attempts =") {
            "max_attempts = 2".to_owned()
        } else if trimmed.starts_with("listen =") {
            // Parallel tests: any free port; `DaemonProcess::http_address` finds it.
            "listen = \"127.0.0.1:0\"".to_owned()
        } else if trimmed.starts_with("enabled =") {
            // No scheduled sweeps unless a test asks for them (`TempConfig::edited`).
            "enabled = false".to_owned()
        } else if trimmed.starts_with("drain_timeout =") {
            "drain_timeout = \"20s\"".to_owned()
        } else {
            line.to_owned()
        };
        out.push_str(&line);
        out.push('\n');
    }
    TempConfig::new(&out)
}

/// The log filter of a test's daemon: each batch at debug, for the log a failing test
/// prints.
const TEST_LOG_FILTER: &str = "info,kbsync_daemon=debug";

/// What the listener logs once its LISTEN has taken effect.
const LISTENER_LISTENING: &str = "kbsync_daemon::listener: listening";

/// A `kbsync run` process; killed when dropped. Its stderr goes to a log file.
pub struct DaemonProcess {
    child: Child,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl DaemonProcess {
    pub fn start(config: &Path, database_url: &str) -> Self {
        Self::start_with_env(config, &[("DATABASE_URL", database_url)])
    }

    /// `start` with these variables for the database instead of `DATABASE_URL` (libpq's
    /// `PG*` variables, say).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn(config, env, Some(TEST_LOG_FILTER))
    }

    /// `start` with the log level `kbsync run` ships with (no `RUST_LOG`): for benchmarks,
    /// which measure what production runs. A test's daemon logs each batch at debug, and
    /// that filter names the daemon crate's log target: two builds compared side by side
    /// across a rename of that crate would not log the same.
    pub fn start_as_shipped(config: &Path, database_url: &str) -> Self {
        Self::spawn(config, &[("DATABASE_URL", database_url)], None)
    }

    fn spawn(config: &Path, env: &[(&str, &str)], log_filter: Option<&str>) -> Self {
        let log_dir = tempfile::tempdir().expect("a directory for the daemon log");
        let log = log_dir.path().join("kbsync.log");
        let stderr = std::fs::File::create(&log).expect("daemon log file");
        let mut command = Command::new(kbsync_bin());
        command
            .env_remove("KBSYNC_DATABASE_URL")
            .env_remove("DATABASE_URL");
        for var in crate::kbsync_process::LIBPQ_VARIABLES {
            command.env_remove(var);
        }
        command
            .envs(env.iter().copied())
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("OPENAI_API_KEY", TEST_API_KEY);
        // The one place the daemon's log filter is decided: a RUST_LOG of the caller's
        // environment would otherwise leak in.
        match log_filter {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting kbsync run");
        Self {
            child,
            log,
            _log_dir: log_dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        // Also called on a daemon that already exited (a test's cleanup after a crash it
        // provoked): an error here only says it is gone, which is what was wanted.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit (at most `within`); returns the exit status.
    /// Async so that servers on the test's runtime keep answering meanwhile.
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        // The exit is what is checked, below: a kill that failed shows as a timeout there.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.exit_within(within).await
    }

    /// The address of the HTTP endpoint, read from the start-up log line (the test
    /// configs listen on port 0).
    pub async fn http_address(&self) -> String {
        wait_for(
            Duration::from_secs(30),
            "the http endpoint's address in the log",
            || async {
                self.log()
                    .lines()
                    .find(|l| l.contains("http endpoint listening"))
                    .and_then(|l| l.split("address=").nth(1))
                    .map(|rest| rest.split_whitespace().next().unwrap_or(rest).to_owned())
            },
        )
        .await
    }

    /// Wait until the listener's LISTEN has taken effect `times` times (1: started; a
    /// reconnect adds one). The HTTP endpoint's start-up line ("http endpoint
    /// listening") comes first and must not count: only the listener's own line does.
    pub async fn wait_until_listening(&self, times: usize, within: Duration) {
        wait_for_daemon(self, within, "the listener's LISTEN", || async {
            (self.log().matches(LISTENER_LISTENING).count() >= times).then_some(())
        })
        .await
    }

    /// GET `path` from the daemon's HTTP endpoint: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.http_address().await);
        let response = reqwest::get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}\n{}", self.log()));
        let status = response.status().as_u16();
        (status, response.text().await.expect("the response body"))
    }

    /// POST `body` as JSON to `path`, with `token` as the bearer token when given:
    /// (status, the JSON answer).
    pub async fn http_post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let url = format!("http://{}{path}", self.http_address().await);
        let mut request = reqwest::Client::new().post(&url).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}\n{}", self.log()));
        let status = response.status().as_u16();
        let text = response.text().await.expect("the response body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {url} answered {status} with no JSON ({e}): {text}"));
        (status, json)
    }

    /// Send a signal by name (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Wait (at most `within`) for the process to end by itself: a daemon that must
    /// refuse to start.
    pub async fn exit_within(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kbsync did not exit within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, check).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// `wait_for`, and on timeout the panic shows the end of `daemon`'s log.
pub async fn wait_for_daemon<T, F, Fut>(
    daemon: &DaemonProcess,
    timeout: Duration,
    what: &str,
    check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, check).await {
        Some(value) => value,
        None => {
            let log = daemon.log();
            let tail: String = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("timed out after {timeout:?} waiting for {what}; the daemon log ends:\n{tail}")
        }
    }
}

async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
