//! The stage runner: a durable pull consumer with bounded concurrency.
//!
//! A stage implements [`Handler`] (input envelope → output envelope or
//! [`StageError`]); the runner owns everything around it:
//!
//! - a semaphore permit is taken *before* fetching, so the stage never holds
//!   more messages than it can work on;
//! - long handlers send in-progress acks so the broker does not redeliver;
//! - success: the output is published (PubAck awaited, `Nats-Msg-Id` set),
//!   then the input is acked;
//! - transient error: nak with a delay, the longer of the exponential
//!   back-off with jitter and the remote side's `Retry-After`; at
//!   `max_deliver` the message is dead-lettered instead;
//! - permanent error or unreadable payload: dead-letter, then term;
//! - a pause (quota, budget, database down) or a broker that cannot store
//!   the output: the stage stops fetching and holds the message with
//!   in-progress acks, spending no delivery, then tries again;
//! - shutdown: stop fetching, nak (no delay) what was fetched but not
//!   started, wait for in-flight work within the drain timeout.

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, kv};
use base64::Engine as _;
use futures::StreamExt;
use halakha_common::StageError;
use halakha_common::config::Reader;
use halakha_common::envelope::{
    Attempt, DeadLetter, Envelope, ErrorKind, LEGACY_TRACE_HEADER, SCHEMA_VERSION, TRACE_HEADER,
};
use halakha_common::health::ReadyFlag;
use halakha_common::metrics as m;
use halakha_common::trace::TraceContext;
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::names::{Names, Route};
use crate::publisher::Publisher;
use crate::topology::{self, ConsumerOverrides, TopologyError};

/// The most of an original payload a dead letter keeps: the entry (base64
/// may grow it by a third) must stay under the broker's 1 MiB default.
pub const MAX_KEPT_PAYLOAD: usize = 256 * 1024;

/// Tuning of a stage's consumer loop, from the environment.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Messages handled at once (`CONCURRENCY`).
    pub concurrency: usize,
    /// Deliveries before a transiently failing message is dead-lettered
    /// (`MAX_DELIVER`).
    pub max_deliver: i64,
    /// How long the broker waits for an ack before redelivering
    /// (`ACK_WAIT_SECS`); in-progress acks are sent every third of it.
    pub ack_wait: Duration,
    /// First retry delay (`BACKOFF_BASE_MS`), doubled per attempt...
    pub backoff_base: Duration,
    /// ...up to this (`BACKOFF_MAX_SECS`).
    pub backoff_max: Duration,
    /// Time allowed to finish in-flight work on shutdown (`DRAIN_TIMEOUT_SECS`).
    pub drain_timeout: Duration,
    /// How long one pull request waits for messages.
    pub fetch_expires: Duration,
    /// No message finished for this long while some are pending: the
    /// stage reports not-ready and says why (`WATCHDOG_SECS`, 0 = off).
    pub watchdog: Duration,
    /// How often the consumer's info is read for the lag gauges
    /// (`CONSUMER_INFO_INTERVAL_SECS`).
    pub consumer_info_interval: Duration,
}

impl RunnerConfig {
    /// Read the runner variables; `default_concurrency` differs per stage.
    pub fn read(r: &mut Reader<'_>, default_concurrency: usize) -> Self {
        Self {
            concurrency: r.ranged("CONCURRENCY", default_concurrency, 1..=1024),
            max_deliver: r.ranged("MAX_DELIVER", 5, 1..=100),
            ack_wait: r.seconds("ACK_WAIT_SECS", 30, 5..=600),
            backoff_base: Duration::from_millis(r.ranged("BACKOFF_BASE_MS", 1000, 10..=60_000)),
            backoff_max: r.seconds("BACKOFF_MAX_SECS", 60, 1..=3600),
            drain_timeout: r.seconds("DRAIN_TIMEOUT_SECS", 30, 1..=600),
            fetch_expires: Duration::from_secs(1),
            watchdog: r.seconds("WATCHDOG_SECS", 300, 0..=86_400),
            consumer_info_interval: r.seconds("CONSUMER_INFO_INTERVAL_SECS", 15, 1..=300),
        }
    }

