//! The progress of a long command (a sweep, an install, pricing a model) on stderr, as
//! a bar when stderr is a terminal and nothing otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kbsync_core::progress::Progress;

/// A progress bar on stderr when it is a terminal; nothing otherwise.
pub(crate) struct Bar(ProgressBar);

impl Bar {
    pub(crate) fn new() -> Self {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        Self(bar)
    }
}

impl Progress for Bar {
    fn step(&self, source: &str, what: &str, estimate: Option<u64>) {
        let template = if estimate.is_some() {
            "{msg:>20} [{bar:30}] {human_pos}/~{human_len} rows, {per_sec}, {eta} left"
        } else {
            "{msg:>20} {spinner} {pos} ({elapsed})"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            self.0.set_style(style.progress_chars("=> "));
        }
        self.0.reset();
        match estimate {
            Some(n) => self.0.set_length(n),
            None => self.0.unset_length(),
        }
        self.0.set_message(format!("{source}: {what}"));
    }

    fn advance(&self, items: u64) {
        self.0.inc(items);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}
