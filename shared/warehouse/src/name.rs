//! Schema-qualified table names, always rendered as quoted identifiers.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A `schema.table` pair. Names are case-sensitive and used verbatim: they are always quoted
/// when rendered into SQL, so `Sales."Q1"` and `sales.q1` are different tables.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QualifiedName {
    pub schema: String,
    pub table: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, table: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            table: table.into(),
        }
    }

    /// Rejects names PostgreSQL cannot store (empty, or containing NUL).
    pub(crate) fn validate(&self) -> Result<()> {
        for part in [&self.schema, &self.table] {
            if part.is_empty() {
                return Err(self.invalid("empty identifier"));
            }
            if part.contains('\0') {
                return Err(self.invalid("identifier contains a NUL character"));
            }
        }
        Ok(())
    }

    fn invalid(&self, reason: &'static str) -> Error {
        Error::InvalidName {
            input: format!("{}.{}", self.schema, self.table),
            reason,
        }
    }
}

/// Quotes an identifier for SQL, doubling embedded quotes.
pub(crate) fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Renders as SQL: `"schema"."table"`. The output parses back to the same name.
impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(&self.table)
        )
    }
}

/// Parses `schema.table`. Each part is either bare (taken verbatim, no case folding, may not
/// contain `.` or `"`) or double-quoted with `""` for an embedded quote, so `"a.b"."x""y"` is
/// schema `a.b`, table `x"y`.
impl FromStr for QualifiedName {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidName {
            input: input.to_owned(),
            reason,
        };
        let (schema, rest) = parse_part(input).map_err(invalid)?;
        let rest = rest
            .strip_prefix('.')
            .ok_or_else(|| invalid("expected `schema.table`"))?;
        let (table, rest) = parse_part(rest).map_err(invalid)?;
        if !rest.is_empty() {
            return Err(invalid("unexpected text after the table name"));
        }
        let name = Self { schema, table };
        name.validate()
            .map_err(|_| invalid("empty identifier or NUL character"))?;
        Ok(name)
    }
}

/// Parses one identifier from the front of `s`; returns it and the remainder.
fn parse_part(s: &str) -> Result<(String, &str), &'static str> {
    if let Some(quoted) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if quoted[i + 1..].starts_with('"') {
                    out.push('"');
                    chars.next();
                } else {
                    return Ok((out, &quoted[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        Err("unterminated quoted identifier")
    } else {
        let end = s.find(['.', '"']).unwrap_or(s.len());
        if s[end..].starts_with('"') {
            return Err("quote inside an unquoted identifier");
        }
        Ok((s[..end].to_owned(), &s[end..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<QualifiedName> {
        s.parse()
    }

    #[test]
    fn parses_bare_and_quoted_parts() -> Result<()> {
        assert_eq!(parse("gold.Orders")?, QualifiedName::new("gold", "Orders"));
        assert_eq!(
            parse(r#""a.b"."x""y""#)?,
            QualifiedName::new("a.b", r#"x"y"#)
        );
        assert_eq!(parse(r#"gold."T 1""#)?, QualifiedName::new("gold", "T 1"));
        Ok(())
    }

    #[test]
    fn rejects_malformed_names() {
        for bad in [
            "",
            "gold",
            "gold.",
            ".t",
            "a.b.c",
            r#""a.b"#,
            r#"a"b.c"#,
            r#""a"x.b"#,
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn display_quotes_and_round_trips() -> Result<()> {
        let name = QualifiedName::new("Gold", r#"we"ird.Name"#);
        assert_eq!(name.to_string(), r#""Gold"."we""ird.Name""#);
        assert_eq!(parse(&name.to_string())?, name);
        Ok(())
    }
}
