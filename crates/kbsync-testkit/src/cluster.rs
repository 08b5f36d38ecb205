//! A private PostgreSQL cluster for tests that stop and restart the server, so the
//! shared test server is never disturbed. Uses scripts/pg.sh with its own state dir
//! and port, and the binaries the shared server uses.

use std::path::PathBuf;
use std::process::Command;

use crate::repo::repo_root;

pub struct PrivateCluster {
    state: PathBuf,
    port: u16,
    pub url: String,
}

fn pg_sh(state: &PathBuf, port: u16, bin: Option<&str>, action: &str) -> std::process::Output {
    let mut cmd = Command::new(repo_root().join("scripts/pg.sh"));
    cmd.arg(action)
        .env("KBSYNC_STATE_DIR", state)
        .env("KBSYNC_PG_PORT", port.to_string());
    // A cluster marked durable keeps fsync on across restarts too.
    if state.join("durable").exists() {
        cmd.env("KBSYNC_PG_FSYNC", "on");
    }
    if let Ok(level) = std::fs::read_to_string(state.join("wal_level")) {
        cmd.env("KBSYNC_PG_WAL_LEVEL", level.trim());
    }
    if let Some(bin) = bin {
        cmd.env("KBSYNC_PG_BIN", bin);
    }
    cmd.output().expect("running scripts/pg.sh")
}

/// The PostgreSQL major scripts/pg.sh runs (its `KBSYNC_PG_MAJOR`, 18 unless set): its
/// data and socket directories are named after it.
fn pg_major() -> String {
    // Unset means pg.sh's own default, 18: the directories pg.sh makes, not a guess.
    std::env::var("KBSYNC_PG_MAJOR").unwrap_or_else(|_| "18".to_owned())
}

impl PrivateCluster {
    pub fn start() -> Self {
        Self::start_with(false, None)
    }

    /// With fsync on, as a production server runs (the shared test server has it off).
    pub fn start_durable() -> Self {
        Self::start_with(true, None)
    }

    /// With another `wal_level` than the scripts' `logical` (e.g. "replica").
    pub fn start_with_wal_level(level: &str) -> Self {
        Self::start_with(false, Some(level))
    }

    fn start_with(durable: bool, wal_level: Option<&str>) -> Self {
        let bindir = Command::new(repo_root().join("scripts/pg.sh"))
            .arg("bindir")
            .output()
            .expect("scripts/pg.sh bindir");
        assert!(
            bindir.status.success(),
            "scripts/pg.sh bindir failed: {}",
            String::from_utf8_lossy(&bindir.stderr)
        );
        let bindir = String::from_utf8_lossy(&bindir.stdout).trim().to_owned();
        // Under the repo's .kbsync (world-traversable), so that the unprivileged
        // server user can reach it when the tests run as root.
        let state = repo_root()
            .join(".kbsync/test-clusters")
            .join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&state).expect("cluster state dir");
        if durable {
            std::fs::write(state.join("durable"), "fsync on\n").expect("durable marker");
        }
        if let Some(level) = wal_level {
            std::fs::write(state.join("wal_level"), level).expect("wal_level marker");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let out = pg_sh(&state, port, Some(&bindir), "start");
        if !out.status.success() {
            // Best-effort tidying before the panic that reports the real failure.
            let _ = std::fs::remove_dir_all(&state);
            panic!(
                "private cluster did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Self { state, port, url }
    }

    fn bindir(&self) -> String {
        let out = Command::new(repo_root().join("scripts/pg.sh"))
            .arg("bindir")
            .output()
            .expect("pg.sh bindir");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn control(&self, action: &str) {
        let out = pg_sh(&self.state, self.port, Some(&self.bindir()), action);
        assert!(
            out.status.success(),
            "{action} of the private cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop(&self) {
        self.control("stop");
    }

    pub fn restart(&self) {
        self.control("start");
    }

    /// A cluster whose `postgres` database has the demo tables and kbsync installed
    /// with `config`; and that database's URL.
    pub fn with_demo_schema(config: &crate::temp_config::TempConfig) -> (Self, String) {
        let cluster = Self::start();
        let url = cluster.database_url("postgres");
        for args in [&["demo", "schema"][..], &["install"]] {
            crate::kbsync_process::run_kbsync(
                config.path(),
                args,
                &[("DATABASE_URL", url.as_str())],
            )
            .assert_success();
        }
        (cluster, url)
    }

    /// From now on `role` logs in over TCP with its password (SCRAM), as on a managed
    /// server; the cluster's own superuser keeps trust.
    pub fn require_password_for(&self, role: &str) {
        let hba = self.state.join(format!("pgdata{}/pg_hba.conf", pg_major()));
        let rules = std::fs::read_to_string(&hba).expect("reading pg_hba.conf");
        let first = format!("host all {role} 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(&hba, format!("{first}{rules}")).expect("writing pg_hba.conf");
        self.control("reload");
    }

    /// The directory of the cluster's Unix socket, and its port.
    pub fn socket(&self) -> (PathBuf, u16) {
        (self.state.join(format!("pgrun{}", pg_major())), self.port)
    }

    /// URL of database `name` on this cluster.
    pub fn database_url(&self, name: &str) -> String {
        let mut url = url::Url::parse(&self.url).expect("cluster URL");
        url.set_path(&format!("/{name}"));
        url.to_string()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Drop cannot report, and a test that already failed must keep its own message;
        // a cluster left behind stays under .kbsync/test-clusters, where it can be looked at.
        let _ = pg_sh(&self.state, self.port, Some(&self.bindir()), "stop");
        let _ = std::fs::remove_dir_all(&self.state);
    }
}
