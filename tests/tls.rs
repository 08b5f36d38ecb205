//! Connecting as users connect to a managed database: over TLS with the certificate
//! verified (`sslmode=verify-full`), through PgBouncer in session mode requiring TLS and
//! SCRAM, as an ordinary role that owns its database; the failures a team meets first
//! (another CA, another host name, no TLS) each named; logical capture over TLS through
//! a front that carries replication; a transaction-mode pooler refused with what to do.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::Duration;

use kbsync_testkit::demo_state::converged;
use kbsync_testkit::{
    DaemonProcess, FakeOpenAi, LOGICAL_CAPTURE, PgBouncer, PoolMode, TEST_API_KEY, TempConfig,
    TestCa, TlsFront, admin_url, connect_url, run_kbsync, sync_config,
};

const DIMS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "s3cret-pw";

/// A database owned by a role of its own (no SUPERUSER, CREATEROLE or REPLICATION
/// unless asked), with the extension an administrator created: what a managed service
/// gives a team. Both are dropped with it.
struct OwnedDatabase {
    name: String,
    role: String,
}

impl OwnedDatabase {
    async fn create(replication: bool) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("kbsync_tls_{id}");
        let role = format!("app_{}", &id[..12]);
        let admin = connect_url(&admin_url()).await;
        admin
            .batch_execute(&format!(
                "CREATE ROLE \"{role}\" LOGIN PASSWORD '{PASSWORD}' NOSUPERUSER NOCREATEROLE {}",
                if replication {
                    "REPLICATION"
                } else {
                    "NOREPLICATION"
                }
            ))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\" OWNER \"{role}\""))
            .await
            .unwrap();
        // The administrator's one step.
        connect_url(&self_url(&name))
            .await
            .batch_execute("CREATE EXTENSION vector")
            .await
            .unwrap();
        Self { name, role }
    }

    /// The database as the administrator reaches it directly (for the test's checks).
    fn admin_url(&self) -> String {
        self_url(&self.name)
    }

    /// The database through `port` on `host`, as the role, with `params`.
    fn url(&self, host: &str, port: u16, params: &str) -> String {
        format!(
            "postgres://{}:{PASSWORD}@{host}:{port}/{}{}",
            self.role, self.name, params
        )
    }
}

fn self_url(database: &str) -> String {
    let mut url = url::Url::parse(&admin_url()).unwrap();
    url.set_path(&format!("/{database}"));
    url.to_string()
}

fn server_port() -> u16 {
    url::Url::parse(&admin_url())
        .unwrap()
        .port()
        .expect("DATABASE_URL names a port")
}

impl Drop for OwnedDatabase {
    fn drop(&mut self) {
        let (name, role) = (self.name.clone(), self.role.clone());
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let admin = connect_url(&admin_url()).await;
                    admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await?;
                    admin
                        .batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\""))
                        .await
                })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("warning: could not drop {} / {}: {e}", self.name, self.role);
        }
    }
}

/// `db` behind PgBouncer (TLS required, SCRAM) in `mode`: the CA, the pooler, and the
/// role's `sslmode=verify-full` URL through it.
fn behind_pgbouncer(db: &OwnedDatabase, mode: PoolMode) -> (TestCa, PgBouncer, String) {
    let ca = TestCa::new("kbsync test CA", &["localhost"]);
    let bouncer = PgBouncer::start(server_port(), &ca, mode, &[(&db.role, PASSWORD)]);
    let url = db.url(
        "localhost",
        bouncer.port,
        &format!(
            "?sslmode=verify-full&sslrootcert={}",
            ca.ca_file().display()
        ),
    );
    (ca, bouncer, url)
}

fn kbsync(config: &TempConfig, url: &str, args: &[&str]) -> kbsync_testkit::CommandOutput {
    run_kbsync(
        config.path(),
        args,
        &[("DATABASE_URL", url), ("OPENAI_API_KEY", TEST_API_KEY)],
    )
}

