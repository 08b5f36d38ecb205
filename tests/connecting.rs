//! Connecting the way users connect: a failure says why, once, in the daemon's log and in
//! a command's error; what waiting cannot fix stops the daemon; libpq's `PG*` variables,
//! a password file and a Unix socket work as they do for psql; a closed pipe ends a
//! command quietly.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, PrivateCluster, TestDb, connect_url, run_kbsync, sync_config,
    wait_for_daemon,
};

const DIMS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

/// A cluster with the demo schema and kbsync installed, where role `app` (password
/// `right`, owner of the database `shop`) must log in with its password over TCP.
struct PasswordCluster {
    cluster: PrivateCluster,
    // Answers the embedding requests while the cluster is used.
    _server: FakeOpenAi,
    config: kbsync_testkit::TempConfig,
}

impl PasswordCluster {
    async fn start() -> Self {
        let server = FakeOpenAi::start(DIMS).await;
        let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
        let cluster = PrivateCluster::start();
        let admin = connect_url(&cluster.database_url("postgres")).await;
        admin
            .batch_execute("CREATE ROLE app LOGIN PASSWORD 'right'")
            .await
            .unwrap();
        admin
            .batch_execute("CREATE DATABASE shop OWNER app")
            .await
            .unwrap();
        // The administrator's one step on a managed server.
        connect_url(&cluster.database_url("shop"))
            .await
            .batch_execute("CREATE EXTENSION vector")
            .await
            .unwrap();
        cluster.require_password_for("app");
        let this = Self {
            cluster,
            _server: server,
            config,
        };
        for args in [&["demo", "schema"][..], &["install"]] {
            this.kbsync(args, &[("DATABASE_URL", &this.url("right"))])
                .assert_success();
        }
        this
    }

    /// `app@127.0.0.1:PORT/shop` with `password`.
    fn url(&self, password: &str) -> String {
        let mut url = url::Url::parse(&self.cluster.database_url("shop")).unwrap();
        url.set_username("app").unwrap();
        url.set_password(Some(password)).unwrap();
        url.to_string()
    }

    fn url_without_password(&self) -> String {
        let mut url = url::Url::parse(&self.url("x")).unwrap();
        url.set_password(None).unwrap();
        url.to_string()
    }

    fn port(&self) -> String {
        self.cluster.socket().1.to_string()
    }

    fn kbsync(&self, args: &[&str], env: &[(&str, &str)]) -> kbsync_testkit::CommandOutput {
        run_kbsync(self.config.path(), args, env)
    }
}

/// A port on 127.0.0.1 that nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_wrong_password_says_so_once_and_stops_the_daemon() {
    let c = PasswordCluster::start().await;
    let wrong = c.url("wrong");
    let out = c.kbsync(&["status"], &[("DATABASE_URL", &wrong)]);
    out.assert_failure();
    let cause = "password authentication failed for user \"app\"";
    assert_eq!(out.stderr.matches(cause).count(), 1, "{}", out.stderr);
    assert!(
        !out.stderr.contains("wrong"),
        "the password leaked: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("just db"), "{}", out.stderr);
    assert!(!out.stderr.contains("db error"), "{}", out.stderr);

    let mut daemon = DaemonProcess::start(c.config.path(), &wrong);
    let status = daemon.exit_within(WAIT).await;
    assert!(!status.success());
    let log = daemon.log();
    assert_eq!(log.matches(cause).count(), 1, "{log}");
    assert!(
        !log.contains("retrying"),
        "a wrong password is not waited for: {log}"
    );
}

#[tokio::test]
async fn an_unknown_database_says_so_once_and_stops_the_daemon() {
    let db = TestDb::create().await;
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let mut url = url::Url::parse(db.url()).unwrap();
    url.set_path("/no_such_database");
    let cause = "database \"no_such_database\" does not exist";
    let out = run_kbsync(
        config.path(),
        &["status"],
        &[("DATABASE_URL", url.as_str())],
    );
    out.assert_failure();
    assert_eq!(out.stderr.matches(cause).count(), 1, "{}", out.stderr);
    assert!(!out.stderr.contains("just db"), "{}", out.stderr);

    let mut daemon = DaemonProcess::start(config.path(), url.as_str());
    let status = daemon.exit_within(WAIT).await;
    assert!(!status.success());
    assert_eq!(daemon.log().matches(cause).count(), 1, "{}", daemon.log());
}

