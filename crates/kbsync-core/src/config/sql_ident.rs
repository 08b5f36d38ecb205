//! The one place where names and values from configuration become SQL text.
//!
//! DDL (triggers, trigger functions) cannot take bind parameters, so identifiers and the
//! few literals of a source's filter are validated here and always quoted.

use std::fmt;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentError {
    #[error(
        "{0:?} is not a plain SQL identifier (letters, digits, _ and $, not starting with a digit, at most 63 bytes)"
    )]
    NotPlain(String),
    #[error("{0:?} is not a table name: expected `table` or `schema.table`")]
    BadQualifiedName(String),
    #[error("value {0:?} contains a NUL byte, which PostgreSQL text cannot hold")]
    NulInLiteral(String),
}

/// A validated SQL identifier. Displays double-quoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(String);

impl Ident {
    pub fn new(name: &str) -> Result<Self, IdentError> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
        if first_ok && rest_ok && name.len() <= 63 {
            Ok(Self(name.to_owned()))
        } else {
            Err(IdentError::NotPlain(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a string literal (validation admits no quote, so wrapping is enough).
    pub fn as_literal(&self) -> String {
        format!("'{}'", self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Validation admits no double quote, so wrapping is enough.
        write!(f, "\"{}\"", self.0)
    }
}

/// `table` or `schema.table`, each part a validated identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: Option<Ident>,
    pub name: Ident,
}

impl TableName {
    pub fn parse(text: &str) -> Result<Self, IdentError> {
        let parts: Vec<&str> = text.split('.').collect();
        match parts.as_slice() {
            [name] => Ok(Self {
                schema: None,
                name: Ident::new(name)?,
            }),
            [schema, name] => Ok(Self {
                schema: Some(Ident::new(schema)?),
                name: Ident::new(name)?,
            }),
            _ => Err(IdentError::BadQualifiedName(text.to_owned())),
        }
    }

    /// The name as `to_regclass` wants it (quoted, so case is kept).
    pub fn regclass_text(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

/// A value that can be written into SQL as a string literal: it holds no NUL byte
/// (checked once, when it is made). Displays single-quoted; sessions that run kbsync's
/// DDL set `standard_conforming_strings = on`, so doubling single quotes is the whole
/// escape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SqlLiteral(String);

impl SqlLiteral {
    pub fn new(value: &str) -> Result<Self, IdentError> {
        if value.contains('\0') {
            return Err(IdentError::NulInLiteral(value.to_owned()));
        }
        Ok(Self(value.to_owned()))
    }

    /// The value itself, unquoted.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SqlLiteral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", self.0.replace('\'', "''"))
    }
}

/// A string literal for DDL (`SqlLiteral`, quoted).
pub fn quote_literal(value: &str) -> Result<String, IdentError> {
    Ok(SqlLiteral::new(value)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_identifiers_are_accepted_and_quoted() {
        assert_eq!(
            Ident::new("web_knowledge_qapair").unwrap().to_string(),
            "\"web_knowledge_qapair\""
        );
        assert_eq!(Ident::new("Mixed$1").unwrap().to_string(), "\"Mixed$1\"");
    }

    #[test]
    fn injection_attempts_are_rejected() {
        for bad in [
            "t; DROP TABLE users",
            "t\"; DROP TABLE users; --",
            "1abc",
            "",
            "a b",
            "a-b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(Ident::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("public.t; drop").is_err());
    }

    #[test]
    fn qualified_names_quote_each_part() {
        assert_eq!(
            TableName::parse("app.items").unwrap().to_string(),
            "\"app\".\"items\""
        );
        assert_eq!(TableName::parse("items").unwrap().to_string(), "\"items\"");
    }

    #[test]
    fn literals_double_single_quotes_and_refuse_nul() {
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert_eq!(quote_literal("a\\'b").unwrap(), "'a\\''b'");
        assert!(quote_literal("a\0b").is_err());
    }
}
