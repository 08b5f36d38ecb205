//! The daemon's health as its own tasks see it: the workers record the outcome of
//! every database call and embedding call they make, the listener publishes whether
//! it is connected. `/readyz` and the systemd watchdog read it; nothing else writes it.

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
}

pub struct Health {
    database: Mutex<Component>,
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

    /// Ready: the database answered the last call, the listener is connected, the
    /// provider's last call (if any) succeeded, and capture is not failing.
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
        Readiness {
            ready: database.ok == Some(true)
                && connected
                && provider.ok != Some(false)
                && capture.ok != Some(false),
            database,
            listener,
            provider,
            capture,
        }
    }
}
