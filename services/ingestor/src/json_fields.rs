//! Finds named members of a JSON object as raw text slices, without decoding the values: a
//! change event's row images are passed on as the text they arrived as, so reading a message
//! allocates nothing per field.
//!
//! The object's own structure is checked (strings, nesting, separators); the content of the
//! values is left to whoever decodes them.

/// Why a text is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub at: usize,
    pub what: &'static str,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

/// The raw text of the members `names` of the JSON object `text` (`None` where absent; `null`
/// is returned as the text `null`). Member names with escapes never match.
pub fn fields<'a, const N: usize>(
    text: &'a str,
    names: [&str; N],
) -> Result<[Option<&'a str>; N], Malformed> {
    let mut found = [None; N];
    let mut scan = Scanner {
        bytes: text.as_bytes(),
        at: 0,
    };
    scan.skip_ws();
    scan.expect(b'{', "expected an object")?;
    scan.skip_ws();
    if scan.peek() == Some(b'}') {
        scan.at += 1;
    } else {
        loop {
            scan.skip_ws();
            let (name, escaped) = scan.string()?;
            scan.skip_ws();
            scan.expect(b':', "expected `:`")?;
            scan.skip_ws();
            let start = scan.at;
            scan.value()?;
            if !escaped && let Some(i) = names.iter().position(|n| *n == name) {
                found[i] = Some(&text[start..scan.at]);
            }
            scan.skip_ws();
            match scan.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(scan.error("expected `,` or `}`")),
            }
        }
    }
    scan.skip_ws();
    if scan.at != scan.bytes.len() {
        return Err(scan.error("trailing characters"));
    }
    Ok(found)
}

/// The text of a JSON string value without its quotes, if it is one without escapes.
pub fn plain_string(raw: &str) -> Option<&str> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains(['\\', '"'])).then_some(inner)
}

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn error(&self, what: &'static str) -> Malformed {
        Malformed { at: self.at, what }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), Malformed> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    /// A string: its content (escapes left as they are) and whether it has any.
    fn string(&mut self) -> Result<(&'a str, bool), Malformed> {
        self.expect(b'"', "expected a string")?;
        let start = self.at;
        let mut escaped = false;
        loop {
            match self.next() {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    self.next()
                        .ok_or_else(|| self.error("unterminated string"))?;
                }
                Some(b) if b < 0x20 => return Err(self.error("control character in a string")),
                Some(_) => {}
                None => return Err(self.error("unterminated string")),
            }
        }
        // The slice lies between two ASCII quotes of valid UTF-8 text.
        let bytes: &'a [u8] = self.bytes;
        let content = std::str::from_utf8(&bytes[start..self.at - 1])
            .map_err(|_| self.error("invalid UTF-8"))?;
        Ok((content, escaped))
    }

    /// Skips one value of any kind.
    fn value(&mut self) -> Result<(), Malformed> {
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(b'{' | b'[') => self.nested(),
            Some(b) if b == b'-' || b.is_ascii_alphanumeric() => {
                while matches!(self.peek(), Some(b) if b == b'-' || b == b'+' || b == b'.' || b.is_ascii_alphanumeric())
                {
                    self.at += 1;
                }
                Ok(())
            }
            _ => Err(self.error("expected a value")),
        }
    }

    /// Skips an object or array, matching brackets outside strings.
    fn nested(&mut self) -> Result<(), Malformed> {
        let mut stack: Vec<u8> = Vec::new();
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.string()?;
                    continue;
                }
                Some(open @ (b'{' | b'[')) => stack.push(if open == b'{' { b'}' } else { b']' }),
                Some(close @ (b'}' | b']')) => {
                    if stack.pop() != Some(close) {
                        return Err(self.error("mismatched bracket"));
                    }
                    if stack.is_empty() {
                        self.at += 1;
                        return Ok(());
                    }
                }
                Some(_) => {}
                None => return Err(self.error("unterminated object or array")),
            }
            self.at += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_members_as_raw_text() {
        let text = r#" { "op" : "u", "before":null, "after":{"id":7,"s":"a}\"b","n":[1,{"x":2}]},
            "ts_ms":1700, "k\"ey":1, "source":{"lsn":5} } "#;
        let [op, before, after, ts, source, missing] =
            fields(text, ["op", "before", "after", "ts_ms", "source", "nope"]).unwrap();
        assert_eq!(op, Some(r#""u""#));
        assert_eq!(before, Some("null"));
        assert_eq!(after, Some(r#"{"id":7,"s":"a}\"b","n":[1,{"x":2}]}"#));
        assert_eq!(ts, Some("1700"));
        assert_eq!(source, Some(r#"{"lsn":5}"#));
        assert_eq!(missing, None);
        assert_eq!(plain_string(op.unwrap()), Some("u"));
        assert_eq!(plain_string(r#""a\"b""#), None);
        assert_eq!(fields("{}", ["a"]).unwrap(), [None]);
    }

    #[test]
    fn malformed_objects_are_refused() {
        for bad in [
            "{not json",
            "[1]",
            r#"{"a":1"#,
            r#"{"a":1,}"#,
            r#"{"a":{"b":[1}}"#,
            r#"{"a":"x}"#,
            r#"{"a":1} x"#,
            "",
        ] {
            assert!(fields(bad, ["a"]).is_err(), "{bad}");
        }
    }
}
