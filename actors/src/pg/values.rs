//! pgoutput text-format column values to faithful JSON.
//!
//! Both the replication session and the snapshot readers pin the settings of
//! [`super::session`] (`DateStyle=ISO`, `TimeZone=UTC`,
//! `IntervalStyle=iso_8601`, `extra_float_digits=3`, hex bytea), so the text
//! forms are predictable. Types are known by `postgres-types`' [`Type`]
//! (OIDs, names, array elements); the types converted by their own rule are
//! listed in [`SCALARS`] and [`ARRAYS`]. Numbers JSON cannot hold exactly (numeric, money) become
//! strings with every digit; NaN and infinities become strings; timestamps
//! become RFC 3339; bytea becomes base64; arrays become (nested) JSON arrays.
//! Nothing panics on odd input: the fallback is always the original text as a
//! JSON string.
//!
//! Types beyond the built-ins are rendered by the [`Rule`] the catalog gives
//! them ([`super::types`]): domains as their base type, composites as
//! objects ([`record`]), hstore as an object, arrays of any type as arrays,
//! money as an exact decimal string (`lc_monetary` is pinned to `C` by
//! [`super::session`], and the text is parsed to digits), and everything
//! else as its text. Text that is not valid UTF-8 (a `SQL_ASCII` database)
//! is decoded lossily: each invalid sequence becomes U+FFFD.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{Number, Value};

use tokio_postgres::types::{Kind, Type};

use super::types::Rule;

mod record;

/// The built-in scalar types pgcdc names and converts by their own rule;
/// every other type is rendered as its text (or by its own rule, see
/// [`super::types`]) and named by [`super::types::label`].
const SCALARS: &[Type] = &[
    Type::BOOL,
    Type::BYTEA,
    Type::CHAR,
    Type::NAME,
    Type::INT8,
    Type::INT2,
    Type::INT4,
    Type::TEXT,
    Type::OID,
    Type::XID,
    Type::JSON,
    Type::XML,
    Type::CIDR,
    Type::FLOAT4,
    Type::FLOAT8,
    Type::MONEY,
    Type::MACADDR,
    Type::INET,
    Type::BPCHAR,
    Type::VARCHAR,
    Type::DATE,
    Type::TIME,
    Type::TIMESTAMP,
    Type::TIMESTAMPTZ,
    Type::INTERVAL,
    Type::TIMETZ,
    Type::NUMERIC,
    Type::UUID,
    Type::JSONB,
];

/// The arrays of [`SCALARS`] pgcdc names and converts element by element.
const ARRAYS: &[Type] = &[
    Type::BOOL_ARRAY,
    Type::BYTEA_ARRAY,
    Type::CHAR_ARRAY,
    Type::NAME_ARRAY,
    Type::INT2_ARRAY,
    Type::INT4_ARRAY,
    Type::TEXT_ARRAY,
    Type::XID_ARRAY,
    Type::BPCHAR_ARRAY,
    Type::VARCHAR_ARRAY,
    Type::INT8_ARRAY,
    Type::FLOAT4_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::OID_ARRAY,
    Type::MACADDR_ARRAY,
    Type::INET_ARRAY,
    Type::TIMESTAMP_ARRAY,
    Type::DATE_ARRAY,
    Type::TIME_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::INTERVAL_ARRAY,
    Type::NUMERIC_ARRAY,
    Type::TIMETZ_ARRAY,
    Type::XML_ARRAY,
    Type::JSON_ARRAY,
    Type::CIDR_ARRAY,
    Type::MONEY_ARRAY,
    Type::UUID_ARRAY,
    Type::JSONB_ARRAY,
];

/// One of [`SCALARS`] or [`ARRAYS`] by OID; `None` for any other type.
/// Looked up for every value rendered, so by index: [`Type::oid`] is a
/// match over every built-in type, too slow to scan the lists with.
fn known(type_oid: u32) -> Option<&'static Type> {
    static BY_OID: std::sync::OnceLock<Vec<Option<&'static Type>>> = std::sync::OnceLock::new();
    let table = BY_OID.get_or_init(|| {
        let all = || SCALARS.iter().chain(ARRAYS);
        let len = all().map(|t| t.oid() as usize + 1).max().unwrap_or(0);
        let mut table = vec![None; len];
        for t in all() {
            table[t.oid() as usize] = Some(t);
        }
        table
    });
    usize::try_from(type_oid)
        .ok()
        .and_then(|i| table.get(i).copied().flatten())
}

/// The element type of one of [`ARRAYS`]; `None` for anything else.
fn array_element(type_oid: u32) -> Option<&'static Type> {
    known(type_oid).and_then(|t| match t.kind() {
        Kind::Array(elem) => Some(elem),
        _ => None,
    })
}

