//! A source as the rest of kbsync uses it, validated once from its `[sources.NAME]`
//! section: table, key, tenant, related tables, filter, text template and metadata,
//! each ready to be written into SQL.

use std::time::Duration;

use crate::config::sql_ident::{Ident, SqlLiteral, TableName};

use super::file::*;

/// What a source's chunk sizes are checked against: the model's limits.
pub(crate) struct ChunkLimits {
    /// The most tokens the model takes in one input.
    pub model_tokens: usize,
    /// `chunk_tokens` when the source does not set it.
    pub default_chunk_tokens: usize,
}

/// How a source's text is assembled from its columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextPart {
    Literal(SqlLiteral),
    Column(ColumnRef),
}

/// A run of a text template's literal text: it is also written into SQL (the sweep
/// builds the text there), so it must be a valid literal.
fn template_literal(text: &str) -> Result<TextPart, String> {
    SqlLiteral::new(text)
        .map(TextPart::Literal)
        .map_err(|e| e.to_string())
}

/// A related table of a source, validated: `foreign_key` on the source row points at
/// `references` (unique) in `table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Related {
    /// The name its columns go by (`page` in `{page.title}`).
    pub name: String,
    pub table: TableName,
    pub foreign_key: Ident,
    pub references: Ident,
}

/// A column a source reads: of its own row (`related` None) or of the row of
/// `Source::related[i]` its foreign key points at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ColumnRef {
    pub related: Option<usize>,
    pub column: Ident,
}

/// Where a statement has a source row's columns: its own under the prefix `own`
/// (`t.`, `n.`, `(c.n).`), related row `i` under the alias `{related}{i}` (`t_r0`).
#[derive(Debug, Clone, Copy)]
pub struct RowAlias<'a> {
    pub own: &'a str,
    pub related: &'a str,
}

impl RowAlias<'_> {
    /// The source row as `t` with its related rows as `t_r0`, `t_r1`, …: the aliases of
    /// the statements that read rows (`source_rows::RowSql`).
    pub const TABLE: RowAlias<'static> = RowAlias {
        own: "t.",
        related: "t_r",
    };
}

impl ColumnRef {
    /// This column in a statement whose rows are named as `at` says.
    pub fn sql(&self, at: RowAlias) -> String {
        match self.related {
            None => format!("{}{}", at.own, self.column),
            Some(i) => format!("{}{i}.{}", at.related, self.column),
        }
    }

    /// `column` or `related.column`, as the config writes it.
    pub fn written(&self, related: &[Related]) -> String {
        match self.related.and_then(|i| related.get(i)) {
            None => self.column.as_str().to_owned(),
            Some(r) => format!("{}.{}", r.name, self.column.as_str()),
        }
    }
}

/// `column` or `related.column` against the declared related tables.
fn column_ref(text: &str, related: &[Related]) -> Result<ColumnRef, String> {
    let text = text.trim();
    match text.split_once('.') {
        None => Ok(ColumnRef {
            related: None,
            column: Ident::new(text).map_err(|e| e.to_string())?,
        }),
        Some((name, column)) => {
            let Some(i) = related.iter().position(|r| r.name == name) else {
                let declared: Vec<&str> = related.iter().map(|r| r.name.as_str()).collect();
                return Err(format!(
                    "{text:?} names the related table {name:?}, which is not declared ({}); declare it as [sources.NAME.related.{name}] with table, foreign_key and references",
                    if declared.is_empty() {
                        "none is".to_owned()
                    } else {
                        format!("declared: {}", declared.join(", "))
                    }
                ));
            };
            if column.contains('.') {
                return Err(format!(
                    "{text:?} reaches past the related table {name:?}: one level only; declare the table you need as a related table of the source itself"
                ));
            }
            Ok(ColumnRef {
                related: Some(i),
                column: Ident::new(column).map_err(|e| e.to_string())?,
            })
        }
    }
}

pub fn parse_text_template(template: &str, related: &[Related]) -> Result<Vec<TextPart>, String> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => return Err(format!("unclosed placeholder {{{name}")),
                    }
                }
                let column = column_ref(&name, related)
                    .map_err(|e| format!("placeholder {{{name}}}: {e}"))?;
                if !literal.is_empty() {
                    parts.push(template_literal(&std::mem::take(&mut literal))?);
                }
                parts.push(TextPart::Column(column));
            }
            '}' => return Err("a lone `}`; write `}}` for a brace".into()),
            other => literal.push(other),
        }
    }
    if !literal.is_empty() {
        parts.push(template_literal(&literal)?);
    }
    if !parts.iter().any(|p| matches!(p, TextPart::Column(_))) {
        return Err("names no column: use {column} placeholders".into());
    }
    Ok(parts)
}