#[tokio::test]
async fn verify_full_through_pgbouncer_as_an_ordinary_role_syncs_and_every_command_works() {
    let db = OwnedDatabase::create(false).await;
    let (_ca, _bouncer, url) = behind_pgbouncer(&db, PoolMode::Session);
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    for args in [&["demo", "schema"][..], &["demo", "data"]] {
        kbsync(&config, &url, args).assert_success();
    }
    let check = kbsync(&config, &url, &["config", "check", "--quiet"]);
    check.assert_success();
    assert!(
        check
            .stdout
            .contains("every table and column the sources use exists"),
        "{}",
        check.stdout
    );
    let install = kbsync(&config, &url, &["install"]);
    install.assert_success();
    assert!(
        install.stdout.contains("queued for the daemon"),
        "{}",
        install.stdout
    );

    let daemon = DaemonProcess::start(config.path(), &url);
    let client = connect_url(&db.admin_url()).await;
    converged(&client, &daemon).await;
    // An edit through the pooler is synced too (the capture's wake-up crosses it).
    let edit = connect_url(&db.admin_url()).await;
    edit.batch_execute(
        "UPDATE web_knowledge_product SET description = description || ' Now waterproof.'
          WHERE id = (SELECT id FROM web_knowledge_product ORDER BY id LIMIT 1)",
    )
    .await
    .unwrap();
    converged(&client, &daemon).await;

    let status = kbsync(&config, &url, &["status"]);
    status.assert_success();
    assert!(
        status.stdout.contains("daemons: 1 running"),
        "{}",
        status.stdout
    );
    let search = kbsync(
        &config,
        &url,
        &["search", "--tenant", "1", "--mode", "text", "headlamp"],
    );
    search.assert_success();
    assert!(search.stdout.contains("headlamp"), "{}", search.stdout);
    kbsync(&config, &url, &["reconcile", "--dry-run"]).assert_success();
    kbsync(&config, &url, &["reconcile"]).assert_success();
    kbsync(&config, &url, &["errors"]).assert_success();
    kbsync(&config, &url, &["errors", "retry", "--all"]).assert_success();
    // The SQL function, as the role, through the pooler.
    let (role_client, connection) = kbsync_core::db::connection_settings(&url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    tokio::spawn(connection);
    let hits: i64 = role_client
        .query_one(
            "SELECT count(*) FROM kbsync.search('1', 'headlamp', NULL, 3, 'text')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(hits, 3);
    let mut daemon = daemon;
    assert!(daemon.terminate(WAIT).await.success(), "{}", daemon.log());
    let all = format!("{}{}{}", install.stdout, status.stdout, daemon.log());
    assert!(!all.contains(PASSWORD), "the password leaked");

    // And out again: nothing of kbsync is left on the application's tables.
    let removed = kbsync(&config, &url, &["uninstall"]);
    removed.assert_success();
    assert!(
        removed.stdout.contains("tenant_knowledge is kept"),
        "{}",
        removed.stdout
    );
    let left: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'kbsync\\_%')
                  + (SELECT count(*) FROM pg_namespace WHERE nspname = 'kbsync')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    edit.batch_execute("UPDATE web_knowledge_product SET price = price + 1")
        .await
        .unwrap();
    kbsync(&config, &url, &["uninstall", "--drop-knowledge"]).assert_success();
    let knowledge: bool = client
        .query_one("SELECT to_regclass('public.tenant_knowledge') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(knowledge, "tenant_knowledge was not dropped");
}

#[tokio::test]
async fn tls_failures_name_their_cause_and_pgssl_variables_work_as_the_url() {
    let db = OwnedDatabase::create(false).await;
    let ca = TestCa::new("kbsync test CA", &["localhost"]);
    let other = TestCa::new("another CA", &["localhost"]);
    let bouncer = PgBouncer::start(
        server_port(),
        &ca,
        PoolMode::Session,
        &[(&db.role, PASSWORD)],
    );
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    let verify_full = |host: &str, ca: &TestCa| {
        db.url(
            host,
            bouncer.port,
            &format!(
                "?sslmode=verify-full&sslrootcert={}",
                ca.ca_file().display()
            ),
        )
    };
    kbsync(&config, &verify_full("localhost", &ca), &["demo", "schema"]).assert_success();

    let cases = [
        (
            verify_full("localhost", &other),
            "not signed by a CA in sslrootcert",
        ),
        (
            verify_full("127.0.0.1", &ca),
            "does not name the host in the URL",
        ),
        (
            db.url("localhost", bouncer.port, "?sslmode=disable"),
            "accepts only TLS connections",
        ),
        // PgBouncer reports a wrong password as 08P01 "SASL authentication failed", a
        // protocol violation, not PostgreSQL's 28P01.
        (
            verify_full("localhost", &ca).replace(PASSWORD, "not-the-password"),
            "check the user name and password",
        ),
    ];
    for (url, cause) in &cases {
        let out = kbsync(&config, url, &["status"]);
        out.assert_failure();
        assert!(out.stderr.contains(cause), "{url}: {}", out.stderr);
        assert!(!out.stderr.contains("just db"), "{}", out.stderr);
        assert!(
            !out.stderr.contains(PASSWORD),
            "the password leaked: {}",
            out.stderr
        );
        // The daemon does not wait for what waiting cannot fix.
        let mut daemon = DaemonProcess::start(config.path(), url);
        assert!(!daemon.exit_within(WAIT).await.success());
        assert!(daemon.log().contains(cause), "{}", daemon.log());
    }

    // PGSSLMODE and PGSSLROOTCERT, as the URL parameters.
    let plain_url = db.url("localhost", bouncer.port, "");
    let ca_file = ca.ca_file();
    let with = |mode: &str, root: &str| {
        run_kbsync(
            config.path(),
            &["install"],
            &[
                ("DATABASE_URL", plain_url.as_str()),
                ("PGSSLMODE", mode),
                ("PGSSLROOTCERT", root),
            ],
        )
    };
    with("verify-full", ca_file.to_str().unwrap()).assert_success();
    let out = with("verify-full", other.ca_file().to_str().unwrap());
    out.assert_failure();
    assert!(
        out.stderr.contains("not signed by a CA in sslrootcert"),
        "{}",
        out.stderr
    );
}

// Several threads: the front runs on this runtime while the kbsync commands block one.
#[tokio::test(flavor = "multi_thread")]
async fn logical_capture_syncs_over_tls_through_a_front_that_carries_replication() {
    let db = OwnedDatabase::create(true).await;
    let ca = TestCa::new("kbsync test CA", &["localhost"]);
    let front = TlsFront::start(server_port(), &ca).await;
    let url = db.url(
        "localhost",
        front.port,
        &format!(
            "?sslmode=verify-full&sslrootcert={}",
            ca.ca_file().display()
        ),
    );
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms").edited(&[LOGICAL_CAPTURE]);
    for args in [&["demo", "schema"][..], &["install"], &["demo", "data"]] {
        kbsync(&config, &url, args).assert_success();
    }
    // A plain connection is refused by the front, as by a server that requires TLS.
    let plain = kbsync(
        &config,
        &db.url("localhost", front.port, "?sslmode=disable"),
        &["status"],
    );
    assert!(
        plain.stderr.contains("accepts only TLS connections"),
        "{}",
        plain.stderr
    );

    let daemon = DaemonProcess::start(config.path(), &url);
    let client = connect_url(&db.admin_url()).await;
    converged(&client, &daemon).await;
    // The changes came through the slot, decoded over the TLS front.
    let decoded: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'kbsync-decoder'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(decoded, 1, "{}", daemon.log());
}

#[tokio::test]
async fn a_transaction_mode_pooler_is_refused_with_what_to_change() {
    let db = OwnedDatabase::create(false).await;
    let (_ca, _bouncer, url) = behind_pgbouncer(&db, PoolMode::Transaction);
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms");
    // Installed directly (install, too, takes a session lock).
    let direct = db.url("127.0.0.1", server_port(), "?sslmode=disable");
    for args in [&["demo", "schema"][..], &["install"]] {
        kbsync(&config, &direct, args).assert_success();
    }
    let mut daemon = DaemonProcess::start(config.path(), &url);
    assert!(!daemon.exit_within(WAIT).await.success());
    let log = daemon.log();
    assert!(
        log.contains("does not keep a session") && log.contains("pool_mode = session"),
        "{log}"
    );
}

#[tokio::test]
async fn logical_capture_names_the_rights_an_ordinary_role_lacks() {
    let db = OwnedDatabase::create(false).await;
    let server = FakeOpenAi::start(DIMS).await;
    let config = sync_config(&server.base_url(), DIMS, "100ms", "100ms").edited(&[LOGICAL_CAPTURE]);
    let direct = db.url("127.0.0.1", server_port(), "?sslmode=disable");
    kbsync(&config, &direct, &["demo", "schema"]).assert_success();
    let out = kbsync(&config, &direct, &["install"]);
    out.assert_failure();
    assert!(
        out.stderr
            .contains("needs a role with the REPLICATION attribute")
            && out
                .stderr
                .contains(&format!("ALTER ROLE \"{}\" WITH REPLICATION", db.role)),
        "{}",
        out.stderr
    );
    let admin = connect_url(&admin_url()).await;
    admin
        .batch_execute(&format!("ALTER ROLE \"{}\" WITH REPLICATION", db.role))
        .await
        .unwrap();
    let admin_here = connect_url(&db.admin_url()).await;
    let superuser = url::Url::parse(&admin_url()).unwrap().username().to_owned();
    admin_here
        .batch_execute(&format!(
            "ALTER TABLE web_knowledge_product OWNER TO \"{superuser}\""
        ))
        .await
        .unwrap();
    let out = kbsync(&config, &direct, &["install"]);
    out.assert_failure();
    assert!(
        out.stderr
            .contains("this role does not own web_knowledge_product"),
        "{}",
        out.stderr
    );
    admin_here
        .batch_execute(&format!(
            "ALTER TABLE web_knowledge_product OWNER TO \"{}\"",
            db.role
        ))
        .await
        .unwrap();
    kbsync(&config, &direct, &["install"]).assert_success();
}

#[tokio::test]
async fn an_ordinary_role_searches_through_the_api_and_changes_the_model_through_the_pooler() {
    const NEXT_MODEL: &str = "test-embedding-next";
    const NEXT_DIMS: usize = 12;
    const TOKEN: &str = "tls-search-token";
    let db = OwnedDatabase::create(false).await;
    let (_ca, _bouncer, url) = behind_pgbouncer(&db, PoolMode::Session);
    let server = FakeOpenAi::start(DIMS).await;
    let next = FakeOpenAi::start(NEXT_DIMS).await;
    let tokens = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tokens.path(), format!("{TOKEN}\n")).unwrap();
    let base = sync_config(&server.base_url(), DIMS, "100ms", "100ms").edited(&[(
        "max_query_chars = 2000",
        &format!(
            "max_query_chars = 2000\napi_tokens_file = \"{}\"",
            tokens.path().display()
        ),
    )]);
    let text = std::fs::read_to_string(base.path()).unwrap();
    let config = TempConfig::new(&format!(
        "{text}
[next_embedding]
provider = \"openai\"
model = \"{NEXT_MODEL}\"
dimensions = {NEXT_DIMS}
base_url = \"{}\"
max_inputs_per_request = 64
max_concurrency = 2
request_timeout = \"10s\"
",
        next.base_url()
    ));
    for args in [&["demo", "schema"][..], &["demo", "data"], &["install"]] {
        kbsync(&config, &url, args).assert_success();
    }
    let mut daemon = DaemonProcess::start(config.path(), &url);
    let client = connect_url(&db.admin_url()).await;
    converged(&client, &daemon).await;

    let (code, answer) = daemon
        .http_post_json(
            "/v1/search",
            Some(TOKEN),
            &serde_json::json!({"tenant": "1", "query": "headlamp", "mode": "text", "k": 2}),
        )
        .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["results"].as_array().unwrap().len(), 2, "{answer}");

    kbsync(&config, &url, &["model", "start"]).assert_success();
    kbsync_testkit::wait_for_daemon(&daemon, WAIT, "the new model's vectors filled", || async {
        let out = kbsync(&config, &url, &["model", "status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        (status["chunks_missing"] == 0).then_some(())
    })
    .await;
    kbsync_testkit::wait_for_daemon(&daemon, WAIT, "the cut-over", || async {
        kbsync(&config, &url, &["model", "cutover"])
            .status
            .success()
            .then_some(())
    })
    .await;
    kbsync(&config, &url, &["model", "finish"]).assert_success();
    let dims: i32 = client
        .query_one(
            "SELECT atttypmod FROM pg_attribute
              WHERE attrelid = 'public.tenant_knowledge'::regclass AND attname = 'embedding'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dims as usize, NEXT_DIMS);
    assert!(next.request_count() > 0);
    daemon.terminate(WAIT).await;
}
