//! The built `kbsync` binary, run as a user would run it, and what it printed.

use std::path::{Path, PathBuf};
use std::process::Output;

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
