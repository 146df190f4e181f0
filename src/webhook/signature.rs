//! Signing deliveries (contract §11, the Standard Webhooks scheme): secrets
//! `whsec_<base64 of 32 random bytes>`, delivery ids `msg_…`, and the
//! `webhook-signature` header value, with two signatures while a rotation is
//! recent.
//!
//! Pure functions: nothing here stores or sends.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::{Rng, RngCore};
use sha2::Sha256;

/// Prefix of every signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// How long deliveries carry the previous secret's signature after a rotation.
pub const ROTATION_OVERLAP_MS: i64 = 24 * 3600 * 1000;

/// A new secret: `whsec_` + padded standard base64 of 32 CSPRNG bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// The characters of a delivery id's tail, in ascending byte order (so ids
/// with the same length sort as their numbers do).
const ID_ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Characters of an id that encode its creation time in milliseconds
/// (62^8 ms is about 6,900 years).
const ID_TIME_CHARS: usize = 8;

/// Random characters at the end of an id.
const ID_RANDOM_CHARS: usize = 16;

/// A new delivery id: `msg_` + 24 characters of `A-Z a-z 0-9`: 8 of the
/// creation time in milliseconds, then 16 random ones (95 bits, from the
/// thread's CSPRNG). Ids made later sort after earlier ones, so storing them
/// appends to the id index instead of writing all over it.
pub fn new_delivery_id() -> String {
    delivery_id_at(crate::storage::now_millis())
}

fn delivery_id_at(millis: i64) -> String {
    let mut out = [0u8; 4 + ID_TIME_CHARS + ID_RANDOM_CHARS];
    out[..4].copy_from_slice(b"msg_");
    let (time, random) = out[4..].split_at_mut(ID_TIME_CHARS);
    put_base62(time, u64::try_from(millis).unwrap_or(0));
    // Two draws from the thread's CSPRNG, 8 characters from each (62^8 <
    // 2^64: a draw's reduction favours some tails by at most 1 in 84,000).
    let mut rng = rand::thread_rng();
    for tail in random.chunks_mut(8) {
        put_base62(tail, rng.gen());
    }
    // Every byte is ASCII: nothing is replaced.
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `v` into `slots` in base 62, most significant first (higher
/// digits than fit are dropped).
fn put_base62(slots: &mut [u8], mut v: u64) {
    let base = ID_ALPHABET.len() as u64;
    for slot in slots.iter_mut().rev() {
        *slot = ID_ALPHABET[(v % base) as usize];
        v /= base;
    }
}

/// When a delivery id made by [`new_delivery_id`] was made (Unix
/// milliseconds); `None` for an id of another form.
pub fn delivery_id_time(id: &str) -> Option<i64> {
    let tail = id.strip_prefix("msg_")?.as_bytes();
    if tail.len() != ID_TIME_CHARS + ID_RANDOM_CHARS {
        return None;
    }
    let base = ID_ALPHABET.len() as i64;
    tail[..ID_TIME_CHARS].iter().try_fold(0i64, |t, c| {
        let digit = ID_ALPHABET.iter().position(|a| a == c)?;
        t.checked_mul(base)?.checked_add(digit as i64)
    })
}

/// Whether `id` has the form of a delivery id.
pub fn is_delivery_id(id: &str) -> bool {
    id.strip_prefix("msg_").is_some_and(|t| {
        (1..=64).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// A secret that is not `whsec_` + base64.
#[derive(Debug, thiserror::Error)]
#[error("malformed signing secret")]
pub struct BadSecret;

/// The key bytes of a secret.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, BadSecret> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).ok_or(BadSecret)?;
    STANDARD.decode(b64).map_err(|_| BadSecret)
}

/// `<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    STANDARD.encode(mac.finalize().into_bytes())
}

/// The `webhook-signature` value: `v1,<sig>` with the current key, then
/// ` v1,<sig>` with the previous one while it is still honoured.
pub fn signature_header(
    current: &[u8],
    previous: Option<&[u8]>,
    id: &str,
    ts: i64,
    body: &[u8],
) -> String {
    let mut out = format!("v1,{}", sign(current, id, ts, body));
    if let Some(prev) = previous {
        out.push_str(" v1,");
        out.push_str(&sign(prev, id, ts, body));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_ids() {
        let s = new_secret();
        assert!(s.starts_with("whsec_"));
        assert_eq!(s.len(), 6 + 44);
        assert_eq!(secret_key(&s).unwrap().len(), 32);
        let id = new_delivery_id();
        assert!(is_delivery_id(&id), "{id}");
        assert!(!is_delivery_id("msg_"));
        assert!(!is_delivery_id("msg_a-b"));
        assert!(!is_delivery_id("x_abc"));
    }

    #[test]
    fn ids_sort_by_creation_time() {
        assert_eq!(
            delivery_id_time(&delivery_id_at(1_764_900_000_123)),
            Some(1_764_900_000_123)
        );
        assert_eq!(delivery_id_time("msg_x"), None);
        assert_eq!(delivery_id_time(&format!("msg_{}", "!".repeat(24))), None);
        let earlier = delivery_id_at(1_764_900_000_000);
        let later = delivery_id_at(1_764_900_000_001);
        assert!(is_delivery_id(&earlier) && is_delivery_id(&later));
        assert_eq!(earlier.len(), 28);
        assert!(earlier < later, "{earlier} {later}");
        assert!(delivery_id_at(1) < delivery_id_at(62_i64.pow(7)));
        assert_ne!(delivery_id_at(5), delivery_id_at(5));
    }

    #[test]
    fn known_signature() {
        // The Standard Webhooks specification's example.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
