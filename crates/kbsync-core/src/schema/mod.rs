//! kbsync's objects in the database: installing and upgrading them (`install`, with the
//! versioned migrations), removing them (`uninstall`), and the server and pgvector
//! versions they need (`db::server_versions` reads them).

pub mod install;
pub mod uninstall;
