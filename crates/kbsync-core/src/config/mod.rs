//! `kbsync.toml` loaded and validated once: the sections (`file.rs`), the sources made
//! into the `Source`s the rest uses (`source.rs`), and each section's rules (`checks.rs`)
//! that turn a bad file into an error naming the file, the field and what is wrong.

mod checks;
mod file;
mod source;
pub mod sql_ident;

// The sections and the validated source are part of the config's one namespace
// (`kbsync_core::config::EmbeddingConfig`, `…::Source`).
use file::defaults;
pub use file::*;
pub use source::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Environment variables that override the config file.
pub const ENV_DATABASE_URL: &str = "KBSYNC_DATABASE_URL";
pub const ENV_DATABASE_URL_FALLBACK: &str = "DATABASE_URL";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {error}")]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}: {field}: {problem}")]
    Invalid {
        file: PathBuf,
        field: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub database: DatabaseConfig,
    pub embedding: EmbeddingConfig,
    /// The model to move to (`kbsync model plan`): the same fields as `[embedding]`,
    /// its own provider and limits. Leave it out when no change of model is planned.
    #[serde(default)]
    pub next_embedding: Option<EmbeddingConfig>,
    #[serde(default)]
    pub capture: CaptureConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub scheduling: SchedulingConfig,
    #[serde(default)]
    pub index: IndexConfig,
    #[serde(default)]
    pub search: SearchConfig,
    /// Sources by name; the name is the chunk type stored in `tenant_knowledge.source`.
    pub sources: BTreeMap<String, SourceConfig>,
    /// The section `embedding` was read from, for messages: "embedding", or
    /// "next_embedding" in `with_next_model`'s copy.
    #[serde(skip, default = "defaults::embedding_section")]
    pub(crate) embedding_section: &'static str,
    /// `sources`, validated once by `parse` (for this config's model: chunk limits
    /// follow it).
    #[serde(skip)]
    validated_sources: Vec<Source>,
    /// This config with `[next_embedding]` as its model, validated by `parse`.
    #[serde(skip)]
    next_model: Option<Box<Config>>,
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            file: path.to_owned(),
            error,
        })?;
        let mut config = Self::parse(&text, path)?;
        if let Some(base) = path.parent() {
            config.resolve_paths_against(base);
        }
        Ok(config)
    }

    /// Parse and validate config text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |field: String, problem: String| ConfigError::Invalid {
            file: path.to_owned(),
            field,
            problem,
        };
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| invalid("(syntax)".into(), one_line(&e.to_string())))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                "(top level)".to_owned()
            } else {
                field
            };
            invalid(field, one_line(&e.inner().to_string()))
        })?;
        let mut config = config;
        config
            .validate()
            .map_err(|(field, problem)| invalid(field, problem))?;
        Ok(config)
    }

    /// The database URL: environment first, then the file; with neither, an empty URL
    /// when libpq's `PGHOST`/`PGDATABASE`/... variables are set (they fill it in, as for
    /// psql).
    pub fn database_url(&self) -> Option<String> {
        // A variable that is not UTF-8 is passed on as it reads (the connection then
        // fails on it, naming it), not skipped for the next source of a URL.
        let from_env = |name: &str| {
            std::env::var_os(name)
                .map(|value| value.to_string_lossy().into_owned())
                .filter(|url| !url.is_empty())
        };
        from_env(ENV_DATABASE_URL)
            .or_else(|| from_env(ENV_DATABASE_URL_FALLBACK))
            .or_else(|| self.database.url.clone())
            .or_else(|| {
                crate::db::connection_defaults::Environment::from_process()
                    .has_libpq_variables()
                    .then(|| "postgresql://".to_owned())
            })
    }

    pub fn max_chunk_tokens(&self) -> usize {
        self.embedding
            .max_chunk_tokens
            .unwrap_or(match self.embedding.provider {
                ProviderKind::Local => 200,
                ProviderKind::Openai => 512,
            })
    }

    pub fn model_token_limit(&self) -> usize {
        match self.embedding.provider {
            ProviderKind::Local => LOCAL_MODEL_TOKEN_LIMIT,
            ProviderKind::Openai => OPENAI_TOKEN_LIMIT,
        }
    }

    /// The reconcile schedule, parsed.
    pub fn reconcile_schedule(&self) -> Result<cron::Schedule, String> {
        self.reconcile.parsed_schedule()
    }

    /// Each problem as (field path, what is wrong and what to do).
    /// Check every section, and keep the validated sources and the next model's
    /// config for `sources` and `with_next_model`.
    fn validate(&mut self) -> Result<(), (String, String)> {
        fn in_section(section: &str) -> impl Fn(checks::Problem) -> (String, String) + '_ {
            move |(field, problem)| (format!("{section}.{field}"), problem)
        }
        self.embedding
            .check(self.model_token_limit(), self.max_chunk_tokens())
            .map_err(in_section("embedding"))?;
        self.daemon.check().map_err(in_section("daemon"))?;
        self.capture.check().map_err(in_section("capture"))?;
        self.index.check().map_err(in_section("index"))?;
        self.search.check().map_err(in_section("search"))?;
        self.reconcile.check().map_err(in_section("reconcile"))?;
        self.scheduling.check().map_err(in_section("scheduling"))?;
        if self.sources.is_empty() {
            return Err((
                "sources".into(),
                "no sources declared: add at least one [sources.NAME] table".into(),
            ));
        }
        let limits = ChunkLimits {
            model_tokens: self.model_token_limit(),
            default_chunk_tokens: self.max_chunk_tokens(),
        };
        let mut sources = Vec::with_capacity(self.sources.len());
        for (name, source) in &self.sources {
            sources.push(
                Source::from_config(name, source, &limits)
                    .map_err(|(field, problem)| (format!("sources.{name}{field}"), problem))?,
            );
        }
        self.validated_sources = sources;
        self.next_model = None;
        if let Some(next) = self.next_embedding.clone() {
            let mut next = Config {
                embedding: next,
                next_embedding: None,
                embedding_section: "next_embedding",
                validated_sources: Vec::new(),
                next_model: None,
                ..self.clone()
            };
            if next.embedding.model == self.embedding.model {
                return Err((
                    "next_embedding.model".into(),
                    format!(
                        "{:?} is embedding.model already; the next model needs another name (each chunk records its model by name)",
                        self.embedding.model
                    ),
                ));
            }
            // The same rules as [embedding], the sources' chunk limits included.
            next.validate()
                .map_err(|(field, problem)| match field.strip_prefix("embedding.") {
                    Some(rest) => (format!("next_embedding.{rest}"), problem),
                    None => (
                        field,
                        format!("{problem} (with the [next_embedding] model)"),
                    ),
                })?;
            self.next_model = Some(Box::new(next));
        }
        Ok(())
    }

    /// Validate again after a test changed fields of a parsed config.
    #[cfg(test)]
    pub(crate) fn revalidated(mut self) -> Self {
        self.validate().expect("the changed test config is valid");
        self
    }

    /// Relative paths in the file (model directories, the token file) are relative to
    /// the config file, not to the working directory.
    fn resolve_paths_against(&mut self, base: &Path) {
        let resolve = |path: &mut Option<PathBuf>| {
            if let Some(p) = path.as_mut()
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.embedding.model_dir);
        if let Some(next) = self.next_embedding.as_mut() {
            resolve(&mut next.model_dir);
        }
        resolve(&mut self.search.api_tokens_file);
        if let Some(next) = self.next_model.as_mut() {
            next.resolve_paths_against(base);
        }
    }

    /// This config with `[next_embedding]` as its model (its provider, tokenizer and
    /// chunk limits); None without one.
    pub fn with_next_model(&self) -> Option<Config> {
        self.next_model.as_deref().cloned()
    }

    /// The section this config's `embedding` came from, for messages.
    pub fn embedding_section(&self) -> &'static str {
        self.embedding_section
    }

    /// This config with `embedding` as its model for what embeds queries or judges
    /// stored vectors; its sources (their chunking) stay this config's.
    pub fn with_embedding(&self, embedding: EmbeddingConfig) -> Config {
        Config {
            embedding,
            ..self.clone()
        }
    }

    /// The validated sources (validated once, by `parse`).
    pub fn sources(&self) -> &[Source] {
        &self.validated_sources
    }

    /// A copy safe to print: the password of the database URL replaced.
    /// The source called `name`, or an error that lists the declared ones.
    pub fn source_named(&self, name: &str) -> Result<Source, String> {
        let all = self.sources();
        let known: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        let message = format!(
            "unknown source {name:?}: the config declares {}",
            known.join(", ")
        );
        all.iter().find(|s| s.name == name).cloned().ok_or(message)
    }

    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        copy.database.url = copy.database.url.as_deref().map(crate::db::redact_url);
        copy
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl crate::db::server_versions::StoredModel for EmbeddingConfig {
    fn name(&self) -> &str {
        &self.model
    }
    fn dimensions(&self) -> u32 {
        self.dimensions
    }
    fn stored_as_halfvec(&self) -> bool {
        self.vector_type() == VectorType::Halfvec
    }
}

