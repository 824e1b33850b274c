//! Values that never show themselves in `Debug` or `Display` output: a
//! [`Secret`] string, and librdkafka [`Properties`] whose sensitive values
//! are redacted.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// A password or other credential; prints as `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

/// A string, or a number or boolean taken as its text (`linger.ms = 5`).
/// Leading zeros of a number are gone by then: settings keep secrets from
/// the environment verbatim so `0123` stays `0123`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    S(String),
    I(i64),
    U(u64),
    F(f64),
    B(bool),
}

impl From<Scalar> for String {
    fn from(s: Scalar) -> String {
        match s {
            Scalar::S(s) => s,
            Scalar::I(i) => i.to_string(),
            Scalar::U(u) => u.to_string(),
            Scalar::F(f) => f.to_string(),
            Scalar::B(b) => b.to_string(),
        }
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// Accepts any scalar, so a type mismatch never echoes the value.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Secret(Scalar::deserialize(d)?.into()))
    }
}

impl Secret {
    /// Wrap a credential.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The credential itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Words in a librdkafka property name that mark its value as secret:
/// passwords, client secrets, JAAS and OAuth configurations, key material.
const SENSITIVE: &[&str] = &[
    "password",
    "secret",
    "jaas",
    "sasl.oauthbearer.config",
    "ssl.key.pem",
    "ssl.keystore",
    "ssl_key",
    "token",
    "credential",
];

/// Whether the librdkafka property `key` holds a secret.
pub fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SENSITIVE.iter().any(|w| key.contains(w))
}

/// librdkafka properties (`kafka.properties`): any scalar value is taken as
/// its text; `Debug` shows sensitive values as `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Properties(BTreeMap<String, String>);

impl Properties {
    /// `text` (a librdkafka error, which may quote a value) with every
    /// sensitive value replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let secrets = self
            .0
            .iter()
            .filter(|(k, v)| is_sensitive(k) && !v.is_empty());
        secrets.fold(text.to_owned(), |t, (_, v)| t.replace(v.as_str(), "***"))
    }
}

impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, Scalar>::deserialize(d)?;
        Ok(Self(map.into_iter().map(|(k, v)| (k, v.into())).collect()))
    }
}

impl std::ops::Deref for Properties {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Properties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a Properties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.0.iter().map(|(k, v)| match is_sensitive(k) {
            true => (k, "***"),
            false => (k, v.as_str()),
        });
        f.debug_map().entries(shown).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug_and_display() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "\"***\" ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn sensitive_properties_are_redacted_and_scalars_kept_as_text() {
        let p: Properties = serde_json::from_str(
            r#"{"sasl.password": "hunter2", "ssl.key.password": "k3y", "sasl.jaas.config": "x pass=j",
                "sasl.oauthbearer.client.secret": "cs", "ssl.key.pem": "-----BEGIN", "linger.ms": 5,
                "sasl.username": "pgcdc"}"#,
        )
        .unwrap();
        let shown = format!("{p:?}");
        for secret in ["hunter2", "k3y", "pass=j", "\"cs\"", "BEGIN"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("\"sasl.username\": \"pgcdc\""), "{shown}");
        assert_eq!(p["linger.ms"], "5");
        assert_eq!(p.redact("bad value \"hunter2\""), "bad value \"***\"");
        assert_eq!(p["sasl.password"], "hunter2");
    }
}
