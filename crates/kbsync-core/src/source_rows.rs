//! Reading the current state of a source's rows: one query per batch of keys, the
//! tenant joined in, the filter applied, the text built from the configured columns.
//! A key with no row here is one whose chunks must go.

use std::collections::BTreeSet;

use tokio_postgres::GenericClient;

use crate::config::{Source, TextPart};
use crate::sql_ident::{Ident, quote_literal};

/// A source row as kbsync needs it.
#[derive(Debug, Clone)]
pub struct SourceRow {
    pub key: String,
    pub tenant: String,
    pub text: String,
    /// `RowSql::text_hash64` of the row: what the chunks record as the text they were
    /// cut from, for the reconcile sweep's comparison.
    pub text_hash64: i64,
    pub metadata: serde_json::Value,
}

/// Every configured source's statement, planned by the database: one line per source
/// whose table, columns or filter the database does not have (empty: all fine).
pub async fn unusable_sources(
    client: &impl GenericClient,
    config: &crate::config::Config,
) -> Vec<String> {
    let mut problems = Vec::new();
    for source in config.sources() {
        let verified = match SourceQuery::prepare(client, &source).await {
            Ok(query) => query.verify(client).await,
            Err(e) => Err(e),
        };
        if let Err(e) = verified {
            problems.push(format!(
                "sources.{}: {}",
                source.name,
                crate::db::describe(&e)
            ));
        }
    }
    problems
}

/// The prepared SELECT for one source.
#[derive(Debug, Clone)]
pub struct SourceQuery {
    /// The source's SQL pieces the query was built from.
    pub rows: RowSql,
    load_sql: String,
    /// The first page of all eligible rows in key order, and the pages after a key.
    first_page_sql: String,
    next_page_sql: String,
    text_columns: Vec<Ident>,
    text: Vec<TextPart>,
}

/// The SQL pieces that say which rows of a source are eligible (exist, pass the
/// filter, have a tenant) and what their tenant, metadata and text are. Defined once,
/// used by the daemon's reads, the TRUNCATE clean-up and the reconcile sweep, so the
/// three can never disagree about what belongs in the knowledge base.
#[derive(Debug, Clone)]
pub struct RowSql {
    /// The source table, quoted (alias `t` in the other pieces).
    pub table: String,
    /// `table t [JOIN tenant_table v ON ...]`.
    pub from: String,
    /// The tenant expression (not cast).
    pub tenant: String,
    /// True for eligible rows of `from`.
    pub eligible: String,
    /// The row's metadata as jsonb.
    pub metadata: String,
    /// The row's text exactly as `SourceQuery::load` builds it (NULL columns empty).
    pub text: String,
    /// `t.key`.
    pub key: String,
    /// The key column's type as the catalog names it (None: table not found).
    pub key_type: Option<String>,
}

impl RowSql {
    pub async fn prepare(
        client: &impl GenericClient,
        source: &Source,
    ) -> Result<Self, tokio_postgres::Error> {
        let key_type: Option<String> = client
            .query_opt(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                  WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped",
                &[&source.table.regclass_text(), &source.key.as_str()],
            )
            .await?
            .map(|r| r.get(0));
        let (tenant, join) = match &source.tenant_via {
            Some((table, fk, references)) => (
                format!("v.{}", source.tenant_column),
                format!(" JOIN {table} v ON v.{references} = t.{fk}"),
            ),
            None => (format!("t.{}", source.tenant_column), String::new()),
        };
        let metadata = if source.metadata.is_empty() {
            "'{}'::jsonb".to_owned()
        } else {
            let pairs: Vec<String> = source
                .metadata
                .iter()
                .map(|m| format!("'{}', t.{m}", m.as_str()))
                .collect();
            format!("jsonb_build_object({})", pairs.join(", "))
        };
        let parts: Vec<String> = source
            .text
            .iter()
            .map(|p| match p {
                // Template literals were validated when the config was read.
                TextPart::Literal(l) => quote_literal(l).unwrap_or_else(|_| "''".to_owned()),
                TextPart::Column(c) => format!("t.{c}::text"),
            })
            .collect();
        Ok(Self {
            table: source.table.to_string(),
            from: format!("{} t{join}", source.table),
            eligible: format!("{} AND {tenant} IS NOT NULL", source.filter_sql("t.")),
            tenant,
            metadata,
            text: format!("concat({})", parts.join(", ")),
            key: format!("t.{}", source.key),
            key_type,
        })
    }

    /// The row text's 64-bit hash, as migration 0006 defines it: bytewise (COLLATE
    /// "C", so a case-insensitive collation cannot make two texts hash alike).
    pub fn text_hash64(&self) -> String {
        format!("hashtextextended(({}) COLLATE \"C\", 0)", self.text)
    }

