//! Signing pgcdc's own WAL messages.
//!
//! Any role that can run SQL can call `pg_logical_emit_message` with pgcdc's
//! prefixes. A forged watermark could make the stream emit a backfill chunk
//! at the wrong position, and a forged signal could start copies nobody asked
//! for. Genuine messages therefore carry an HMAC-SHA256 of their fields,
//! keyed with a per-installation secret kept next to the checkpoint
//! (`<state_dir>/message.key`, mode 0600, created by the daemon's first
//! start). Only processes that can read the state directory (the daemon and
//! `pgcdc snapshot --table` run beside it) can sign; the stream ignores,
//! with a warning, every message whose MAC does not verify. Roles that can
//! read the WAL see MACs, never the key.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of the secret, in bytes.
const KEY_BYTES: usize = 32;

/// The secret that signs this installation's watermarks and signals.
#[derive(Clone)]
pub struct MessageKey([u8; KEY_BYTES]);

impl fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MessageKey(<redacted>)")
    }
}

impl MessageKey {
    /// A fresh random key.
    pub fn random() -> io::Result<Self> {
        let mut key = [0u8; KEY_BYTES];
        getrandom::getrandom(&mut key).map_err(io::Error::other)?;
        Ok(Self(key))
    }

    /// Read the key at `path`.
    pub fn load(path: &Path) -> io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Self::parse(text.trim()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: not a pgcdc message key ({} hex digits)",
                    path.display(),
                    KEY_BYTES * 2
                ),
            )
        })
    }

    /// Read the key at `path`, creating it (mode 0600, synced) if missing.
    pub fn load_or_create(path: &Path) -> io::Result<Self> {
        match Self::load(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let key = Self::random()?;
        let tmp = path.with_extension("tmp");
        let mut file = open_private(&tmp)?;
        file.write_all(key.hex().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(key)
    }

    fn parse(hex: &str) -> Option<Self> {
        if hex.len() != KEY_BYTES * 2 || !hex.is_ascii() {
            return None;
        }
        let mut key = [0u8; KEY_BYTES];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(key))
    }

    fn hex(&self) -> String {
        hex(&self.0)
    }

    fn mac<S: AsRef<str>>(&self, fields: &[S]) -> Hmac<Sha256> {
        // A key of any length is accepted by HMAC: this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("hmac accepts any key length"));
        for f in fields {
            // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
            let f = f.as_ref();
            mac.update(&(f.len() as u64).to_be_bytes());
            mac.update(f.as_bytes());
        }
        mac
    }

    /// The MAC of `fields`, as hex.
    pub fn sign<S: AsRef<str>>(&self, fields: &[S]) -> String {
        hex(&self.mac(fields).finalize().into_bytes())
    }

    /// Whether `mac` (hex) is the MAC of `fields` (compared in constant time).
    pub fn verify<S: AsRef<str>>(&self, fields: &[S], mac: &str) -> bool {
        let Some(bytes) = unhex(mac) else {
            return false;
        };
        self.mac(fields).verify_slice(&bytes).is_ok()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(unix)]
fn open_private(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> io::Result<std::fs::File> {
    std::fs::File::create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_with_its_key_and_fields() {
        let key = MessageKey::random().unwrap();
        let other = MessageKey::random().unwrap();
        let mac = key.sign(&["s", "1", "true"]);
        assert!(key.verify(&["s", "1", "true"], &mac));
        assert!(!key.verify(&["s", "1", "false"], &mac));
        assert!(!key.verify(&["s1", "", "true"], &mac));
        assert!(!other.verify(&["s", "1", "true"], &mac));
        assert!(!key.verify(&["s", "1", "true"], "not hex"));
        assert!(!key.verify(&["s", "1", "true"], ""));
    }

    #[test]
    fn the_key_file_is_created_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("message.key");
        let created = MessageKey::load_or_create(&path).unwrap();
        let again = MessageKey::load_or_create(&path).unwrap();
        assert_eq!(created.0, again.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "garbage").unwrap();
        let err = MessageKey::load(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(format!("{created:?}").contains("redacted"));
    }
}
