//! Changing the embedding model: pricing a change (`plan`), the blue/green migration
//! (`migration`), and adopting an earlier system's embeddings (`adopt`).

pub mod adopt;
pub mod migration;
pub mod plan;
