//! kbsync's reusable core, one folder per stage of the data path: `config` (the file,
//! validated once into the `Source`s the rest uses), `capture` (trigger and logical),
//! `outbox`, `sync` (source rows → chunks → embeddings → knowledge writes), `search`
//! (the SQL function and the HNSW index), `model` (migration, plan, adopt) and
//! `schema` (install, migrations); `db` is how every stage reaches PostgreSQL.

pub mod capture;
pub mod config;
pub mod db;
pub mod model;
pub mod outbox;
pub mod progress;
pub mod schema;
pub mod search;
pub mod sync;
