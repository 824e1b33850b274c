//! Tests of the value renderer, against a reference list of PostgreSQL's
//! built-in types kept apart from `postgres-types`.

use proptest::prelude::*;
use serde_json::json;

use super::*;

// The reference: built-in type OIDs and names as PostgreSQL's `pg_type.dat`
// lists them, kept apart from `postgres-types` so the tests check it.

/// Built-in type OIDs, from PostgreSQL's `pg_type.dat`.
mod oid {
    /// `bool`.
    pub const BOOL: u32 = 16;
    /// `bytea`.
    pub const BYTEA: u32 = 17;
    /// `"char"` (single byte).
    pub const CHAR: u32 = 18;
    /// `name`.
    pub const NAME: u32 = 19;
    /// `int8` (bigint).
    pub const INT8: u32 = 20;
    /// `int2` (smallint).
    pub const INT2: u32 = 21;
    /// `int4` (integer).
    pub const INT4: u32 = 23;
    /// `text`.
    pub const TEXT: u32 = 25;
    /// `oid`.
    pub const OID: u32 = 26;
    /// `xid`.
    pub const XID: u32 = 28;
    /// `json`.
    pub const JSON: u32 = 114;
    /// `xml`.
    pub const XML: u32 = 142;
    /// `cidr`.
    pub const CIDR: u32 = 650;
    /// `float4` (real).
    pub const FLOAT4: u32 = 700;
    /// `float8` (double precision).
    pub const FLOAT8: u32 = 701;
    /// `money`.
    pub const MONEY: u32 = 790;
    /// `macaddr`.
    pub const MACADDR: u32 = 829;
    /// `inet`.
    pub const INET: u32 = 869;
    /// `bpchar` (char(n)).
    pub const BPCHAR: u32 = 1042;
    /// `varchar`.
    pub const VARCHAR: u32 = 1043;
    /// `date`.
    pub const DATE: u32 = 1082;
    /// `time`.
    pub const TIME: u32 = 1083;
    /// `timestamp` (without time zone).
    pub const TIMESTAMP: u32 = 1114;
    /// `timestamptz`.
    pub const TIMESTAMPTZ: u32 = 1184;
    /// `interval`.
    pub const INTERVAL: u32 = 1186;
    /// `timetz`.
    pub const TIMETZ: u32 = 1266;
    /// `numeric`.
    pub const NUMERIC: u32 = 1700;
    /// `uuid`.
    pub const UUID: u32 = 2950;
    /// `jsonb`.
    pub const JSONB: u32 = 3802;

    /// `_bool`.
    pub const BOOL_ARRAY: u32 = 1000;
    /// `_bytea`.
    pub const BYTEA_ARRAY: u32 = 1001;
    /// `_char`.
    pub const CHAR_ARRAY: u32 = 1002;
    /// `_name`.
    pub const NAME_ARRAY: u32 = 1003;
    /// `_int2`.
    pub const INT2_ARRAY: u32 = 1005;
    /// `_int4`.
    pub const INT4_ARRAY: u32 = 1007;
    /// `_text`.
    pub const TEXT_ARRAY: u32 = 1009;
    /// `_xid`.
    pub const XID_ARRAY: u32 = 1011;
    /// `_bpchar`.
    pub const BPCHAR_ARRAY: u32 = 1014;
    /// `_varchar`.
    pub const VARCHAR_ARRAY: u32 = 1015;
    /// `_int8`.
    pub const INT8_ARRAY: u32 = 1016;
    /// `_float4`.
    pub const FLOAT4_ARRAY: u32 = 1021;
    /// `_float8`.
    pub const FLOAT8_ARRAY: u32 = 1022;
    /// `_oid`.
    pub const OID_ARRAY: u32 = 1028;
    /// `_macaddr`.
    pub const MACADDR_ARRAY: u32 = 1040;
    /// `_inet`.
    pub const INET_ARRAY: u32 = 1041;
    /// `_timestamp`.
    pub const TIMESTAMP_ARRAY: u32 = 1115;
    /// `_date`.
    pub const DATE_ARRAY: u32 = 1182;
    /// `_time`.
    pub const TIME_ARRAY: u32 = 1183;
    /// `_timestamptz`.
    pub const TIMESTAMPTZ_ARRAY: u32 = 1185;
    /// `_interval`.
    pub const INTERVAL_ARRAY: u32 = 1187;
    /// `_numeric`.
    pub const NUMERIC_ARRAY: u32 = 1231;
    /// `_timetz`.
    pub const TIMETZ_ARRAY: u32 = 1270;
    /// `_xml`.
    pub const XML_ARRAY: u32 = 143;
    /// `_json`.
    pub const JSON_ARRAY: u32 = 199;
    /// `_cidr`.
    pub const CIDR_ARRAY: u32 = 651;
    /// `_money`.
    pub const MONEY_ARRAY: u32 = 791;
    /// `_uuid`.
    pub const UUID_ARRAY: u32 = 2951;
    /// `_jsonb`.
    pub const JSONB_ARRAY: u32 = 3807;
}

