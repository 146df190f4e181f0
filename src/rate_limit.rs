//! Fixed-window request limits (contract §4): a window of 60 seconds starts
//! with a key's first request; the key is the request's token (per peer IP
//! without one). Every `/api/*` and `/ws/*` reply, and `GET /console`
//! (contract §13), carries the bucket's `X-RateLimit-*` headers, set by the
//! middleware at the bottom.
//!
//! Keys are kept as keyed 64-bit hashes, so no token is held here.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, Error, ResponseError};
use parking_lot::{Mutex, RwLock};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::settings::RateLimitSettings;

/// Length of one window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Windows are swept when the table grows past this many keys.
const SWEEP_THRESHOLD: usize = 10_000;

/// The buckets of contract §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// Every `/api/*` request and `/ws` upgrade attempt.
    General,
    /// `POST /api/instance/new`.
    InstanceNew,
    /// `POST /api/events/publish/:instance` (only when limited).
    Publish,
    /// `/ws` upgrade attempts per client IP (only when limited).
    UpgradeIp,
}

/// The outcome for one request: what its headers show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Unix seconds when the window ends.
    pub reset: u64,
    pub allowed: bool,
    /// Whole seconds until the window ends (≥ 1).
    pub retry_after: u64,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    count: u32,
}

/// The limiter shared by all workers.
pub struct RateLimiter {
    limits: RwLock<RateLimitSettings>,
    windows: Mutex<HashMap<(Bucket, u64), Window>>,
    hasher: std::collections::hash_map::RandomState,
}

