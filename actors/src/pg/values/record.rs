//! Parsers of two text forms built of quoted strings: composite values
//! (`record_out`: `(1,"a b",,"x""y")`) and `hstore` (`"k"=>"v", "n"=>NULL`).
//! Pure functions: `None` for anything malformed, never a panic.

use serde_json::{Map, Value};

/// The fields of composite text `s` (`(f1,f2,…)`), expecting `width` of
/// them: `None` for an empty field (SQL NULL), the unquoted text otherwise.
/// Inside quotes `""` is a quote and a backslash escapes the next character;
/// outside quotes a backslash escapes too (as `record_in` reads it).
/// `None` if malformed or of another width.
pub(super) fn composite(s: &str, width: usize) -> Option<Vec<Option<String>>> {
    let inner = s.trim().strip_prefix('(')?;
    if width == 0 {
        return (inner == ")").then(Vec::new);
    }
    let bytes = inner.as_bytes();
    let mut fields = Vec::with_capacity(width);
    let mut pos = 0;
    loop {
        let (field, end) = field(bytes, pos)?;
        fields.push(field);
        match bytes.get(end)? {
            b',' => pos = end + 1,
            b')' if end + 1 == bytes.len() => break,
            _ => return None,
        }
    }
    (fields.len() == width).then_some(fields)
}

/// One composite field starting at `pos`: its value and the position of
/// the `,` or `)` that ends it.
fn field(bytes: &[u8], mut pos: usize) -> Option<(Option<String>, usize)> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut any = false;
    loop {
        let b = *bytes.get(pos)?;
        match b {
            b',' | b')' if !quoted => break,
            b'"' if quoted && bytes.get(pos + 1) == Some(&b'"') => {
                out.push(b'"');
                pos += 1;
            }
            b'"' => quoted = !quoted,
            b'\\' => {
                pos += 1;
                out.push(*bytes.get(pos)?);
            }
            b => out.push(b),
        }
        any = true;
        pos += 1;
    }
    let value = if any {
        Some(String::from_utf8(out).ok()?)
    } else {
        None
    };
    Some((value, pos))
}

/// The pairs of hstore text `s` (`"k"=>"v", "n"=>NULL`) as an object of
/// strings and nulls; `None` if malformed.
pub(super) fn hstore(s: &str) -> Option<Map<String, Value>> {
    let mut p = Cursor {
        s: s.as_bytes(),
        pos: 0,
    };
    let mut map = Map::new();
    p.skip_ws();
    while p.pos < p.s.len() {
        let key = p.quoted()?;
        p.skip_ws();
        p.expect(b"=>")?;
        p.skip_ws();
        let value = if p.s.get(p.pos) == Some(&b'"') {
            Value::String(p.quoted()?)
        } else {
            p.expect(b"NULL")?;
            Value::Null
        };
        map.insert(key, value);
        p.skip_ws();
        if p.pos < p.s.len() {
            p.expect(b",")?;
            p.skip_ws();
        }
    }
    Some(map)
}

/// A position in hstore text.
struct Cursor<'a> {
    /// The text.
    s: &'a [u8],
    /// Next byte to read.
    pos: usize,
}

impl Cursor<'_> {
    /// Skip whitespace between tokens.
    fn skip_ws(&mut self) {
        while self.s.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
            self.pos += 1;
        }
    }

    /// Consume `token` or fail.
    fn expect(&mut self, token: &[u8]) -> Option<()> {
        let end = self.pos + token.len();
        (self.s.get(self.pos..end)? == token).then(|| self.pos = end)
    }

    /// A `"…"` string with backslash escapes.
    fn quoted(&mut self) -> Option<String> {
        self.expect(b"\"")?;
        let mut out = Vec::new();
        loop {
            let b = *self.s.get(self.pos)?;
            self.pos += 1;
            match b {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    out.push(*self.s.get(self.pos)?);
                    self.pos += 1;
                }
                b => out.push(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn composite_fields_unquote_and_empty_fields_are_null() {
        assert_eq!(
            composite(r#"(1,"a b",,"x""y\\z","")"#, 5),
            Some(vec![
                some("1"),
                some("a b"),
                None,
                some(r#"x"y\z"#),
                some("")
            ])
        );
        assert_eq!(composite("(,)", 2), Some(vec![None, None]));
        assert_eq!(composite("()", 0), Some(vec![]));
        assert_eq!(composite("()", 1), Some(vec![None]));
    }

    #[test]
    fn nested_composites_stay_one_field_for_the_inner_parse() {
        let outer = composite(r#"(home,"(1.5,""a,b"")")"#, 2).unwrap();
        assert_eq!(outer, vec![some("home"), some(r#"(1.5,"a,b")"#)]);
        let inner = composite(outer[1].as_deref().unwrap(), 2);
        assert_eq!(inner, Some(vec![some("1.5"), some("a,b")]));
    }

    #[test]
    fn malformed_or_mismatched_composites_are_refused() {
        for bad in ["", "1,2", "(1,2", "(1,2)x", r#"("open)"#, "(a\\", "(1,2))"] {
            assert_eq!(composite(bad, 2), None, "{bad}");
        }
        assert_eq!(composite("(1,2,3)", 2), None);
    }

    #[test]
    fn hstore_pairs_become_an_object_of_strings_and_nulls() {
        let map = hstore(r#""a"=>"1", "b c"=>NULL, "q\"\\"=>"x\"y""#).unwrap();
        assert_eq!(
            Value::Object(map),
            json!({"a": "1", "b c": null, "q\"\\": "x\"y"})
        );
        assert_eq!(hstore(""), Some(Map::new()));
        for bad in [r#""a"=>"#, r#""a"=>1"#, r#""a""b""#, r#""a"=>"1" "b"=>"2""#] {
            assert_eq!(hstore(bad), None, "{bad}");
        }
    }
}
