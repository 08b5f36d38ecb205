//! Reading the current state of a source's rows: one query per batch of keys, the
//! tenant joined in, the filter applied, the text built from the configured columns.
//! A key with no row here is one whose chunks must go.

use std::collections::BTreeSet;

use tokio_postgres::GenericClient;

use crate::config::{Source, TextPart};
use crate::sql_ident::Ident;

/// A source row as kbsync needs it.
#[derive(Debug, Clone)]
pub struct SourceRow {
    pub key: String,
    pub tenant: String,
    pub text: String,
    pub metadata: serde_json::Value,
}

/// The prepared SELECT for one source.
#[derive(Debug, Clone)]
pub struct SourceQuery {
    load_sql: String,
    text_columns: Vec<Ident>,
    text: Vec<TextPart>,
}

impl SourceQuery {
    /// Build the query; the key column's type comes from the catalog so that the
    /// lookup by key uses the table's index.
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
        // The catalog's own type name (e.g. `uuid`, `integer`); falls back to text
        // comparison when the table is not there (install reports that clearly).
        let key_match = match key_type {
            Some(t) => format!("t.{} = ANY($1::text[]::{t}[])", source.key),
            None => format!("t.{}::text = ANY($1::text[])", source.key),
        };
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
        let columns: Vec<String> = text_columns
            .iter()
            .map(|c| format!("t.{c}::text"))
            .collect();
        let load_sql = format!(
            "SELECT t.{key}::text, {tenant}::text, {metadata}{sep}{columns}
               FROM {table} t{join}
              WHERE {key_match} AND {filter} AND {tenant} IS NOT NULL",
            key = source.key,
            table = source.table,
            sep = if columns.is_empty() { "" } else { ", " },
            columns = columns.join(", "),
            filter = source.filter_sql("t."),
        );
        Ok(Self {
            load_sql,
            text_columns,
            text: source.text.clone(),
        })
    }

    /// The rows of `keys` that exist and pass the filter.
    pub async fn load(
        &self,
        client: &impl GenericClient,
        keys: &[String],
    ) -> Result<Vec<SourceRow>, tokio_postgres::Error> {
        let rows = client.query(&self.load_sql, &[&keys]).await?;
        Ok(rows
            .iter()
            .map(|row| {
                let values: Vec<Option<String>> = (0..self.text_columns.len())
                    .map(|i| row.get(3 + i))
                    .collect();
                SourceRow {
                    key: row.get(0),
                    tenant: row.get(1),
                    metadata: row.get(2),
                    text: self.build_text(&values),
                }
            })
            .collect())
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

    /// Delete chunks of this source whose row is gone or fails the filter (after a
    /// TRUNCATE, where the keys are unknown).
    pub fn orphan_delete_sql(source: &Source) -> String {
        format!(
            "DELETE FROM public.tenant_knowledge k
              WHERE k.source = $1
                AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{key}::text = k.source_key AND {filter})",
            table = source.table,
            key = source.key,
            filter = source.filter_sql("t."),
        )
    }
}
