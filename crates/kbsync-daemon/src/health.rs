//! The daemon's health as its own tasks see it: the workers record the outcome of
//! every database call and embedding call they make, the listener publishes whether
//! it is connected. `/readyz` and the systemd watchdog read it; nothing else writes it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::watch;

/// One dependency's last known state.
#[derive(Debug, Clone, Serialize)]
pub struct Component {
    /// None: not used yet.
    pub ok: Option<bool>,
    /// The last error, or what the last success was.
    pub detail: String,
    /// When that was (RFC 3339).
    pub since: String,
}

impl Component {
    fn new(ok: Option<bool>, detail: &str) -> Self {
        Self {
            ok,
            detail: detail.to_owned(),
            since: chrono::Utc::now().to_rfc3339(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub database: Component,
    pub listener: Component,
    pub provider: Component,
    /// Trigger capture: always ok. Logical capture: the decoder's connection to the
    /// slot, and whether the slot holds back more WAL than `capture.max_retained_wal_mb`.
    pub capture: Component,
    /// Sources no batch gets through until someone fixes something (a column the config
    /// names is missing, no privilege): the error and since when. Not ready while any.
    pub broken_sources: BTreeMap<String, Component>,
}

pub struct Health {
    database: Mutex<Component>,
    broken: Mutex<BTreeMap<String, Component>>,
    provider: Mutex<Component>,
    capture: Mutex<Component>,
    listener: watch::Receiver<bool>,
}

fn set(slot: &Mutex<Component>, ok: bool, detail: &str) {
    let mut current = slot.lock().unwrap_or_else(|p| p.into_inner());
    // Keep `since` at the change, not the latest repeat.
    if current.ok != Some(ok) || (!ok && current.detail != detail) {
        *current = Component::new(Some(ok), detail);
    }
}

impl Health {
    pub fn new(listener: watch::Receiver<bool>) -> Self {
        Self {
            database: Mutex::new(Component::new(None, "not connected yet")),
            provider: Mutex::new(Component::new(None, "no embedding call yet")),
            capture: Mutex::new(Component::new(None, "not started yet")),
            broken: Mutex::new(BTreeMap::new()),
            listener,
        }
    }

    pub fn database_ok(&self) {
        set(&self.database, true, "last call succeeded");
    }

    pub fn database_failed(&self, error: &str) {
        set(&self.database, false, error);
    }

    pub fn provider_ok(&self) {
        set(&self.provider, true, "last call succeeded");
    }

    pub fn provider_failed(&self, error: &str) {
        set(&self.provider, false, error);
    }

    /// `detail` replaces the last one even when the state stays ok (it carries the
    /// slot's retained WAL).
    pub fn capture_ok(&self, detail: &str) {
        let mut current = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        if current.ok == Some(true) {
            current.detail = detail.to_owned();
        } else {
            *current = Component::new(Some(true), detail);
        }
    }

    pub fn capture_failed(&self, error: &str) {
        set(&self.capture, false, error);
    }

    /// `source`'s statements fail in a way waiting alone does not fix. Returns whether
    /// it was already broken with this error (a repeat, not news).
    pub fn source_broken(&self, source: &str, error: &str) -> bool {
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        let repeat = broken.get(source).is_some_and(|c| c.detail == error);
        if !repeat {
            broken.insert(source.to_owned(), Component::new(Some(false), error));
        }
        repeat
    }

    /// A batch of `source` went through. Returns whether it was broken until now.
    pub fn source_ok(&self, source: &str) -> bool {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(source)
            .is_some()
    }

    /// Ready: the database answered the last call, the listener is connected, the
    /// provider's last call (if any) succeeded, capture is not failing, and no source
    /// is broken.
    pub fn readiness(&self) -> Readiness {
        let database = self
            .database
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let provider = self
            .provider
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let connected = *self.listener.borrow();
        let listener = Component::new(
            Some(connected),
            if connected {
                "listening for changes"
            } else {
                "not connected; reconnecting"
            },
        );
        let capture = self
            .capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let broken_sources = self
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Readiness {
            ready: database.ok == Some(true)
                && connected
                && provider.ok != Some(false)
                && capture.ok != Some(false)
                && broken_sources.is_empty(),
            broken_sources,
            database,
            listener,
            provider,
            capture,
        }
    }
}