    fn overrides(&self) -> ConsumerOverrides {
        ConsumerOverrides {
            max_deliver: Some(self.max_deliver),
            ack_wait: Some(self.ack_wait),
            max_ack_pending: Some(i64::try_from(self.concurrency.max(1) * 4).unwrap_or(1000).max(100)),
        }
    }

    /// Delay before the next attempt after `delivered` deliveries:
    /// exponential, capped, with jitter in the upper half.
    pub fn backoff(&self, delivered: i64) -> Duration {
        let exp = u32::try_from(delivered.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
        let full = self.backoff_base.saturating_mul(2u32.saturating_pow(exp)).min(self.backoff_max);
        let half = full / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let r = if jitter_ms == 0 { 0 } else { random_u64() % (jitter_ms + 1) };
        half + Duration::from_millis(r)
    }
}

fn random_u64() -> u64 {
    // A fresh RandomState is seeded from the OS; enough for jitter.
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// Where and how often a message was delivered, given to the handler.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    pub stream: String,
    pub stream_seq: u64,
    /// Deliveries of this message, this one included (1 on the first).
    pub delivered: i64,
    pub headers: Option<HeaderMap>,
}

/// What a handler did with a message.
#[derive(Debug)]
pub enum Handled<T> {
    /// Publish this output, then ack the input.
    Publish(T),
    /// Nothing to publish: ack.
    Done,
    /// Its effect was already done (a redelivery, a known submission): ack,
    /// counted as `duplicate`.
    Duplicate,
}

/// The business logic of a stage.
pub trait Handler: Send + Sync + 'static {
    type Input: DeserializeOwned + Envelope + Send;
    type Output: Serialize + Envelope + Send + Sync;