/// A filter rule, validated: SQL over a row whose columns are where a `RowAlias` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub column: ColumnRef,
    pub condition: FilterCondition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterCondition {
    Equals(SqlLiteral),
    NotEquals(SqlLiteral),
    OneOf(Vec<SqlLiteral>),
    IsNull(bool),
}

impl Filter {
    /// This rule as SQL over the row at `at`; NULL counts as "does not pass".
    pub fn to_sql(&self, at: RowAlias) -> String {
        let col = self.column.sql(at);
        match &self.condition {
            FilterCondition::Equals(v) => format!("{col} = {v}"),
            FilterCondition::NotEquals(v) => format!("{col} IS DISTINCT FROM {v}"),
            FilterCondition::OneOf(vs) => format!(
                "{col} IN ({})",
                vs.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            FilterCondition::IsNull(true) => format!("{col} IS NULL"),
            FilterCondition::IsNull(false) => format!("{col} IS NOT NULL"),
        }
    }
}

/// A source, validated, with its names ready to be quoted into SQL.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub table: TableName,
    pub key: Ident,
    /// Its related tables, each used by at least one column reference.
    pub related: Vec<Related>,
    pub tenant: ColumnRef,
    pub filters: Vec<Filter>,
    pub text: Vec<TextPart>,
    /// (key in the chunk's metadata, column).
    pub metadata: Vec<(String, ColumnRef)>,
    pub debounce: Duration,
    pub max_wait: Duration,
    pub delete_debounce: Duration,
    pub single_chunk: bool,
    pub chunk_tokens: usize,
    pub chunk_overlap: usize,
    /// The text search configuration of this source's chunks (a regconfig name).
    pub text_search: Ident,
}

/// A relation name: lowercase letters, digits and single underscores (it names
/// triggers, `kbsync_{source}__{related}_upd`, where `__` separates the two).
fn valid_related_name(name: &str) -> bool {
    name.len() <= 20
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.contains("__")
        && !name.ends_with('_')
}

impl Source {
    /// The name as a SQL literal (trigger functions carry it). Validation admits only
    /// lowercase letters, digits and `_`, so wrapping is the whole quoting (as for
    /// `Ident::as_literal`).
    pub fn name_literal(&self) -> String {
        format!("'{}'", self.name)
    }

