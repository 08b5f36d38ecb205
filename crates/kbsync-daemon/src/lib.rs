//! The daemon: a listener that turns NOTIFYs into wake-ups, in logical capture mode a
//! decoder that turns the replication slot's changes into captured changes, a
//! collector that moves captured changes into the outbox, and workers that claim ready outbox entries (the
//! debounce windows), process them (read rows → chunk → embed → write) and
//! acknowledge them, until cancelled; during a model migration a task that fills the
//! other model's vectors; and the HTTP endpoint, with the search API.

mod batch;
mod batch_failure;
mod batch_plan;
mod batch_sizing;
mod collector;
mod daemon;
mod decoder;
pub mod health;
mod http;
mod index_manager;
mod leases;
mod listener;
mod model_fill;
mod model_switch;
mod pgoutput;
mod search_api;
mod shared;
mod sweeps;
pub mod systemd;
mod tasks;
pub mod telemetry;
mod texts_in_flight;
mod worker;

pub use daemon::{Daemon, DaemonError};