/// Whether `type_oid` is one of [`SCALARS`].
pub(crate) fn known_scalar(type_oid: u32) -> bool {
    known(type_oid).is_some_and(|t| !matches!(t.kind(), Kind::Array(_)))
}

/// The element OID of `type_oid` if it is one of [`ARRAYS`].
pub(crate) fn known_array(type_oid: u32) -> Option<u32> {
    array_element(type_oid).map(Type::oid)
}

/// PostgreSQL's limit on array dimensions (`MAXDIM`); deeper literals are malformed.
const MAX_ARRAY_DEPTH: usize = 6;

/// Name of a built-in type (e.g. `int4`, `_text`, `timestamptz`), or `None`
/// for unknown OIDs (enums, domains, extension types).
pub fn type_name(type_oid: u32) -> Option<&'static str> {
    known(type_oid).map(Type::name)
}

/// Convert one text-format value of a column of built-in type `type_oid`
/// (any other OID is rendered as its text) to JSON.
#[cfg(test)]
pub fn text_to_json(type_oid: u32, text: &[u8]) -> Value {
    render(&Rule::builtin(type_oid).unwrap_or(Rule::Text), text)
}

/// Convert one text-format value to JSON by its type's `rule`.
pub fn render(rule: &Rule, text: &[u8]) -> Value {
    match std::str::from_utf8(text) {
        Ok(s) => render_str(rule, s),
        Err(_) => render_str(rule, &String::from_utf8_lossy(text)),
    }
}

/// [`render`] of text already decoded.
fn render_str(rule: &Rule, s: &str) -> Value {
    let string = || Value::String(s.to_owned());
    match rule {
        Rule::Builtin(oid) => scalar_to_json(known(*oid), s),
        Rule::Text => string(),
        Rule::Hstore => record::hstore(s).map_or_else(string, Value::Object),
        Rule::Array { elem, delim } => {
            parse_array(s, *delim).map_or_else(string, |node| node_to_json(elem, node))
        }
        Rule::Composite(fields) => {
            record::composite(s, fields.len()).map_or_else(string, |values| {
                let object = fields
                    .iter()
                    .zip(values)
                    .map(|((name, rule), v)| {
                        let v = v.map_or(Value::Null, |text| render_str(rule, &text));
                        (name.clone(), v)
                    })
                    .collect();
                Value::Object(object)
            })
        }
    }
}

/// [`write_rendered`] for a built-in type (any other OID is rendered as its text).
#[cfg(test)]
pub fn write_json(type_oid: u32, text: &[u8], out: &mut Vec<u8>) {
    write_rendered(&Rule::builtin(type_oid).unwrap_or(Rule::Text), text, out)
}

/// Append the JSON of one text-format value to `out`: the same bytes as
/// serializing [`render`]'s result, without building a [`Value`] for
/// the common scalar types (the snapshot's hot path).
pub fn write_rendered(rule: &Rule, text: &[u8], out: &mut Vec<u8>) {
    let Ok(s) = std::str::from_utf8(text) else {
        return to_json_bytes(&render(rule, text), out);
    };
    let ty = match rule {
        Rule::Builtin(oid) => known(*oid),
        Rule::Text => return to_json_bytes(s, out),
        _ => None,
    };
    match ty {
        Some(
            &Type::TEXT
            | &Type::VARCHAR
            | &Type::BPCHAR
            | &Type::NAME
            | &Type::UUID
            | &Type::NUMERIC
            | &Type::DATE,
        ) => to_json_bytes(s, out),
        Some(&Type::INT2 | &Type::INT4 | &Type::INT8 | &Type::OID | &Type::XID) => {
            match s.parse::<i64>() {
                Ok(n) => to_json_bytes(&n, out),
                Err(_) => to_json_bytes(s, out),
            }
        }
        Some(&Type::BOOL) if s == "t" || s == "f" => {
            out.extend_from_slice(if s == "t" { b"true" } else { b"false" })
        }
        // PostgreSQL's timestamp text needs no JSON escaping.
        Some(ty @ (&Type::TIMESTAMPTZ | &Type::TIMESTAMP))
            if s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ') =>
        {
            out.push(b'"');
            rfc3339(s, *ty == Type::TIMESTAMPTZ, out);
            out.push(b'"');
        }
        _ => to_json_bytes(&render_str(rule, s), out),
    }
}

/// Serialize into `out`; writing JSON to a `Vec` cannot fail.
pub fn to_json_bytes<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(out, value);
}