/// Built-in scalar types: (OID, name).
const SCALARS: &[(u32, &str)] = &[
    (oid::BOOL, "bool"),
    (oid::BYTEA, "bytea"),
    (oid::CHAR, "char"),
    (oid::NAME, "name"),
    (oid::INT8, "int8"),
    (oid::INT2, "int2"),
    (oid::INT4, "int4"),
    (oid::TEXT, "text"),
    (oid::OID, "oid"),
    (oid::XID, "xid"),
    (oid::JSON, "json"),
    (oid::XML, "xml"),
    (oid::CIDR, "cidr"),
    (oid::FLOAT4, "float4"),
    (oid::FLOAT8, "float8"),
    (oid::MONEY, "money"),
    (oid::MACADDR, "macaddr"),
    (oid::INET, "inet"),
    (oid::BPCHAR, "bpchar"),
    (oid::VARCHAR, "varchar"),
    (oid::DATE, "date"),
    (oid::TIME, "time"),
    (oid::TIMESTAMP, "timestamp"),
    (oid::TIMESTAMPTZ, "timestamptz"),
    (oid::INTERVAL, "interval"),
    (oid::TIMETZ, "timetz"),
    (oid::NUMERIC, "numeric"),
    (oid::UUID, "uuid"),
    (oid::JSONB, "jsonb"),
];

/// Built-in array types: (array OID, element OID, name).
const ARRAYS: &[(u32, u32, &str)] = &[
    (oid::BOOL_ARRAY, oid::BOOL, "_bool"),
    (oid::BYTEA_ARRAY, oid::BYTEA, "_bytea"),
    (oid::CHAR_ARRAY, oid::CHAR, "_char"),
    (oid::NAME_ARRAY, oid::NAME, "_name"),
    (oid::INT2_ARRAY, oid::INT2, "_int2"),
    (oid::INT4_ARRAY, oid::INT4, "_int4"),
    (oid::TEXT_ARRAY, oid::TEXT, "_text"),
    (oid::XID_ARRAY, oid::XID, "_xid"),
    (oid::BPCHAR_ARRAY, oid::BPCHAR, "_bpchar"),
    (oid::VARCHAR_ARRAY, oid::VARCHAR, "_varchar"),
    (oid::INT8_ARRAY, oid::INT8, "_int8"),
    (oid::FLOAT4_ARRAY, oid::FLOAT4, "_float4"),
    (oid::FLOAT8_ARRAY, oid::FLOAT8, "_float8"),
    (oid::OID_ARRAY, oid::OID, "_oid"),
    (oid::MACADDR_ARRAY, oid::MACADDR, "_macaddr"),
    (oid::INET_ARRAY, oid::INET, "_inet"),
    (oid::TIMESTAMP_ARRAY, oid::TIMESTAMP, "_timestamp"),
    (oid::DATE_ARRAY, oid::DATE, "_date"),
    (oid::TIME_ARRAY, oid::TIME, "_time"),
    (oid::TIMESTAMPTZ_ARRAY, oid::TIMESTAMPTZ, "_timestamptz"),
    (oid::INTERVAL_ARRAY, oid::INTERVAL, "_interval"),
    (oid::NUMERIC_ARRAY, oid::NUMERIC, "_numeric"),
    (oid::TIMETZ_ARRAY, oid::TIMETZ, "_timetz"),
    (oid::XML_ARRAY, oid::XML, "_xml"),
    (oid::JSON_ARRAY, oid::JSON, "_json"),
    (oid::CIDR_ARRAY, oid::CIDR, "_cidr"),
    (oid::MONEY_ARRAY, oid::MONEY, "_money"),
    (oid::UUID_ARRAY, oid::UUID, "_uuid"),
    (oid::JSONB_ARRAY, oid::JSONB, "_jsonb"),
];