    /// `t.key OP param`, with the text value (or text array) `param` cast to the key's
    /// own type so that the table's index on the key is used.
    pub fn key_compare(&self, op: &str, param: &str, array: bool) -> String {
        let suffix = if array { "[]" } else { "" };
        match &self.key_type {
            Some(t) => format!("{} {op} ({param}::text{suffix}::{t}{suffix})", self.key),
            None => format!("{}::text {op} ({param}::text{suffix})", self.key),
        }
    }
}

impl SourceQuery {
    /// Build the query; the key column's type comes from the catalog so that the
    /// lookup by key uses the table's index.
    pub async fn prepare(
        client: &impl GenericClient,
        source: &Source,
    ) -> Result<Self, tokio_postgres::Error> {
        let sql = RowSql::prepare(client, source).await?;
        let text_columns: Vec<Ident> = {
            let mut seen = BTreeSet::new();
            source
                .text
                .iter()
                .filter_map(|p| match p {
                    TextPart::Column(c) if seen.insert(c.clone()) => Some(c.clone()),
                    _ => None,
                })
                .collect()
        };
        let columns: Vec<String> = text_columns
            .iter()
            .map(|c| format!("t.{c}::text"))
            .collect();
        let select = format!(
            "SELECT {key}::text, {tenant}::text, {metadata}, {text_hash64}{sep}{columns}
               FROM {from}",
            key = sql.key,
            tenant = sql.tenant,
            metadata = sql.metadata,
            text_hash64 = sql.text_hash64(),
            sep = if columns.is_empty() { "" } else { ", " },
            columns = columns.join(", "),
            from = sql.from,
        );
        let load_sql = format!(
            "{select} WHERE {key_match} AND {eligible}",
            key_match = sql.key_compare("= ANY", "$1", true),
            eligible = sql.eligible,
        );
        let first_page_sql = format!(
            "{select} WHERE {eligible} ORDER BY {key} LIMIT $1",
            eligible = sql.eligible,
            key = sql.key,
        );
        let next_page_sql = format!(
            "{select} WHERE {after} AND {eligible} ORDER BY {key} LIMIT $2",
            after = sql.key_compare(">", "$1", false),
            eligible = sql.eligible,
            key = sql.key,
        );
        Ok(Self {
            rows: sql,
            load_sql,
            first_page_sql,
            next_page_sql,
            text_columns,
            text: source.text.clone(),
        })
    }

    /// Have PostgreSQL parse and plan the source's statement without running it: a
    /// missing table or column, or a filter that does not compile, fails here with the
    /// server's own message rather than in the first batch.
    pub async fn verify(&self, client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
        client.prepare(&self.load_sql).await.map(drop)
    }

    /// The rows of `keys` that exist and pass the filter.
    pub async fn load(
        &self,
        client: &impl GenericClient,
        keys: &[String],
    ) -> Result<Vec<SourceRow>, tokio_postgres::Error> {
        let rows = client.query(&self.load_sql, &[&keys]).await?;
        Ok(self.source_rows(&rows))
    }

    /// Up to `limit` eligible rows in key order, after the key `after` (from the first
    /// row when None): a whole source read page by page, without holding it in memory.
    pub async fn load_page(
        &self,
        client: &impl GenericClient,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SourceRow>, tokio_postgres::Error> {
        let rows = match after {
            None => client.query(&self.first_page_sql, &[&limit]).await?,
            Some(key) => client.query(&self.next_page_sql, &[&key, &limit]).await?,
        };
        Ok(self.source_rows(&rows))
    }

    fn source_rows(&self, rows: &[tokio_postgres::Row]) -> Vec<SourceRow> {
        rows.iter()
            .map(|row| {
                let values: Vec<Option<String>> = (0..self.text_columns.len())
                    .map(|i| row.get(4 + i))
                    .collect();
                SourceRow {
                    key: row.get(0),
                    tenant: row.get(1),
                    metadata: row.get(2),
                    text_hash64: row.get(3),
                    text: self.build_text(&values),
                }
            })
            .collect()
    }

    fn build_text(&self, values: &[Option<String>]) -> String {
        let mut text = String::new();
        for part in &self.text {
            match part {
                TextPart::Literal(l) => text.push_str(l),
                TextPart::Column(c) => {
                    let i = self.text_columns.iter().position(|x| x == c).unwrap_or(0);
                    text.push_str(values.get(i).and_then(|v| v.as_deref()).unwrap_or(""));
                }
            }
        }
        text
    }

    /// Delete chunks of this source whose row is gone or not eligible (after a
    /// TRUNCATE, where the keys are unknown).
    pub fn orphan_delete_sql(rows: &RowSql) -> String {
        format!(
            "DELETE FROM public.tenant_knowledge k
              WHERE k.source = $1
                AND NOT EXISTS (SELECT 1 FROM {from} WHERE {key}::text = k.source_key AND {eligible})",
            from = rows.from,
            key = rows.key,
            eligible = rows.eligible,
        )
    }
}
