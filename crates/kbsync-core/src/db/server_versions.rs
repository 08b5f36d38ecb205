//! The PostgreSQL and pgvector versions kbsync supports, read from the server and
//! checked before `kbsync install` changes anything.

use tokio_postgres::GenericClient;

/// The oldest PostgreSQL major kbsync is tested on (CI runs 16 and 18).
pub const MIN_POSTGRES_MAJOR: i32 = 16;
/// The oldest pgvector with what kbsync's schema uses: HNSW indexes (0.5.0).
pub const MIN_PGVECTOR: Version = Version(0, 5, 0);
/// The oldest pgvector with `halfvec` (and HNSW indexes of up to 4,000 dimensions).
pub const MIN_PGVECTOR_HALFVEC: Version = Version(0, 7, 0);

/// The most dimensions pgvector indexes (HNSW) as `vector`; `halfvec` takes more.
pub const MAX_VECTOR_INDEX_DIMENSIONS: u32 = 2000;

/// What the version check needs to know of an embedding model (the config's
/// `EmbeddingConfig` is one).
pub trait StoredModel {
    fn name(&self) -> &str;
    fn dimensions(&self) -> u32;
    /// Whether its vectors are stored as `halfvec`.
    fn stored_as_halfvec(&self) -> bool;
}

/// A pgvector version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// `0.8.5`; missing parts are 0, anything else after them is ignored (`0.8.0-dev`).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.').map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u32>()
        });
        // None (unreadable) is not a default: `unsupported` refuses it, quoting the text.
        // Only an absent minor or patch counts as 0 ("0.8" is 0.8.0).
        let major = parts.next()?.ok()?;
        let minor = parts.next().unwrap_or(Ok(0)).ok()?;
        let patch = parts.next().unwrap_or(Ok(0)).ok()?;
        Some(Self(major, minor, patch))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// What the server runs: its version, and pgvector's (installed in this database, or
/// else the one `CREATE EXTENSION vector` would install; None: not available at all).
#[derive(Debug, Clone)]
pub struct ServerVersions {
    /// `server_version_num`, e.g. 180004.
    pub postgres_num: i32,
    /// `server_version`, as the server words it.
    pub postgres: String,
    pub pgvector: Option<String>,
    /// Whether `pgvector` is the installed extension's version (else the available one).
    pub pgvector_installed: bool,
}