    pub(crate) fn from_config(
        name: &str,
        cfg: &SourceConfig,
        limits: &ChunkLimits,
    ) -> Result<Self, (String, String)> {
        let field = |f: &str| {
            if f.is_empty() {
                String::new()
            } else {
                format!(".{f}")
            }
        };
        let valid_name = name.len() <= 40
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !name.contains("__");
        if !valid_name {
            return Err((
                String::new(),
                format!(
                    "source name {name:?} must be lowercase letters, digits and single underscores, start with a letter, at most 40 characters"
                ),
            ));
        }
        let table = TableName::parse(&cfg.table).map_err(|e| (field("table"), e.to_string()))?;
        let key = Ident::new(&cfg.key).map_err(|e| (field("key"), e.to_string()))?;
        let mut related = Vec::new();
        for (rel_name, rel) in &cfg.related {
            let at = |f: &str| field(&format!("related.{rel_name}{f}"));
            related.push(Self::related_from_config(rel_name, rel, &at)?);
        }
        // `tenant.via` written in place is a related table named `via`.
        let tenant_related = match &cfg.tenant.via {
            None => None,
            Some(TenantVia::Related(rel_name)) => Some(
                related
                    .iter()
                    .position(|r| &r.name == rel_name)
                    .ok_or_else(|| {
                        (
                            field("tenant.via"),
                            format!(
                                "names the related table {rel_name:?}, which is not declared: add [sources.{name}.related.{rel_name}] with table, foreign_key and references"
                            ),
                        )
                    })?,
            ),
            Some(TenantVia::Join(join)) => {
                let at = |f: &str| field(&format!("tenant.via{f}"));
                let via = Self::related_from_config("via", join, &at)?;
                match related.iter().position(|r| r.name == "via") {
                    Some(i) if related[i] == via => Some(i),
                    Some(_) => {
                        return Err((
                            field("tenant.via"),
                            "a different related table is already named \"via\": write tenant.via = \"<name>\" to use a declared one".into(),
                        ));
                    }
                    None => {
                        related.push(via);
                        Some(related.len() - 1)
                    }
                }
            }
        };
        let tenant = ColumnRef {
            related: tenant_related,
            column: Ident::new(&cfg.tenant.column)
                .map_err(|e| (field("tenant.column"), e.to_string()))?,
        };
        let mut filters = Vec::new();
        for (i, rule) in cfg.filter.iter().enumerate() {
            let at = |f: &str| field(&format!("filter[{i}]{f}"));
            let column = column_ref(&rule.column, &related).map_err(|e| (at(".column"), e))?;
            let literal = |v: &str| SqlLiteral::new(v).map_err(|e| (at(""), e.to_string()));
            let mut conditions = Vec::new();
            if let Some(v) = &rule.equals {
                conditions.push(FilterCondition::Equals(literal(v)?));
            }
            if let Some(v) = &rule.not_equals {
                conditions.push(FilterCondition::NotEquals(literal(v)?));
            }
            if let Some(vs) = &rule.one_of {
                if vs.is_empty() {
                    return Err((at(".one_of"), "must list at least one value".into()));
                }
                conditions.push(FilterCondition::OneOf(
                    vs.iter().map(|v| literal(v)).collect::<Result<_, _>>()?,
                ));
            }
            if let Some(b) = rule.is_null {
                conditions.push(FilterCondition::IsNull(b));
            }
            if conditions.len() != 1 {
                return Err((
                    at(""),
                    "needs exactly one of equals, not_equals, one_of, is_null".into(),
                ));
            }
            let condition = conditions.remove(0);
            filters.push(Filter { column, condition });
        }
        let text = parse_text_template(&cfg.text, &related).map_err(|e| (field("text"), e))?;
        let metadata = cfg
            .metadata
            .iter()
            .map(|m| {
                column_ref(m, &related)
                    .map(|c| (c.written(&related), c))
                    .map_err(|e| (field("metadata"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if cfg.max_wait < cfg.debounce {
            return Err((
                field("max_wait"),
                format!(
                    "{} is shorter than debounce ({}); max_wait bounds how long a busy key may wait, so it must be at least the debounce window",
                    humantime_serde::re::humantime::format_duration(cfg.max_wait),
                    humantime_serde::re::humantime::format_duration(cfg.debounce)
                ),
            ));
        }
        let limit = limits.model_tokens;
        let chunk_tokens = cfg.chunk_tokens.unwrap_or(limits.default_chunk_tokens);
        if chunk_tokens == 0 || chunk_tokens > limit {
            return Err((
                field("chunk_tokens"),
                format!(
                    "{chunk_tokens} is out of range: 1..={limit} for the configured embedding model"
                ),
            ));
        }
        let chunk_overlap = cfg.chunk_overlap.unwrap_or(chunk_tokens / 8);
        if chunk_overlap >= chunk_tokens {
            return Err((
                field("chunk_overlap"),
                format!("{chunk_overlap} must be smaller than the chunk size ({chunk_tokens})"),
            ));
        }
        let text_search = Ident::new(&cfg.text_search).map_err(|_| {
            (
                field("text_search"),
                format!(
                    "{:?} is not a text search configuration name (`SELECT cfgname FROM pg_ts_config` lists them; e.g. \"simple\", \"english\")",
                    cfg.text_search
                ),
            )
        })?;
        let source = Self {
            text_search,
            name: name.to_owned(),
            table,
            key,
            related,
            tenant,
            filters,
            text,
            metadata,
            debounce: cfg.debounce,
            max_wait: cfg.max_wait,
            delete_debounce: cfg.delete_debounce,
            single_chunk: cfg.single_chunk,
            chunk_tokens,
            chunk_overlap,
        };
        // A related table nothing reads would be watched for nothing.
        for (i, rel) in source.related.iter().enumerate() {
            if source.related_columns(i).len() <= 1 {
                return Err((
                    field(&format!("related.{}", rel.name)),
                    format!(
                        "is declared but nothing reads it: name its columns as {{{0}.column}} in the text, in a filter or the metadata, or take the tenant through it (tenant.via = \"{0}\"); or remove it",
                        rel.name
                    ),
                ));
            }
        }
        Ok(source)
    }

    fn related_from_config(
        name: &str,
        cfg: &RelatedConfig,
        at: &dyn Fn(&str) -> String,
    ) -> Result<Related, (String, String)> {
        if !valid_related_name(name) {
            return Err((
                at(""),
                format!(
                    "related table name {name:?} must be lowercase letters, digits and single underscores, start with a letter, at most 20 characters"
                ),
            ));
        }
        Ok(Related {
            name: name.to_owned(),
            table: TableName::parse(&cfg.table).map_err(|e| (at(".table"), e.to_string()))?,
            foreign_key: Ident::new(&cfg.foreign_key)
                .map_err(|e| (at(".foreign_key"), e.to_string()))?,
            references: Ident::new(&cfg.references)
                .map_err(|e| (at(".references"), e.to_string()))?,
        })
    }

    /// Every column reference of the source: text, filter, metadata, tenant.
    pub fn column_refs(&self) -> Vec<ColumnRef> {
        let mut refs: Vec<ColumnRef> = self
            .text
            .iter()
            .filter_map(|p| match p {
                TextPart::Column(c) => Some(c.clone()),
                TextPart::Literal(_) => None,
            })
            .collect();
        refs.extend(self.filters.iter().map(|f| f.column.clone()));
        refs.extend(self.metadata.iter().map(|(_, c)| c.clone()));
        refs.push(self.tenant.clone());
        refs
    }

    /// Columns of the source table whose change can change this source's chunks:
    /// the key, its own columns of the text, filter, metadata and tenant, and the
    /// foreign key of each related table. Derived, so it cannot drift from the config.
    pub fn relevant_columns(&self) -> Vec<Ident> {
        let mut cols = vec![self.key.clone()];
        cols.extend(
            self.column_refs()
                .into_iter()
                .filter(|c| c.related.is_none())
                .map(|c| c.column),
        );
        cols.extend(self.related.iter().map(|r| r.foreign_key.clone()));
        dedup(cols)
    }

    /// Columns of related table `i` whose change can change the chunks of the rows
    /// that reference it: the referenced key first, then every column read from it.
    pub fn related_columns(&self, i: usize) -> Vec<Ident> {
        let mut cols: Vec<Ident> = self
            .related
            .get(i)
            .map(|r| r.references.clone())
            .into_iter()
            .collect();
        cols.extend(
            self.column_refs()
                .into_iter()
                .filter(|c| c.related == Some(i))
                .map(|c| c.column),
        );
        dedup(cols)
    }

    /// The related tables joined to the row at `at`, each as `{at.related}{i}`, from
    /// `tables` (the related tables' names as the statement must write them). A LEFT
    /// JOIN: a row whose related row is missing reads NULLs there (no tenant, a filter
    /// that fails, an empty placeholder), as the row loader and the sweep both do.
    pub fn joins_sql(&self, at: RowAlias, tables: &[String]) -> String {
        self.related
            .iter()
            .zip(tables)
            .enumerate()
            .map(|(i, (r, table))| {
                format!(
                    " LEFT JOIN {table} {alias}{i} ON {alias}{i}.{references} = {own}{fk}",
                    alias = at.related,
                    references = r.references,
                    own = at.own,
                    fk = r.foreign_key,
                )
            })
            .collect()
    }

    /// The related tables' names as written in the config (resolved by the session's
    /// search_path), for `joins_sql`.
    pub fn related_tables(&self) -> Vec<String> {
        self.related.iter().map(|r| r.table.to_string()).collect()
    }

    /// The tenant of the row at `at` (NULL when it has none).
    pub fn tenant_sql(&self, at: RowAlias) -> String {
        self.tenant.sql(at)
    }

    /// SQL that is true when the row at `at` passes the filter's rules on its own
    /// columns (never NULL): a row that fails them is not eligible whatever its related
    /// rows say.
    pub fn own_filter_sql(&self, at: RowAlias) -> String {
        let rules: Vec<String> = self
            .filters
            .iter()
            .filter(|f| f.column.related.is_none())
            .map(|f| f.to_sql(at))
            .collect();
        if rules.is_empty() {
            return "true".to_owned();
        }
        format!("COALESCE(({}), false)", rules.join(" AND "))
    }

    /// SQL that is true when the row at `at` passes the filter (never NULL).
    pub fn filter_sql(&self, at: RowAlias) -> String {
        if self.filters.is_empty() {
            return "true".to_owned();
        }
        let rules: Vec<String> = self.filters.iter().map(|f| f.to_sql(at)).collect();
        format!("COALESCE(({}), false)", rules.join(" AND "))
    }
}

fn dedup(mut cols: Vec<Ident>) -> Vec<Ident> {
    let mut seen = std::collections::BTreeSet::new();
    cols.retain(|c| seen.insert(c.clone()));
    cols
}
