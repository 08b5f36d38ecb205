//! How far a long piece of work is — a sweep, a plan, an adoption — reported to whoever
//! shows it (a progress bar on a terminal, or nothing).

/// Where long work reports its progress.
pub trait Progress: Sync {
    /// A new step: `what` of `source`, of about `estimate` items when known.
    fn step(&self, source: &str, what: &str, estimate: Option<u64>);
    fn advance(&self, items: u64);
    fn finish(&self);
}

/// No progress output.
pub struct Quiet;

impl Progress for Quiet {
    fn step(&self, _: &str, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