    /// Handle one message.
    fn handle(
        &self,
        input: Self::Input,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<Handled<Self::Output>, StageError>> + Send;

    /// The `Nats-Msg-Id` of the output. The default ties it to the input's
    /// stream position: a redelivery of the same input publishes the same
    /// id (the broker drops the copy), while an operator's replay (a new
    /// stream position) flows through.
    fn output_message_id(&self, output: &Self::Output, delivery: &Delivery) -> String {
        format!("{}:{}:{}", output.id(), delivery.stream, delivery.stream_seq)
    }

    /// What the stage worked with, for its dead letters (for example the
    /// model and prompt version). Empty by default.
    fn dead_letter_context(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

/// Why the runner could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

/// A stage's consumer loop, bound to its durable consumer.
pub struct Runner {
    route: Route,
    consumer: PullConsumer,
    publisher: Publisher,
    config: RunnerConfig,
    consuming: ReadyFlag,
    progress: ReadyFlag,
    attempts: Option<kv::Store>,
}

impl Runner {
    /// Apply the route's consumer definition and bind to it. `consuming`
    /// is set while the fetch loop is healthy.
    pub async fn bind(
        js: &jetstream::Context,
        names: &Names,
        route: Route,
        config: RunnerConfig,
        consuming: ReadyFlag,
        progress: ReadyFlag,
    ) -> Result<Self, RunnerError> {
        let consumer_config = topology::consumer(names, &route, &config.overrides())?;
        let consumer = topology::apply_consumer(js, &route, consumer_config).await?;
        progress.set(true);
        let attempts = topology::attempts_bucket(js, names).await;
        Ok(Self { route, consumer, publisher: Publisher::new(js.clone()), config, consuming, progress, attempts })
    }

    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Run until `shutdown` is cancelled, then drain.
    pub async fn run<H: Handler>(self, handler: Arc<H>, shutdown: CancellationToken) {
        let stage = self.route.name;
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        // A JoinSet, not a detached spawn: if this future is dropped (the
        // process is killed, a test aborts the stage) every in-flight
        // handler goes with it, as it would with the process.
        let mut in_flight: JoinSet<()> = JoinSet::new();
        // Pull requests past their expiry that the broker has not ended.
        let mut late: JoinSet<()> = JoinSet::new();
        let holding: Arc<std::sync::Mutex<std::collections::HashMap<u64, jetstream::Message>>> = Arc::default();
        let shared = Arc::new(Shared {
            route: self.route.clone(),
            publisher: self.publisher.clone(),
            config: self.config.clone(),
            pause: PauseGate::default(),
            shutdown: shutdown.clone(),
            consuming: self.consuming.clone(),
            last_progress: std::sync::atomic::AtomicU64::new(now_ms()),
            attempts: self.attempts.clone(),
        });
        m::init_stage(stage);
        let watchdog = tokio::spawn(watch_consumer(shared.clone(), self.consumer.clone(), self.progress.clone()));
        tracing::info!(stage, consumer = %self.route.consumer, stream = %self.route.input_stream, concurrency = self.config.concurrency, "Consuming");
        self.consuming.set(true);
        let mut draining = false;

        while !draining {
            // A paused stage fetches nothing until the pause ends.
            if shared.pause.until().is_some() {
                if !shared.pause.wait(&shutdown).await {
                    break;
                }
                metrics::gauge!(m::STAGE_PAUSED, "stage" => stage).set(0.0);
                self.consuming.set(true);
                tracing::info!(stage, "Pause over; fetching again");
            }
            // Take a permit before fetching: never hold work we cannot start.
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let mut held: Vec<OwnedSemaphorePermit> = vec![first];
            while let Ok(p) = permits.clone().try_acquire_owned() {
                held.push(p);
            }
            let batch =
                self.consumer.batch().max_messages(held.len()).expires(self.config.fetch_expires).messages().await;
            // The broker ends an expired pull request with a 408. Should
            // that answer not come (nats-server 2.9 drops the request
            // without it when a message arrives just as it expires, and
            // the message then waits for the next pull; the client library
            // would wait five seconds more), the stage pulls again soon
            // after the expiry, and the old request is watched a while
            // longer on its own for a message still on its way.
            let overdue = tokio::time::sleep(self.config.fetch_expires + PULL_END_WAIT);
            tokio::pin!(overdue);
            let mut unended = false;
            let mut batch = match batch {
                Ok(b) => {
                    self.consuming.set(true);
                    b
                }
                Err(error) => {
                    self.consuming.set(false);
                    tracing::warn!(stage, %error, "Fetch failed; retrying in 1s");
                    drop(held);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled(), if !draining => {
                        draining = true;
                        continue;
                    }
                    next = batch.next() => next,
                    () = &mut overdue => {
                        unended = true;
                        break;
                    }
                };
                match next {
                    None => break,
                    Some(Err(error)) => {
                        tracing::warn!(stage, %error, "Pull request ended with an error");
                        break;
                    }
                    Some(Ok(msg)) => {
                        let permit = if draining { None } else { held.pop() };
                        match permit {
                            Some(permit) => {
                                let shared = shared.clone();
                                let handler = handler.clone();
                                while in_flight.try_join_next().is_some() {}
                                // Remember what is held, to hand it back if
                                // the drain runs out of time.
                                let key = held_key(&msg);
                                if let (Ok(mut h), Some(k)) = (holding.lock(), key) {
                                    h.insert(k, msg.clone());
                                }
                                let holding = holding.clone();
                                in_flight.spawn(async move {
                                    process(&shared, handler.as_ref(), msg).await;
                                    if let (Ok(mut h), Some(k)) = (holding.lock(), key) {
                                        h.remove(&k);
                                    }
                                    drop(permit);
                                });
                            }
                            None => {
                                // Fetched but not started: hand it back at once.
                                let _ = msg.ack_with(AckKind::Nak(None)).await;
                            }
                        }
                    }
                }
            }
            drop(held);
            if unended {
                while late.try_join_next().is_some() {}
                late.spawn(hand_back_late(stage, batch, FETCH_GRACE.saturating_sub(PULL_END_WAIT)));
            }
        }

        self.consuming.set(false);
        watchdog.abort();
        tracing::info!(stage, in_flight = in_flight.len(), "Draining");
        let drained = tokio::time::timeout(self.config.drain_timeout, async {
            while in_flight.join_next().await.is_some() {}
            while late.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            // Out of time: stop the handlers and hand their messages back
            // at once (no delay), for another replica to take.
            in_flight.abort_all();
            let left: Vec<jetstream::Message> =
                holding.lock().map(|mut h| h.drain().map(|(_, m)| m).collect()).unwrap_or_default();
            for msg in &left {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
            tracing::warn!(
                stage,
                handed_back = left.len(),
                "Drain timeout reached; unfinished messages nak'ed for redelivery"
            );
        } else {
            tracing::info!(stage, "Drained");
        }
    }
}

struct Shared {
    route: Route,
    publisher: Publisher,
    config: RunnerConfig,
    pause: PauseGate,
    shutdown: CancellationToken,
    /// Readiness of the loop: false while it cannot fetch or is paused.
    consuming: ReadyFlag,
    /// When a message last finished (ms since the epoch), for the watchdog.
    last_progress: std::sync::atomic::AtomicU64,
    /// Failed deliveries by message, for the dead letters' history.
    attempts: Option<kv::Store>,
}

/// A held message's stream sequence (its key while in flight).
fn held_key(msg: &jetstream::Message) -> Option<u64> {
    msg.info().ok().map(|i| i.stream_sequence)
}

fn now_ms() -> u64 {
    u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis())
        .unwrap_or(u64::MAX)
}

/// Read the consumer's info every `CONSUMER_INFO_INTERVAL_SECS` for the
/// lag gauges, and keep the stuck-consumer watchdog: messages wait
/// (pending or unacknowledged) but none has finished for `WATCHDOG_SECS`:
/// not ready, and a log line says why.
async fn watch_consumer(shared: Arc<Shared>, mut consumer: PullConsumer, flag: ReadyFlag) {
    let stage = shared.route.name;
    let limit = shared.config.watchdog;
    let mut every = shared.config.consumer_info_interval;
    if !limit.is_zero() {
        every = every.min((limit / 4).max(Duration::from_millis(200)));
    }
    let mut stuck = false;
    loop {
        let Ok(info) = consumer.info().await else {
            tokio::time::sleep(every).await;
            continue;
        };
        metrics::gauge!(m::CONSUMER_PENDING, "stage" => stage).set(info.num_pending as f64);
        metrics::gauge!(m::CONSUMER_ACK_PENDING, "stage" => stage).set(info.num_ack_pending as f64);
        metrics::gauge!(m::CONSUMER_REDELIVERED, "stage" => stage).set(info.num_redelivered as f64);
        if !limit.is_zero() {
            let waiting = info.num_pending + info.num_ack_pending as u64;
            let idle_ms = now_ms().saturating_sub(shared.last_progress.load(std::sync::atomic::Ordering::Relaxed));
            let now_stuck = waiting > 0 && idle_ms > u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
            if now_stuck && !stuck {
                tracing::error!(
                    stage,
                    waiting,
                    idle_secs = idle_ms / 1000,
                    "No message finished for longer than WATCHDOG_SECS while messages wait: reporting not ready"
                );
            } else if stuck && !now_stuck {
                tracing::info!(stage, "Progress again: ready");
            }
            stuck = now_stuck;
            flag.set(!stuck);
        }
        tokio::time::sleep(every).await;
    }
}

/// When the stage may fetch again, after a handler asked for a pause.
#[derive(Default)]
struct PauseGate {
    until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl PauseGate {
    /// Pause until at least `for_` from now; true when this starts a pause.
    fn pause(&self, for_: Duration) -> bool {
        let end = tokio::time::Instant::now() + for_;
        let Ok(mut until) = self.until.lock() else { return false };
        let starts = until.is_none_or(|u| u <= tokio::time::Instant::now());
        if until.is_none_or(|u| u < end) {
            *until = Some(end);
        }
        starts
    }

    fn until(&self) -> Option<tokio::time::Instant> {
        self.until.lock().ok().and_then(|u| *u).filter(|u| *u > tokio::time::Instant::now())
    }

    /// Wait out the pause; false if shutdown came first.
    async fn wait(&self, shutdown: &CancellationToken) -> bool {
        while let Some(until) = self.until() {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep_until(until) => {}
            }
        }
        true
    }
}

enum Outcome {
    Ack { duplicate: bool },
    Nak(Duration),
    DeadLetter(ErrorKind),
}

/// How long past a pull request's expiry the runner waits for the broker's
/// end of it before pulling again. Until then a message that arrives finds
/// no request (the old one expired), so this is the longest a broker that
/// drops the end of a request holds the stage back.
const PULL_END_WAIT: Duration = Duration::from_millis(50);

/// How long past its expiry a request the broker has not ended is watched
/// for a message still on its way (delivered before the expiry, read
/// late), which goes back to the broker at once.
const FETCH_GRACE: Duration = Duration::from_secs(1);

/// Watch a pull request the runner has stopped waiting for: a message it
/// still brings has no permit (the next request has them), so it is handed
/// back at once for redelivery, not left for `ack_wait`. Ends with the
/// request's end, or after `until`.
pub async fn hand_back_late(stage: &'static str, mut batch: jetstream::consumer::pull::Batch, until: Duration) {
    let give_up = tokio::time::sleep(until);
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            next = batch.next() => match next {
                Some(Ok(msg)) => {
                    metrics::counter!(m::LATE_DELIVERIES_TOTAL, "stage" => stage).increment(1);
                    tracing::info!(stage, "Message from a pull request past its expiry; handed back");
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
                Some(Err(_)) | None => return,
            },
            () = &mut give_up => {
                // Not ended within FETCH_GRACE of its expiry (nats-server 2.9
                // can drop a request without the 408 that ends it).
                metrics::counter!(m::UNENDED_PULLS_TOTAL, "stage" => stage).increment(1);
                tracing::info!(
                    stage,
                    "Pull request never ended by the broker; the stage pulled again {} ms past its expiry",
                    PULL_END_WAIT.as_millis()
                );
                return;
            }
        }
    }
}

/// How a handled message ended, before the ack.
enum Finished {
    Ok,
    Duplicate,
}

/// The trace of a delivery: its `traceparent` continued, or a new trace.
pub fn trace_of(headers: Option<&HeaderMap>) -> TraceContext {
    TraceContext::continue_from(headers.and_then(|h| h.get(TRACE_HEADER)).map(|v| v.as_str()))
}

async fn process<H: Handler>(shared: &Shared, handler: &H, msg: jetstream::Message) {
    let stage = shared.route.name;
    let started = Instant::now();
    metrics::counter!(m::STAGE_RECEIVED_TOTAL, "stage" => stage).increment(1);
    let delivery = match msg.info() {
        Ok(info) => Delivery {
            subject: msg.subject.to_string(),
            stream: info.stream.to_owned(),
            stream_seq: info.stream_sequence,
            delivered: info.delivered,
            headers: msg.headers.clone(),
        },
        Err(error) => {
            // Not a JetStream delivery: nothing to ack.
            tracing::error!(stage, %error, "Message without JetStream metadata ignored");
            return;
        }
    };
    let trace = trace_of(delivery.headers.as_ref());
    let span = tracing::info_span!(
        "message",
        stage,
        seq = delivery.stream_seq,
        attempt = delivery.delivered,
        id = tracing::field::Empty,
        trace_id = %trace.trace_id(),
    );
    async {
        metrics::gauge!(m::STAGE_IN_FLIGHT, "stage" => stage).increment(1.0);
        let (id, result) = handle(shared, handler, &msg, &delivery, &trace).await;
        let outcome = match result {
            Ok(Finished::Ok) => Outcome::Ack { duplicate: false },
            Ok(Finished::Duplicate) => Outcome::Ack { duplicate: true },
            // Shut down while paused: hand the message back at once.
            Err(e) if e.is_paused() => Outcome::Nak(Duration::ZERO),
            Err(e) if e.is_transient() && delivery.delivered < shared.config.max_deliver => {
                let attempt = Attempt {
                    attempt: u64::try_from(delivery.delivered).unwrap_or(0),
                    at: OffsetDateTime::now_utc(),
                    reason: e.full_reason(),
                };
                record_attempt(shared.attempts.as_ref(), &delivery.stream, delivery.stream_seq, attempt).await;
                // Never sooner than the remote side asked, never sooner than
                // our own back-off: both protect the provider.
                let backoff = shared.config.backoff(delivery.delivered);
                let delay = e.retry_after().map_or(backoff, |asked| asked.max(backoff));
                tracing::warn!(error = %e.full_reason(), retry_in_ms = delay.as_millis() as u64, "Transient failure; will retry");
                Outcome::Nak(delay)
            }
            Err(e) => {
                let kind = if e.is_transient() { ErrorKind::MaxDeliveries } else { ErrorKind::Permanent };
                let reason = e.full_reason();
                tracing::error!(error = %reason, kind = kind.as_str(), "Giving up on message; dead-lettering");
                match dead_letter(shared, &msg, &delivery, id, kind, reason, handler.dead_letter_context()).await {
                    Ok(()) => Outcome::DeadLetter(kind),
                    Err(error) => {
                        tracing::error!(%error, "Dead-letter publish failed; will retry the message");
                        Outcome::Nak(shared.config.backoff(delivery.delivered))
                    }
                }
            }
        };
        // A plain ack (no confirmation round trip: the broker's share per
        // message is what a relay's is). A lost ack is a redelivery, which
        // the idempotent sinks and the de-duplication ids absorb; shutdown
        // flushes the connection, so a drained stage loses none.
        let (label, ack) = match outcome {
            Outcome::Ack { duplicate } => (if duplicate { "duplicate" } else { "ok" }, shared.publisher.ack(&msg).await),
            Outcome::Nak(d) => ("retried", msg.ack_with(AckKind::Nak(Some(d))).await),
            Outcome::DeadLetter(kind) => {
                metrics::counter!(m::DEAD_LETTERS_TOTAL, "stage" => stage, "kind" => kind.as_str()).increment(1);
                ("dead_lettered", msg.double_ack_with(AckKind::Term).await)
            }
        };
        if let Err(error) = ack {
            // The broker will redeliver after ack_wait; the sinks are idempotent.
            tracing::warn!(%error, outcome = label, "Acknowledgement not sent");
        }
        let elapsed = started.elapsed();
        metrics::histogram!(m::STAGE_PROCESSING_SECONDS, "stage" => stage).record(elapsed.as_secs_f64());
        metrics::counter!(m::STAGE_PROCESSED_TOTAL, "stage" => stage, "outcome" => label).increment(1);
        shared.last_progress.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!(m::STAGE_IN_FLIGHT, "stage" => stage).decrement(1.0);
        tracing::info!(outcome = label, elapsed_ms = elapsed.as_millis() as u64, "Message handled");
    }
    .instrument(span)
    .await
}

/// Decode, handle (with in-progress acks) and publish the output.
/// Returns the halakha id when the payload was readable.
async fn handle<H: Handler>(
    shared: &Shared,
    handler: &H,
    msg: &jetstream::Message,
    delivery: &Delivery,
    trace: &TraceContext,
) -> (Option<String>, Result<Finished, StageError>) {
    let input: H::Input = match serde_json::from_slice(&msg.payload) {
        Ok(input) => input,
        Err(e) => {
            let reason = format!("payload is not a valid {} message: {e}", H::Input::KIND);
            return (None, Err(StageError::permanent(reason)));
        }
    };
    let id = input.id();
    tracing::Span::current().record("id", id.as_str());
    let version = input.schema_version();
    if version == 0 || version > SCHEMA_VERSION {
        let reason = format!("unsupported schema_version {version} (this build reads 1..={SCHEMA_VERSION})");
        return (Some(id), Err(StageError::permanent(reason)));
    }
    // The handler takes the input; the rare attempt after a pause reads
    // it again from the payload rather than every message cloning it.
    let mut input = Some(input);
    let output = loop {
        let this = match input.take() {
            Some(input) => input,
            None => match serde_json::from_slice(&msg.payload) {
                Ok(input) => input,
                Err(e) => return (Some(id), Err(StageError::permanent(format!("payload no longer readable: {e}")))),
            },
        };
        match with_progress(handler.handle(this, delivery), msg, shared.config.ack_wait / 3).await {
            Ok(Handled::Publish(output)) => break output,
            Ok(Handled::Done) => return (Some(id), Ok(Finished::Ok)),
            Ok(Handled::Duplicate) => return (Some(id), Ok(Finished::Duplicate)),
            Err(StageError::Paused { reason, resume_after }) => {
                if !hold(shared, msg, &reason, resume_after).await {
                    return (Some(id), Err(StageError::paused(reason, Duration::ZERO)));
                }
            }
            Err(e) => return (Some(id), Err(e)),
        }
    };
    let Some(subject) = shared.route.output_subject.as_deref() else {
        tracing::error!("Handler returned an output on a route without an output subject; dropped");
        return (Some(id), Ok(Finished::Ok));
    };
    let msg_id = handler.output_message_id(&output, delivery);
    // The trace follows the submission through every stage.
    // The broker unable to store the output (a stream leader election, a
    // restart) is an outage, not a fault of this message: the work done is
    // kept, the stage pauses and the publish is tried again, spending no
    // delivery (spending them would dead-letter every message in flight).
    let mut wait = Duration::from_millis(200);
    loop {
        let mut headers = HeaderMap::new();
        headers.insert(TRACE_HEADER, trace.header().as_str());
        match shared.publisher.publish_json_with(subject, &msg_id, &output, headers).await {
            // The broker had this output already: a redelivery of work done.
            Ok(ack) if ack.duplicate => return (Some(id), Ok(Finished::Duplicate)),
            Ok(_) => return (Some(id), Ok(Finished::Ok)),
            Err(e) => {
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "stage" => shared.route.name).increment(1);
                if !e.is_broker_unavailable() {
                    return (Some(id), Err(StageError::permanent("could not publish the output").with_source(e)));
                }
                let reason = format!("the broker cannot store outputs: {}", halakha_common::error::chain(&e));
                if !hold(shared, msg, &reason, wait).await {
                    return (Some(id), Err(StageError::paused(reason, Duration::ZERO)));
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Pause the stage (no fetching) for at least `for_` and hold `msg` with
/// in-progress acks until the pause ends: no delivery is spent. False when
/// shutdown came first.
async fn hold(shared: &Shared, msg: &jetstream::Message, reason: &str, for_: Duration) -> bool {
    let stage = shared.route.name;
    if shared.pause.pause(for_) {
        shared.consuming.set(false);
        metrics::counter!(m::STAGE_PAUSES_TOTAL, "stage" => stage).increment(1);
        metrics::gauge!(m::STAGE_PAUSED, "stage" => stage).set(1.0);
        tracing::error!(stage, %reason, resume_in_ms = for_.as_millis() as u64, "Stage paused");
    }
    with_progress(shared.pause.wait(&shared.shutdown), msg, shared.config.ack_wait / 3).await
}

/// Run `work`, telling the broker every `period` that the message is still
/// being worked on, so a long call is not redelivered to another worker.
async fn with_progress<F: Future>(work: F, msg: &jetstream::Message, period: Duration) -> F::Output {
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                if let Err(error) = msg.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "In-progress ack failed");
                }
            }
        }
    }
}

/// Where the original message of a dead letter was.
pub struct Origin<'a> {
    pub subject: &'a str,
    pub stream: &'a str,
    pub stream_seq: u64,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a [u8],
}

/// A dead-letter entry for `origin`: its headers, and its payload as text
/// (base64 when not UTF-8). The entry must fit in one broker message, so a
/// payload over [`MAX_KEPT_PAYLOAD`] keeps only its start (the whole
/// message stays in its stream).
pub fn dead_letter_entry(
    stage: &str,
    kind: ErrorKind,
    reason: String,
    attempts: u64,
    id: Option<String>,
    origin: &Origin<'_>,
) -> DeadLetter {
    let headers: BTreeMap<String, Vec<String>> = origin
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.as_str().to_owned()).collect()))
        .collect();
    let original = origin.payload;
    let (kept, truncated_from) = if original.len() > MAX_KEPT_PAYLOAD {
        (&original[..MAX_KEPT_PAYLOAD], Some(original.len() as u64))
    } else {
        (original, None)
    };
    let (payload, payload_base64) = match std::str::from_utf8(kept) {
        Ok(s) => (Some(s.to_owned()), None),
        Err(e) if truncated_from.is_some() && e.error_len().is_none() => {
            // Cut inside a character: keep the text up to it.
            (Some(String::from_utf8_lossy(&kept[..e.valid_up_to()]).into_owned()), None)
        }
        Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(kept))),
    };
    DeadLetter {
        schema_version: SCHEMA_VERSION,
        id,
        stage: stage.to_owned(),
        error_kind: kind,
        reason,
        attempts,
        failed_at: OffsetDateTime::now_utc(),
        subject: origin.subject.to_owned(),
        stream: origin.stream.to_owned(),
        stream_seq: origin.stream_seq,
        headers,
        payload,
        payload_base64,
        payload_truncated_from: truncated_from,
        history: Vec::new(),
        trace_id: origin.headers.and_then(|h| {
            h.get(TRACE_HEADER)
                .and_then(|v| TraceContext::parse(v.as_str()))
                .map(|t| t.trace_id())
                .or_else(|| h.get(LEGACY_TRACE_HEADER).map(|v| v.as_str().to_owned()))
        }),
        context: BTreeMap::new(),
    }
}

