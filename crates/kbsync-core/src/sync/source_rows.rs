//! Reading the current state of a source's rows: one query per batch of keys, the
//! tenant joined in, the filter applied, the text built from the configured columns.
//! A key with no row here is one whose chunks must go.

use std::collections::BTreeSet;

use tokio_postgres::GenericClient;

use crate::config::{ColumnRef, RowAlias, Source, TextPart};

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
        // A related table's missing column is named as the config names it (the
        // statement's own error would name an alias).
        let related = match missing_related_columns(client, source).await {
            Ok(missing) => missing,
            Err(e) => vec![crate::db::describe(&e)],
        };
        if !related.is_empty() {
            problems.extend(
                related
                    .into_iter()
                    .map(|problem| format!("sources.{}: {problem}", source.name)),
            );
            continue;
        }
        let verified = match SourceQuery::prepare(client, source).await {
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

/// What the source reads from its related tables that the database does not have,
/// as `related.NAME: …` lines.
async fn missing_related_columns(
    client: &impl GenericClient,
    source: &Source,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut missing = Vec::new();
    for (i, related) in source.related.iter().enumerate() {
        let wanted: Vec<String> = source
            .related_columns(i)
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect();
        let row = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL,
                        ARRAY(SELECT attname::text FROM pg_attribute
                               WHERE attrelid = to_regclass($1) AND attname = ANY($2)
                                 AND attnum > 0 AND NOT attisdropped)",
                &[&related.table.regclass_text(), &wanted],
            )
            .await?;
        if !row.get::<_, bool>(0) {
            missing.push(format!(
                "related.{}: table {} does not exist in this database",
                related.name, related.table
            ));
            continue;
        }
        let found: Vec<String> = row.get(1);
        for column in wanted.iter().filter(|c| !found.contains(c)) {
            missing.push(format!(
                "related.{0}: column {1} ({0}.{1}) does not exist in table {2}",
                related.name, column, related.table
            ));
        }
    }
    Ok(missing)
}

/// The prepared SELECT for one source.
#[derive(Debug, Clone)]
pub struct SourceQuery {
    /// The source's SQL pieces the query was built from.
    pub rows: RowSql,
    load_sql: String,
    /// Per related table: (the referenced rows of `$1`'s keys that a transaction in
    /// progress is updating or deleting, the statement that waits for one of them).
    related_writers: Vec<(String, String)>,
    /// The first page of all eligible rows in key order, and the pages after a key.
    first_page_sql: String,
    next_page_sql: String,
    text_columns: Vec<ColumnRef>,
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

/// The type of a table's column as the catalog names it (None: no such column).
async fn column_type(
    client: &impl GenericClient,
    table_text: &str,
    column: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped",
            &[&table_text, &column],
        )
        .await?
        .map(|r| r.get(0)))
}

impl RowSql {
    pub async fn prepare(
        client: &impl GenericClient,
        source: &Source,
    ) -> Result<Self, tokio_postgres::Error> {
        let key_type =
            column_type(client, &source.table.regclass_text(), source.key.as_str()).await?;
        let at = RowAlias::TABLE;
        let tenant = source.tenant_sql(at);
        let join = source.joins_sql(at, &source.related_tables());
        let metadata = if source.metadata.is_empty() {
            "'{}'::jsonb".to_owned()
        } else {
            let pairs: Vec<String> = source
                .metadata
                .iter()
                .map(|(name, column)| {
                    // Names are identifiers, or two joined by a dot: nothing to escape.
                    format!("'{name}', {}", column.sql(at))
                })
                .collect();
            format!("jsonb_build_object({})", pairs.join(", "))
        };
        let parts: Vec<String> = source
            .text
            .iter()
            .map(|p| match p {
                TextPart::Literal(l) => l.to_string(),
                TextPart::Column(c) => format!("{}::text", c.sql(at)),
            })
            .collect();
        Ok(Self {
            table: source.table.to_string(),
            from: format!("{} t{join}", source.table),
            eligible: format!("{} AND {tenant} IS NOT NULL", source.filter_sql(at)),
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
        let text_columns: Vec<ColumnRef> = {
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
            .map(|c| format!("{}::text", c.sql(RowAlias::TABLE)))
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
        let mut related_writers = Vec::new();
        for related in &source.related {
            let table = related.table.to_string();
            let references = &related.references;
            let ref_type = column_type(client, &related.table.regclass_text(), references.as_str())
                .await?
                .unwrap_or_else(|| "text".to_owned());
            // SKIP LOCKED skips only rows locked against FOR SHARE: rows being updated
            // or deleted, not those a foreign key check holds.
            let busy = format!(
                "WITH refs AS (SELECT DISTINCT t.{fk} AS ref FROM {source_table} t WHERE {key_match}),
                      free AS (SELECT r.{references} AS ref FROM {table} r
                                WHERE r.{references} IN (SELECT ref FROM refs) FOR SHARE OF r SKIP LOCKED)
                 SELECT r.{references}::text FROM {table} r
                  WHERE r.{references} IN (SELECT ref FROM refs)
                    AND r.{references} NOT IN (SELECT ref FROM free)",
                fk = related.foreign_key,
                source_table = source.table,
                key_match = sql.key_compare("= ANY", "$1", true),
            );
            let wait = format!(
                "SELECT 1 FROM {table} r WHERE r.{references} = $1::text::{ref_type} FOR SHARE OF r"
            );
            related_writers.push((busy, wait));
        }
        Ok(Self {
            rows: sql,
            related_writers,
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
        client.prepare(&self.load_sql).await?;
        for (busy, wait) in &self.related_writers {
            client.prepare(busy).await?;
            client.prepare(wait).await?;
        }
        Ok(())
    }

    /// The rows of `keys` that exist and pass the filter, read once no transaction is
    /// still writing the related rows they read.
    ///
    /// Why wait: a page update's trigger sees only FAQs committed before it ran. A FAQ
    /// inserted meanwhile is queued by its own trigger, and if it were read now, with
    /// the page update not yet committed, it would be written with the page's old
    /// tenant, and nothing would queue it again. Waiting for that writer (a FOR SHARE
    /// on its row, one row at a time, so that kbsync never holds one row while waiting
    /// for another and cannot deadlock a writer) makes the read see its commit.
    pub async fn load(
        &self,
        client: &impl GenericClient,
        keys: &[String],
    ) -> Result<Vec<SourceRow>, tokio_postgres::Error> {
        for (busy, wait) in &self.related_writers {
            let busy: Vec<String> = client
                .query(busy, &[&keys])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for reference in &busy {
                client.query(wait, &[reference]).await?;
            }
        }
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
                TextPart::Literal(l) => text.push_str(l.as_str()),
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
