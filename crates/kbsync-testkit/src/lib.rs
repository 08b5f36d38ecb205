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

mod kbsync_process;
mod listener;
mod repo;
mod temp_config;
mod test_db;

pub use kbsync_process::{CommandOutput, LIBPQ_VARIABLES, kbsync_bin, run_kbsync};
pub use listener::Listener;
pub use repo::{readme_block_starting, repo_root, shipped_config, shown_in_readme};
pub use temp_config::{LOGICAL_CAPTURE, TempConfig};
pub use test_db::{TestDb, admin_url, connect_url};
