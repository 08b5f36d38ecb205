//! A fresh database per test, named by UUID, on the server `DATABASE_URL` names, and
//! dropped afterwards.

use std::path::Path;

use tokio_postgres::{Client, NoTls};

use crate::kbsync_process::{CommandOutput, run_kbsync};
use crate::repo::shipped_config;

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
    // A connection that ends with an error makes the test's next statement fail with
    // it; printed here too, so that the cause is beside the failure.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("a test connection ended: {e}");
        }
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
