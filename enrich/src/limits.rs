//! Politeness towards the provider: requests and tokens per minute, the
//! provider's own `x-ratelimit-*` signals, and the daily token budget.
//!
//! Budgets are shared by every replica through Redis (fixed one-minute
//! windows) when it is configured and answers; otherwise each replica keeps
//! its own (GCRA limiters). Waiting for room happens inside the handler, so
//! the runner's in-progress acks keep the message; a spent daily budget
//! pauses the stage instead of failing messages.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::{DefaultDirectRateLimiter, Quota};
use halakha_common::StageError;
use halakha_common::cache::Cache;
use halakha_common::envelope::Usage;
use reqwest::header::HeaderMap;

/// Settings of the provider limits.
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    /// Requests per minute (`OPENAI_REQUESTS_PER_MINUTE`, 0 = no limit).
    pub requests_per_minute: u32,
    /// Tokens per minute (`OPENAI_TOKENS_PER_MINUTE`, 0 = no limit).
    pub tokens_per_minute: u32,
    /// Tokens per UTC day (`OPENAI_DAILY_TOKEN_BUDGET`, 0 = no budget).
    pub daily_token_budget: u64,
}

pub struct Limits {
    config: LimitsConfig,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    shared: Arc<Cache>,
    prefix: String,
    blocked_until_ms: Mutex<u64>,
    used_today: Mutex<(u64, u64)>,
}

fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

fn per_minute(n: u32) -> Option<DefaultDirectRateLimiter> {
    NonZeroU32::new(n).map(|n| DefaultDirectRateLimiter::direct(Quota::per_minute(n)))
}

/// Parse the reset durations OpenAI sends: `1s`, `6m0s`, `20ms`, `1h2m3.5s`.
pub fn parse_reset(s: &str) -> Option<Duration> {
    let (mut total, mut num) = (0f64, String::new());
    let mut chars = s.trim().chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let value: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += value * unit;
        any = true;
    }
    if !num.is_empty() {
        total += num.parse::<f64>().ok()?;
        any = true;
    }
    (any && total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(3600.0)))
}

impl Limits {
    pub fn new(config: LimitsConfig, shared: Arc<Cache>, namespace: &str) -> Self {
        Self {
            requests: per_minute(config.requests_per_minute),
            tokens: per_minute(config.tokens_per_minute),
            config,
            shared,
            prefix: format!("{namespace}:enrich:limits"),
            blocked_until_ms: Mutex::new(0),
            used_today: Mutex::new((0, 0)),
        }
    }

    fn day_and_minute() -> (u64, u64) {
        let secs = now_ms() / 1000;
        (secs / 86_400, secs / 60)
    }

    /// Wait for room for one request of about `estimate` tokens. A spent
    /// daily budget is a pause until the next UTC day.
    pub async fn acquire(&self, estimate: u32) -> Result<(), StageError> {
        let (day, _) = Self::day_and_minute();
        if self.config.daily_token_budget > 0 {
            let used = self.used_today(day).await;
            if used >= self.config.daily_token_budget {
                let until_midnight = 86_400 - (now_ms() / 1000) % 86_400;
                return Err(StageError::paused(
                    format!("daily token budget of {} spent ({used} used)", self.config.daily_token_budget),
                    Duration::from_secs(until_midnight),
                ));
            }
        }
        self.wait_if_blocked().await;
        self.take("requests", 1, self.config.requests_per_minute, self.requests.as_ref()).await;
        self.take("tokens", estimate, self.config.tokens_per_minute, self.tokens.as_ref()).await;
        Ok(())
    }

    async fn used_today(&self, day: u64) -> u64 {
        let key = format!("{}:tokens:{day}", self.prefix);
        if let Some(n) = self.shared.get_i64(&key).await {
            return u64::try_from(n).unwrap_or(0);
        }
        self.used_today.lock().map(|u| if u.0 == day { u.1 } else { 0 }).unwrap_or(0)
    }

    async fn wait_if_blocked(&self) {
        let local = self.blocked_until_ms.lock().map(|b| *b).unwrap_or(0);
        let shared = self.shared.get_i64(&format!("{}:blocked_until", self.prefix)).await.unwrap_or(0);
        let until = local.max(u64::try_from(shared).unwrap_or(0));
        let now = now_ms();
        if until > now {
            let wait = Duration::from_millis(until - now);
            tracing::info!(wait_ms = wait.as_millis() as u64, "Provider rate limit reached; waiting");
            tokio::time::sleep(wait).await;
        }
    }

