//! A webhook's configuration (contract §11): what the set endpoint and
//! instance creation accept, validated key by key (each refusal names its
//! key in `error.details`), and the URL a delivery goes to.
//!
//! Pure validation: nothing here stores, resolves or sends.

use std::net::IpAddr;

use serde::Serialize;
use serde_json::{Map, Value};

use super::address::AddressPolicy;
use crate::domain::{EventKind, EventSet};

/// The label used when none (or `""`) is given.
pub const DEFAULT_LABEL: &str = "default";

/// Longest URL accepted, in characters.
pub const MAX_URL: usize = 2048;

/// Longest `authorization` value accepted.
pub const MAX_AUTHORIZATION: usize = 1024;

/// A webhook's configuration as persisted and replied (without its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookConfig {
    pub label: String,
    pub enabled: bool,
    pub url: Option<String>,
    pub authorization: Option<String>,
    pub by_events: bool,
    /// Event filter, first-seen order, no duplicates; empty = all six.
    pub events: Vec<EventKind>,
    pub media_base64: bool,
    pub ordered: bool,
}

impl WebhookConfig {
    /// The filter as a set.
    pub fn event_set(&self) -> EventSet {
        EventSet::of(&self.events)
    }
}

/// A validated set request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookInput {
    pub config: WebhookConfig,
    pub rotate_secret: bool,
}

/// A refusal: the key at fault and why (for `error.details`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub why: String,
}

impl Invalid {
    fn new(key: &str, why: impl Into<String>) -> Self {
        Invalid {
            key: key.to_string(),
            why: why.into(),
        }
    }

    /// The text for `error.details`.
    pub fn details(&self) -> String {
        format!("`{}` {}", self.key, self.why)
    }
}

/// Whether `label` is 1–64 of `A-Z a-z 0-9 _ . -`.
pub fn is_valid_label(label: &str) -> bool {
    (1..=64).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A label from a query or body: `""` means `default`.
pub fn label_or_default(label: &str) -> &str {
    if label.is_empty() {
        DEFAULT_LABEL
    } else {
        label
    }
}

/// The names under which each key of the set body arrives; instance
/// creation prefixes them (`webhookURL`, `webhookByEvents`, …).
pub struct Keys {
    pub label: Option<&'static str>,
    pub enabled: &'static str,
    pub url: &'static str,
    pub authorization: &'static str,
    pub by_events: &'static str,
    pub events: &'static str,
    pub media_base64: &'static str,
    pub ordered: Option<&'static str>,
    pub rotate_secret: Option<&'static str>,
}

/// The keys of `POST /api/events/webhook/:instance`.
pub const SET_KEYS: Keys = Keys {
    label: Some("label"),
    enabled: "enabled",
    url: "url",
    authorization: "authorization",
    by_events: "byEvents",
    events: "events",
    media_base64: "mediaBase64",
    ordered: Some("ordered"),
    rotate_secret: Some("rotateSecret"),
};

/// The `webhook*` keys of `POST /api/instance/new`.
pub const INSTANCE_KEYS: Keys = Keys {
    label: None,
    enabled: "webhookEnabled",
    url: "webhookURL",
    authorization: "webhookAuthorization",
    by_events: "webhookByEvents",
    events: "webhookEvents",
    media_base64: "webhookMediaBase64",
    ordered: None,
    rotate_secret: None,
};

fn opt_bool(fields: &Map<String, Value>, key: &str) -> Result<Option<bool>, Invalid> {
    match fields.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(Invalid::new(key, "must be a boolean")),
    }
}

