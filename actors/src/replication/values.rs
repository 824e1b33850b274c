//! pgoutput text-format column values to faithful JSON.
//!
//! The replication session pins `DateStyle=ISO`, `TimeZone=UTC`,
//! `IntervalStyle=iso_8601` and `extra_float_digits=3`, so the text forms are
//! predictable. Numbers that JSON cannot hold exactly (numeric, money) become
//! strings; NaN and infinities become strings; nothing panics on odd input —
//! the fallback is always the original text as a string.

use base64::Engine;
use serde_json::{Map, Number, Value};

use super::decode::{Relation, Tuple, TupleValue};

/// Built-in type OIDs (pg_type.dat).
pub mod oid {
    #![allow(missing_docs)]
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const XID: u32 = 28;
    pub const JSON: u32 = 114;
    pub const XML: u32 = 142;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const MONEY: u32 = 790;
    pub const MACADDR: u32 = 829;
    pub const INET: u32 = 869;
    pub const CIDR: u32 = 650;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// (array type OID, element type OID, array type name).
const ARRAYS: &[(u32, u32, &str)] = &[
    (1000, oid::BOOL, "_bool"),
    (1001, oid::BYTEA, "_bytea"),
    (1002, oid::CHAR, "_char"),
    (1003, oid::NAME, "_name"),
    (1005, oid::INT2, "_int2"),
    (1007, oid::INT4, "_int4"),
    (1009, oid::TEXT, "_text"),
    (1014, oid::BPCHAR, "_bpchar"),
    (1015, oid::VARCHAR, "_varchar"),
    (1016, oid::INT8, "_int8"),
    (1021, oid::FLOAT4, "_float4"),
    (1022, oid::FLOAT8, "_float8"),
    (1028, oid::OID, "_oid"),
    (1115, oid::TIMESTAMP, "_timestamp"),
    (1182, oid::DATE, "_date"),
    (1183, oid::TIME, "_time"),
    (1185, oid::TIMESTAMPTZ, "_timestamptz"),
    (1187, oid::INTERVAL, "_interval"),
    (1231, oid::NUMERIC, "_numeric"),
    (199, oid::JSON, "_json"),
    (2951, oid::UUID, "_uuid"),
    (3807, oid::JSONB, "_jsonb"),
    (1041, oid::INET, "_inet"),
    (791, oid::MONEY, "_money"),
];

/// Name of a built-in type, or `None` for unknown OIDs.
pub fn type_name(type_oid: u32) -> Option<&'static str> {
    let scalar = match type_oid {
        oid::BOOL => "bool",
        oid::BYTEA => "bytea",
        oid::CHAR => "char",
        oid::NAME => "name",
        oid::INT8 => "int8",
        oid::INT2 => "int2",
        oid::INT4 => "int4",
        oid::TEXT => "text",
        oid::OID => "oid",
        oid::XID => "xid",
        oid::JSON => "json",
        oid::XML => "xml",
        oid::FLOAT4 => "float4",
        oid::FLOAT8 => "float8",
        oid::MONEY => "money",
        oid::MACADDR => "macaddr",
        oid::INET => "inet",
        oid::CIDR => "cidr",
        oid::BPCHAR => "bpchar",
        oid::VARCHAR => "varchar",
        oid::DATE => "date",
        oid::TIME => "time",
        oid::TIMESTAMP => "timestamp",
        oid::TIMESTAMPTZ => "timestamptz",
        oid::INTERVAL => "interval",
        oid::TIMETZ => "timetz",
        oid::NUMERIC => "numeric",
        oid::UUID => "uuid",
        oid::JSONB => "jsonb",
        _ => {
            return ARRAYS
                .iter()
                .find(|(a, _, _)| *a == type_oid)
                .map(|(_, _, n)| *n)
        }
    };
    Some(scalar)
}

/// Convert one text-format value of a column of type `type_oid` to JSON.
pub fn text_to_json(type_oid: u32, text: &[u8]) -> Value {
    let s = String::from_utf8_lossy(text);
    if let Some((_, elem, _)) = ARRAYS.iter().find(|(a, _, _)| *a == type_oid) {
        return parse_array(&s).map_or_else(
            || Value::String(s.clone().into_owned()),
            |a| array_to_json(*elem, a),
        );
    }
    scalar_to_json(type_oid, &s)
}

fn scalar_to_json(type_oid: u32, s: &str) -> Value {
    let string = || Value::String(s.to_owned());
    match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID | oid::XID => {
            s.parse::<i64>().map_or_else(|_| string(), Value::from)
        }
        oid::FLOAT4 | oid::FLOAT8 => match s.parse::<f64>().ok().and_then(Number::from_f64) {
            Some(n) => Value::Number(n),
            None => string(),
        },
        oid::BOOL => match s {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => string(),
        },
        oid::JSON | oid::JSONB => serde_json::from_str(s).unwrap_or_else(|_| string()),
        oid::BYTEA => bytea(s).unwrap_or_else(string),
        oid::TIMESTAMPTZ => Value::String(timestamptz(s)),
        oid::TIMESTAMP => Value::String(timestamp(s)),
        _ => string(),
    }
}