    /// Take `n` from a per-minute budget, waiting for the next window when
    /// it is spent (shared), or for the limiter (local).
    async fn take(&self, what: &str, n: u32, limit: u32, local: Option<&DefaultDirectRateLimiter>) {
        if limit == 0 || n == 0 {
            return;
        }
        if self.shared.is_on() {
            loop {
                let (_, minute) = Self::day_and_minute();
                let key = format!("{}:{what}:{minute}", self.prefix);
                match self.shared.incr_by_with_ttl(&key, i64::from(n), Duration::from_secs(120)).await {
                    Some(total) if total <= i64::from(limit) => return,
                    Some(_) => {
                        let next = (minute + 1) * 60_000;
                        tokio::time::sleep(Duration::from_millis(next.saturating_sub(now_ms()).max(10))).await;
                    }
                    None => break,
                }
            }
        }
        if let Some(limiter) = local {
            let n = NonZeroU32::new(n.min(limit)).unwrap_or(NonZeroU32::MIN);
            // n never exceeds the burst (= the per-minute limit), so this waits.
            let _ = limiter.until_n_ready(n).await;
        }
    }

    /// Account what a call really used.
    pub async fn record(&self, estimate: u32, usage: &Usage) {
        let (day, minute) = Self::day_and_minute();
        let used = u64::from(usage.total_tokens);
        if self.config.tokens_per_minute > 0 && self.shared.is_on() {
            let key = format!("{}:tokens:{minute}", self.prefix);
            let correction = i64::from(usage.total_tokens) - i64::from(estimate);
            self.shared.incr_by_with_ttl(&key, correction, Duration::from_secs(120)).await;
        }
        if self.config.daily_token_budget > 0 {
            let key = format!("{}:tokens:{day}", self.prefix);
            self.shared.incr_by_with_ttl(&key, i64::try_from(used).unwrap_or(0), Duration::from_secs(2 * 86_400)).await;
            if let Ok(mut u) = self.used_today.lock() {
                *u = if u.0 == day { (day, u.1 + used) } else { (day, used) };
            }
        }
    }

    /// Read the provider's `x-ratelimit-*` headers: when a budget is at 0,
    /// hold every call (every replica, through Redis) until it resets.
    pub async fn observe(&self, headers: &HeaderMap) {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let mut wait = Duration::ZERO;
        for (remaining, reset) in [
            ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
            ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
        ] {
            if get(remaining).and_then(|r| r.trim().parse::<u64>().ok()) == Some(0)
                && let Some(d) = get(reset).and_then(parse_reset)
            {
                wait = wait.max(d);
            }
        }
        if wait.is_zero() {
            return;
        }
        let until = now_ms() + u64::try_from(wait.as_millis()).unwrap_or(0);
        if let Ok(mut b) = self.blocked_until_ms.lock() {
            *b = (*b).max(until);
        }
        let key = format!("{}:blocked_until", self.prefix);
        self.shared.set_i64(&key, i64::try_from(until).unwrap_or(i64::MAX), wait + Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_reset_durations_parse() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_reset("1m30.5s"), Some(Duration::from_millis(90_500)));
        assert_eq!(parse_reset("soon"), None);
    }

    #[tokio::test]
    async fn a_spent_daily_budget_is_a_pause_not_a_failure() {
        let l =
            Limits::new(LimitsConfig { daily_token_budget: 100, ..Default::default() }, Arc::new(Cache::off()), "t");
        assert!(l.acquire(10).await.is_ok());
        l.record(10, &Usage { prompt_tokens: 60, completion_tokens: 40, total_tokens: 100 }).await;
        let e = l.acquire(10).await.expect_err("spent");
        assert!(e.is_paused() && e.full_reason().contains("daily token budget"), "{e}");
        assert!(e.retry_after().is_some_and(|d| d <= Duration::from_secs(86_400)));
    }

    #[tokio::test]
    async fn a_zero_remaining_header_holds_the_next_call_until_the_reset() {
        let l = Limits::new(LimitsConfig::default(), Arc::new(Cache::off()), "t");
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining-requests", "0".parse().expect("value"));
        h.insert("x-ratelimit-reset-requests", "300ms".parse().expect("value"));
        l.observe(&h).await;
        let started = std::time::Instant::now();
        l.acquire(1).await.expect("no budget");
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    }
}