fn j(type_oid: u32, s: &str) -> Value {
    text_to_json(type_oid, s.as_bytes())
}

#[test]
fn integers_become_json_integers() {
    assert_eq!(j(oid::INT2, "-7"), json!(-7));
    assert_eq!(j(oid::INT4, "2147483647"), json!(2147483647));
    assert_eq!(j(oid::INT8, "-9223372036854775808"), json!(i64::MIN));
    assert_eq!(j(oid::OID, "4294967295"), json!(4294967295u32));
    assert_eq!(j(oid::XID, "731"), json!(731));
}

#[test]
fn unparseable_integers_fall_back_to_the_string() {
    assert_eq!(
        j(oid::INT8, "9223372036854775808"),
        json!("9223372036854775808")
    );
    assert_eq!(j(oid::INT4, "12abc"), json!("12abc"));
    assert_eq!(j(oid::INT4, ""), json!(""));
}

#[test]
fn floats_become_numbers_and_specials_become_strings() {
    assert_eq!(j(oid::FLOAT8, "0.1"), json!(0.1));
    assert_eq!(j(oid::FLOAT8, "-1.5e+300"), json!(-1.5e300));
    assert_eq!(j(oid::FLOAT4, "1.10000002"), json!(1.10000002));
    for special in ["NaN", "Infinity", "-Infinity"] {
        assert_eq!(j(oid::FLOAT4, special), json!(special));
        assert_eq!(j(oid::FLOAT8, special), json!(special));
    }
    assert_eq!(j(oid::FLOAT8, "1e999"), json!("1e999"));
    assert_eq!(j(oid::FLOAT8, "abc"), json!("abc"));
}

#[test]
fn numeric_and_money_keep_every_digit_as_strings() {
    assert_eq!(
        j(oid::NUMERIC, "12345678901234567890.123456789000"),
        json!("12345678901234567890.123456789000")
    );
    for special in ["NaN", "Infinity", "-Infinity"] {
        assert_eq!(j(oid::NUMERIC, special), json!(special));
    }
}

#[test]
fn money_becomes_an_exact_decimal_whatever_the_symbols() {
    let cases = [
        ("$1,000.00", "1000.00"),
        ("-$92,233,720,368,547,758.08", "-92233720368547758.08"),
        ("($5.25)", "-5.25"),
        ("$0.00", "0.00"),
    ];
    for (text, want) in cases {
        assert_eq!(j(oid::MONEY, text), json!(want), "{text}");
    }
    assert_eq!(j(oid::MONEY, "$"), json!("$"));
    assert_eq!(j(oid::MONEY, "1.2.3"), json!("1.2.3"));
}

#[test]
fn booleans_come_from_t_and_f() {
    assert_eq!(j(oid::BOOL, "t"), json!(true));
    assert_eq!(j(oid::BOOL, "f"), json!(false));
    assert_eq!(j(oid::BOOL, "yes"), json!("yes"));
}

