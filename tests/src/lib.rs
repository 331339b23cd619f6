//! Test harness: a fresh namespace and database per test, the three stages
//! started in-process against the machine's real NATS and Postgres, and
//! HTTP fakes of OpenAI and Notion that keep the documented contracts.
//!
//! Services are found at their usual local ports unless `TEST_NATS_URL`
//! or `TEST_DATABASE_URL` (a URL to an administrative database) say
//! otherwise.

#![allow(clippy::unwrap_used)] // a test harness fails loudly by design

pub mod fakes;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use futures::StreamExt;
use halakha_common::config::{Map, Reader};
use halakha_nats::names::Subject;
use halakha_nats::{Names, Namespace};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A key accepted by the ingest stages the tests start.
pub const API_KEY: &str = "test-key-0123456789abcdef0123456789abcdef";
/// The key the fake OpenAI expects.
pub const OPENAI_KEY: &str = "sk-test-key";
/// The token the fake Notion expects.
pub const NOTION_TOKEN: &str = "secret_test_token";
/// The database the fake Notion serves.
pub const NOTION_DATABASE: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";

pub fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn admin_db_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` (`TEST_DATABASE_URL`) with its database replaced by `db_name`,
/// its parameters (`?sslmode=...`) kept.
fn db_url_for(url: &str, db_name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    match query {
        Some(q) => format!("{server}/{db_name}?{q}"),
        None => format!("{server}/{db_name}"),
    }
}

/// How long [`until_answered`]'s questions wait for each answer. A request
/// the broker leaves unanswered (nats-server 2.9 answers none while an
/// election runs) costs its whole timeout: 2 s, not the client's 5.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Ask the JetStream API until it answers, or fail at `deadline`. A
/// replicated stream answers only while it has a leader: after a node of
/// a cluster is lost it may have none for a few seconds (CI saw a stream
/// info request time out once).
async fn until_answered<T, F, Fut>(what: &str, deadline: tokio::time::Instant, mut ask: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, async_nats::Error>>,
{
    loop {
        match ask().await {
            Ok(answer) => return answer,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("{what}: {e}; asking again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: no answer before the deadline: {e}"),
        }
    }
}

/// One line of the real corpus in `tests/fixtures/corpus/`.
#[derive(Debug, Clone, Deserialize)]
pub struct CorpusItem {
    pub id: String,
    pub lang: String,
    pub source: String,
    pub text: String,
}

/// The real halakha texts (see the corpus README for sources and licenses).
pub fn corpus() -> Vec<CorpusItem> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/corpus/halakhot.jsonl");
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// An isolated environment: its own namespace and database.
pub struct TestEnv {
    pub nats_url: String,
    pub names: Names,
    pub db_name: String,
    pub database_url: String,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    /// `js` with a shorter wait for each answer, for the questions asked
    /// again until answered ([`until_answered`]).
    asks: jetstream::Context,
    /// `cleanup` ran: nothing is left for the drop to remove.
    cleaned: bool,
}

/// A test that panics never reaches its `cleanup`: what its environment
/// made is removed as it unwinds, on a connection and a runtime of its
/// own (the test's runtime may be the very thread that is unwinding), for
/// at most 30 s. Without this, each failed run left its streams (which
/// cost an idle broker CPU) and its database behind.
impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned || !std::thread::panicking() {
            return;
        }
        let (url, leftovers) = (self.nats_url.clone(), self.leftovers());
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), leftovers.remove_over(&url)).await;
            });
        })
        .join();
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TestEnv {
    pub async fn new() -> Self {
        Self::with_nats(&nats_url()).await
    }

    /// An environment on another NATS server (one a test can kill).
    pub async fn with_nats(url: &str) -> Self {
        // TEST_LOG=debug (a tracing filter) shows the stages' logs.
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let c = halakha_common::config::TelemetryConfig {
                metrics_addr: "127.0.0.1:0".parse().unwrap(),
                log_format: halakha_common::config::LogFormat::Human,
                log_filter: filter,
                worker_threads: None,
            };
            halakha_common::telemetry::init_tracing(&c);
        }
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let unique = format!("t{}_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), nanos);
        let ns: Namespace = unique.parse().unwrap();
        let db_name = format!("halakha_{unique}");
        let admin = connect_db(&admin_db_url()).await;
        admin.batch_execute(&format!("CREATE DATABASE {db_name}")).await.unwrap();
        let database_url = db_url_for(&admin_db_url(), &db_name);
        let servers = halakha_nats::connect::server_addrs(url).unwrap();
        let nats = async_nats::ConnectOptions::new().retry_on_initial_connect().connect(servers).await.unwrap();
        let js = jetstream::new(nats.clone());
        let mut asks = js.clone();
        asks.set_timeout(ASK_TIMEOUT);
        Self { nats_url: url.to_owned(), names: Names::new(ns), db_name, database_url, nats, js, asks, cleaned: false }
    }

    /// Variables every stage needs, pointing at this environment.
    pub fn base_vars(&self) -> Map {
        Map::new([
            ("NATS_URL", self.nats_url.clone()),
            ("PIPELINE_NAMESPACE", self.names.namespace().to_string()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("DATABASE_URL", self.database_url.clone()),
            ("BACKOFF_BASE_MS", "50".into()),
            ("BACKOFF_MAX_SECS", "1".into()),
            ("DRAIN_TIMEOUT_SECS", "5".into()),
            ("REDIS_URL", redis_url()),
            ("CACHE_TTL_SECS", "600".into()),
        ])
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        connect_db(&self.database_url).await
    }

    /// Messages stored in one stream of this namespace.
    pub async fn stream_len(&self, s: Subject) -> u64 {
        let name = self.names.stream(s);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        until_answered(&format!("stream {name}"), deadline, || async {
            Ok(self.asks.get_stream(&name).await?.info().await?.state.messages)
        })
        .await
    }

    /// Wait until `n` messages are in the stream of `s` and return their
    /// payloads, or fail after `limit`.
    pub async fn collect<T: serde::de::DeserializeOwned>(&self, s: Subject, n: usize, limit: Duration) -> Vec<T> {
        self.collect_filtered(s, self.names.subject(s), n, limit).await
    }

    /// Every stage's dead letters (`<ns>.dlq.>`), `n` of them.
    pub async fn dead_letters(&self, n: usize, limit: Duration) -> Vec<halakha_common::DeadLetter> {
        let dlq = Subject::DeadLetter(halakha_nats::Stage::Ingest);
        self.collect_filtered(dlq, self.names.dlq_wildcard(), n, limit).await
    }

    async fn collect_filtered<T: serde::de::DeserializeOwned>(
        &self,
        s: Subject,
        filter: String,
        n: usize,
        limit: Duration,
    ) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut messages = until_answered(&format!("collect on {filter}"), deadline, || async {
            let stream = self.asks.get_stream(self.names.stream(s)).await?;
            let config =
                jetstream::consumer::pull::OrderedConfig { filter_subject: filter.clone(), ..Default::default() };
            Ok(stream.create_consumer(config).await?.messages().await?)
        })
        .await;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let next = tokio::time::timeout_at(deadline, messages.next()).await;
            match next {
                Ok(Some(Ok(m))) => out.push(serde_json::from_slice(&m.payload).unwrap()),
                Ok(Some(Err(e))) => panic!("ordered consumer failed: {e}"),
                Ok(None) => panic!("ordered consumer ended"),
                Err(_) => panic!("only {} of {n} messages on {filter} after {limit:?}", out.len()),
            }
        }
        out
    }

    /// Poll the status route until `pred` holds for the answer (the status
    /// lives in Postgres, which announces nothing to wait on), or fail.
    pub async fn wait_for_status(
        &self,
        base: &str,
        id: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let resp = http.get(format!("{base}/v1/halakhot/{id}")).bearer_auth(API_KEY).send().await.unwrap();
            let v: serde_json::Value = resp.json().await.unwrap();
            if pred(&v) {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "status of {id} never matched; last: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publish the stored message `seq` of `s`'s stream again under a fresh
    /// `Nats-Msg-Id` (what an operator's replay does), so the broker's
    /// de-duplication window does not drop it.
    pub async fn republish(&self, s: Subject, seq: u64) {
        let stream = self.js.get_stream(self.names.stream(s)).await.unwrap();
        let raw = stream.get_raw_message(seq).await.unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("replay-{}-{seq}", self.names.stream(s)).as_str());
        self.js.publish_with_headers(raw.subject.to_string(), headers, raw.payload).await.unwrap().await.unwrap();
    }

    /// Wait until a durable consumer has nothing pending and nothing
    /// unacknowledged (the broker announces no such event: its state is
    /// read until it holds), or fail.
    pub async fn wait_idle(&self, s: Subject, consumer: &str, limit: Duration) {
        let name = self.names.stream(s);
        let deadline = tokio::time::Instant::now() + limit;
        let stream =
            until_answered(&format!("stream {name}"), deadline, || async { Ok(self.asks.get_stream(&name).await?) })
                .await;
        loop {
            let info = until_answered(&format!("consumer {consumer} of {name}"), deadline, || async {
                Ok(stream.consumer_info(consumer).await?)
            })
            .await;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{consumer} still busy: {info:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Remove the namespace's streams and the database.
    pub async fn cleanup(mut self) {
        self.leftovers().remove().await;
        self.cleaned = true;
    }

    /// What this environment leaves on the servers, to remove later even
    /// if the environment itself is gone (a run that failed part way).
    pub fn leftovers(&self) -> Leftovers {
        Leftovers {
            js: self.js.clone(),
            stream_prefix: format!("{}_", self.names.namespace().as_str().to_ascii_uppercase()),
            kv_stream: format!("KV_{}", self.names.attempts_bucket()),
            db_name: self.db_name.clone(),
        }
    }
}

/// An environment's streams (its namespace's, and any other named after
/// it, as the bench's relays are) and its database.
pub struct Leftovers {
    js: jetstream::Context,
    stream_prefix: String,
    kv_stream: String,
    db_name: String,
}

impl Leftovers {
    /// Delete them; what is already gone is skipped.
    pub async fn remove(&self) {
        Self::remove_streams(&self.js, &self.stream_prefix, &self.kv_stream).await;
        self.drop_database().await;
    }

    /// [`Leftovers::remove`] over a new connection to `nats_url` (the
    /// environment's own may be gone with its runtime); the database is
    /// dropped even when the broker cannot be reached (a test that
    /// stopped its own).
    pub async fn remove_over(&self, nats_url: &str) {
        let servers = halakha_nats::connect::server_addrs(nats_url).unwrap_or_default();
        if let Ok(Ok(nats)) = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(servers)).await {
            Self::remove_streams(&jetstream::new(nats), &self.stream_prefix, &self.kv_stream).await;
        }
        self.drop_database().await;
    }

    async fn remove_streams(js: &jetstream::Context, prefix: &str, kv_stream: &str) {
        let mut names: Vec<String> = Vec::new();
        let mut listed = js.stream_names();
        while let Some(Ok(name)) = listed.next().await {
            if name.starts_with(prefix) || name == kv_stream {
                names.push(name);
            }
        }
        for name in names {
            let _ = js.delete_stream(&name).await;
        }
    }

    async fn drop_database(&self) {
        let Ok((admin, conn)) = tokio_postgres::connect(&admin_db_url(), tokio_postgres::NoTls).await else { return };
        tokio::spawn(conn);
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name)).await;
    }
}

/// The value of a sample of the metric `name` whose labels include
/// `label` (`key="value"`), on a Prometheus text page.
pub fn sample(page: &str, name: &str, label: &str) -> Option<f64> {
    page.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
        .find(|l| l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub async fn connect_db(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// A stage running in this process.
pub struct Running {
    pub http_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.unwrap().unwrap();
    }
}

fn read<T>(vars: &Map, f: impl FnOnce(&mut Reader<'_>) -> T) -> T {
    let mut r = Reader::new(vars);
    let v = f(&mut r);
    r.finish(v).unwrap()
}

pub async fn spawn_ingest(env: &TestEnv, extra: &[(&str, &str)]) -> Running {
    let mut vars = env.base_vars();
    vars.set("API_KEYS", API_KEY).set("HTTP_ADDR", "127.0.0.1:0");
    for (k, v) in extra {
        vars.set(*k, *v);
    }
    let app = halakha_ingest::App::build(read(&vars, halakha_ingest::Config::read)).await.unwrap();
    let http_addr = Some(app.http_addr());
    let metrics_addr = app.metrics_addr();
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(async move { app.run(s).await.unwrap() });
    Running { http_addr, metrics_addr, shutdown, task }
}

pub async fn spawn_enrich(env: &TestEnv, openai_url: &str, extra: &[(&str, &str)]) -> Running {
    let mut vars = env.base_vars();
    vars.set("OPENAI_API_KEY", OPENAI_KEY).set("OPENAI_BASE_URL", format!("{openai_url}/v1"));
    for (k, v) in extra {
        vars.set(*k, *v);
    }
    let app = halakha_enrich::App::build(read(&vars, halakha_enrich::Config::read)).await.unwrap();
    let metrics_addr = app.metrics_addr();
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(async move { app.run(s).await.unwrap() });
    Running { http_addr: None, metrics_addr, shutdown, task }
}

pub async fn spawn_publish(env: &TestEnv, notion_url: Option<&str>, extra: &[(&str, &str)]) -> Running {
    let mut vars = env.base_vars();
    if let Some(url) = notion_url {
        vars.set("NOTION_TOKEN", NOTION_TOKEN).set("NOTION_DATABASE_ID", NOTION_DATABASE).set("NOTION_BASE_URL", url);
    }
    for (k, v) in extra {
        vars.set(*k, *v);
    }
    let app = halakha_publish::App::build(read(&vars, halakha_publish::Config::read)).await.unwrap();
    let metrics_addr = app.metrics_addr();
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(async move { app.run(s).await.unwrap() });
    Running { http_addr: None, metrics_addr, shutdown, task }
}

/// Subjects used by tests.
pub use halakha_nats::names::Subject as S;

/// What a [`Pipeline`] runs.
pub struct Spec<'a> {
    pub model: fakes::Model,
    /// Run the publish stage.
    pub publish: bool,
    /// With the Notion sink on (a fake Notion).
    pub notion: bool,
    pub ingest_vars: &'a [(&'a str, &'a str)],
    pub enrich_vars: &'a [(&'a str, &'a str)],
    pub publish_vars: &'a [(&'a str, &'a str)],
    /// Requests per second the fake Notion allows (None: no limit).
    pub notion_rate: Option<u32>,
    /// Another NATS server than the machine's (one the test can kill).
    pub nats_url: Option<String>,
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Self {
            model: fakes::Model::Faithful,
            publish: true,
            notion: true,
            ingest_vars: &[],
            enrich_vars: &[],
            publish_vars: &[],
            notion_rate: None,
            nats_url: None,
        }
    }
}

/// The stages of one isolated environment, with their fakes.
pub struct Pipeline {
    pub env: TestEnv,
    pub base: String,
    pub http: reqwest::Client,
    pub completions: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub chaos: std::sync::Arc<fakes::ChaosCounts>,
    pub creates: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub notion: Option<wiremock::MockServer>,
    pub notion_state: Option<std::sync::Arc<fakes::NotionState>>,
    pub openai: wiremock::MockServer,
    stages: Vec<(&'static str, Running)>,
}

impl Pipeline {
    pub async fn start(spec: Spec<'_>) -> Self {
        let env = match &spec.nats_url {
            Some(url) => TestEnv::with_nats(url).await,
            None => TestEnv::new().await,
        };
        let (openai, completions, chaos) = fakes::openai_counted(spec.model).await;
        let (notion, notion_state, creates) = if spec.notion && spec.publish {
            let (server, state) = fakes::notion_with(spec.notion_rate).await;
            let creates = state.creates.clone();
            (Some(server), Some(state), creates)
        } else {
            (None, None, Default::default())
        };
        let ingest = spawn_ingest(&env, spec.ingest_vars).await;
        let base = format!("http://{}", ingest.http_addr.unwrap());
        let mut stages =
            vec![("ingest", ingest), ("enrich", spawn_enrich(&env, &openai.uri(), spec.enrich_vars).await)];
        if spec.publish {
            let url = notion.as_ref().map(|n| n.uri());
            // The fake answers at once: no need for Notion's 3 requests/s
            // unless the test says so (its own vars come last and win).
            let rate = if spec.notion_rate.is_some() { "3" } else { "100" };
            let mut vars = vec![("NOTION_REQUESTS_PER_SECOND", rate)];
            vars.extend_from_slice(spec.publish_vars);
            stages.push(("publish", spawn_publish(&env, url.as_deref(), &vars).await));
        }
        Self {
            env,
            base,
            http: reqwest::Client::new(),
            completions,
            chaos,
            creates,
            notion,
            notion_state,
            openai,
            stages,
        }
    }

    /// `POST /v1/halakhot`, expecting 202; the answer.
    pub async fn submit(&self, body: serde_json::Value) -> serde_json::Value {
        let resp =
            self.http.post(format!("{}/v1/halakhot", self.base)).bearer_auth(API_KEY).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 202);
        resp.json().await.unwrap()
    }

    /// The form route of the original service.
    pub async fn post_form(&self, fields: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(format!("{}/api/v1/processing/halakhot/post", self.base))
            .bearer_auth(API_KEY)
            .form(fields)
            .send()
            .await
            .unwrap()
    }

    pub fn completions(&self) -> usize {
        self.completions.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Start another publish replica (after a kill), Notion as before (a
    /// fake Notion is started if the pipeline had none).
    pub async fn add_publish(&mut self, vars: &[(&str, &str)]) {
        if self.notion.is_none() {
            let (server, state) = fakes::notion_with(None).await;
            self.creates = state.creates.clone();
            self.notion = Some(server);
            self.notion_state = Some(state);
        }
        let url = self.notion.as_ref().map(|n| n.uri());
        let stage = spawn_publish(&self.env, url.as_deref(), vars).await;
        self.stages.push(("publish", stage));
    }

    /// Start another ingest replica; the API base moves to it.
    pub async fn add_ingest(&mut self, vars: &[(&str, &str)]) {
        let stage = spawn_ingest(&self.env, vars).await;
        self.base = format!("http://{}", stage.http_addr.unwrap());
        self.stages.push(("ingest", stage));
    }

    /// Abort every replica of a stage (`ingest`, `enrich`, `publish`) as a
    /// crash would: no drain, nothing acknowledged, in-flight work gone.
    pub async fn kill(&mut self, name: &str) {
        let (dead, alive): (Vec<_>, Vec<_>) = self.stages.drain(..).partition(|(n, _)| *n == name);
        self.stages = alive;
        for (_, stage) in dead {
            stage.task.abort();
            let _ = stage.task.await;
        }
    }

    /// Stop every replica of a stage the graceful way (SIGTERM's path).
    pub async fn stop_stage(&mut self, name: &str) {
        let (stopping, alive): (Vec<_>, Vec<_>) = self.stages.drain(..).partition(|(n, _)| *n == name);
        self.stages = alive;
        for (_, stage) in stopping {
            stage.stop().await;
        }
    }

    /// Start another enrich replica on the same consumer.
    pub async fn add_enrich(&mut self, vars: &[(&str, &str)]) {
        let stage = spawn_enrich(&self.env, &self.openai.uri(), vars).await;
        self.stages.push(("enrich", stage));
    }

    pub fn creates(&self) -> usize {
        self.creates.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The metrics address of the first running replica of a stage.
    pub fn metrics_addr(&self, name: &str) -> SocketAddr {
        self.stages.iter().find(|(n, _)| *n == name).map(|(_, r)| r.metrics_addr).unwrap()
    }

    /// The invariant: each id published (one row, one Notion page) exactly
    /// once, no stray row; prints the counts for the reliability table.
    pub async fn assert_each_ended_once(&self, ids: &[String]) {
        let db = self.env.db().await;
        let notion = self.notion_state.as_ref().unwrap();
        for id in ids {
            let row = db.query_one("SELECT status FROM halakhot WHERE id = $1", &[id]).await.unwrap();
            assert_eq!(row.get::<_, String>(0), "published", "{id}");
            assert_eq!(notion.pages_for(id).len(), 1, "{id}: exactly one page");
        }
        let rows: i64 = db.query_one("SELECT count(*) FROM halakhot", &[]).await.unwrap().get(0);
        assert_eq!(rows as usize, ids.len(), "no stray row");
        eprintln!("submitted {0}, published {0}, dead-lettered 0, lost 0, duplicated 0", ids.len());
    }

    /// Stop every stage (draining) and remove the environment.
    pub async fn stop(self) {
        for (_, stage) in self.stages {
            stage.stop().await;
        }
        self.env.cleanup().await;
    }
}

/// A `nats-server` of the test's own, on a free port with a temporary
/// store, which the test can kill (SIGKILL) and start again on the same
/// port and store. `NATS_SERVER_BIN` names the binary (default: the one
/// on `PATH`).
pub struct NatsServer {
    port: u16,
    /// Its monitoring port (`/connz`, `/varz`).
    monitor: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl NatsServer {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("halakha-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self { port, monitor: free_port(), dir, child: None };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = std::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server runs (set NATS_SERVER_BIN if it is not on PATH)");
        self.child = Some(child);
        // Ready when it answers with JetStream on.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 2048];
                if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await
                    && String::from_utf8_lossy(&buf[..n]).contains("\"jetstream\":true")
                {
                    return;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every subject some client of this server subscribes to now (core
    /// subscriptions, from `/connz`).
    pub async fn subscriptions(&self) -> Vec<String> {
        let url = format!("http://127.0.0.1:{}/connz?subs=1", self.monitor);
        let connz: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        let connections = connz["connections"].as_array().cloned().unwrap_or_default();
        connections
            .iter()
            .filter_map(|c| c["subscriptions_list"].as_array())
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    }

    /// SIGKILL: no goodbye to the clients, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A three-node NATS cluster with JetStream on each node, on free ports,
/// for tests of replicated streams and of losing a node.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
}

struct ClusterNode {
    port: u16,
    monitor: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl NatsCluster {
    pub async fn start() -> Self {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let cluster_name = format!("halakha-test-{}-{}", std::process::id(), routes[0]);
        let mut nodes = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let (port, monitor) = (free_port(), free_port());
            let dir = std::env::temp_dir().join(format!("{cluster_name}-n{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let child = std::process::Command::new(&bin)
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string()])
                .args(["-js", "-n", &format!("n{i}"), "--cluster_name", &cluster_name])
                .args(["--cluster", &format!("nats://127.0.0.1:{route}"), "--routes", &route_list, "-sd"])
                .arg(&dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("nats-server runs (set NATS_SERVER_BIN if it is not on PATH)");
            nodes.push(ClusterNode { port, monitor, dir, child: Some(child) });
        }
        let cluster = Self { nodes };
        // Ready when every node says JetStream is current (a meta leader
        // is elected): the server's own health check.
        halakha_common::install_crypto_provider();
        cluster.wait_healthy(Duration::from_secs(30)).await;
        cluster.wait_placement(Duration::from_secs(30)).await;
        cluster
    }

    /// Wait until the meta leader can place a three-replica stream. A
    /// healthy cluster may not yet: the leader learns each peer's
    /// JetStream from that peer's own announcements, and until then it
    /// answers "no suitable peers for placement" (CI saw a stage fail to
    /// start on it). A probe stream, created and removed, is the event.
    async fn wait_placement(&self, limit: Duration) {
        let seeds = halakha_nats::connect::server_addrs(&self.url()).expect("the nodes' URLs parse");
        let client = async_nats::connect(seeds).await.expect("the NATS cluster accepts a client");
        let mut js = jetstream::new(client);
        js.set_timeout(ASK_TIMEOUT);
        let name = "HALAKHA_TEST_PLACEMENT_PROBE";
        let deadline = tokio::time::Instant::now() + limit;
        until_answered("a three-replica stream", deadline, || async {
            let config = jetstream::stream::Config {
                name: name.into(),
                subjects: vec!["halakha-test-placement-probe".into()],
                num_replicas: 3,
                ..Default::default()
            };
            // Made by an attempt whose answer came too late: there it is.
            js.get_or_create_stream(config).await?;
            Ok(())
        })
        .await;
        until_answered("removing the probe stream", deadline, || async {
            js.delete_stream(name).await?;
            Ok(())
        })
        .await;
    }

    /// Every node's URL, comma-separated (a `NATS_URL` seed list).
    pub fn url(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// Wait until every running node says JetStream is current again.
    pub async fn wait_healthy(&self, limit: Duration) {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + limit;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let url = format!("http://127.0.0.1:{}/healthz", node.monitor);
                if http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "the NATS cluster did not recover");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.nodes[i].dir);
        }
    }
}

/// A TCP proxy in front of a service, which a test can cut (every
/// connection dropped, new ones refused) and restore: a database or a
/// cache "unreachable" without stopping the machine's shared server.
pub struct TcpProxy {
    pub addr: SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    epoch: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: &str) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let epoch = std::sync::Arc::new(tx);
        let (up2, epoch2, target) = (up.clone(), epoch.clone(), target.to_owned());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, in effect
                }
                let mut cut = epoch2.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { addr, up, epoch, task }
    }

    /// Drop every connection and refuse new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The workspace's stage binaries, built (or found up to date) once per
/// test process with the same profile as the tests, so a test never runs a
/// stale binary.
pub fn stage_binaries() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The caller's profile: dev for the tests, release for the bench.
        let mut args = vec!["build", "--workspace", "--bins", "--quiet"];
        if !cfg!(debug_assertions) {
            args.push("--release");
        }
        let status = std::process::Command::new(cargo)
            .args(&args)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("run cargo build --workspace --bins");
        assert!(status.success(), "cargo build --workspace --bins failed");
        // A test binary is target/<profile>/deps/e2e-<hash>; a binary of
        // this crate (the bench) is target/<profile>/bench.
        let exe = std::env::current_exe().expect("the running binary's path");
        let dir = exe.parent().expect("target/<profile>");
        if dir.ends_with("deps") { dir.parent().expect("target/<profile>") } else { dir }.to_path_buf()
    })
    .clone()
}

/// A stage binary running as its own process, its JSON log lines captured.
pub struct StageProcess {
    pub name: &'static str,
    child: tokio::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    seen: tokio::sync::watch::Receiver<usize>,
    /// False while the test leaves the process's standard output unread.
    reading: tokio::sync::watch::Sender<bool>,
    pub metrics_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
}

impl StageProcess {
    /// Start `binary` (`halakha-ingest`, ...) with exactly `vars` (and
    /// `LOG_FORMAT=json`), from a directory without a `.env`; wait for its
    /// "Stage started" line and read its addresses from it.
    pub async fn start(name: &'static str, binary: &str, vars: &Map) -> Self {
        let path = stage_binaries().join(binary);
        let mut cmd = tokio::process::Command::new(&path);
        cmd.env_clear().current_dir(std::env::temp_dir()).env("LOG_FORMAT", "json").env("RUST_LOG", "info");
        for (k, v) in &vars.0 {
            cmd.env(k, v);
        }
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::inherit()).kill_on_drop(true);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let lines: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let (tx, seen) = tokio::sync::watch::channel(0usize);
        let sink = lines.clone();
        let reading = tokio::sync::watch::Sender::new(true);
        let mut read = reading.subscribe();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while read.wait_for(|on| *on).await.is_ok()
                && let Ok(Some(line)) = reader.next_line().await
            {
                let n = {
                    let mut l = sink.lock().unwrap();
                    l.push(line);
                    l.len()
                };
                let _ = tx.send(n);
            }
        });
        let mut p = Self {
            name,
            child,
            lines,
            seen,
            reading,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: None,
        };
        let started = p.wait_for_line(Duration::from_secs(60), |v| v["message"] == "Stage started").await;
        let addr = |key: &str| started[key].as_str().filter(|s| !s.is_empty()).map(|s| s.parse().unwrap());
        p.metrics_addr = addr("metrics_addr").expect("the start line names metrics_addr");
        p.http_addr = addr("http_addr");
        p
    }

    /// Every line so far, each parsed as JSON (a line that is not JSON
    /// fails the test: `LOG_FORMAT=json` means every line).
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{} wrote a line that is not JSON ({e}): {l}", self.name))
            })
            .collect()
    }

    /// Stop reading the process's standard output (a stalled log
    /// collector): once the pipe's buffer is full, its writes wait.
    pub fn pause_reading(&self) {
        self.reading.send_replace(false);
    }

    /// Read its standard output again.
    pub fn resume_reading(&self) {
        self.reading.send_replace(true);
    }

    /// Wait until `n` lines match `pred`; fail after `limit`.
    pub async fn wait_for_lines(&mut self, n: usize, limit: Duration, pred: impl Fn(&serde_json::Value) -> bool) {
        let what = format!("{n} matching lines");
        self.wait_for(limit, &what, |logs| (logs.iter().filter(|v| pred(v)).count() >= n).then_some(())).await;
    }

    /// Every line so far, as written.
    pub fn raw_logs(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Wait for a log line matching `pred`; fail after `limit`.
    pub async fn wait_for_line(
        &mut self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for(limit, "the expected line", |logs| logs.into_iter().find(|v| pred(v))).await
    }

    /// Wait until `found` finds what it looks for in the lines so far (each
    /// new line looks again); fail after `limit`.
    async fn wait_for<T>(
        &mut self,
        limit: Duration,
        what: &str,
        found: impl Fn(Vec<serde_json::Value>) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(v) = found(self.logs()) {
                return v;
            }
            match tokio::time::timeout_at(deadline, self.seen.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("{} exited before {what}: {:?}", self.name, self.lines.lock().unwrap()),
                Err(_) => panic!("{}: not {what} within {limit:?}: {:?}", self.name, self.lines.lock().unwrap()),
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resident memory now and at its peak (`VmRSS`, `VmHWM`), in bytes.
    pub fn rss(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kb| kb * 1024))
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGTERM, then the exit status (within `limit`).
    pub async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running");
        let sent = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
        assert!(sent.success());
        tokio::time::timeout(limit, self.child.wait()).await.expect("exited within the drain timeout").expect("wait")
    }
}