/// A non-array value by its type's rule.
fn scalar_to_json(ty: Option<&Type>, s: &str) -> Value {
    let string = || Value::String(s.to_owned());
    let Some(ty) = ty else {
        return string();
    };
    match *ty {
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID | Type::XID => {
            s.parse::<i64>().map_or_else(|_| string(), Value::from)
        }
        Type::FLOAT4 | Type::FLOAT8 => float(s).unwrap_or_else(string),
        Type::BOOL => match s {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => string(),
        },
        Type::JSON | Type::JSONB => json(s).unwrap_or_else(string),
        Type::BYTEA => bytea(s).unwrap_or_else(string),
        Type::TIMESTAMPTZ => Value::String(timestamptz(s)),
        Type::TIMESTAMP => Value::String(timestamp(s)),
        Type::MONEY => money(s).map_or_else(string, Value::String),
        // numeric keeps every digit; the rest are strings by nature.
        _ => string(),
    }
}

/// Money text (`-$1,000.00` with `lc_monetary=C`) as an exact decimal
/// (`-1000.00`): the sign (a `-` or parentheses), the digits and the decimal
/// point; currency symbols and group separators are dropped. `None` if there
/// are no digits or more than one decimal point.
fn money(s: &str) -> Option<String> {
    let negative = s.contains('-') || s.trim_start().starts_with('(');
    let mut out = String::with_capacity(s.len());
    if negative {
        out.push('-');
    }
    out.extend(s.chars().filter(|c| c.is_ascii_digit() || *c == '.'));
    let digits = out.chars().filter(char::is_ascii_digit).count();
    (digits > 0 && out.matches('.').count() <= 1).then_some(out)
}

/// json/jsonb text as a JSON value, numbers with every digit
/// (`arbitrary_precision`). `None` when serde_json refuses it: PostgreSQL
/// only sends valid JSON, so that means nesting deeper than serde_json's
/// limit ([`JSON_DEPTH_LIMIT`]); the value is then sent as its text.
fn json(s: &str) -> Option<Value> {
    match serde_json::from_str(s) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, limit = JSON_DEPTH_LIMIT, "json value not parsed (nested too deep?); sent as its text");
            None
        }
    }
}

/// The deepest nesting serde_json parses (its limit of 128 counts the
/// level that fails): JSON nested deeper is sent as its text.
pub(crate) const JSON_DEPTH_LIMIT: usize = 127;

/// A finite float as a JSON number; `None` for `NaN`, infinities and garbage.
fn float(s: &str) -> Option<Value> {
    let f = s.parse::<f64>().ok().filter(|f| f.is_finite())?;
    Number::from_f64(f).map(Value::Number)
}

/// Hex bytea text (`\x0aff`) → base64; `None` if it is not hex format.
fn bytea(s: &str) -> Option<Value> {
    hex_bytes(s).map(|bytes| Value::String(BASE64.encode(bytes)))
}

/// A bytea value as rendered (base64) → its hex text (`\x0aff`), as
/// PostgreSQL reads it back; `None` if it is not base64.
pub(crate) fn bytea_text(base64: &str) -> Option<String> {
    let bytes = BASE64.decode(base64).ok()?;
    let mut out = String::with_capacity(2 + 2 * bytes.len());
    out.push_str("\\x");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    Some(out)
}

/// The bytes of hex bytea text (`\x0aff`); `None` if it is not hex format.
pub(crate) fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    let hex = s.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.chunks_exact(2)
        .map(|pair| match pair {
            [hi, lo] => Some(nibble(*hi)? << 4 | nibble(*lo)?),
            _ => None,
        })
        .collect()
}

/// The value of one hex digit.
fn nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits `date time` at the space, if `s` looks like an ISO timestamp of an
/// AD year (BC years and `infinity` are not RFC 3339 and stay as they are).
fn split_timestamp(s: &str) -> Option<(&str, &str)> {
    if s.ends_with(" BC") {
        return None;
    }
    s.split_once(' ')
        .filter(|(date, _)| date.len() >= 10 && date.starts_with(|c: char| c.is_ascii_digit()))
}