/// `\x0aff` → base64.
fn bytea(s: &str) -> Option<Value> {
    let hex = s.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    Some(Value::String(
        base64::engine::general_purpose::STANDARD.encode(bytes?),
    ))
}

/// `2024-01-02 03:04:05.5` → `2024-01-02T03:04:05.5` (no zone: it has none).
fn timestamp(s: &str) -> String {
    if s.ends_with(" BC") || !s.is_char_boundary(10) || s.as_bytes().get(10) != Some(&b' ') {
        return s.to_owned();
    }
    format!("{}T{}", &s[..10], &s[11..])
}

/// `2024-01-02 03:04:05.5+00` → `2024-01-02T03:04:05.5Z`; `-08` → `-08:00`.
fn timestamptz(s: &str) -> String {
    let t = timestamp(s);
    if t == s {
        return t; // infinity, BC, or an unexpected shape: keep PostgreSQL's text
    }
    let Some(pos) = t[11..].rfind(['+', '-']).map(|p| p + 11) else {
        return t;
    };
    let (base, offset) = t.split_at(pos);
    match offset {
        "+00" | "+00:00" | "-00" => format!("{base}Z"),
        o if o.len() == 3 => format!("{base}{o}:00"),
        o => format!("{base}{o}"),
    }
}

/// A parsed array literal: nested lists of optional element texts.
#[derive(Debug, Clone, PartialEq)]
enum ArrayNode {
    Elem(Option<String>),
    List(Vec<ArrayNode>),
}

fn array_to_json(elem: u32, node: ArrayNode) -> Value {
    match node {
        ArrayNode::Elem(None) => Value::Null,
        ArrayNode::Elem(Some(s)) => scalar_to_json(elem, &s),
        ArrayNode::List(items) => {
            Value::Array(items.into_iter().map(|n| array_to_json(elem, n)).collect())
        }
    }
}

/// Parse `{…}` (optionally prefixed by dimensions `[1:3]=`); `None` if malformed.
fn parse_array(s: &str) -> Option<ArrayNode> {
    let s = match s.strip_prefix('[') {
        Some(_) => &s[s.find('=')? + 1..],
        None => s,
    };
    let chars: Vec<char> = s.chars().collect();
    let mut pos = 0;
    let node = parse_list(&chars, &mut pos, 0)?;
    (pos == chars.len()).then_some(node)
}

fn parse_list(c: &[char], pos: &mut usize, depth: usize) -> Option<ArrayNode> {
    if depth > 16 || c.get(*pos) != Some(&'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if c.get(*pos) == Some(&'}') {
        *pos += 1;
        return Some(ArrayNode::List(items));
    }
    loop {
        let item = match c.get(*pos)? {
            '{' => parse_list(c, pos, depth + 1)?,
            '"' => ArrayNode::Elem(Some(parse_quoted(c, pos)?)),
            _ => {
                let start = *pos;
                while !matches!(c.get(*pos), Some(',' | '}') | None) {
                    *pos += 1;
                }
                let raw: String = c[start..*pos].iter().collect();
                let raw = raw.trim();
                ArrayNode::Elem((!raw.eq_ignore_ascii_case("NULL")).then(|| raw.to_owned()))
            }
        };
        items.push(item);
        match c.get(*pos)? {
            ',' => *pos += 1,
            '}' => {
                *pos += 1;
                return Some(ArrayNode::List(items));
            }
            _ => return None,
        }
    }
}

fn parse_quoted(c: &[char], pos: &mut usize) -> Option<String> {
    *pos += 1;
    let mut out = String::new();
    loop {
        match c.get(*pos)? {
            '\\' => {
                out.push(*c.get(*pos + 1)?);
                *pos += 2;
            }
            '"' => {
                *pos += 1;
                return Some(out);
            }
            ch => {
                out.push(*ch);
                *pos += 1;
            }
        }
    }
}

