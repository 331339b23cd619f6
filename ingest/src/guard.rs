//! What stands between the network and the handlers: API keys, per-key
//! rate limits, CORS and the request timeout.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use halakha_common::cache::Cache;
use halakha_common::metrics as m;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::errors::ApiError;

/// A short, non-secret name of an API key, for metrics and logs: 8 hex
/// digits of a domain-separated SHA-256 (keys have at least 32 characters,
/// so this reveals nothing usable about them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub String);

fn fingerprint(key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"halakha-api-key-fingerprint\0");
    h.update(key.as_bytes());
    hex::encode(&h.finalize()[..4])
}

/// The accepted API keys, kept as SHA-256 digests so every comparison has
/// the same length and runs in constant time.
pub struct ApiKeys {
    keys: Vec<([u8; 32], String)>,
}

impl ApiKeys {
    pub fn new(keys: &[SecretString]) -> Self {
        m::init_counters(m::HTTP_AUTH_FAILURES_TOTAL, "reason", &["missing", "invalid"]);
        for k in keys {
            let fp = fingerprint(k.expose_secret());
            metrics::counter!(m::HTTP_REQUESTS_BY_KEY_TOTAL, "key" => fp.clone()).increment(0);
            metrics::counter!(m::HTTP_RATE_LIMITED_TOTAL, "key" => fp).increment(0);
        }
        Self {
            keys: keys
                .iter()
                .map(|k| (Sha256::digest(k.expose_secret().as_bytes()).into(), fingerprint(k.expose_secret())))
                .collect(),
        }
    }

    /// The fingerprint of the key `presented` is, if it is one. Every key
    /// is compared, in constant time, whichever matches.
    pub fn verify(&self, presented: &str) -> Option<KeyFingerprint> {
        let p: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (digest, fp) in &self.keys {
            let diff = digest.iter().zip(p.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(fp);
            }
        }
        found.map(|fp| KeyFingerprint(fp.clone()))
    }
}

/// The key of a request: `Authorization: Bearer <key>` or `X-API-Key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, token) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then_some(token.trim());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Auth then rate limit, as one middleware. The key itself is never
/// logged; requests are counted by its fingerprint.
pub async fn require_key(State(guard): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    let fp = match presented_key(req.headers()) {
        Some(k) => match guard.keys.verify(k) {
            Some(fp) => fp,
            None => {
                metrics::counter!(m::HTTP_AUTH_FAILURES_TOTAL, "reason" => "invalid").increment(1);
                return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API key").into_response();
            }
        },
        None => {
            metrics::counter!(m::HTTP_AUTH_FAILURES_TOTAL, "reason" => "missing").increment(1);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an API key is required (Authorization: Bearer or X-API-Key)",
            )
            .into_response();
        }
    };
    metrics::counter!(m::HTTP_REQUESTS_BY_KEY_TOTAL, "key" => fp.0.clone()).increment(1);
    if let Err(retry_after) = guard.limiter.check(&fp).await {
        metrics::counter!(m::HTTP_RATE_LIMITED_TOTAL, "key" => fp.0.clone()).increment(1);
        tracing::warn!(key = %fp.0, retry_after, "Rate limit reached");
        return ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests for this API key")
            .retry_after(retry_after)
            .into_response();
    }
    req.extensions_mut().insert(fp);
    next.run(req).await
}

/// Keys and limits, shared by the API routes.
pub struct Guard {
    pub keys: ApiKeys,
    pub limiter: RateLimiter,
}

/// Requests per minute per key: shared across replicas through Redis
/// (fixed one-minute windows) when `REDIS_URL` is set and Redis answers,
/// else per replica (GCRA, with a burst).
pub struct RateLimiter {
    per_minute: u32,
    local: Option<DefaultKeyedRateLimiter<String>>,
    shared: Arc<Cache>,
    prefix: String,
}

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32, shared: Arc<Cache>, namespace: &str) -> Self {
        let local = NonZeroU32::new(per_minute).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            DefaultKeyedRateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst))
        });
        Self { per_minute, local, shared, prefix: format!("{namespace}:ingest:rate") }
    }

    /// `Err(seconds to wait)` when the key is over its rate.
    pub async fn check(&self, fp: &KeyFingerprint) -> Result<(), u64> {
        let Some(local) = &self.local else { return Ok(()) };
        if self.shared.is_on() {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let window = now / 60;
            let key = format!("{}:{}:{window}", self.prefix, fp.0);
            if let Some(n) = self.shared.incr_with_ttl(&key, Duration::from_secs(120)).await {
                return if n <= i64::from(self.per_minute) { Ok(()) } else { Err(60 - now % 60) };
            }
        }
        local.check_key(&fp.0).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// Origins allowed to call the API from a browser.
pub struct Cors {
    origins: Vec<HeaderValue>,
}

impl Cors {
    pub fn new(origins: &[String]) -> Self {
        Self { origins: origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect() }
    }
}

const ALLOW_METHODS: &str = "GET, POST, OPTIONS";
const ALLOW_HEADERS: &str = "Authorization, Content-Type, X-API-Key";

/// CORS from an allow-list: an allowed origin is echoed (never `*`, never
/// credentials); a preflight from any other origin gets no allow headers.
pub async fn cors(State(cors): State<Arc<Cors>>, req: Request, next: Next) -> Response {
    let allowed = req.headers().get(header::ORIGIN).filter(|o| cors.origins.iter().any(|a| a == *o)).cloned();
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight { StatusCode::NO_CONTENT.into_response() } else { next.run(req).await };
    let h = resp.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if preflight {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        } else {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Retry-After"));
        }
    }
    resp
}

/// Answer 503 `timeout` when a request takes longer than its bound.
pub async fn timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long; retry later")
            .retry_after(1)
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configured_key_is_accepted_and_nothing_else() {
        let keys = ApiKeys::new(&[SecretString::from("a".repeat(32)), SecretString::from("b".repeat(40))]);
        let a = keys.verify(&"a".repeat(32)).expect("first key");
        let b = keys.verify(&"b".repeat(40)).expect("second key");
        assert_ne!(a, b, "each key has its own fingerprint");
        assert_eq!(a.0.len(), 8);
        assert!(keys.verify(&"a".repeat(31)).is_none());
        assert!(keys.verify(&format!("{}b", "a".repeat(31))).is_none());
        assert!(keys.verify("").is_none());
    }

    #[test]
    fn the_key_is_read_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().expect("header"));
        assert_eq!(presented_key(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "xyz".parse().expect("header"));
        assert_eq!(presented_key(&h), Some("xyz"));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(presented_key(&h), None);
    }

    #[tokio::test]
    async fn the_local_limiter_allows_the_burst_then_says_how_long_to_wait() {
        let limiter = RateLimiter::new(60, 2, Arc::new(Cache::off()), "t");
        let fp = KeyFingerprint("k".into());
        assert!(limiter.check(&fp).await.is_ok());
        assert!(limiter.check(&fp).await.is_ok());
        let wait = limiter.check(&fp).await.expect_err("over the burst");
        assert!((1..=1).contains(&wait), "one request per second refills: {wait}");
        assert!(limiter.check(&KeyFingerprint("other".into())).await.is_ok(), "limits are per key");
    }
}
