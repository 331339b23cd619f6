//! The three stage binaries as real processes: what dashboards scrape
//! (`/metrics` against the catalog, checked by `promtool`), what
//! orchestrators probe (`/health/ready`), and what operators grep (one
//! trace id per item in the JSON logs of every stage).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use halakha_common::metrics::{self as m, CATALOG, Kind};
use halakha_tests::fakes::{self, Model};
use halakha_tests::{API_KEY, NOTION_DATABASE, NOTION_TOKEN, OPENAI_KEY, S, StageProcess, TestEnv, corpus};
use serde_json::{Value, json};

/// One sample of a Prometheus text page.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape: each family's `# TYPE`, and every sample.
struct Page {
    text: String,
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Page {
    fn parse(text: String) -> Self {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            samples.push(parse_sample(line));
        }
        Self { text, types, samples }
    }

    /// The sum of the samples of `name` whose labels include `want`.
    fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }
}

fn parse_sample(line: &str) -> Sample {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => panic!("not a sample: {line}"),
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut key = String::new();
        let end;
        loop {
            let (i, c) = chars.next().expect("a closed label set");
            match c {
                '}' => {
                    end = i;
                    break;
                }
                ',' => {}
                '=' => {
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next().expect("a closed label value");
                        match c {
                            '\\' => value.push(chars.next().expect("an escaped char").1),
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        }
        rest = &body[end + 1..];
    }
    let value = rest.trim().split(' ').next().expect("a value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().unwrap_or_else(|_| panic!("not a number in {line}")),
    };
    Sample { name: name.to_owned(), labels, value }
}

async fn scrape(http: &reqwest::Client, p: &StageProcess) -> Page {
    let text = http.get(format!("http://{}/metrics", p.metrics_addr)).send().await.unwrap().text().await.unwrap();
    Page::parse(text)
}

/// `promtool check metrics` on a page: the names, types and help texts
/// follow Prometheus' conventions.
fn promtool_check(stage: &str, page: &Page) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed by this test (Debian: apt-get install prometheus; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(page.text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on {stage}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The page of `stage` holds every metric the catalog says it serves, with
/// its type, and nothing the catalog does not list, with exactly the
/// documented labels.
fn assert_matches_catalog(stage: &str, page: &Page) {
    for metric in CATALOG.iter().filter(|c| c.served_by.contains(&stage)) {
        assert_eq!(
            page.types.get(metric.name).map(String::as_str),
            Some(metric.kind.as_str()),
            "{stage} serves {} as a {}",
            metric.name,
            metric.kind.as_str()
        );
    }
    for sample in &page.samples {
        let metric =
            m::lookup(&sample.name).unwrap_or_else(|| panic!("{stage} serves {}, not in the catalog", sample.name));
        assert!(metric.served_by.contains(&stage), "{} is not documented for {stage}", metric.name);
        let mut want: BTreeSet<&str> = metric.labels.iter().map(|(l, _)| *l).collect();
        if metric.kind == Kind::Histogram && sample.name.ends_with("_bucket") {
            want.insert("le");
        }
        let have: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
        assert_eq!(have, want, "{stage}: labels of {}", sample.name);
    }
}

fn has_trace(line: &Value, trace_id: &str) -> bool {
    line["trace_id"] == trace_id
        || line["spans"].as_array().is_some_and(|spans| spans.iter().any(|s| s["trace_id"] == trace_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_stage_processes_serve_the_documented_metrics_and_log_each_items_trace() {
    let env = TestEnv::new().await;
    let (openai, completions, _) = fakes::openai_counted(Model::Faithful).await;
    let (notion, notion_state) = fakes::notion_with(None).await;
    let mut base = env.base_vars();
    base.set("CONSUMER_INFO_INTERVAL_SECS", "1").set("BOOKS_INTERVAL_SECS", "1");
    let mut vars = base.clone();
    vars.set("API_KEYS", API_KEY).set("HTTP_ADDR", "127.0.0.1:0");
    let ingest = StageProcess::start("ingest", "halakha-ingest", &vars).await;
    let mut vars = base.clone();
    vars.set("OPENAI_API_KEY", OPENAI_KEY).set("OPENAI_BASE_URL", format!("{}/v1", openai.uri()));
    let enrich = StageProcess::start("enrich", "halakha-enrich", &vars).await;
    let mut vars = base.clone();
    vars.set("NOTION_TOKEN", NOTION_TOKEN)
        .set("NOTION_DATABASE_ID", NOTION_DATABASE)
        .set("NOTION_BASE_URL", notion.uri())
        .set("NOTION_REQUESTS_PER_SECOND", "100");
    let publish = StageProcess::start("publish", "halakha-publish", &vars).await;
    halakha_common::install_crypto_provider();
    let http = reqwest::Client::new();
    let api = format!("http://{}", ingest.http_addr.expect("ingest serves HTTP"));

    // Three texts over HTTP and three on <ns>.submitted, each with the
    // caller's W3C trace context.
    let items: Vec<_> = corpus().into_iter().filter(|i| i.lang != "ru").step_by(20).take(6).collect();
    let mut traces = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let trace_id = format!("4bf92f3577b34da6a3ce929d0e0e47{i:02x}");
        let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
        let body = json!({"content": item.text, "idempotency_key": item.id});
        if i % 2 == 0 {
            let resp = http
                .post(format!("{api}/v1/halakhot"))
                .bearer_auth(API_KEY)
                .header("traceparent", &traceparent)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 202);
        } else {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("traceparent", traceparent.as_str());
            let subject = env.names.subject(S::Submitted);
            let payload = serde_json::to_vec(&body).unwrap().into();
            env.js.publish_with_headers(subject, headers, payload).await.unwrap().await.unwrap();
        }
        traces.push(trace_id);
    }
    // One request with a wrong key, counted by reason.
    let refused = http.get(format!("{api}/v1/halakhot/x")).bearer_auth("not-a-key").send().await.unwrap();
    assert_eq!(refused.status(), 401);

    let _: Vec<halakha_common::Published> = env.collect(S::Published, 6, Duration::from_secs(60)).await;
    for (stream, consumer) in [(S::Submitted, "ingest"), (S::Ingested, "enrich"), (S::Enriched, "publish")] {
        env.wait_idle(stream, consumer, Duration::from_secs(30)).await;
    }

    // Counters move after the ack, and the lag and the books are read
    // every second: wait for the figures of an idle pipeline.
    let ns = env.names.namespace().to_string();
    let stages = [(&ingest, "ingest", 3.0), (&enrich, "enrich", 6.0), (&publish, "publish", 6.0)];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let pages = loop {
        let mut pages = Vec::new();
        for (p, _, _) in &stages {
            pages.push(scrape(&http, p).await);
        }
        let settled = stages.iter().zip(&pages).all(|((_, stage, n), page)| {
            page.value(m::STAGE_PROCESSED_TOTAL, &[("stage", stage), ("outcome", "ok")]) == *n
                && page.value(m::CONSUMER_PENDING, &[("stage", stage)]) == 0.0
                && page.value(m::CONSUMER_ACK_PENDING, &[("stage", stage)]) == 0.0
        }) && pages[0].types.contains_key(m::PIPELINE_UNACCOUNTED)
            && pages[0].value(m::PIPELINE_UNACCOUNTED, &[("namespace", &ns)]) == 0.0;
        if settled {
            break pages;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics did not settle: {}", pages[0].text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    for ((_, stage, n), page) in stages.iter().zip(&pages) {
        assert_matches_catalog(stage, page);
        promtool_check(stage, page);
        let s = [("stage", *stage)];
        assert_eq!(page.value(m::STAGE_RECEIVED_TOTAL, &s), *n, "{stage}");
        assert_eq!(page.value(&format!("{}_count", m::STAGE_PROCESSING_SECONDS), &s), *n, "{stage}");
        for outcome in ["retried", "dead_lettered", "duplicate"] {
            assert_eq!(page.value(m::STAGE_PROCESSED_TOTAL, &[("stage", stage), ("outcome", outcome)]), 0.0);
        }
        assert_eq!(page.value(m::STAGE_IN_FLIGHT, &s), 0.0, "{stage}");
        assert_eq!(page.value(m::BUILD_INFO, &[("binary", &format!("halakha-{stage}"))]), 1.0);
    }
    let [ingest_page, enrich_page, publish_page] = &pages[..] else { unreachable!() };
    let accepted = |via| ingest_page.value(m::INGEST_ACCEPTED_TOTAL, &[("via", via), ("duplicate", "false")]);
    assert_eq!((accepted("http"), accepted("nats")), (3.0, 3.0));
    let posts = [("route", "/v1/halakhot"), ("method", "POST"), ("status", "202")];
    assert_eq!(ingest_page.value(m::HTTP_REQUESTS_TOTAL, &posts), 3.0);
    let refused = [("route", "/v1/halakhot/{id}"), ("method", "GET"), ("status", "401")];
    assert_eq!(ingest_page.value(m::HTTP_REQUESTS_TOTAL, &refused), 1.0, "the route template, not the raw path");
    assert_eq!(ingest_page.value(m::HTTP_AUTH_FAILURES_TOTAL, &[("reason", "invalid")]), 1.0);
    assert!(ingest_page.value(m::DB_POOL_MAX_CONNECTIONS, &[]) > 0.0);

    let calls = completions.load(std::sync::atomic::Ordering::SeqCst) as f64;
    assert_eq!(calls, 6.0);
    assert_eq!(enrich_page.value(m::OPENAI_REQUESTS_TOTAL, &[("outcome", "ok")]), calls);
    assert_eq!(enrich_page.value(&format!("{}_count", m::OPENAI_REQUEST_SECONDS), &[]), calls);
    for kind in ["prompt", "completion"] {
        assert!(enrich_page.value(m::OPENAI_TOKENS_TOTAL, &[("kind", kind), ("model", "gpt-4o-mini")]) > 0.0);
    }
    assert!(enrich_page.value(m::OPENAI_COST_MICRODOLLARS_TOTAL, &[("model", "gpt-4o-mini")]) > 0.0);
    assert_eq!(enrich_page.value(m::CACHE_REQUESTS_TOTAL, &[("outcome", "miss")]), 6.0);

    let creates = notion_state.creates.load(std::sync::atomic::Ordering::SeqCst) as f64;
    assert_eq!(creates, 6.0);
    let created = [("operation", "create_page"), ("outcome", "ok")];
    assert_eq!(publish_page.value(m::NOTION_REQUESTS_TOTAL, &created), creates);
    assert_eq!(publish_page.value(m::NOTION_RATE_LIMITED_TOTAL, &[]), 0.0);
    assert_eq!(publish_page.value(m::DB_WRITES_TOTAL, &[("status", "published")]), 6.0);

    // Readiness names each dependency.
    for (p, deps) in [
        (&ingest, vec![("nats", "up"), ("postgres", "up"), ("redis", "up")]),
        (&enrich, vec![("nats", "up"), ("redis", "up"), ("openai", "configured")]),
        (&publish, vec![("nats", "up"), ("postgres", "up"), ("redis", "up"), ("notion", "configured")]),
    ] {
        let r = http.get(format!("http://{}/health/ready", p.metrics_addr)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", p.name);
        let v: Value = r.json().await.unwrap();
        for (dep, status) in deps {
            assert_eq!(v["dependencies"][dep]["status"], status, "{}: {v}", p.name);
        }
        let alive = http.get(format!("http://{}/health", p.metrics_addr)).send().await.unwrap();
        assert_eq!(alive.status(), 200);
    }

    // Every item's trace id is in the logs of all three stages, and no
    // secret is anywhere in them.
    for p in [&ingest, &enrich, &publish] {
        let logs = p.logs();
        for trace_id in &traces {
            assert!(logs.iter().any(|l| has_trace(l, trace_id)), "{} never logged trace {trace_id}", p.name);
        }
        let all: String = logs.iter().map(Value::to_string).collect();
        for secret in [API_KEY, OPENAI_KEY, NOTION_TOKEN] {
            assert!(!all.contains(secret), "{} logged a secret", p.name);
        }
    }

    // SIGTERM: each drains and exits 0.
    for mut p in [ingest, enrich, publish] {
        let name = p.name;
        let status = p.terminate(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(0), "{name} exit status");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_log_reader_stalls_keeps_working_and_loses_no_line() {
    // Nobody reads its standard output: the pipe's 64 KiB fill after a few
    // hundred of the 2,000 lines these submissions make.
    let n = 2000;
    let (env, mut ingest) = ingest_unread(n).await;

    // Read again: every line was kept.
    ingest.resume_reading();
    ingest
        .wait_for_lines(n, Duration::from_secs(30), |v| v["message"] == "Message handled" && v["outcome"] == "ok")
        .await;
    // Its last line, written after the runtime stopped, is there too.
    assert!(ingest.terminate(Duration::from_secs(30)).await.success());
    ingest.wait_for_line(Duration::from_secs(5), |v| v["message"] == "Stage stopped").await;
    env.cleanup().await;
}

/// Ingest as a process, its standard output left unread while it handles
/// `n` corpus texts submitted on `<ns>.submitted`.
async fn ingest_unread(n: usize) -> (TestEnv, StageProcess) {
    let env = TestEnv::new().await;
    let mut vars = env.base_vars();
    vars.set("API_KEYS", API_KEY).set("HTTP_ADDR", "127.0.0.1:0");
    let ingest = StageProcess::start("ingest", "halakha-ingest", &vars).await;
    ingest.pause_reading();
    submit(&env, n).await;
    (env, ingest)
}

/// Submit `n` corpus texts on `<ns>.submitted` and wait until ingest has
/// handled them all.
async fn submit(env: &TestEnv, n: usize) {
    let subject = env.names.subject(S::Submitted);
    let texts = corpus();
    let mut acks = Vec::with_capacity(n);
    for (i, item) in texts.iter().cycle().take(n).enumerate() {
        let body = json!({"content": item.text, "idempotency_key": format!("{}-{i}", item.id)});
        let payload = serde_json::to_vec(&body).unwrap().into();
        acks.push(env.js.publish(subject.clone(), payload).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
    // Handled and acknowledged all the same.
    env.wait_idle(S::Submitted, "ingest", Duration::from_secs(60)).await;
    assert_eq!(env.stream_len(S::Ingested).await, n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_log_reader_has_stopped_reading_still_exits_in_time() {
    // 400 lines (about 200 KB) for a pipe of 64 KiB: the log writer is
    // stuck in a write that no reader will take.
    let (env, mut ingest) = ingest_unread(400).await;
    // The drain has nothing to wait for; the exit waits 2 s for the log
    // writer, not for ever.
    let started = std::time::Instant::now();
    assert!(ingest.terminate(Duration::from_secs(15)).await.success());
    assert!(started.elapsed() < Duration::from_secs(10), "exited after {:?}", started.elapsed());
    env.cleanup().await;
}
