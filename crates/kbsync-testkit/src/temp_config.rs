//! Config files written for one test, and edits of them.

use std::path::{Path, PathBuf};

use crate::repo::shipped_config;

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