/// Validates the webhook keys of `fields`. `Ok(None)` when the enabled key
/// is absent and `enabled_required` is false (instance creation: the other
/// keys are still validated).
pub fn parse_fields(
    fields: &Map<String, Value>,
    keys: &Keys,
    enabled_required: bool,
    policy: &AddressPolicy,
) -> Result<Option<WebhookInput>, Invalid> {
    let label = match keys.label.and_then(|k| fields.get(k).map(|v| (k, v))) {
        None => DEFAULT_LABEL.to_string(),
        Some((k, Value::String(s))) => {
            let s = label_or_default(s);
            if !is_valid_label(s) {
                return Err(Invalid::new(
                    k,
                    "must be 1-64 characters of A-Z a-z 0-9 _ . -",
                ));
            }
            s.to_string()
        }
        Some((k, _)) => return Err(Invalid::new(k, "must be a string")),
    };
    let enabled = opt_bool(fields, keys.enabled)?;
    if enabled.is_none() && enabled_required {
        return Err(Invalid::new(keys.enabled, "is required"));
    }
    let url = match fields.get(keys.url) {
        None => None,
        Some(Value::String(s)) => {
            validate_url(s, policy).map_err(|why| Invalid::new(keys.url, why))?;
            Some(s.clone())
        }
        Some(_) => return Err(Invalid::new(keys.url, "must be a string")),
    };
    let authorization = match fields.get(keys.authorization) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            if s.len() > MAX_AUTHORIZATION || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err(Invalid::new(
                    keys.authorization,
                    "must be at most 1024 visible ASCII characters or spaces",
                ));
            }
            Some(s.clone())
        }
        Some(_) => return Err(Invalid::new(keys.authorization, "must be a string or null")),
    };
    let by_events = opt_bool(fields, keys.by_events)?.unwrap_or(false);
    let events = match fields.get(keys.events) {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                let kind = item.as_str().and_then(EventKind::parse).ok_or_else(|| {
                    Invalid::new(keys.events, format!("has an unknown event name: {item}"))
                })?;
                if !out.contains(&kind) {
                    out.push(kind);
                }
            }
            out
        }
        Some(_) => return Err(Invalid::new(keys.events, "must be a list of event names")),
    };
    let media_base64 = opt_bool(fields, keys.media_base64)?.unwrap_or(false);
    let ordered = match keys.ordered {
        Some(k) => opt_bool(fields, k)?.unwrap_or(false),
        None => false,
    };
    let rotate_secret = match keys.rotate_secret {
        Some(k) => opt_bool(fields, k)?.unwrap_or(false),
        None => false,
    };
    let Some(enabled) = enabled else {
        return Ok(None);
    };
    if enabled && url.is_none() {
        return Err(Invalid::new(
            keys.url,
            "is required when the webhook is enabled",
        ));
    }
    let config = if enabled {
        WebhookConfig {
            label,
            enabled,
            url,
            authorization,
            by_events,
            events,
            media_base64,
            ordered,
        }
    } else {
        WebhookConfig {
            label,
            enabled,
            url: None,
            authorization: None,
            by_events,
            events: Vec::new(),
            media_base64: false,
            ordered,
        }
    };
    Ok(Some(WebhookInput {
        config,
        rotate_secret,
    }))
}

/// The host of a URL already validated by [`validate_url`], as an IP
/// address when it is a literal — in any spelling the URL standard reads as
/// one (`127.1`, `2130706433`, `0x7f000001` are 127.0.0.1), as the client
/// that delivers reads it.
pub fn ip_literal(url: &str) -> Option<IpAddr> {
    host_ip(&url::Url::parse(url).ok()?)
}

/// The host of a parsed URL as an IP address, when it is one.
fn host_ip(url: &url::Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// Checks a webhook URL against the contract's rules; the error says why.
pub fn validate_url(url: &str, policy: &AddressPolicy) -> Result<(), String> {
    if url.chars().count() > MAX_URL {
        return Err("must be at most 2048 characters".into());
    }
    if !url.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err("must be visible ASCII without spaces".into());
    }
    let lower = url.to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &url[7..]
    } else if lower.starts_with("https://") {
        &url[8..]
    } else {
        return Err("must start with http:// or https://".into());
    };
    if url.contains('#') {
        return Err("must not have a fragment".into());
    }
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("must not carry user info".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err("has an unclosed IPv6 bracket".into());
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("has an invalid IPv6 address".into());
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or("has junk after the IPv6 address")?,
            ),
        };
        (addr, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("must have a host".into());
    }
    if !authority.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err("has an invalid host name".into());
    }
    if let Some(p) = port {
        if p.is_empty()
            || p.len() > 5
            || !p.bytes().all(|b| b.is_ascii_digit())
            || p.parse::<u32>().map_or(true, |n| n == 0 || n > 65535)
        {
            return Err("has an invalid port".into());
        }
    }
    let Ok(parsed) = url::Url::parse(url) else {
        return Err("is not a valid URL".into());
    };
    if let Some(ip) = host_ip(&parsed) {
        if !policy.permits(ip) {
            return Err("names a refused address (loopback, private, link-local, …)".into());
        }
    }
    Ok(())
}

