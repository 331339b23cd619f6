//! Faults we can make here, each ending with the invariant: every accepted
//! submission ended exactly once, as one published row and one Notion page,
//! or as one dead letter with a reason.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use halakha_common::envelope::Published;
use halakha_tests::{API_KEY, NatsServer, Pipeline, S, Spec, TestEnv, corpus};
use serde_json::{Value, json};

/// Submit through the batch route, retrying while the pipeline answers
/// 503 (a broker or database outage); the accepted ids.
async fn submit_retrying(p: &Pipeline, texts: &[(String, String)]) -> Vec<String> {
    let mut ids = Vec::new();
    for (key, text) in texts {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let resp = p
                .http
                .post(format!("{}/v1/halakhot", p.base))
                .bearer_auth(API_KEY)
                .json(&json!({"content": text, "idempotency_key": key}))
                .send()
                .await;
            if let Ok(r) = resp
                && r.status() == 202
            {
                ids.push(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never accepted: {key}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    ids
}

/// The invariant (see [`Pipeline::assert_each_ended_once`]).
async fn assert_each_ended_once(p: &Pipeline, ids: &[String]) {
    p.assert_each_ended_once(ids).await;
}

fn texts(n: usize, skip: usize) -> Vec<(String, String)> {
    corpus().into_iter().filter(|i| i.lang != "ru").skip(skip).take(n).map(|i| (i.id, i.text)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_killed_and_restarted_mid_stream_loses_nothing_and_duplicates_nothing() {
    let mut server = NatsServer::start().await;
    let vars = [("ACK_WAIT_SECS", "5")];
    let p = Pipeline::start(Spec {
        nats_url: Some(server.url()),
        ingest_vars: &vars,
        enrich_vars: &vars,
        publish_vars: &vars,
        ..Spec::default()
    })
    .await;
    let mut ids = submit_retrying(&p, &texts(20, 0)).await;
    let _: Vec<Published> = p.env.collect(S::Published, 5, Duration::from_secs(60)).await;

    server.kill();
    // Disconnected stages say so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = p.http.get(format!("{}/health/ready", p.base)).send().await.unwrap();
        if ready.status() == 503 {
            let v: Value = ready.json().await.unwrap();
            assert!(v["failing"].as_array().unwrap().iter().any(|f| f == "nats"), "{v}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ingest still says ready without NATS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.restart().await;
    ids.extend(submit_retrying(&p, &texts(20, 20)).await);
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 40);

    // Every id published; events may repeat (at-least-once), ids may not be lost.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut n = 40;
    while seen.len() < 40 {
        assert!(tokio::time::Instant::now() < deadline, "only {} of 40 published", seen.len());
        let events: Vec<Published> = p.env.collect(S::Published, n, Duration::from_secs(90)).await;
        seen.clear();
        for e in events {
            *seen.entry(e.id).or_default() += 1;
        }
        n += 40 - seen.len().min(40);
    }
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), ids.iter().cloned().collect::<BTreeSet<_>>());
    assert_each_ended_once(&p, &ids).await;
    assert_eq!(p.creates(), 40, "one page each");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stage_killed_mid_batch_and_restarted_loses_nothing_and_duplicates_nothing() {
    let vars = [("ACK_WAIT_SECS", "5")];
    let mut p = Pipeline::start(Spec {
        model: halakha_tests::fakes::Model::SLOW,
        ingest_vars: &vars,
        enrich_vars: &vars,
        publish_vars: &vars,
        ..Spec::default()
    })
    .await;
    // Half over NATS, half over HTTP.
    let over_nats = texts(15, 0);
    for (key, text) in &over_nats {
        let body = serde_json::to_vec(&json!({"content": text, "idempotency_key": key})).unwrap();
        p.env.js.publish(p.env.names.subject(S::Submitted), body.into()).await.unwrap().await.unwrap();
    }
    let mut ids: Vec<String> = over_nats.iter().map(|(k, _)| halakha_common::text::derive_id(Some(k), "")).collect();
    ids.extend(submit_retrying(&p, &texts(15, 15)).await);

    let mut killed_in_flight = 0;
    for (stage, after) in [("ingest", 3usize), ("enrich", 8), ("publish", 14)] {
        let _: Vec<Published> = p.env.collect(S::Published, after, Duration::from_secs(60)).await;
        let (stream, consumer) = match stage {
            "ingest" => (S::Submitted, "ingest"),
            "enrich" => (S::Ingested, "enrich"),
            _ => (S::Enriched, "publish"),
        };
        let info =
            p.env.js.get_stream(p.env.names.stream(stream)).await.unwrap().consumer_info(consumer).await.unwrap();
        killed_in_flight += info.num_ack_pending;
        p.kill(stage).await;
        match stage {
            "ingest" => p.add_ingest(&vars).await,
            "enrich" => p.add_enrich(&vars).await,
            _ => p.add_publish(&[("ACK_WAIT_SECS", "5"), ("NOTION_REQUESTS_PER_SECOND", "100")]).await,
        }
    }
    let _: Vec<Published> = p.env.collect(S::Published, 30, Duration::from_secs(90)).await;
    for consumer in [(S::Submitted, "ingest"), (S::Ingested, "enrich"), (S::Enriched, "publish")] {
        p.env.wait_idle(consumer.0, consumer.1, Duration::from_secs(60)).await;
    }
    assert_eq!(p.env.stream_len(S::DeadLetter(halakha_nats::Stage::Ingest)).await, 0);
    eprintln!("messages in flight when their stage was killed: {killed_in_flight}");
    assert!(killed_in_flight > 0, "at least one kill landed mid-batch");
    assert_each_ended_once(&p, &ids).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_for_twenty_seconds_pauses_publish_and_loses_nothing() {
    // publish reaches Postgres only through a proxy the test can cut; with
    // two deliveries allowed, an outage that spent deliveries would
    // dead-letter messages.
    let proxy = halakha_tests::TcpProxy::start("127.0.0.1:5432").await;
    let mut p =
        Pipeline::start(Spec { model: halakha_tests::fakes::Model::SLOW, publish: false, ..Spec::default() }).await;
    let proxied = p.env.database_url.replace("127.0.0.1:5432", &proxy.addr.to_string());
    p.add_publish(&[("DATABASE_URL", proxied.as_str()), ("NOTION_REQUESTS_PER_SECOND", "100"), ("MAX_DELIVER", "2")])
        .await;

    let ids = submit_retrying(&p, &texts(20, 40)).await;
    let _: Vec<Published> = p.env.collect(S::Published, 3, Duration::from_secs(60)).await;
    proxy.cut();
    let outage = std::time::Instant::now();
    // publish says it is not ready while it cannot write.
    let ready_url = format!("http://{}/health/ready", p.metrics_addr("publish"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = p.http.get(&ready_url).send().await.unwrap();
        let status = r.status();
        let v: serde_json::Value = r.json().await.unwrap();
        // It says why: the postgres dependency is down.
        if status == 503 && v["dependencies"]["postgres"]["status"] == "down" {
            assert_eq!(v["dependencies"]["postgres"]["required"], true, "{v}");
            assert_eq!(v["dependencies"]["nats"]["status"], "up", "{v}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "publish still says ready without its database: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(outage.elapsed())).await;
    proxy.restore();

    let _: Vec<Published> = p.env.collect(S::Published, 20, Duration::from_secs(90)).await;
    p.env.wait_idle(S::Enriched, "publish", Duration::from_secs(60)).await;
    assert_eq!(
        p.env.stream_len(S::DeadLetter(halakha_nats::Stage::Ingest)).await,
        0,
        "nothing dead-lettered for an outage"
    );
    let r = p.http.get(&ready_url).send().await.unwrap();
    assert_eq!(r.status(), 200, "ready again");
    assert_each_ended_once(&p, &ids).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_stream_leaves_enrichment_going_without_its_cache() {
    let proxy = halakha_tests::TcpProxy::start("127.0.0.1:6379").await;
    let redis = format!("redis://{}", proxy.addr);
    let vars = [("REDIS_URL", redis.as_str())];
    let p =
        Pipeline::start(Spec { model: halakha_tests::fakes::Model::SLOW, enrich_vars: &vars, ..Spec::default() }).await;
    let ids = submit_retrying(&p, &texts(20, 60)).await;
    let _: Vec<Published> = p.env.collect(S::Published, 4, Duration::from_secs(60)).await;
    proxy.cut();
    // Redis is not required: enrich says it is down and stays ready.
    let ready_url = format!("http://{}/health/ready", p.metrics_addr("enrich"));
    let r = p.http.get(&ready_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["dependencies"]["redis"]["status"], "down", "{v}");
    assert_eq!(v["dependencies"]["redis"]["required"], false, "{v}");
    assert_eq!(v["dependencies"]["openai"]["status"], "configured", "{v}");
    let _: Vec<Published> = p.env.collect(S::Published, 20, Duration::from_secs(90)).await;
    for (stream, consumer) in [(S::Ingested, "enrich"), (S::Enriched, "publish")] {
        p.env.wait_idle(stream, consumer, Duration::from_secs(60)).await;
    }
    assert_eq!(p.env.stream_len(S::DeadLetter(halakha_nats::Stage::Ingest)).await, 0);
    let metrics = halakha_common::metrics::install_recorder().render();
    assert!(metrics.contains("halakha_cache_requests_total{outcome=\"error\"}"), "the lost cache is counted");
    assert_each_ended_once(&p, &ids).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_429_and_529_from_notion_are_waited_out_and_each_page_is_made_once() {
    let p = Pipeline::start(Spec::default()).await;
    let notion = p.notion_state.clone().unwrap();
    *notion.burst.lock().unwrap() = [429, 429, 529, 429, 529, 529, 429, 529].into_iter().collect();
    let ids = submit_retrying(&p, &texts(12, 80)).await;
    let _: Vec<Published> = p.env.collect(S::Published, 12, Duration::from_secs(90)).await;
    p.env.wait_idle(S::Enriched, "publish", Duration::from_secs(60)).await;
    assert_eq!(notion.burst_answers.load(std::sync::atomic::Ordering::SeqCst), 8, "every refusal was served");
    assert_eq!(p.env.stream_len(S::DeadLetter(halakha_nats::Stage::Ingest)).await, 0);
    assert_each_ended_once(&p, &ids).await;
    assert_eq!(p.creates(), 12);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_every_stage_share_the_work_and_nothing_is_done_twice() {
    let mut p = Pipeline::start(Spec { model: halakha_tests::fakes::Model::SLOW, ..Spec::default() }).await;
    p.add_ingest(&[]).await;
    p.add_enrich(&[]).await;
    p.add_publish(&[("NOTION_REQUESTS_PER_SECOND", "100")]).await;
    // Through the second ingest replica's API (add_ingest moved the base
    // there), and over NATS, where both ingest replicas pull.
    let mut ids = submit_retrying(&p, &texts(20, 100)).await;
    for (key, text) in &texts(20, 120) {
        let body = serde_json::to_vec(&json!({"content": text, "idempotency_key": key})).unwrap();
        p.env.js.publish(p.env.names.subject(S::Submitted), body.into()).await.unwrap().await.unwrap();
        ids.push(halakha_common::text::derive_id(Some(key), ""));
    }
    let _: Vec<Published> = p.env.collect(S::Published, 40, Duration::from_secs(90)).await;
    for (stream, consumer) in [(S::Submitted, "ingest"), (S::Ingested, "enrich"), (S::Enriched, "publish")] {
        p.env.wait_idle(stream, consumer, Duration::from_secs(60)).await;
    }
    assert_eq!(p.env.stream_len(S::Enriched).await, 40, "each text enriched once");
    assert_eq!(p.env.stream_len(S::Published).await, 40, "each text published once");
    assert_eq!(p.creates(), 40);
    assert_each_ended_once(&p, &ids).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_makes_no_progress_with_work_waiting_reports_not_ready() {
    // The model never answers in time: enrich holds its messages (in-progress
    // acks) and finishes none.
    let vars = [("WATCHDOG_SECS", "2"), ("OPENAI_TIMEOUT_MS", "600000")];
    let p = Pipeline::start(Spec {
        model: halakha_tests::fakes::Model::HANG,
        publish: false,
        enrich_vars: &vars,
        ..Spec::default()
    })
    .await;
    let ready = format!("http://{}/health/ready", p.metrics_addr("enrich"));
    assert_eq!(p.http.get(&ready).send().await.unwrap().status(), 200, "ready while idle");
    submit_retrying(&p, &texts(2, 140)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = p.http.get(&ready).send().await.unwrap();
        if r.status() == 503 {
            let v: Value = r.json().await.unwrap();
            assert!(v["failing"].as_array().unwrap().iter().any(|f| f == "progress"), "{v}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the watchdog never fired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.stop().await;
}

/// The invariant gauge of this namespace, once it is computed.
async fn unaccounted(p: &Pipeline) -> Option<f64> {
    let text = p.http.get(format!("{}/metrics", p.base)).send().await.unwrap().text().await.unwrap();
    let ns = p.env.names.namespace().to_string();
    halakha_tests::sample(&text, "halakha_pipeline_unaccounted", &format!("namespace=\"{ns}\""))
}

async fn wait_for_books(p: &Pipeline, expected: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = unaccounted(p).await;
        if v == Some(expected) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the books say {v:?}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invariant_gauge_returns_to_zero_when_idle_and_shows_a_lost_message() {
    let every = [("BOOKS_INTERVAL_SECS", "1")];
    let p = Pipeline::start(Spec { ingest_vars: &every, ..Spec::default() }).await;
    let ids = submit_retrying(&p, &texts(10, 150)).await;
    let _: Vec<Published> = p.env.collect(S::Published, 10, Duration::from_secs(60)).await;
    p.env.wait_idle(S::Enriched, "publish", Duration::from_secs(30)).await;
    wait_for_books(&p, 0.0).await;
    assert_each_ended_once(&p, &ids).await;

    // A halakha accepted in Postgres whose message went nowhere: lost.
    let db = p.env.db().await;
    db.execute(
        "INSERT INTO halakhot (id, status, content, received_at) VALUES ('lost-on-purpose', 'accepted', 'x', now())",
        &[],
    )
    .await
    .unwrap();
    wait_for_books(&p, 1.0).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_drain_runs_out_of_time_held_messages_are_handed_back_at_once() {
    // A long ack_wait: without the hand-back, the message would wait 60 s.
    let vars = [("DRAIN_TIMEOUT_SECS", "1"), ("ACK_WAIT_SECS", "60"), ("OPENAI_TIMEOUT_MS", "600000")];
    let mut p = Pipeline::start(Spec {
        model: halakha_tests::fakes::Model::HANG,
        publish: false,
        enrich_vars: &vars,
        ..Spec::default()
    })
    .await;
    submit_retrying(&p, &texts(1, 160)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while p.completions() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "enrich never called the model");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = std::time::Instant::now();
    p.stop_stage("enrich").await;
    assert!(stopped.elapsed() < Duration::from_secs(10), "the drain is bounded");
    // Another replica gets it at once, long before the 60 s ack_wait.
    p.add_enrich(&vars).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while p.completions() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the message was not handed back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_three_node_cluster_streams_have_three_replicas_and_losing_a_node_loses_nothing() {
    let mut cluster = halakha_tests::NatsCluster::start().await;
    // An ack sent as the node holding the consumer's leader dies is lost
    // (acks are not confirmed): the message comes again after ack_wait,
    // which the test waits out before it counts (5 s, not 30).
    let replicas = [("STREAM_REPLICAS", "3"), ("ACK_WAIT_SECS", "5")];
    let p = Pipeline::start(Spec {
        nats_url: Some(cluster.url()),
        ingest_vars: &replicas,
        enrich_vars: &replicas,
        publish_vars: &replicas,
        ..Spec::default()
    })
    .await;
    // Every stream of the namespace is stored on all three nodes, on disk.
    for subject in [S::Submitted, S::Ingested, S::Enriched, S::Published] {
        let mut stream = p.env.js.get_stream(p.env.names.stream(subject)).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{}", info.config.name);
        assert_eq!(info.config.storage, async_nats::jetstream::stream::StorageType::File);
        let cluster_info = info.cluster.clone().expect("clustered");
        assert_eq!(cluster_info.replicas.len(), 2, "a leader and two followers: {cluster_info:?}");
    }

    let mut ids = submit_retrying(&p, &texts(10, 100)).await;
    let _: Vec<Published> = p.env.collect(S::Published, 3, Duration::from_secs(60)).await;
    // One node dies mid-stream; the other two keep a quorum.
    cluster.kill(0);
    cluster.wait_healthy(Duration::from_secs(30)).await;
    ids.extend(submit_retrying(&p, &texts(10, 110)).await);
    let _: Vec<Published> = p.env.collect(S::Published, 20, Duration::from_secs(90)).await;
    for (stream, consumer) in [(S::Ingested, "enrich"), (S::Enriched, "publish")] {
        p.env.wait_idle(stream, consumer, Duration::from_secs(60)).await;
    }
    assert_eq!(p.env.stream_len(S::DeadLetter(halakha_nats::Stage::Ingest)).await, 0);
    assert_each_ended_once(&p, &ids).await;
    p.stop().await;
}

/// A TCP proxy to the broker at `upstream` that passes everything but the
/// broker's 408 answers (the end of an expired pull request), which it
/// drops on their way to the client: a broker whose answer never comes.
/// The receiver gets the moment each pull request passes to the broker.
async fn proxy_dropping_408s(
    upstream: (String, u16),
) -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<tokio::time::Instant>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (pulled, pulls) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let pulled = pulled.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                tokio::spawn(async move {
                    const PULL: &[u8] = b"CONSUMER.MSG.NEXT.";
                    let (mut seen, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
                    loop {
                        let n = match from_client.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        // What was read, after the end of the last read (a
                        // subject cut between two reads is still found).
                        let keep = seen.len().saturating_sub(PULL.len() - 1);
                        seen.drain(..keep);
                        seen.extend_from_slice(&chunk[..n]);
                        for _ in seen.windows(PULL.len()).filter(|w| *w == PULL) {
                            let _ = pulled.send(tokio::time::Instant::now());
                        }
                        if to_server.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                // The server's protocol: one line per operation, and for
                // MSG and HMSG a body whose length ends the line.
                let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
                loop {
                    let n = match from_server.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let mut out = Vec::new();
                    while let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
                        let line = &buf[..eol];
                        let body = if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
                            let last = line.rsplit(|b| *b == b' ').next().unwrap_or_default();
                            std::str::from_utf8(last).unwrap().parse::<usize>().unwrap() + 2
                        } else {
                            0
                        };
                        if buf.len() < eol + 2 + body {
                            break;
                        }
                        let frame: Vec<u8> = buf.drain(..eol + 2 + body).collect();
                        if !(frame.starts_with(b"HMSG ") && frame[eol + 2..].starts_with(b"NATS/1.0 408")) {
                            out.extend_from_slice(&frame);
                        }
                    }
                    if !out.is_empty() && to_client.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, pulls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_the_broker_never_ends_holds_a_stage_back_no_longer_than_a_moment() {
    // Enrich reaches the broker through the proxy: no 1 s pull request it
    // makes while idle is ever ended for it. The client library would wait
    // 5 s more; the runner pulls again 50 ms after the expiry. Each text is
    // sent 1.1 s after one of enrich's pull requests, just after that
    // request expired: a runner that waited for the end any longer (it did
    // for 1 s) would leave it waiting about 0.9 s for its next pull.
    let env = TestEnv::new().await;
    let (openai, _) = halakha_tests::fakes::openai(halakha_tests::fakes::Model::Faithful).await;
    let broker = halakha_nats::connect::server_addrs(&halakha_tests::nats_url()).unwrap().remove(0);
    let (proxy, mut pulls) = proxy_dropping_408s((broker.host().to_owned(), broker.port())).await;
    let ingest = halakha_tests::spawn_ingest(&env, &[]).await;
    let enrich = halakha_tests::spawn_enrich(&env, &openai.uri(), &[("NATS_URL", &format!("nats://{proxy}"))]).await;
    let mut enriched = env.nats.subscribe(env.names.subject(S::Enriched)).await.unwrap();
    env.nats.flush().await.unwrap();
    let mut waits = Vec::new();
    for (i, (key, text)) in texts(5, 40).into_iter().enumerate() {
        // The next pull request enrich makes.
        while pulls.try_recv().is_ok() {}
        let pulled = tokio::time::timeout(Duration::from_secs(10), pulls.recv()).await.unwrap().unwrap();
        tokio::time::sleep_until(pulled + Duration::from_millis(1100)).await;
        let body = json!({"content": text, "idempotency_key": key});
        let sent = tokio::time::Instant::now();
        env.js
            .publish(env.names.subject(S::Submitted), serde_json::to_vec(&body).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut enriched)).await;
        assert!(matches!(got, Ok(Some(_))), "text {i} never enriched");
        waits.push(sent.elapsed());
    }
    assert!(waits.iter().all(|w| *w < Duration::from_millis(600)), "waits: {waits:?}");
    // Each request left unended is counted, for the operators to see.
    let page = reqwest::get(format!("http://{}/metrics", enrich.metrics_addr)).await.unwrap().text().await.unwrap();
    let unended = halakha_tests::sample(&page, "halakha_stage_unended_pull_requests_total", "stage=\"enrich\"")
        .unwrap_or_default();
    assert!(unended >= 1.0, "no unended pull request counted:\n{page}");
    enrich.stop().await;
    ingest.stop().await;
    env.cleanup().await;
}