impl RateLimiter {
    pub fn new(limits: RateLimitSettings) -> Self {
        Self {
            limits: RwLock::new(limits),
            windows: Mutex::new(HashMap::new()),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Replaces the limits (SIGHUP); running windows keep their counts.
    /// Returns whether anything changed.
    pub fn set_limits(&self, limits: RateLimitSettings) -> bool {
        let mut held = self.limits.write();
        let changed = *held != limits;
        *held = limits;
        changed
    }

    fn limit_of(&self, bucket: Bucket) -> u32 {
        let limits = self.limits.read();
        match bucket {
            Bucket::General => limits.per_minute,
            Bucket::InstanceNew => limits.instance_new_per_minute,
            Bucket::Publish => limits.publish_per_minute,
            Bucket::UpgradeIp => limits.upgrades_per_ip_per_minute,
        }
    }

    fn key(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Counts one request of `key` in `bucket` (when `consume`), or only
    /// reports the bucket's state. `None` when the bucket is not limited.
    pub fn check(&self, bucket: Bucket, key: &str, consume: bool) -> Option<Quota> {
        let limit = self.limit_of(bucket);
        if limit == 0 {
            return None;
        }
        let now = Instant::now();
        let hashed = self.key(key);
        let mut windows = self.windows.lock();
        if windows.len() > SWEEP_THRESHOLD {
            windows.retain(|_, w| now.duration_since(w.started) < WINDOW);
        }
        let fresh = Window {
            started: now,
            count: 0,
        };
        let window = if consume {
            let w = windows.entry((bucket, hashed)).or_insert(fresh);
            if now.duration_since(w.started) >= WINDOW {
                *w = fresh;
            }
            if w.count <= limit {
                w.count += 1;
            }
            *w
        } else {
            match windows.get(&(bucket, hashed)) {
                Some(w) if now.duration_since(w.started) < WINDOW => *w,
                _ => fresh,
            }
        };
        drop(windows);
        let left = WINDOW.saturating_sub(now.duration_since(window.started));
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let reset_at = unix_now + left;
        Some(Quota {
            limit,
            remaining: limit.saturating_sub(window.count),
            reset: reset_at.as_secs() + u64::from(reset_at.subsec_nanos() > 0),
            // Only a request that counts can be refused: one that shows the
            // bucket without consuming it (publish, §4) always passes.
            allowed: !consume || window.count <= limit,
            retry_after: left.as_secs() + u64::from(left.subsec_nanos() > 0),
        })
    }
}

/// Which bucket a request falls in, and whether it consumes from it.
/// `None` for paths outside `/api/*` and `/ws/*`. `path` is the path as the
/// router matches it (percent-escapes decoded), so `/api/instance/%6Eew`
/// is instance creation here too.
fn classify(method: &Method, path: &str, publish_limited: bool) -> Option<(Bucket, bool)> {
    let publish = path
        .strip_prefix("/api/events/publish/")
        .is_some_and(|instance| !instance.is_empty() && !instance.contains('/'));
    if path == "/api/instance/new" && method == Method::POST {
        Some((Bucket::InstanceNew, true))
    } else if publish && method == Method::POST {
        if publish_limited {
            Some((Bucket::Publish, true))
        } else {
            Some((Bucket::General, false))
        }
    } else if path.starts_with("/api/")
        || path == "/api"
        || path.starts_with("/ws/")
        // The console's page (contract §13); its assets under /console/ are not limited.
        || path == "/console"
    {
        Some((Bucket::General, true))
    } else {
        None
    }
}

fn set_headers(headers: &mut actix_web::http::header::HeaderMap, quota: &Quota) {
    for (name, value) in [
        ("x-ratelimit-limit", quota.limit.to_string()),
        ("x-ratelimit-remaining", quota.remaining.to_string()),
        ("x-ratelimit-reset", quota.reset.to_string()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
}

/// Middleware: counts the request, answers 429 over the limit, and puts the
/// bucket's headers on whatever reply follows.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let limiter = req.app_data::<web::Data<RateLimiter>>().cloned();
    let classified = limiter.as_ref().and_then(|l| {
        let publish_limited = l.limit_of(Bucket::Publish) > 0;
        classify(req.method(), req.match_info().as_str(), publish_limited).map(|c| (l, c))
    });
    let peer_ip = req
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let quota = classified.and_then(|(limiter, (bucket, consume))| {
        let key = crate::auth::request_token(req.request()).unwrap_or_else(|| peer_ip.clone());
        let quota = limiter.check(bucket, &key, consume);
        // An upgrade also counts against its IP's bucket, when that is limited;
        // whichever bucket refuses is the one shown.
        if req.path().starts_with("/ws/") && quota.is_none_or(|q| q.allowed) {
            if let Some(ip_quota) = limiter.check(Bucket::UpgradeIp, &peer_ip, true) {
                if !ip_quota.allowed {
                    return Some(ip_quota);
                }
            }
        }
        quota
    });
    if let Some(q) = quota.filter(|q| !q.allowed) {
        if let Some(metrics) = req.app_data::<web::Data<Metrics>>() {
            metrics.rate_limited.inc();
        }
        let mut reply = ApiError::RateLimited {
            retry_after_secs: q.retry_after,
        }
        .error_response();
        set_headers(reply.headers_mut(), &q);
        return Ok(req.into_response(reply).map_into_right_body());
    }
    let mut res = next.call(req).await?;
    if let Some(q) = quota {
        set_headers(res.headers_mut(), &q);
    }
    Ok(res.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_down_to_zero_then_refuses() {
        let limiter = RateLimiter::new(RateLimitSettings {
            per_minute: 3,
            instance_new_per_minute: 1,
            publish_per_minute: 0,
            upgrades_per_ip_per_minute: 0,
        });
        let seen: Vec<_> = (0..4)
            .map(|_| limiter.check(Bucket::General, "t", true).unwrap())
            .collect();
        assert_eq!(
            seen.iter().map(|q| q.remaining).collect::<Vec<_>>(),
            vec![2, 1, 0, 0]
        );
        assert!(seen[2].allowed && !seen[3].allowed);
        assert!(seen[3].retry_after >= 1 && seen[3].retry_after <= 60);
        assert!(
            limiter
                .check(Bucket::General, "other", true)
                .unwrap()
                .allowed
        );
        assert!(limiter.check(Bucket::Publish, "t", true).is_none());
        let peek = limiter.check(Bucket::General, "fresh", false).unwrap();
        assert_eq!(peek.remaining, 3);
        // Showing an exhausted bucket without consuming it never refuses.
        let shown = limiter.check(Bucket::General, "t", false).unwrap();
        assert!(shown.allowed && shown.remaining == 0);
    }
}
