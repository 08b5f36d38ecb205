//! The setup most end-to-end tests share: a fresh database with the demo tables,
//! kbsync installed, configured for an OpenAI-compatible test server.

use tokio_postgres::Client;

use crate::daemon::{DaemonProcess, sync_config};
use crate::openai_server::FakeOpenAi;
use crate::temp_config::TempConfig;
use crate::test_db::TestDb;

pub struct Installed {
    pub db: TestDb,
    /// A connection of the test's own.
    pub client: Client,
    pub server: FakeOpenAi,
    /// `sync_config` for `server`.
    pub config: TempConfig,
}

impl Installed {
    /// Vectors of `dims` dimensions; every debounce window `window`, every delete
    /// window `delete_window`.
    pub async fn new(dims: usize, window: &str, delete_window: &str) -> Self {
        Self::with_capture(dims, window, delete_window, false).await
    }

    /// `new`, with logical capture (a publication and a slot, no triggers).
    pub async fn new_logical(dims: usize, window: &str, delete_window: &str) -> Self {
        Self::with_capture(dims, window, delete_window, true).await
    }

    async fn with_capture(dims: usize, window: &str, delete_window: &str, logical: bool) -> Self {
        let server = FakeOpenAi::start(dims).await;
        let mut config = sync_config(&server.base_url(), dims, window, delete_window);
        if logical {
            config = config.edited(&[crate::temp_config::LOGICAL_CAPTURE]);
        }
        Self::with_config(server, config).await
    }

    /// The same with a config of the caller's for `server` (another model, say).
    pub async fn with_config(server: FakeOpenAi, config: TempConfig) -> Self {
        let db = TestDb::create().await.with_demo_schema().await;
        db.kbsync_with_config(config.path(), &["install"])
            .assert_success();
        let client = db.client().await;
        Self {
            db,
            client,
            server,
            config,
        }
    }

    /// `kbsync run` with the test config.
    pub fn daemon(&self) -> DaemonProcess {
        self.daemon_with(&self.config)
    }

    /// `kbsync run` with another config (e.g. `self.config.edited(...)`).
    pub fn daemon_with(&self, config: &TempConfig) -> DaemonProcess {
        DaemonProcess::start(config.path(), self.db.url())
    }

    /// `kbsync demo data`: the demo rows, written as an application would.
    pub fn seed(&self) {
        self.db
            .kbsync_with_config(self.config.path(), &["demo", "data"])
            .assert_success();
    }

    /// Inputs the test server received whose text contains `needle`.
    pub fn inputs_containing(&self, needle: &str) -> usize {
        self.server
            .requests()
            .iter()
            .flatten()
            .filter(|i| i.contains(needle))
            .count()
    }
}