/// The URL a delivery of `event` goes to: the webhook's URL, with
/// `/<event>` appended to its path when `by_events` (one `/` between them,
/// before any query string).
pub fn target_url(url: &str, by_events: bool, event: EventKind) -> String {
    if !by_events {
        return url.to_string();
    }
    let (base, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let has_path = base[scheme_end..].contains('/');
    let mut out = base.to_string();
    if !has_path || !out.ends_with('/') {
        out.push('/');
    }
    out.push_str(event.as_str());
    out.push_str(query);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> AddressPolicy {
        AddressPolicy::default()
    }

    #[test]
    fn urls() {
        for ok in [
            "https://app.example.com/wh",
            "http://a",
            "HTTP://a.b:8080/x?y=1",
            "https://[2001:db8::1]:443/p",
            "https://8.8.8.8/x",
        ] {
            assert!(validate_url(ok, &p()).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://a",
            "https://",
            "https:///x",
            "https://u:p@a/",
            "https://a/#f",
            "https://a:0/",
            "https://a:99999/",
            "https://a b/",
            "https://127.0.0.1/",
            "https://[::1]/",
            "https://10.0.0.1:80/",
            "https://[::ffff:169.254.169.254]/",
            "https://127.1/",
            "https://0x7f.1/",
            "https://3232235521/",
            "https://[2001:db8::1/",
        ] {
            assert!(validate_url(bad, &p()).is_err(), "{bad}");
        }
        let long = format!("https://a/{}", "x".repeat(2048));
        assert!(validate_url(&long, &p()).is_err());
        let allow = AddressPolicy::new(&["127.0.0.0/8".into()]);
        assert!(validate_url("http://127.0.0.1:9/x", &allow).is_ok());
    }

    #[test]
    fn by_events_urls() {
        let e = EventKind::CallUpdate;
        assert_eq!(
            target_url("https://a/wh", true, e),
            "https://a/wh/call.update"
        );
        assert_eq!(
            target_url("https://a/wh/", true, e),
            "https://a/wh/call.update"
        );
        assert_eq!(target_url("https://a", true, e), "https://a/call.update");
        assert_eq!(
            target_url("https://a?x=1", true, e),
            "https://a/call.update?x=1"
        );
        assert_eq!(
            target_url("https://a/p?x=1", true, e),
            "https://a/p/call.update?x=1"
        );
        assert_eq!(target_url("https://a/p?x=1", false, e), "https://a/p?x=1");
    }

    #[test]
    fn bodies() {
        let parse = |s: &str| {
            let Value::Object(m) = serde_json::from_str(s).unwrap() else {
                panic!()
            };
            parse_fields(&m, &SET_KEYS, true, &p())
        };
        let ok = parse(r#"{"enabled":true,"url":"https://a/x","events":["call.update","call.update"],"label":""}"#).unwrap().unwrap();
        assert_eq!(ok.config.label, "default");
        assert_eq!(ok.config.events.len(), 1);
        let off = parse(r#"{"enabled":false,"url":"https://a/x","authorization":"x","byEvents":true,"mediaBase64":true}"#).unwrap().unwrap();
        assert_eq!(off.config.url, None);
        assert!(off.config.by_events && !off.config.media_base64);
        for (bad, key) in [
            (r#"{}"#, "enabled"),
            (r#"{"enabled":true}"#, "url"),
            (r#"{"enabled":null}"#, "enabled"),
            (r#"{"enabled":true,"url":null}"#, "url"),
            (r#"{"enabled":false,"url":"nope"}"#, "url"),
            (
                r#"{"enabled":true,"url":"https://a","label":"a b"}"#,
                "label",
            ),
            (
                r#"{"enabled":true,"url":"https://a","label":null}"#,
                "label",
            ),
            (
                r#"{"enabled":true,"url":"https://a","events":["x"]}"#,
                "events",
            ),
            (
                r#"{"enabled":true,"url":"https://a","byEvents":null}"#,
                "byEvents",
            ),
            (
                r#"{"enabled":true,"url":"https://a","ordered":1}"#,
                "ordered",
            ),
            (
                r#"{"enabled":true,"url":"https://a","rotateSecret":"y"}"#,
                "rotateSecret",
            ),
            (
                r#"{"enabled":true,"url":"https://a","authorization":5}"#,
                "authorization",
            ),
            (
                r#"{"enabled":true,"url":"https://a","authorization":"a\u0001"}"#,
                "authorization",
            ),
        ] {
            assert_eq!(parse(bad).unwrap_err().key, key, "{bad}");
        }
    }
}