fn attempt_key(stream: &str, seq: u64) -> String {
    format!("{stream}.{seq}")
}

/// Note a failed delivery, for the history of a later dead letter.
/// Best effort: a lost record only shortens the history.
async fn record_attempt(attempts: Option<&kv::Store>, stream: &str, seq: u64, attempt: Attempt) {
    let Some(store) = attempts else { return };
    let key = attempt_key(stream, seq);
    let mut history: Vec<Attempt> = match store.get(&key).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
        _ => Vec::new(),
    };
    history.push(attempt);
    if let Ok(bytes) = serde_json::to_vec(&history)
        && let Err(error) = store.put(&key, bytes.into()).await
    {
        tracing::debug!(%error, "Could not record a failed attempt");
    }
}

/// The failed deliveries recorded for a message, oldest first.
pub async fn attempt_history(attempts: Option<&kv::Store>, stream: &str, seq: u64) -> Vec<Attempt> {
    let Some(store) = attempts else { return Vec::new() };
    match store.get(attempt_key(stream, seq)).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The `Nats-Msg-Id` of a dead letter: one entry per stored message, whoever
/// writes it (the runner at `max_deliver`, or the advisory loop).
pub fn dead_letter_id(stream: &str, stream_seq: u64) -> String {
    format!("dlq:{stream}:{stream_seq}")
}

async fn dead_letter(
    shared: &Shared,
    msg: &jetstream::Message,
    delivery: &Delivery,
    id: Option<String>,
    kind: ErrorKind,
    reason: String,
    context: BTreeMap<String, String>,
) -> Result<(), crate::PublishError> {
    let origin = Origin {
        subject: &delivery.subject,
        stream: &delivery.stream,
        stream_seq: delivery.stream_seq,
        headers: msg.headers.as_ref(),
        payload: &msg.payload,
    };
    let attempts = u64::try_from(delivery.delivered).unwrap_or(0);
    let mut history = attempt_history(shared.attempts.as_ref(), &delivery.stream, delivery.stream_seq).await;
    history.push(Attempt { attempt: attempts, at: OffsetDateTime::now_utc(), reason: reason.clone() });
    let mut entry = dead_letter_entry(shared.route.name, kind, reason, attempts, id, &origin);
    entry.history = history;
    entry.context = context;
    let msg_id = dead_letter_id(&delivery.stream, delivery.stream_seq);
    shared.publisher.publish_json(&shared.route.dlq_subject, &msg_id, &entry).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use halakha_common::config::Map;

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_is_capped() {
        let src = Map::default();
        let mut r = Reader::new(&src);
        let mut c = RunnerConfig::read(&mut r, 4);
        c.backoff_base = Duration::from_millis(100);
        c.backoff_max = Duration::from_secs(1);
        for _ in 0..50 {
            let d1 = c.backoff(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100), "{d1:?}");
            let d3 = c.backoff(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400), "{d3:?}");
            let d10 = c.backoff(10);
            assert!(d10 <= Duration::from_secs(1) && d10 >= Duration::from_millis(500), "{d10:?}");
        }
    }
}
