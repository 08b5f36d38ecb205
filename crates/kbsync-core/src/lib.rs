//! kbsync's reusable core: configuration and sources, the SQL that captures changes,
//! schema installation and database access.

pub mod capture;
pub mod config;
pub mod db;
pub mod install;
pub mod sql_ident;