impl ServerVersions {
    pub async fn read(client: &impl GenericClient) -> Result<Self, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version'),
                        (SELECT extversion FROM pg_extension WHERE extname = 'vector'),
                        (SELECT default_version FROM pg_available_extensions WHERE name = 'vector')",
                &[],
            )
            .await?;
        let installed: Option<String> = row.get(2);
        Ok(Self {
            postgres_num: row.get(0),
            postgres: row.get(1),
            pgvector_installed: installed.is_some(),
            pgvector: installed.or(row.get(3)),
        })
    }

    /// None when kbsync supports this server for these models (a model stored as
    /// halfvec needs a newer pgvector); else what is wrong and what to do.
    pub fn unsupported<'a, M: StoredModel + 'a>(
        &self,
        models: impl IntoIterator<Item = &'a M>,
    ) -> Option<String> {
        let major = self.postgres_num / 10_000;
        if major < MIN_POSTGRES_MAJOR {
            return Some(format!(
                "this server runs PostgreSQL {} and kbsync needs PostgreSQL {MIN_POSTGRES_MAJOR} or newer (it is tested on 16 and 18): upgrade the server (every managed service offers 16 and newer)",
                self.postgres
            ));
        }
        let Some(text) = &self.pgvector else {
            return Some(
                "pgvector is not available on this server (no `vector` in pg_available_extensions): install it (managed services: allow the `vector` extension), then run `kbsync install` again".into(),
            );
        };
        let Some(found) = Version::parse(text) else {
            return Some(format!(
                "pgvector reports the version {text:?}, which kbsync cannot read; kbsync needs {MIN_PGVECTOR} or newer"
            ));
        };
        let fix = if self.pgvector_installed {
            "upgrade it: install a newer pgvector on the server, then `ALTER EXTENSION vector UPDATE`"
        } else {
            "install a newer pgvector on the server"
        };
        if found < MIN_PGVECTOR {
            return Some(format!(
                "this database has pgvector {found} and kbsync needs {MIN_PGVECTOR} or newer (HNSW indexes): {fix}, then run `kbsync install` again"
            ));
        }
        if let Some(model) = models.into_iter().find(|m| m.stored_as_halfvec())
            && found < MIN_PGVECTOR_HALFVEC
        {
            return Some(format!(
                "model {:?} stores its {} dimensions as halfvec, and this database has pgvector {found}: halfvec needs pgvector {MIN_PGVECTOR_HALFVEC} or newer. Either {fix}, then run `kbsync install` again, or choose a model of at most {} dimensions (text-embedding-3 models shorten with send_dimensions = true) stored as vector_type = \"vector\"",
                model.name(),
                model.dimensions(),
                MAX_VECTOR_INDEX_DIMENSIONS
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model as the check sees it.
    struct Model(u32);

    impl StoredModel for Model {
        fn name(&self) -> &str {
            "text-embedding-3-large"
        }
        fn dimensions(&self) -> u32 {
            self.0
        }
        fn stored_as_halfvec(&self) -> bool {
            self.0 > MAX_VECTOR_INDEX_DIMENSIONS
        }
    }

    const NO_MODELS: [&Model; 0] = [];

    fn versions(postgres_num: i32, pgvector: Option<&str>, installed: bool) -> ServerVersions {
        ServerVersions {
            postgres_num,
            postgres: format!("{}.{}", postgres_num / 10_000, postgres_num % 10_000),
            pgvector: pgvector.map(str::to_owned),
            pgvector_installed: installed,
        }
    }

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(Version::parse("0.8.5"), Some(Version(0, 8, 5)));
        assert_eq!(Version::parse("0.8"), Some(Version(0, 8, 0)));
        assert_eq!(Version::parse("0.8.0-dev"), Some(Version(0, 8, 0)));
        assert_eq!(Version::parse("x"), None);
        assert!(Version(0, 4, 4) < MIN_PGVECTOR && MIN_PGVECTOR <= Version(0, 6, 2));
    }

    #[test]
    fn unsupported_versions_name_what_was_found_the_minimum_and_the_fix() {
        assert_eq!(
            versions(180004, Some("0.8.5"), true).unsupported(NO_MODELS),
            None
        );
        assert_eq!(
            versions(160002, Some("0.6.2"), false).unsupported(NO_MODELS),
            None
        );
        let old_vector = versions(160014, Some("0.4.4"), true)
            .unsupported(NO_MODELS)
            .unwrap();
        assert!(
            old_vector.contains("pgvector 0.4.4")
                && old_vector.contains("0.5.0 or newer")
                && old_vector.contains("ALTER EXTENSION vector UPDATE"),
            "{old_vector}"
        );
        let old_server = versions(150007, Some("0.8.0"), true)
            .unsupported(NO_MODELS)
            .unwrap();
        assert!(
            old_server.contains("PostgreSQL 15.7") && old_server.contains("16 or newer"),
            "{old_server}"
        );
        let none = versions(180004, None, false)
            .unsupported(NO_MODELS)
            .unwrap();
        assert!(none.contains("pgvector is not available"), "{none}");
    }

    #[test]
    fn halfvec_needs_pgvector_0_7() {
        let model = Model(3072);
        assert_eq!(
            versions(180004, Some("0.7.0"), true).unsupported([&model]),
            None
        );
        let old = versions(160002, Some("0.6.2"), true)
            .unsupported([&model])
            .unwrap();
        assert!(
            old.contains("pgvector 0.6.2")
                && old.contains("0.7.0 or newer")
                && old.contains("3072"),
            "{old}"
        );
    }
}
