//! Secrets at rest (contract §11): with `webhook.encryption_key` set,
//! `authorization` values and signing secrets are stored sealed with
//! ChaCha20-Poly1305 (a random nonce per value, stored with it), as
//! `enc:v1:<base64 of nonce ‖ ciphertext>`; without it they are stored as
//! given — except that a value which itself begins with `enc:` is stored
//! behind [`PLAIN_PREFIX`], so it is never taken for a sealed one. The `v1`
//! names the key scheme so a later key rotation can tell values apart.
//!
//! Owns the codec only; storage and the workers call it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

/// Prefix of a sealed value.
pub const SEALED_PREFIX: &str = "enc:v1:";

/// Prefix of a value stored unsealed that begins with `enc:` itself.
const PLAIN_PREFIX: &str = "enc:plain:";

/// A stored value that cannot be opened (the key changed or is missing).
#[derive(Debug, thiserror::Error)]
#[error("cannot decrypt")]
pub struct CannotDecrypt;

/// The key in `EVENTGATE_ENCRYPTION_KEY` is not base64 of 32 bytes.
#[derive(Debug, thiserror::Error)]
#[error("must be the base64 of 32 bytes")]
pub struct BadKey;

/// Seals and opens stored secrets.
#[derive(Clone, Default)]
pub struct Sealer {
    cipher: Option<ChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("encrypting", &self.cipher.is_some())
            .finish()
    }
}

/// Decodes a key text (base64 of 32 bytes).
pub fn parse_key(text: &str) -> Result<[u8; 32], BadKey> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| BadKey)?;
    bytes.try_into().map_err(|_| BadKey)
}

impl Sealer {
    /// A sealer with `key` (empty: values are stored as given).
    pub fn new(key: &str) -> Result<Self, BadKey> {
        if key.trim().is_empty() {
            return Ok(Self::default());
        }
        let key = parse_key(key)?;
        Ok(Self {
            cipher: Some(ChaCha20Poly1305::new(Key::from_slice(&key))),
        })
    }

    /// The stored form of `plain`.
    pub fn seal(&self, plain: &str) -> String {
        let Some(cipher) = &self.cipher else {
            return if plain.starts_with("enc:") {
                format!("{PLAIN_PREFIX}{plain}")
            } else {
                plain.to_string()
            };
        };
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        match cipher.encrypt(&nonce, plain.as_bytes()) {
            Ok(sealed) => {
                let mut out = nonce.to_vec();
                out.extend_from_slice(&sealed);
                format!("{SEALED_PREFIX}{}", STANDARD.encode(out))
            }
            // Encryption of a short in-memory value does not fail; never store it plain.
            Err(_) => format!("{SEALED_PREFIX}!"),
        }
    }

    /// The plain value of a stored one.
    pub fn open(&self, stored: &str) -> Result<String, CannotDecrypt> {
        if let Some(plain) = stored.strip_prefix(PLAIN_PREFIX) {
            return Ok(plain.to_string());
        }
        let Some(b64) = stored.strip_prefix(SEALED_PREFIX) else {
            return Ok(stored.to_string());
        };
        let cipher = self.cipher.as_ref().ok_or(CannotDecrypt)?;
        let bytes = STANDARD.decode(b64).map_err(|_| CannotDecrypt)?;
        if bytes.len() < 12 {
            return Err(CannotDecrypt);
        }
        let (nonce, sealed) = bytes.split_at(12);
        let plain = cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| CannotDecrypt)?;
        String::from_utf8(plain).map_err(|_| CannotDecrypt)
    }

    /// What a reply shows: the plain value, or the stored one (with a
    /// warning in the log) when it cannot be opened.
    pub fn show(&self, stored: &str) -> String {
        self.open(stored).unwrap_or_else(|_| {
            log::warn!(
                "a stored webhook secret cannot be decrypted (was the encryption key changed?)"
            );
            stored.to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open() {
        let key = STANDARD.encode([7u8; 32]);
        let s = Sealer::new(&key).unwrap();
        let a = s.seal("Bearer x");
        let b = s.seal("Bearer x");
        assert!(a.starts_with(SEALED_PREFIX) && a != b);
        assert_eq!(s.open(&a).unwrap(), "Bearer x");
        let other = Sealer::new(&STANDARD.encode([8u8; 32])).unwrap();
        assert!(other.open(&a).is_err());
        assert!(Sealer::default().open(&a).is_err());
        assert_eq!(Sealer::default().seal("p"), "p");
        assert!(Sealer::new("short").is_err());
        // Without a key, a value that looks sealed is stored so it reads back
        // as given (with a key or without).
        for plain in ["enc:v1:abc", "enc:plain:x", "enc:"] {
            let stored = Sealer::default().seal(plain);
            assert_eq!(Sealer::default().open(&stored).unwrap(), plain);
            assert_eq!(s.open(&stored).unwrap(), plain);
            assert_eq!(s.open(&s.seal(plain)).unwrap(), plain);
        }
    }
}
