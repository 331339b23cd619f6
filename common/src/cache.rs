//! A best-effort Redis cache.
//!
//! The cache saves work; it is never a reason to fail a message. When
//! `REDIS_URL` is unset it is off; when Redis is down every call is a miss,
//! counted in `halakha_cache_requests_total{outcome="error"}`, and the
//! connection is retried a few seconds later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

use crate::metrics as m;

/// How long to wait before trying to reach Redis again after a failure.
const RECONNECT_AFTER: Duration = Duration::from_secs(5);

/// `REDIS_URL` could not be used.
#[derive(Debug, thiserror::Error)]
#[error("REDIS_URL is not a valid redis:// URL")]
pub struct InvalidRedisUrl(#[source] redis::RedisError);

struct Inner {
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    retry_at: Mutex<Option<Instant>>,
    ttl: Duration,
}

/// A cache of byte values under string keys, with one TTL.
pub struct Cache {
    inner: Option<Inner>,
}

impl Cache {
    /// A cache that never hits and never stores.
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// A cache on `url`; nothing is connected until first use.
    pub fn new(url: &SecretString, ttl: Duration) -> Result<Self, InvalidRedisUrl> {
        let client = redis::Client::open(url.expose_secret()).map_err(InvalidRedisUrl)?;
        m::init_counters(m::CACHE_REQUESTS_TOTAL, "outcome", &["hit", "miss", "error"]);
        Ok(Self { inner: Some(Inner { client, conn: Mutex::new(None), retry_at: Mutex::new(None), ttl }) })
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    async fn connection(inner: &Inner) -> Option<ConnectionManager> {
        let mut conn = inner.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Some(c.clone());
        }
        let mut retry_at = inner.retry_at.lock().await;
        if retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1);
        match inner.client.get_connection_manager_with_config(config).await {
            Ok(c) => {
                *retry_at = None;
                *conn = Some(c.clone());
                Some(c)
            }
            Err(error) => {
                tracing::warn!(%error, "Redis unreachable; continuing without the cache");
                *retry_at = Some(Instant::now() + RECONNECT_AFTER);
                None
            }
        }
    }

    /// Ask Redis for a `PONG` (the readiness probe). Off: `Ok`.
    pub async fn ping(&self) -> Result<(), String> {
        let Some(inner) = &self.inner else { return Ok(()) };
        let Some(mut conn) = Self::connection(inner).await else { return Err("unreachable".into()) };
        redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Report this cache in `/health/ready`: probed when configured (not
    /// required: the stages work on without it), else `disabled`.
    pub fn report_health(self: &Arc<Self>, readiness: &crate::health::Readiness) {
        if !self.is_on() {
            readiness.info("redis", serde_json::json!({"status": "disabled"}));
            return;
        }
        let cache = self.clone();
        readiness.probe(
            "redis",
            false,
            Arc::new(move || {
                let cache = cache.clone();
                Box::pin(async move { cache.ping().await })
            }),
        );
    }

    fn count(outcome: &'static str) {
        metrics::counter!(m::CACHE_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
    }

    /// The value under `key`, or `None` on a miss, when off, or on error.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let inner = self.inner.as_ref()?;
        let Some(mut conn) = Self::connection(inner).await else {
            Self::count("error");
            return None;
        };
        match conn.get::<_, Option<Vec<u8>>>(key).await {
            Ok(Some(v)) => {
                Self::count("hit");
                Some(v)
            }
            Ok(None) => {
                Self::count("miss");
                None
            }
            Err(error) => {
                tracing::warn!(%error, "Cache read failed; continuing without it");
                Self::count("error");
                None
            }
        }
    }

    /// Increment the counter under `key`, giving it `ttl` when it is new.
    /// `None` when off or unreachable: the caller falls back to local state.
    pub async fn incr_with_ttl(&self, key: &str, ttl: Duration) -> Option<i64> {
        self.incr_by_with_ttl(key, 1, ttl).await
    }

    /// Add `by` (may be negative) to the counter under `key`, setting `ttl`.
    pub async fn incr_by_with_ttl(&self, key: &str, by: i64, ttl: Duration) -> Option<i64> {
        let inner = self.inner.as_ref()?;
        let mut conn = Self::connection(inner).await?;
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let result: redis::RedisResult<(i64, i64)> =
            redis::pipe().atomic().incr(key, by).expire(key, ttl).query_async(&mut conn).await;
        match result {
            Ok((n, _)) => Some(n),
            Err(error) => {
                tracing::warn!(%error, "Redis counter failed; falling back to local state");
                None
            }
        }
    }

    /// The integer under `key` (0 when absent); `None` when off or unreachable.
    pub async fn get_i64(&self, key: &str) -> Option<i64> {
        let inner = self.inner.as_ref()?;
        let mut conn = Self::connection(inner).await?;
        match conn.get::<_, Option<i64>>(key).await {
            Ok(v) => Some(v.unwrap_or(0)),
            Err(error) => {
                tracing::warn!(%error, "Redis read failed; falling back to local state");
                None
            }
        }
    }

    /// Store an integer under `key` for `ttl`; errors are logged.
    pub async fn set_i64(&self, key: &str, value: i64, ttl: Duration) {
        let Some(inner) = self.inner.as_ref() else { return };
        let Some(mut conn) = Self::connection(inner).await else { return };
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        if let Err(error) = conn.pset_ex::<_, _, ()>(key, value, ms).await {
            tracing::warn!(%error, "Redis write failed; continuing with local state");
        }
    }

    /// Store `value` under `key` with the cache's TTL; errors are logged.
    pub async fn set(&self, key: &str, value: &[u8]) {
        let Some(inner) = self.inner.as_ref() else { return };
        let Some(mut conn) = Self::connection(inner).await else {
            Self::count("error");
            return;
        };
        if let Err(error) = conn.set_ex::<_, _, ()>(key, value, inner.ttl.as_secs().max(1)).await {
            tracing::warn!(%error, "Cache write failed; continuing without it");
            Self::count("error");
        }
    }
}