#[test]
fn string_like_types_stay_strings() {
    let cases = [
        (oid::TEXT, "héllo"),
        (oid::VARCHAR, "v"),
        (oid::BPCHAR, "ab   "),
        (oid::NAME, "pg_class"),
        (oid::CHAR, "x"),
        (oid::UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (oid::INET, "192.168.0.1/24"),
        (oid::CIDR, "10.0.0.0/8"),
        (oid::MACADDR, "08:00:2b:01:02:03"),
        (oid::XML, "<a>1</a>"),
        (99_999, "happy"),
    ];
    for (type_oid, text) in cases {
        assert_eq!(j(type_oid, text), json!(text), "type {type_oid}");
    }
}

#[test]
fn invalid_utf8_becomes_a_lossy_string() {
    assert_eq!(text_to_json(oid::TEXT, b"a\xffb"), json!("a\u{fffd}b"));
    assert_eq!(text_to_json(99_999, b"\xc3"), json!("\u{fffd}"));
}

#[test]
fn timestamptz_becomes_rfc3339() {
    let cases = [
        (
            "2024-01-02 03:04:05.123456+00",
            "2024-01-02T03:04:05.123456Z",
        ),
        ("2024-01-02 03:04:05+05:30", "2024-01-02T03:04:05+05:30"),
        ("2024-01-02 03:04:05-08", "2024-01-02T03:04:05-08:00"),
        (
            "1883-11-18 12:00:00+05:53:28",
            "1883-11-18T12:00:00+05:53:28",
        ),
        ("12024-01-02 03:04:05+00", "12024-01-02T03:04:05Z"),
        ("infinity", "infinity"),
        ("-infinity", "-infinity"),
        ("0044-03-15 12:00:00+00 BC", "0044-03-15 12:00:00+00 BC"),
    ];
    for (text, want) in cases {
        assert_eq!(j(oid::TIMESTAMPTZ, text), json!(want), "{text}");
    }
}

#[test]
fn timestamp_gets_a_t_and_no_zone() {
    assert_eq!(
        j(oid::TIMESTAMP, "2024-01-02 03:04:05.5"),
        json!("2024-01-02T03:04:05.5")
    );
    assert_eq!(j(oid::TIMESTAMP, "infinity"), json!("infinity"));
    assert_eq!(
        j(oid::TIMESTAMP, "0001-01-01 00:00:00 BC"),
        json!("0001-01-01 00:00:00 BC")
    );
}

#[test]
fn dates_times_and_intervals_stay_as_is() {
    assert_eq!(j(oid::DATE, "2024-02-29"), json!("2024-02-29"));
    assert_eq!(j(oid::TIME, "03:04:05.5"), json!("03:04:05.5"));
    assert_eq!(j(oid::TIMETZ, "03:04:05+02"), json!("03:04:05+02"));
    assert_eq!(j(oid::INTERVAL, "P1Y2M3DT4H5M6S"), json!("P1Y2M3DT4H5M6S"));
}

#[test]
fn json_and_jsonb_are_parsed() {
    assert_eq!(
        j(oid::JSONB, r#"{"a": [1, null, "x"]}"#),
        json!({"a": [1, null, "x"]})
    );
    assert_eq!(j(oid::JSON, "42"), json!(42));
    assert_eq!(j(oid::JSON, "not json"), json!("not json"));
}

#[test]
fn bytea_hex_becomes_base64() {
    assert_eq!(j(oid::BYTEA, "\\x00ff10"), json!("AP8Q"));
    assert_eq!(j(oid::BYTEA, "\\x00FF10"), json!("AP8Q"));
    assert_eq!(j(oid::BYTEA, "\\x61"), json!("YQ=="));
    assert_eq!(j(oid::BYTEA, "\\x"), json!(""));
}

#[test]
fn bytea_that_is_not_hex_stays_a_string() {
    for text in ["\\x0", "\\x0g", "\\x+f", "abc\\000", ""] {
        assert_eq!(j(oid::BYTEA, text), json!(text));
    }
}

#[test]
fn arrays_convert_each_element_by_its_type() {
    assert_eq!(j(oid::INT4_ARRAY, "{1,2,3}"), json!([1, 2, 3]));
    assert_eq!(j(oid::INT2_ARRAY, "{-1,NULL}"), json!([-1, null]));
    assert_eq!(
        j(oid::INT8_ARRAY, "{9223372036854775807}"),
        json!([i64::MAX])
    );
    assert_eq!(j(oid::NUMERIC_ARRAY, "{1.10,NaN}"), json!(["1.10", "NaN"]));
    assert_eq!(j(oid::BOOL_ARRAY, "{t,f}"), json!([true, false]));
    assert_eq!(
        j(oid::FLOAT8_ARRAY, "{0.5,Infinity}"),
        json!([0.5, "Infinity"])
    );
    assert_eq!(j(oid::FLOAT4_ARRAY, "{-0.25}"), json!([-0.25]));
    assert_eq!(j(oid::VARCHAR_ARRAY, "{a,b}"), json!(["a", "b"]));
    assert_eq!(j(oid::BPCHAR_ARRAY, r#"{"a  "}"#), json!(["a  "]));
    assert_eq!(j(oid::DATE_ARRAY, "{2024-01-02}"), json!(["2024-01-02"]));
    assert_eq!(
        j(oid::UUID_ARRAY, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"),
        json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"])
    );
}

#[test]
fn arrays_of_timestamps_json_and_bytea_unescape_then_convert() {
    assert_eq!(
        j(
            oid::TIMESTAMPTZ_ARRAY,
            r#"{"2024-01-02 03:04:05+00",infinity}"#
        ),
        json!(["2024-01-02T03:04:05Z", "infinity"])
    );
    assert_eq!(
        j(oid::TIMESTAMP_ARRAY, r#"{"2024-01-02 03:04:05"}"#),
        json!(["2024-01-02T03:04:05"])
    );
    assert_eq!(
        j(oid::JSONB_ARRAY, r#"{"{\"a\": 1}",NULL,"[2]"}"#),
        json!([{"a": 1}, null, [2]])
    );
    assert_eq!(j(oid::JSON_ARRAY, r#"{"\"s\""}"#), json!(["s"]));
    assert_eq!(j(oid::BYTEA_ARRAY, r#"{"\\x6162"}"#), json!(["YWI="]));
}

#[test]
fn array_quoting_escapes_and_nulls() {
    assert_eq!(j(oid::INT4_ARRAY, "{}"), json!([]));
    assert_eq!(
        j(
            oid::TEXT_ARRAY,
            r#"{"a b","x\"y","NULL",NULL,null,plain,"","a\\b"}"#
        ),
        json!(["a b", "x\"y", "NULL", null, null, "plain", "", "a\\b"])
    );
    assert_eq!(
        j(oid::TEXT_ARRAY, r"{\NULL, a b ,x\ }"),
        json!(["NULL", "a b", "x "])
    );
    assert_eq!(j(oid::TEXT_ARRAY, r#"{"é,}"}"#), json!(["é,}"]));
}

#[test]
fn nested_arrays_and_dimension_prefixes() {
    assert_eq!(j(oid::INT4_ARRAY, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
    assert_eq!(j(oid::INT4_ARRAY, "[0:2]={1,2,3}"), json!([1, 2, 3]));
    assert_eq!(
        j(oid::TEXT_ARRAY, "[1:2][-1:0]={{a,b},{c,d}}"),
        json!([["a", "b"], ["c", "d"]])
    );
    assert_eq!(j(oid::INT4_ARRAY, "{{{{{{1}}}}}}"), json!([[[[[[1]]]]]]));
}

#[test]
fn malformed_arrays_fall_back_to_the_whole_string() {
    for text in [
        "{1,2",
        "{1,,2}",
        "{,}",
        "{1}x",
        "1,2",
        "",
        "{\"a}",
        "{a\"b}",
        "{1,{2}}",
        "{{1},2}",
        "{{{{{{{1}}}}}}}",
        "[0:2]{1}",
        "[x:2]={1}",
        "{a\\",
    ] {
        assert_eq!(j(oid::INT4_ARRAY, text), json!(text), "{text}");
    }
}

#[test]
fn the_supported_types_are_exactly_the_reference_list() {
    let mut scalars: Vec<(u32, &str)> =
        super::SCALARS.iter().map(|t| (t.oid(), t.name())).collect();
    let mut want = SCALARS.to_vec();
    scalars.sort_unstable();
    want.sort_unstable();
    assert_eq!(scalars, want);
    let mut arrays: Vec<(u32, u32, &str)> = super::ARRAYS
        .iter()
        .map(|t| {
            (
                t.oid(),
                array_element(t.oid()).map_or(0, Type::oid),
                t.name(),
            )
        })
        .collect();
    let mut want = ARRAYS.to_vec();
    arrays.sort_unstable();
    want.sort_unstable();
    assert_eq!(arrays, want);
}

#[test]
fn type_names_cover_scalars_and_arrays() {
    assert_eq!(type_name(oid::INT4), Some("int4"));
    assert_eq!(type_name(oid::TIMESTAMPTZ), Some("timestamptz"));
    assert_eq!(type_name(oid::TEXT_ARRAY), Some("_text"));
    assert_eq!(type_name(oid::JSON_ARRAY), Some("_json"));
    assert_eq!(type_name(123_456), None);
    for (o, name) in SCALARS {
        assert_eq!(type_name(*o), Some(*name));
    }
    for (o, _, name) in ARRAYS {
        assert_eq!(type_name(*o), Some(*name));
    }
}

/// Renders elements the way `array_out` does: quoted only when needed.
fn literal(items: &[Option<String>]) -> String {
    let rendered: Vec<String> = items
        .iter()
        .map(|item| match item {
            None => "NULL".into(),
            Some(s) if needs_quotes(s) => {
                format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
            }
            Some(s) => s.clone(),
        })
        .collect();
    format!("{{{}}}", rendered.join(","))
}

fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || s.eq_ignore_ascii_case("NULL")
        || s.bytes()
            .any(|b| b"{},\"\\".contains(&b) || b.is_ascii_whitespace())
}

fn all_oids() -> Vec<u32> {
    let scalars = SCALARS.iter().map(|(o, _)| *o);
    scalars
        .chain(ARRAYS.iter().map(|(o, _, _)| *o))
        .chain([0, 99_999])
        .collect()
}

proptest! {
    #[test]
    fn any_bytes_for_any_type_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..64),
        type_oid in prop::sample::select(all_oids()),
    ) {
        let _ = text_to_json(type_oid, &data);
    }

    #[test]
    fn direct_writer_matches_the_value_path(
        text in r#"[-+0-9 :.tfTZa-z"\\é{},]{0,24}|-?[0-9]{1,19}|[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.]{8,12}[+-][0-9]{2}"#,
        type_oid in prop::sample::select(all_oids()),
    ) {
        let mut direct = Vec::new();
        write_json(type_oid, text.as_bytes(), &mut direct);
        prop_assert_eq!(direct, serde_json::to_vec(&j(type_oid, &text)).unwrap());
    }

    #[test]
    fn direct_writer_matches_on_any_bytes(
        data in proptest::collection::vec(any::<u8>(), 0..32),
        type_oid in prop::sample::select(all_oids()),
    ) {
        let mut direct = Vec::new();
        write_json(type_oid, &data, &mut direct);
        prop_assert_eq!(direct, serde_json::to_vec(&text_to_json(type_oid, &data)).unwrap());
    }

    #[test]
    fn array_shaped_text_never_panics(
        text in r#"(\[[0-9:-]{0,4}\]=)?[{}",\\ a-zé1NUL]{0,40}"#,
        type_oid in prop::sample::select(ARRAYS.iter().map(|a| a.0).collect::<Vec<_>>()),
    ) {
        let _ = j(type_oid, &text);
    }

    #[test]
    fn array_literals_round_trip(
        items in proptest::collection::vec(proptest::option::of(r#"[ -~é\t]{0,8}|NULL|null"#), 0..8),
    ) {
        let want: Vec<Value> = items.iter().map(|i| i.clone().map_or(Value::Null, Value::String)).collect();
        prop_assert_eq!(j(oid::TEXT_ARRAY, &literal(&items)), Value::Array(want));
    }

    #[test]
    fn nested_integer_arrays_round_trip(rows in proptest::collection::vec(proptest::collection::vec(any::<i64>(), 1..4), 1..4)) {
        let text = rows
            .iter()
            .map(|r| format!("{{{}}}", r.iter().map(i64::to_string).collect::<Vec<_>>().join(",")))
            .collect::<Vec<_>>()
            .join(",");
        prop_assert_eq!(j(oid::INT8_ARRAY, &format!("{{{text}}}")), json!(rows));
    }
}

/// A composite rule of `(name, rule)` fields.
fn composite(fields: &[(&str, Rule)]) -> Rule {
    Rule::Composite(
        fields
            .iter()
            .map(|(n, r)| (n.to_string(), r.clone()))
            .collect(),
    )
}

/// An array rule of `elem`, comma-delimited.
fn array_of(elem: Rule) -> Rule {
    Rule::Array {
        elem: std::sync::Arc::new(elem),
        delim: b',',
    }
}

/// `render` of a `&str`, checked against the direct writer.
fn r(rule: &Rule, s: &str) -> Value {
    let value = render(rule, s.as_bytes());
    let mut direct = Vec::new();
    write_rendered(rule, s.as_bytes(), &mut direct);
    assert_eq!(direct, serde_json::to_vec(&value).unwrap(), "{s}");
    value
}

#[test]
fn composites_become_objects_with_typed_fields() {
    let point = composite(&[
        ("x", Rule::Builtin(oid::FLOAT8)),
        ("y", Rule::Builtin(oid::FLOAT8)),
    ]);
    let place = composite(&[
        ("name", Rule::Builtin(oid::TEXT)),
        ("at", point.clone()),
        ("tags", array_of(Rule::Text)),
        ("n", Rule::Builtin(oid::INT4)),
    ]);
    assert_eq!(
        r(&place, r#"("a ""q"" \\ b","(1.5,NaN)","{x,""y z""}",)"#),
        json!({"name": "a \"q\" \\ b", "at": {"x": 1.5, "y": "NaN"}, "tags": ["x", "y z"], "n": null})
    );
    assert_eq!(
        r(&place, "(,,,)"),
        json!({"name": null, "at": null, "tags": null, "n": null})
    );
    // A field count other than the catalog's: the text, not a guess.
    assert_eq!(r(&point, "(1,2,3)"), json!("(1,2,3)"));
    assert_eq!(r(&composite(&[]), "()"), json!({}));
}

#[test]
fn arrays_of_composites_enums_and_domains_follow_their_element() {
    let pair = composite(&[("k", Rule::Text), ("v", Rule::Builtin(oid::INT4))]);
    assert_eq!(
        r(&array_of(pair), r#"{"(a,1)",NULL,"(\"b,c\",)"}"#),
        json!([{"k": "a", "v": 1}, null, {"k": "b,c", "v": null}])
    );
    let moods = array_of(Rule::Text);
    assert_eq!(r(&moods, "{}"), json!([]));
    assert_eq!(
        r(&moods, "{{happy,NULL},{sad,\"NULL\"}}"),
        json!([["happy", null], ["sad", "NULL"]])
    );
    let boxes = Rule::Array {
        elem: std::sync::Arc::new(Rule::Text),
        delim: b';',
    };
    assert_eq!(
        r(&boxes, "{(1,1),(0,0);(3,3),(2,2)}"),
        json!(["(1,1),(0,0)", "(3,3),(2,2)"])
    );
}

#[test]
fn hstore_becomes_an_object_and_odd_text_stays_text() {
    assert_eq!(
        r(&Rule::Hstore, r#""a"=>"1", "b"=>NULL"#),
        json!({"a": "1", "b": null})
    );
    assert_eq!(r(&Rule::Hstore, ""), json!({}));
    assert_eq!(r(&Rule::Hstore, "a=>1"), json!("a=>1"));
    for text in ["[1,5)", "empty", "101", "'a':1 'b':2", "<x/>", "(1,2)"] {
        assert_eq!(r(&Rule::Text, text), json!(text));
    }
}

#[test]
fn special_values_keep_their_text_inside_composites_and_arrays() {
    let row = composite(&[
        ("d", Rule::Builtin(oid::DATE)),
        ("ts", Rule::Builtin(oid::TIMESTAMPTZ)),
        ("f", array_of(Rule::Builtin(oid::FLOAT8))),
        ("m", Rule::Builtin(oid::MONEY)),
    ]);
    assert_eq!(
        r(
            &row,
            r#"(infinity,-infinity,"{NaN,Infinity,-Infinity,1}","-$1,000.50")"#
        ),
        json!({"d": "infinity", "ts": "-infinity", "f": ["NaN", "Infinity", "-Infinity", 1.0], "m": "-1000.50"})
    );
}

#[test]
fn json_numbers_keep_every_digit_and_deep_nesting_is_sent_as_text() {
    // jsonb prints numbers as numeric does: plain digits, never an exponent.
    let huge = format!("1{}", "0".repeat(400));
    let text = format!(r#"{{"big": 123456789012345678901234567890, "e": {huge}, "f": 1.50}}"#);
    let mut direct = Vec::new();
    write_json(oid::JSONB, text.as_bytes(), &mut direct);
    assert_eq!(
        String::from_utf8(direct).unwrap(),
        format!(r#"{{"big":123456789012345678901234567890,"e":{huge},"f":1.50}}"#)
    );
    let deep = format!(
        "{}{}",
        "[".repeat(JSON_DEPTH_LIMIT + 1),
        "]".repeat(JSON_DEPTH_LIMIT + 1)
    );
    assert_eq!(j(oid::JSONB, &deep), json!(deep));
    let fits = format!(
        "{}{}",
        "[".repeat(JSON_DEPTH_LIMIT),
        "]".repeat(JSON_DEPTH_LIMIT)
    );
    assert!(j(oid::JSONB, &fits).is_array());
}

#[test]
fn every_listed_type_and_nothing_else_is_known_by_its_oid() {
    for t in super::SCALARS {
        assert_eq!(known(t.oid()), Some(t), "{}", t.name());
        assert!(known_scalar(t.oid()), "{}", t.name());
        assert_eq!(known_array(t.oid()), None, "{}", t.name());
    }
    for t in super::ARRAYS {
        assert_eq!(known(t.oid()), Some(t), "{}", t.name());
        assert!(!known_scalar(t.oid()), "{}", t.name());
        assert!(
            known_array(t.oid()).is_some_and(known_scalar),
            "{}",
            t.name()
        );
    }
    for oid in [0, 1, 705, 4_000, 100_000, u32::MAX] {
        assert_eq!(known(oid), None, "{oid}");
        assert!(!known_scalar(oid) && known_array(oid).is_none(), "{oid}");
    }
}
