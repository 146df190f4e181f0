//! The checks of contract §2 for instance-scoped requests, as handlers call
//! them: from remembered answers on the hot paths (publish, upgrade), from
//! storage where the caller reads or changes what is stored.

use actix_web::HttpRequest;

use super::body::instance_param;
use super::state::AppState;
use crate::auth::cache::CacheKey;
use crate::auth::{self, Access, AuthError, Scope};
use crate::error::ApiError;
use crate::storage::instances::InstanceRecord;

impl AppState {
    /// Authorises an instance-scoped request (contract §2 order): from memory
    /// when a fresh answer is remembered, else from storage; when storage
    /// fails, a remembered answer of any age still serves.
    pub async fn authorize_instance(
        &self,
        token: Option<String>,
        name: String,
        account_only: bool,
    ) -> Result<Access, ApiError> {
        let token = auth::required(token)?;
        let key = CacheKey::new(&token, &name, account_only);
        let access = self.registry.access();
        if let Some(hit) = access.fresh(&key) {
            return Ok(hit);
        }
        match self.authorize_stored(token, name, account_only).await {
            Ok(found) => {
                access.insert(key, found.clone());
                Ok(found)
            }
            Err(AuthError::Refused(refusal)) => Err(refusal),
            Err(AuthError::Storage(cause)) => match access.stale(&key) {
                Some(remembered) => {
                    log::warn!("storage unavailable, serving a remembered authorisation: {cause}");
                    Ok(remembered)
                }
                None => Err(ApiError::from(cause)),
            },
        }
    }

    /// The instance a request's path names, authorised from storage (no
    /// remembered answers: the caller reads or changes what is stored).
    /// Storage failures answer 500 with `failure` when given.
    pub async fn target_instance(
        &self,
        req: &HttpRequest,
        account_only: bool,
        failure: Option<&'static str>,
    ) -> Result<InstanceRecord, ApiError> {
        let token = auth::required(auth::request_token(req))?;
        let found = self
            .authorize_stored(token, instance_param(req), account_only)
            .await;
        match found {
            Ok(access) => access.instance.ok_or(ApiError::InstanceNotFound),
            Err(AuthError::Refused(refusal)) => Err(refusal),
            Err(AuthError::Storage(cause)) => Err(match failure {
                Some(message) => ApiError::Storage { message, cause },
                None => ApiError::from(cause),
            }),
        }
    }

    /// The checks of contract §2 for an instance-scoped request, from storage.
    async fn authorize_stored(
        &self,
        token: String,
        name: String,
        account_only: bool,
    ) -> Result<Access, AuthError> {
        self.db(move |conn| {
            auth::authorize(
                conn,
                &token,
                Scope::Instance {
                    name: &name,
                    account_only,
                },
            )
        })
        .await
    }
}