#[tokio::test]
async fn a_refused_connection_is_retried_with_its_cause() {
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let url = format!("postgres://app@127.0.0.1:{}/shop", closed_port());
    let out = run_kbsync(config.path(), &["status"], &[("DATABASE_URL", &url)]);
    out.assert_failure();
    assert_eq!(
        out.stderr.matches("Connection refused").count(),
        1,
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("app@127.0.0.1"), "{}", out.stderr);

    let mut daemon = DaemonProcess::start(config.path(), &url);
    let line = wait_for_daemon(&daemon, WAIT, "two start-up retries", || async {
        let log = daemon.log();
        let retries: Vec<String> = log
            .lines()
            .filter(|l| l.contains("database unavailable at start; retrying"))
            .map(str::to_owned)
            .collect();
        (retries.len() >= 2).then(|| retries[0].clone())
    })
    .await;
    assert_eq!(line.matches("Connection refused").count(), 1, "{line}");
    assert!(
        daemon.exited().is_none(),
        "waiting can fix a refused connection"
    );
}

#[tokio::test]
async fn libpq_variables_a_password_file_and_a_unix_socket_connect() {
    let c = PasswordCluster::start().await;
    let port = c.port();
    // PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD and no URL at all.
    let env = [
        ("PGHOST", "127.0.0.1"),
        ("PGPORT", port.as_str()),
        ("PGUSER", "app"),
        ("PGDATABASE", "shop"),
        ("PGPASSWORD", "right"),
    ];
    let out = c.kbsync(&["status"], &env);
    out.assert_success();
    assert!(out.stdout.contains("faq"), "{}", out.stdout);

    // The daemon too, on the same variables.
    let daemon = DaemonProcess::start_with_env(c.config.path(), &env);
    daemon.wait_until_listening(1, WAIT).await;

    // A password file, as PGPASSFILE names it and as ~/.pgpass.
    let dir = tempfile::tempdir().unwrap();
    let pgpass = dir.path().join(".pgpass");
    std::fs::write(
        &pgpass,
        format!("# kbsync test\n127.0.0.1:{port}:shop:app:right\n"),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let url = c.url_without_password();
    let out = c.kbsync(&["status"], &[("DATABASE_URL", &url)]);
    out.assert_failure();
    assert!(out.stderr.contains("password"), "{}", out.stderr);
    let passfile = pgpass.to_str().unwrap();
    c.kbsync(
        &["status"],
        &[("DATABASE_URL", &url), ("PGPASSFILE", passfile)],
    )
    .assert_success();
    let home = dir.path().to_str().unwrap();
    c.kbsync(&["status"], &[("DATABASE_URL", &url), ("HOME", home)])
        .assert_success();

    // A Unix socket: the URL with no host and the socket directory in PGHOST, and the
    // directory in the URL itself. The cluster's own superuser may use the socket.
    let (socket_dir, port_number) = c.cluster.socket();
    let superuser = url::Url::parse(&c.cluster.url)
        .unwrap()
        .username()
        .to_owned();
    let socket = socket_dir.to_str().unwrap();
    c.kbsync(
        &["status"],
        &[
            ("DATABASE_URL", "postgres:///shop"),
            ("PGHOST", socket),
            ("PGPORT", &port_number.to_string()),
            ("PGUSER", &superuser),
        ],
    )
    .assert_success();
    let in_url = format!("postgresql:///shop?host={socket}&port={port_number}&user={superuser}");
    c.kbsync(&["status"], &[("DATABASE_URL", &in_url)])
        .assert_success();
}

#[tokio::test]
async fn a_closed_pipe_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let db = TestDb::create().await.with_demo_schema().await;
    db.kbsync(&["install"]).assert_success();
    for args in [&["status"][..], &["config", "check"], &["errors"]] {
        // The reader is gone before kbsync writes its first line.
        let mut child = std::process::Command::new(kbsync_testkit::kbsync_bin())
            .arg("--config")
            .arg(kbsync_testkit::shipped_config())
            .args(args)
            .env("DATABASE_URL", db.url())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        // Ended by SIGPIPE, as `yes | head -1` ends `yes`; a panic exits with 101.
        assert_eq!(
            out.status.signal(),
            Some(13),
            "{args:?}: {:?} {stderr}",
            out.status
        );
    }
    // And as people type it.
    let script = format!(
        "{} --config {} status | head -1",
        kbsync_testkit::kbsync_bin().display(),
        kbsync_testkit::shipped_config().display()
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("source"),
        "{out:?}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{out:?}"
    );
}
