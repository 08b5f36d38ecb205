//! kbsync's reusable core, in the order the data flows: configuration and sources,
//! the capture triggers, the outbox, reading source rows, chunking, embedding, and
//! writing the knowledge table; plus schema installation, adopting an earlier system's
//! embeddings, pricing a change of model, and database access.

pub mod adopt;
pub mod advisory_locks;
pub mod capture;
pub mod chunk;
pub mod chunk_texts;
pub mod config;
pub mod connection_defaults;
pub mod db;
pub mod embed;
pub mod install;
pub mod knowledge;
pub mod knowledge_index;
pub mod model_migration;
pub mod model_plan;
pub mod outbox;
pub mod progress;
pub mod rate_limit;
pub mod replication;
pub mod search;
pub mod server_versions;
pub mod source_problems;
pub mod source_rows;
pub mod sql_ident;
pub mod tls;
pub mod uninstall;