/// A tuple as a JSON object keyed by column name. Unchanged TOAST columns are
/// left out and returned by name, so no marker can pass for a real value.
pub fn tuple_to_json(relation: &Relation, tuple: &Tuple) -> (Map<String, Value>, Vec<String>) {
    let mut row = Map::new();
    let mut unchanged = Vec::new();
    for (col, val) in relation.columns.iter().zip(&tuple.0) {
        let v = match val {
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => {
                unchanged.push(col.name.clone());
                continue;
            }
            TupleValue::Text(t) => text_to_json(col.type_oid, t),
            TupleValue::Binary(b) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
        };
        row.insert(col.name.clone(), v);
    }
    (row, unchanged)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn j(type_oid: u32, s: &str) -> Value {
        text_to_json(type_oid, s.as_bytes())
    }

    #[test]
    fn integers_and_floats() {
        assert_eq!(
            j(oid::INT8, "9223372036854775807"),
            json!(9223372036854775807i64)
        );
        assert_eq!(j(oid::INT2, "-7"), json!(-7));
        assert_eq!(j(oid::FLOAT8, "0.1"), json!(0.1));
        for special in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(j(oid::FLOAT4, special), json!(special));
        }
    }

    #[test]
    fn numeric_keeps_every_digit() {
        assert_eq!(
            j(oid::NUMERIC, "12345678901234567890.123456789"),
            json!("12345678901234567890.123456789")
        );
        assert_eq!(j(oid::NUMERIC, "NaN"), json!("NaN"));
        assert_eq!(j(oid::MONEY, "$1.00"), json!("$1.00"));
    }

    #[test]
    fn booleans_text_json_bytea() {
        assert_eq!(j(oid::BOOL, "t"), json!(true));
        assert_eq!(j(oid::BOOL, "f"), json!(false));
        assert_eq!(j(oid::TEXT, "héllo"), json!("héllo"));
        assert_eq!(
            j(oid::JSONB, r#"{"a": [1, null]}"#),
            json!({"a": [1, null]})
        );
        assert_eq!(j(oid::JSON, "not json"), json!("not json"));
        assert_eq!(j(oid::BYTEA, "\\x00ff10"), json!("AP8Q"));
        assert_eq!(j(oid::BYTEA, "\\x0"), json!("\\x0"));
        assert_eq!(text_to_json(oid::TEXT, b"\xff"), json!("\u{fffd}"));
    }

    #[test]
    fn timestamps_become_rfc3339() {
        assert_eq!(
            j(oid::TIMESTAMPTZ, "2024-01-02 03:04:05.123456+00"),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            j(oid::TIMESTAMPTZ, "2024-01-02 03:04:05+05:30"),
            json!("2024-01-02T03:04:05+05:30")
        );
        assert_eq!(
            j(oid::TIMESTAMPTZ, "2024-01-02 03:04:05-08"),
            json!("2024-01-02T03:04:05-08:00")
        );
        assert_eq!(j(oid::TIMESTAMPTZ, "infinity"), json!("infinity"));
        assert_eq!(
            j(oid::TIMESTAMPTZ, "0044-03-15 12:00:00+00 BC"),
            json!("0044-03-15 12:00:00+00 BC")
        );
        assert_eq!(
            j(oid::TIMESTAMP, "2024-01-02 03:04:05.5"),
            json!("2024-01-02T03:04:05.5")
        );
        assert_eq!(j(oid::DATE, "2024-02-29"), json!("2024-02-29"));
        assert_eq!(j(oid::INTERVAL, "P1DT2H"), json!("P1DT2H"));
    }

    #[test]
    fn arrays_nest_and_convert_elements() {
        assert_eq!(j(1007, "{1,NULL,3}"), json!([1, null, 3]));
        assert_eq!(j(1007, "{}"), json!([]));
        assert_eq!(
            j(1009, r#"{"x y","NULL",NULL,"q\"",plain}"#),
            json!(["x y", "NULL", null, "q\"", "plain"])
        );
        assert_eq!(j(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(j(1007, "[0:2]={1,2,3}"), json!([1, 2, 3]));
        assert_eq!(j(1231, "{1.10,NaN}"), json!(["1.10", "NaN"]));
        assert_eq!(j(1000, "{t,f}"), json!([true, false]));
        assert_eq!(j(1007, "{1,2"), json!("{1,2"));
    }

    #[test]
    fn type_names() {
        assert_eq!(type_name(oid::INT4), Some("int4"));
        assert_eq!(type_name(1009), Some("_text"));
        assert_eq!(type_name(123_456), None);
    }

    fn literal(items: &[Option<String>]) -> String {
        let quoted: Vec<String> = items
            .iter()
            .map(|i| match i {
                None => "NULL".into(),
                Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            })
            .collect();
        format!("{{{}}}", quoted.join(","))
    }

    proptest! {
        #[test]
        fn any_text_for_any_known_type_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64), idx in 0usize..60) {
            let oids: Vec<u32> = [16, 17, 18, 19, 20, 21, 23, 25, 26, 28, 114, 142, 700, 701, 790, 829, 869, 650, 1042, 1043,
                1082, 1083, 1114, 1184, 1186, 1266, 1700, 2950, 3802].into_iter().chain(ARRAYS.iter().map(|a| a.0)).collect();
            let _ = text_to_json(oids[idx % oids.len()], &data);
        }

        #[test]
        fn array_literals_round_trip(items in proptest::collection::vec(proptest::option::of("[ -~é]{0,8}"), 0..8)) {
            let want: Vec<Value> = items.iter().map(|i| i.clone().map_or(Value::Null, Value::String)).collect();
            prop_assert_eq!(j(1009, &literal(&items)), Value::Array(want));
        }
    }
}