/// `2024-01-02 03:04:05.5` → `2024-01-02T03:04:05.5` (no zone: it has none).
fn timestamp(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 3);
    rfc3339(s, false, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `2024-01-02 03:04:05.5+00` → `2024-01-02T03:04:05.5Z`; `-08` → `-08:00`;
/// `+05:30` and second offsets like `+05:53:28` are kept.
fn timestamptz(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 3);
    rfc3339(s, true, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Append the RFC 3339 form of timestamp text `s` (with a zone when
/// `zoned`) to `out`; text that is not an AD timestamp is appended as is.
fn rfc3339(s: &str, zoned: bool, out: &mut Vec<u8>) {
    let Some((date, time)) = split_timestamp(s) else {
        return out.extend_from_slice(s.as_bytes());
    };
    let (clock, zone) = match time.rfind(['+', '-']).filter(|_| zoned) {
        Some(at) => time.split_at(at),
        None => (time, ""),
    };
    for part in [date, "T", clock] {
        out.extend_from_slice(part.as_bytes());
    }
    match zone {
        "+00" | "+00:00" => out.push(b'Z'),
        z if z.len() == 3 => {
            out.extend_from_slice(z.as_bytes());
            out.extend_from_slice(b":00");
        }
        z => out.extend_from_slice(z.as_bytes()),
    }
}

/// A parsed array literal: nested lists of optional element texts.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// An element; `None` for an unquoted `NULL`.
    Elem(Option<String>),
    /// A (sub-)array.
    List(Vec<Node>),
}

/// Converts a parsed array, each element by the element type's rule.
fn node_to_json(elem: &Rule, node: Node) -> Value {
    match node {
        Node::Elem(None) => Value::Null,
        Node::Elem(Some(s)) => render_str(elem, &s),
        Node::List(items) => {
            Value::Array(items.into_iter().map(|n| node_to_json(elem, n)).collect())
        }
    }
}

/// Parses an array literal `{…}`, optionally prefixed by dimensions like
/// `[0:2]=` or `[1:2][1:3]=`, elements split at `delim`; `None` if malformed.
fn parse_array(s: &str, delim: u8) -> Option<Node> {
    let mut p = ArrayParser {
        s: strip_dimensions(s)?.as_bytes(),
        pos: 0,
        delim,
    };
    p.skip_ws();
    let node = p.list(1)?;
    p.skip_ws();
    (p.pos == p.s.len()).then_some(node)
}

/// The literal without its `[lo:hi]…=` dimension prefix, if any.
fn strip_dimensions(s: &str) -> Option<&str> {
    let mut rest = s.trim_start();
    if !rest.starts_with('[') {
        return Some(rest);
    }
    while let Some(after) = rest.strip_prefix('[') {
        let (bounds, tail) = after.split_once(']')?;
        let (lo, hi) = bounds.split_once(':')?;
        lo.trim().parse::<i32>().ok()?;
        hi.trim().parse::<i32>().ok()?;
        rest = tail;
    }
    rest.strip_prefix('=')
}

/// A cursor over an array literal. Delimiters are ASCII, so element bytes
/// between them are whole UTF-8 sequences.
struct ArrayParser<'a> {
    /// The literal (without dimensions).
    s: &'a [u8],
    /// Next byte to read.
    pos: usize,
    /// The element delimiter (`,`, or `;` for `box`).
    delim: u8,
}

impl ArrayParser<'_> {
    /// The next byte, without consuming it.
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    /// The next byte, consumed.
    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    /// Skips whitespace, which PostgreSQL allows around elements.
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// `{item, …}` at nesting `depth`; sub-arrays and elements may not be mixed.
    fn list(&mut self, depth: usize) -> Option<Node> {
        if depth > MAX_ARRAY_DEPTH || self.next()? != b'{' {
            return None;
        }
        self.skip_ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(Node::List(Vec::new()));
        }
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            items.push(self.item(depth)?);
            self.skip_ws();
            match self.next()? {
                b'}' => break,
                b if b == self.delim => {}
                _ => return None,
            }
        }
        let lists = items.iter().filter(|i| matches!(i, Node::List(_))).count();
        (lists == 0 || lists == items.len()).then_some(Node::List(items))
    }

    /// One item: a sub-array, a quoted element or an unquoted element.
    fn item(&mut self, depth: usize) -> Option<Node> {
        match self.peek()? {
            b'{' => self.list(depth + 1),
            b'"' => self.quoted().map(|s| Node::Elem(Some(s))),
            _ => self.unquoted(),
        }
    }

    /// `"…"` with backslash escapes; always a string, even `"NULL"`.
    fn quoted(&mut self) -> Option<String> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.next()? {
                b'\\' => out.push(self.next()?),
                b'"' => return String::from_utf8(out).ok(),
                b => out.push(b),
            }
        }
    }

    /// An unquoted element up to `,` or `}`: trailing whitespace dropped,
    /// backslash escapes honoured, a bare `NULL` (any case) is SQL NULL.
    fn unquoted(&mut self) -> Option<Node> {
        let mut out = Vec::new();
        let (mut keep, mut escaped) = (0, false);
        while let Some(b) = self.peek() {
            match b {
                b'}' => break,
                b if b == self.delim => break,
                b'{' | b'"' => return None,
                b'\\' => {
                    self.pos += 1;
                    out.push(self.next()?);
                    (keep, escaped) = (out.len(), true);
                    continue;
                }
                b => out.push(b),
            }
            self.pos += 1;
            if !b.is_ascii_whitespace() {
                keep = out.len();
            }
        }
        out.truncate(keep);
        if out.is_empty() && !escaped {
            return None;
        }
        let s = String::from_utf8(out).ok()?;
        let null = !escaped && s.eq_ignore_ascii_case("NULL");
        Some(Node::Elem((!null).then_some(s)))
    }
}

#[cfg(test)]
mod tests;