/// A config of one openai model ("m", 8 dimensions) and one source `s`, with extra
/// lines in each section: the unit tests' fixture.
#[cfg(test)]
pub(crate) fn for_tests(embedding_extra: &str, source_extra: &str) -> Config {
    let text = format!(
        "[embedding]\nprovider = \"openai\"\nmodel = \"m\"\ndimensions = 8\nbase_url = \"http://127.0.0.1:1/v1\"\n{embedding_extra}\n\
         [sources.s]\ntable = \"t\"\nkey = \"id\"\ntenant = {{ column = \"u\" }}\ntext = \"{{body}}\"\n{source_extra}\n"
    );
    Config::parse(&text, Path::new("test.toml")).expect("a valid test config")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sql_ident::{Ident, SqlLiteral, TableName};

    #[test]
    fn relative_model_dirs_and_token_files_are_relative_to_the_config_file() {
        let text = "[embedding]\nprovider = \"local\"\nmodel = \"a\"\ndimensions = 384\nmodel_dir = \"models/a\"\n\
                    [next_embedding]\nprovider = \"local\"\nmodel = \"b\"\ndimensions = 384\nmodel_dir = \"models/b\"\n\
                    [search]\napi_tokens_file = \"/etc/kbsync/tokens\"\n\
                    [sources.s]\ntable = \"t\"\nkey = \"id\"\ntenant = { column = \"u\" }\ntext = \"{body}\"\n";
        let mut config = Config::parse(text, Path::new("test.toml")).unwrap();
        config.resolve_paths_against(Path::new("/srv/kbsync"));
        assert_eq!(
            config.embedding.model_dir,
            Some("/srv/kbsync/models/a".into())
        );
        assert_eq!(
            config.next_embedding.clone().and_then(|n| n.model_dir),
            Some("/srv/kbsync/models/b".into())
        );
        // The next model's config, kept from validation, is resolved too.
        assert_eq!(
            config.with_next_model().and_then(|c| c.embedding.model_dir),
            Some("/srv/kbsync/models/b".into())
        );
        assert_eq!(
            config.search.api_tokens_file,
            Some("/etc/kbsync/tokens".into())
        );
    }

    #[test]
    fn text_template_parses_columns_literals_and_escapes() {
        let own = |c: &str| ColumnRef {
            related: None,
            column: Ident::new(c).unwrap(),
        };
        let parts = parse_text_template("Q: {question}\n{{A}}: { answer }", &[]).unwrap();
        assert_eq!(
            parts,
            vec![
                TextPart::Literal(SqlLiteral::new("Q: ").unwrap()),
                TextPart::Column(own("question")),
                TextPart::Literal(SqlLiteral::new("\n{A}: ").unwrap()),
                TextPart::Column(own("answer")),
            ]
        );
        assert!(parse_text_template("{question", &[]).is_err());
        assert!(parse_text_template("no columns", &[]).is_err());
        assert!(parse_text_template("{a; drop table x}", &[]).is_err());
        assert!(parse_text_template("a } b {c}", &[]).is_err());
        let page = Related {
            name: "page".into(),
            table: TableName::parse("pages").unwrap(),
            foreign_key: Ident::new("page_id").unwrap(),
            references: Ident::new("id").unwrap(),
        };
        let parts = parse_text_template("{page.title}: {q}", std::slice::from_ref(&page)).unwrap();
        assert_eq!(
            parts[0],
            TextPart::Column(ColumnRef {
                related: Some(0),
                column: Ident::new("title").unwrap()
            })
        );
        let undeclared = parse_text_template("{site.title}", &[page]).unwrap_err();
        assert!(undeclared.contains("declared: page"), "{undeclared}");
    }

    /// A config whose one source `s` (table `t`) has `source` as its lines.
    fn with_source(source: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[embedding]\nprovider = \"openai\"\nmodel = \"m\"\ndimensions = 8\nbase_url = \"http://127.0.0.1:1/v1\"\n\
             [sources.s]\ntable = \"t\"\nkey = \"id\"\n{source}\n"
        );
        Config::parse(&text, Path::new("test.toml"))
    }

    fn problem(source: &str) -> String {
        match with_source(source) {
            Ok(_) => panic!("accepted: {source}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn related_tables_are_named_by_their_columns_everywhere_a_column_goes() {
        let config = with_source(
            "related.page = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" }\n\
             tenant = { column = \"owner\", via = \"page\" }\n\
             filter = [{ column = \"page.status\", equals = \"live\" }, { column = \"state\", equals = \"done\" }]\n\
             text = \"{page.title}: {body}\"\nmetadata = [\"page.url\", \"kind\"]",
        )
        .unwrap();
        let source = &config.sources()[0];
        let names = |cols: Vec<Ident>| {
            cols.iter()
                .map(|c| c.as_str().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(source.relevant_columns()),
            ["id", "body", "state", "kind", "page_id"]
        );
        assert_eq!(
            names(source.related_columns(0)),
            ["id", "title", "status", "url", "owner"]
        );
        assert_eq!(source.metadata[0].0, "page.url");
        assert_eq!(source.tenant_sql(RowAlias::TABLE), "t_r0.\"owner\"");
        assert_eq!(
            source.own_filter_sql(RowAlias::TABLE),
            "COALESCE((t.\"state\" = 'done'), false)"
        );
        assert_eq!(
            source.joins_sql(RowAlias::TABLE, &source.related_tables()),
            " LEFT JOIN \"pages\" t_r0 ON t_r0.\"id\" = t.\"page_id\""
        );
    }

    #[test]
    fn the_older_inline_via_is_a_related_table_named_via() {
        let config = with_source(
            "tenant = { column = \"owner\", via = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" } }\ntext = \"{body}\"",
        )
        .unwrap();
        let source = &config.sources()[0];
        assert_eq!(source.related.len(), 1);
        assert_eq!(source.related[0].name, "via");
        assert_eq!(source.tenant.related, Some(0));
    }

    #[test]
    fn related_mistakes_name_the_field_and_the_fix() {
        let undeclared =
            problem("tenant = { column = \"owner\", via = \"page\" }\ntext = \"{body}\"");
        assert!(
            undeclared.contains("sources.s.tenant.via")
                && undeclared.contains("[sources.s.related.page]"),
            "{undeclared}"
        );
        let unknown = problem("tenant = { column = \"u\" }\ntext = \"{site.name}\"");
        assert!(
            unknown.contains("sources.s.text") && unknown.contains("not declared"),
            "{unknown}"
        );
        let unused = problem(
            "related.page = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" }\n\
             tenant = { column = \"u\" }\ntext = \"{body}\"",
        );
        assert!(
            unused.contains("sources.s.related.page") && unused.contains("nothing reads it"),
            "{unused}"
        );
        let deep = problem(
            "related.page = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" }\n\
             tenant = { column = \"u\" }\ntext = \"{page.site.name}\"",
        );
        assert!(deep.contains("one level only"), "{deep}");
        let bad_name = problem(
            "related.Page__x = { table = \"pages\", foreign_key = \"page_id\", references = \"id\" }\n\
             tenant = { column = \"u\" }\ntext = \"{body}\"",
        );
        assert!(bad_name.contains("sources.s.related.Page__x"), "{bad_name}");
        let extra = problem(
            "related.page = { table = \"pages\", foreign_key = \"page_id\", reference = \"id\" }\n\
             tenant = { column = \"u\" }\ntext = \"{page.title}\"",
        );
        assert!(extra.contains("reference"), "{extra}");
    }
}
