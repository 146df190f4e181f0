//! Tokens: where a request carries one (contract §2), how new ones are made,
//! how they are hashed for storage and lookup, and what a token may reach.
//!
//! Lookups go by SHA-256 digest, and the digest found is compared with the
//! presented one in constant time, so response times say nothing about how
//! much of a token was right. Nothing here logs a token.

use actix_web::http::header;
use actix_web::HttpRequest;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{AccountId, InstanceName};
use crate::error::ApiError;
use crate::storage::{self, instances::InstanceRecord, DbConn, StorageError};

pub mod cache;

pub use cache::AccessCache;

/// Random bytes in a generated token: 256 bits from the OS CSPRNG.
const TOKEN_BYTES: usize = 32;

/// Shortest and longest custom TokenInstance (contract §8).
pub const CUSTOM_TOKEN_LEN: std::ops::RangeInclusive<usize> = 32..=128;

/// A new token: 64 hex characters from the operating system's CSPRNG.
pub fn generate_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The stored form of a token: hex SHA-256.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether a custom TokenInstance has an acceptable form: 32–128 visible ASCII characters.
pub fn is_valid_custom_token(token: &str) -> bool {
    CUSTOM_TOKEN_LEN.contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic())
}

/// The request's token: header `token`, then `Authorization: Bearer`, then
/// `?token=`; the first present and non-empty one wins.
pub fn request_token(req: &HttpRequest) -> Option<String> {
    let headers = req.headers();
    // A value with bytes outside visible ASCII is present all the same (and
    // matches no token): a later source is not consulted.
    let text = |v: &header::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    if let Some(t) = headers.get("token").map(text) {
        if !t.trim().is_empty() {
            return Some(t.trim().to_string());
        }
    }
    if let Some(auth) = headers.get(header::AUTHORIZATION).map(text) {
        let auth = auth.trim();
        if let Some((scheme, rest)) = auth.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
                return Some(rest.trim().to_string());
            }
        }
    }
    query_values(req.query_string(), "token")
        .into_iter()
        .find(|t| !t.is_empty())
}

/// Every value of `key` in a query string, percent-decoded, in order.
pub fn query_values(query: &str, key: &str) -> Vec<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .map(|pairs| {
            pairs
                .into_iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v)
                .collect()
        })
        .unwrap_or_default()
}

/// Who a token belongs to.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A TokenAccount: every instance of the account.
    Account(AccountId),
    /// A TokenInstance: only this instance.
    Instance(InstanceRecord),
}

impl Principal {
    pub fn account(&self) -> AccountId {
        match self {
            Principal::Account(id) => *id,
            Principal::Instance(rec) => rec.account,
        }
    }
}

/// What a request needs its token to reach.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Account-level endpoints with no instance in the path (instance creation).
    AccountOnly,
    /// Any valid token (instance list).
    AnyToken,
    /// A named instance; `account_only` refuses TokenInstances (deletion, publish).
    Instance { name: &'a str, account_only: bool },
}

/// What a request may act on once authorised.
#[derive(Debug, Clone)]
pub struct Access {
    pub principal: Principal,
    /// The instance named in the path, for `Scope::Instance`.
    pub instance: Option<InstanceRecord>,
}

/// Finds the owner of a token, or `None` when no account or instance has it.
pub fn resolve(conn: &mut DbConn, token: &str) -> Result<Option<Principal>, StorageError> {
    let hash = token_hash(token);
    if let Some(account) = storage::accounts::find_by_token_hash(conn, &hash)? {
        return Ok(Some(Principal::Account(account)));
    }
    match storage::instances::find_by_token_hash(conn, &hash)? {
        Some(rec) if digest_eq(&rec.token, token) => Ok(Some(Principal::Instance(rec))),
        _ => Ok(None),
    }
}

/// Constant-time comparison of two tokens' digests.
fn digest_eq(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes())
        .ct_eq(&Sha256::digest(b.as_bytes()))
        .into()
}

/// Why a request was not authorised: a refusal of contract §2, or storage
/// that could not answer (callers decide what that means for them).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A 401, 403 or 404 of contract §2.
    #[error(transparent)]
    Refused(#[from] ApiError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Refused(refusal) => refusal,
            AuthError::Storage(cause) => ApiError::from(cause),
        }
    }
}

/// The token a request must carry: a missing one is 401 before anything
/// touches storage (contract §2's order holds while storage is down).
pub fn required(token: Option<String>) -> Result<String, ApiError> {
    token.ok_or(ApiError::MissingToken)
}

/// Runs the token → instance checks of contract §2 in order: 401, then 403/404.
/// The token's presence is checked before ([`required`]). Blocking: call
/// inside `web::block`.
pub fn authorize(conn: &mut DbConn, token: &str, scope: Scope<'_>) -> Result<Access, AuthError> {
    let principal = resolve(conn, token)?.ok_or(ApiError::InvalidToken)?;
    match scope {
        Scope::AnyToken => Ok(Access {
            principal,
            instance: None,
        }),
        Scope::AccountOnly => match principal {
            Principal::Account(_) => Ok(Access {
                principal,
                instance: None,
            }),
            Principal::Instance(_) => Err(ApiError::InvalidToken.into()),
        },
        Scope::Instance { name, account_only } => match &principal {
            Principal::Instance(_) if account_only => Err(ApiError::InvalidToken.into()),
            Principal::Instance(own) => {
                if own.name == name {
                    let instance = Some(own.clone());
                    Ok(Access {
                        principal,
                        instance,
                    })
                } else {
                    Err(ApiError::InstanceTokenMismatch.into())
                }
            }
            Principal::Account(account) => {
                // A name that breaks the naming rules cannot exist: no query
                // (PostgreSQL refuses some bytes, such as NUL, outright).
                if InstanceName::parse(name).is_none() {
                    return Err(ApiError::InstanceNotFound.into());
                }
                let found = storage::instances::find(conn, *account, name)?;
                match found {
                    Some(rec) => Ok(Access {
                        principal,
                        instance: Some(rec),
                    }),
                    None => Err(ApiError::InstanceNotFound.into()),
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let a = generate_token();
        let b = generate_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(is_valid_custom_token(&a));
    }

    #[test]
    fn custom_token_rules() {
        assert!(!is_valid_custom_token(&"a".repeat(31)));
        assert!(is_valid_custom_token(&"a".repeat(32)));
        assert!(is_valid_custom_token(&"~".repeat(128)));
        assert!(!is_valid_custom_token(&"a".repeat(129)));
        assert!(!is_valid_custom_token(&format!("{} ", "a".repeat(40))));
    }

    #[test]
    fn token_precedence() {
        use actix_web::test::TestRequest;
        let req = TestRequest::default()
            .insert_header(("token", ""))
            .insert_header(("Authorization", "bEaReR abc"))
            .uri("/x?token=q")
            .to_http_request();
        assert_eq!(request_token(&req).as_deref(), Some("abc"));
        let req = TestRequest::default()
            .insert_header(("Authorization", "Basic abc"))
            .uri("/x?token=q%2B1")
            .to_http_request();
        assert_eq!(request_token(&req).as_deref(), Some("q+1"));
        let req = TestRequest::default().uri("/x?token=").to_http_request();
        assert_eq!(request_token(&req), None);
    }
}
