//! End to end: the three stages against the machine's real NATS JetStream,
//! Postgres and Redis, with OpenAI and Notion replaced by contract-keeping
//! fakes. One test binary for the whole workspace.

#![allow(clippy::unwrap_used)]

#[path = "e2e/api.rs"]
mod api;
#[path = "e2e/broker.rs"]
mod broker;
#[path = "e2e/enrich.rs"]
mod enrich;
#[path = "e2e/faults.rs"]
mod faults;
#[path = "e2e/observability.rs"]
mod observability;
#[path = "e2e/ops.rs"]
mod ops;
#[path = "e2e/publish.rs"]
mod publish;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use halakha_common::envelope::{DeadLetter, ErrorKind, Published};
use halakha_nats::Stage;
use halakha_tests::fakes::Model;
use halakha_tests::{Pipeline, S, Spec, TestEnv, corpus, spawn_ingest};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_corpus_texts_submitted_over_http_and_nats_end_as_fifty_published_rows_and_pages() {
    let concurrency = [("CONCURRENCY", "8")];
    let p = Pipeline::start(Spec { enrich_vars: &concurrency, publish_vars: &concurrency, ..Spec::default() }).await;
    let env = &p.env;
    let started = Instant::now();

    // 50 real texts of every language, long ones included.
    let items: Vec<_> = corpus().into_iter().step_by(8).take(50).collect();
    assert_eq!(items.len(), 50);
    assert!(items.iter().any(|i| i.text.chars().count() > 2000), "a text over Notion's item limit is part of the run");
    let mut ids = BTreeSet::new();
    let mut http_ids = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let body =
            json!({"content": item.text, "schedule_days": i % 3, "source": item.source, "idempotency_key": item.id});
        if i % 2 == 0 {
            let v = p.submit(body).await;
            assert_eq!((v["status"].as_str(), v["duplicate"].as_bool()), (Some("accepted"), Some(false)));
            let id = v["id"].as_str().unwrap().to_owned();
            http_ids.push(id.clone());
            ids.insert(id);
        } else {
            let subject = env.names.subject(S::Submitted);
            env.js.publish(subject, serde_json::to_vec(&body).unwrap().into()).await.unwrap().await.unwrap();
            ids.insert(halakha_common::text::derive_id(Some(&item.id), ""));
        }
    }
    assert_eq!(ids.len(), 50);

    let published: Vec<Published> = env.collect(S::Published, 50, Duration::from_secs(120)).await;
    eprintln!("50 texts published end to end in {:?}", started.elapsed());
    let got: BTreeSet<String> = published.iter().map(|p| p.id.clone()).collect();
    assert_eq!(got, ids, "every submitted id is published once");

    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT count(*) FROM halakhot WHERE status = 'published'
               AND title <> '' AND question <> '' AND answer <> '' AND text_post <> '' AND legend <> ''
               AND notion_page_url LIKE 'https://www.notion.so/%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 50);
    let tags = db.query_one("SELECT count(*) FROM halakha_tags", &[]).await.unwrap();
    assert_eq!(tags.get::<_, i64>(0), 50, "each row linked to its tag once");
    assert_eq!(p.creates(), 50, "exactly one Notion page per halakha");
    assert_eq!(p.completions(), 50, "one completion per text");
    assert_eq!(env.stream_len(S::DeadLetter(Stage::Ingest)).await, 0, "nothing dead-lettered");

    // The same text again under another key: a new id, but the enrichment
    // comes from the Redis cache, so no second completion is paid for.
    let v = p.submit(json!({"content": items[0].text, "idempotency_key": format!("{}-again", items[0].id)})).await;
    let again_id = v["id"].as_str().unwrap().to_owned();
    assert!(!ids.contains(&again_id));
    let published: Vec<Published> = env.collect(S::Published, 51, Duration::from_secs(60)).await;
    assert_eq!(published[50].id, again_id);
    assert_eq!(p.completions(), 50, "the cached enrichment was reused");
    assert_eq!(p.creates(), 51);

    // Resubmitting a published text answers duplicate and publishes nothing.
    let ingested_before = env.stream_len(S::Ingested).await;
    let v = p.submit(json!({"content": items[0].text, "idempotency_key": items[0].id})).await;
    assert_eq!((v["duplicate"].as_bool(), v["id"].as_str()), (Some(true), Some(http_ids[0].as_str())));
    assert_eq!(env.stream_len(S::Ingested).await, ingested_before, "a duplicate publishes nothing");

    // The status route shows the result.
    let v = env.wait_for_status(&p.base, &http_ids[0], Duration::from_secs(5), |v| v["status"] == "published").await;
    assert!(v["notion_page_url"].as_str().unwrap().starts_with("https://www.notion.so/"));
    assert!(!v["title"].as_str().unwrap().is_empty());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_the_model_answers_with_invalid_json_ends_in_the_enrich_dead_letters_and_is_not_published() {
    let p = Pipeline::start(Spec { model: Model::InvalidJson, ..Spec::default() }).await;
    let item = corpus().into_iter().find(|i| i.lang == "fr").unwrap();
    let id =
        p.submit(json!({"content": item.text, "idempotency_key": item.id})).await["id"].as_str().unwrap().to_owned();

    let dead: Vec<DeadLetter> = p.env.collect(S::DeadLetter(Stage::Enrich), 1, Duration::from_secs(60)).await;
    let entry = &dead[0];
    assert_eq!(entry.id.as_deref(), Some(id.as_str()));
    assert_eq!((entry.stage.as_str(), entry.error_kind), ("enrich", ErrorKind::Permanent));
    assert!(
        entry.reason.contains("after one repair turn") && entry.reason.contains("not valid JSON"),
        "{}",
        entry.reason
    );
    assert_eq!(entry.subject, p.env.names.subject(S::Ingested));
    assert!(entry.payload.as_deref().unwrap().contains(&id), "the original payload is kept");
    assert_eq!(p.completions(), 2, "invalid twice in a row: the answer and one repair, then dead-lettered");

    // The status route explains the failure; nothing says published.
    let v = p.env.wait_for_status(&p.base, &id, Duration::from_secs(30), |v| v["status"] == "failed").await;
    assert!(v["error"].as_str().unwrap().contains("not valid JSON"), "{v}");
    let db = p.env.db().await;
    let status: String = db.query_one("SELECT status FROM halakhot WHERE id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(status, "failed");
    assert_eq!(p.env.stream_len(S::Published).await, 0);
    assert_eq!(p.creates(), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_model_is_retried_with_backoff_then_dead_lettered_after_max_deliver() {
    let max = [("MAX_DELIVER", "3")];
    let p =
        Pipeline::start(Spec { model: Model::Overloaded, publish: false, enrich_vars: &max, ..Spec::default() }).await;
    let item = corpus().into_iter().find(|i| i.lang == "he").unwrap();
    // The caller's W3C trace context reaches the dead letter.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = p
        .http
        .post(format!("{}/v1/halakhot", p.base))
        .bearer_auth(halakha_tests::API_KEY)
        .header("traceparent", traceparent)
        .json(&json!({"content": item.text}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    let dead: Vec<DeadLetter> = p.env.collect(S::DeadLetter(Stage::Enrich), 1, Duration::from_secs(60)).await;
    let entry = &dead[0];
    assert_eq!(entry.id.as_deref(), Some(id.as_str()));
    assert_eq!((entry.error_kind, entry.attempts), (ErrorKind::MaxDeliveries, 3));
    assert!(entry.reason.contains("503") && entry.reason.contains("overloaded"), "reason: {}", entry.reason);
    assert_eq!(p.completions(), 3, "one call per delivery, no hidden retries");
    // The whole story: every delivery, when, and why; and the trace id the
    // submission got at ingest.
    let attempts: Vec<u64> = entry.history.iter().map(|a| a.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert!(entry.history.iter().all(|a| a.reason.contains("503")), "{:?}", entry.history);
    assert!(entry.history.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(entry.trace_id.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    let kept = entry.headers["traceparent"][0].as_str();
    assert!(
        kept.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && kept != traceparent,
        "a new span per hop: {kept}"
    );
    assert_eq!(entry.context["model"], "gpt-4o-mini");
    assert!(entry.context["prompt_version"].starts_with("sha256:"));
    let v = p.env.wait_for_status(&p.base, &id, Duration::from_secs(30), |v| v["status"] == "failed").await;
    assert!(v["error"].as_str().unwrap().starts_with("enrich: "), "{v}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_submissions_on_nats_are_dead_lettered_by_ingest_with_their_reason_and_never_dropped() {
    let env = TestEnv::new().await;
    let ingest = spawn_ingest(&env, &[]).await;
    let subject = env.names.subject(S::Submitted);
    let poison: [&[u8]; 4] = [
        b"not json at all",
        br#"{"content": "   "}"#,
        br#"{"content": "x", "schema_version": 99}"#,
        &[0x7b, 0x22, 0xff, 0xfe, 0x22, 0x7d],
    ];
    for p in poison {
        env.js.publish(subject.clone(), p.to_vec().into()).await.unwrap().await.unwrap();
    }
    let mut dead: Vec<DeadLetter> = env.collect(S::DeadLetter(Stage::Ingest), 4, Duration::from_secs(30)).await;
    // Handled concurrently: put them back in the order they were sent.
    dead.sort_by_key(|d| d.stream_seq);
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(reasons[0].contains("not a valid submission message"), "{reasons:?}");
    assert!(reasons[1].contains("content") && reasons[1].contains("empty"), "{reasons:?}");
    assert!(reasons[2].contains("schema_version"), "{reasons:?}");
    assert!(dead.iter().all(|d| d.error_kind == ErrorKind::Permanent && d.stage == "ingest" && d.attempts == 1));
    assert_eq!(dead[0].payload.as_deref(), Some("not json at all"), "the original payload is kept");
    assert_eq!(dead[3].payload, None);
    assert_eq!(dead[3].payload_base64.as_deref(), Some("eyL//iJ9"), "invalid UTF-8 is kept byte for byte");
    assert_eq!(env.stream_len(S::Ingested).await, 0);

    ingest.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_notion_sink_off_a_text_is_published_to_postgres_without_a_page() {
    let p = Pipeline::start(Spec { notion: false, ..Spec::default() }).await;
    let item = corpus().into_iter().find(|i| i.id.starts_with("mt-he-te363")).unwrap();
    let id = p.submit(json!({"content": item.text, "schedule_days": 7})).await["id"].as_str().unwrap().to_owned();
    let published: Vec<Published> = p.env.collect(S::Published, 1, Duration::from_secs(30)).await;
    assert_eq!((published[0].id.as_str(), published[0].notion_page_url.as_deref()), (id.as_str(), None));
    let v = p.env.wait_for_status(&p.base, &id, Duration::from_secs(10), |v| v["status"] == "published").await;
    assert!(v.get("notion_page_url").is_none(), "{v}");
    let db = p.env.db().await;
    let row = db
        .query_one("SELECT date_post - received_at::date, language FROM halakhot WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 7, "date_post is the processing day + schedule_days");
    assert_eq!(row.get::<_, String>(1), "he");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_a_stage_with_new_tuning_updates_its_durable_consumer_in_place() {
    let env = TestEnv::new().await;
    let first = spawn_ingest(&env, &[("MAX_DELIVER", "5"), ("ACK_WAIT_SECS", "30")]).await;
    first.stop().await;
    let stream = env.js.get_stream(env.names.stream(S::Submitted)).await.unwrap();
    let info = stream.consumer_info("ingest").await.unwrap();
    assert_eq!(info.config.max_deliver, 5);

    let second = spawn_ingest(&env, &[("MAX_DELIVER", "3"), ("ACK_WAIT_SECS", "45")]).await;
    let info = stream.consumer_info("ingest").await.unwrap();
    assert_eq!((info.config.max_deliver, info.config.ack_wait), (3, Duration::from_secs(45)));
    for name in env.names.streams() {
        env.js.get_stream(&name).await.unwrap();
    }
    second.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_form_route_waits_for_publication_and_answers_200_with_the_notion_url() {
    let wait = [("FORM_WAIT_SECS", "30")];
    let p = Pipeline::start(Spec { ingest_vars: &wait, ..Spec::default() }).await;
    let item = corpus().into_iter().find(|i| i.id.starts_with("mishnah-fr-schwab")).unwrap();
    let image = "https://images.example.org/halakha/berakhot.png";
    let resp = p.post_form(&[("content", item.text.as_str()), ("schedule_days", "3"), ("last_img", image)]).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "success");
    let url = v["notion_page_url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("https://www.notion.so/"), "{v}");
    assert_eq!(p.creates(), 1);

    // The page carries the image; the row, the page and the schedule.
    let requests = p.notion.as_ref().unwrap().received_requests().await.unwrap();
    let page: Value = requests.iter().find(|r| r.url.path() == "/v1/pages").unwrap().body_json().unwrap();
    assert_eq!(page["properties"]["Image"]["files"][0]["external"]["url"], image);
    let db = p.env.db().await;
    let row = db
        .query_one("SELECT notion_page_url, schedule_days FROM halakhot WHERE id = $1", &[&v["id"].as_str().unwrap()])
        .await
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i32>(1)), (url.clone(), 3));

    // Sent again: already published, answered at once from the database.
    let again = p.post_form(&[("content", item.text.as_str())]).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["notion_page_url"], url.as_str());
    assert_eq!(p.creates(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_listens_for_published_events_only_while_a_form_request_waits() {
    // A server of the test's own, to read its subscriptions; the wait is
    // also how long ingest keeps listening after the last request.
    let nats = halakha_tests::NatsServer::start().await;
    let wait = [("FORM_WAIT_SECS", "5")];
    let p = Pipeline::start(Spec { ingest_vars: &wait, nats_url: Some(nats.url()), ..Spec::default() }).await;
    let published = p.env.names.subject(S::Published);
    let mut texts = corpus().into_iter().filter(|i| i.lang == "fr");
    let (first, second) = (texts.next().unwrap(), texts.next().unwrap());

    // Published with no form request waiting: ingest is not sent the event.
    let id = p.submit(json!({"content": first.text})).await["id"].as_str().unwrap().to_owned();
    p.env.wait_for_status(&p.base, &id, Duration::from_secs(30), |v| v["status"] == "published").await;
    assert!(!nats.subscriptions().await.contains(&published), "ingest subscribed with no request waiting");

    // A form request subscribes first, so it hears its own publication.
    let resp = p.post_form(&[("content", second.text.as_str())]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "success");
    assert!(nats.subscriptions().await.contains(&published), "ingest stopped listening at once");

    // And stops listening once no request has waited for FORM_WAIT_SECS
    // (the broker announces no unsubscription: polled, with a deadline).
    let deadline = Instant::now() + Duration::from_secs(30);
    while nats.subscriptions().await.contains(&published) {
        assert!(Instant::now() < deadline, "ingest kept listening with no request waiting");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_form_route_answers_503_soon_when_the_broker_is_out_of_reach() {
    let mut nats = halakha_tests::NatsServer::start().await;
    let wait = [("FORM_WAIT_SECS", "60")];
    let p = Pipeline::start(Spec { ingest_vars: &wait, nats_url: Some(nats.url()), ..Spec::default() }).await;
    nats.kill();
    let item = corpus().into_iter().find(|i| i.lang == "en").unwrap();
    let started = Instant::now();
    let resp = p.post_form(&[("content", item.text.as_str())]).await;
    assert_eq!(resp.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(20), "answered after {:?}", started.elapsed());
    // Nothing was claimed: a retry once the broker is back starts afresh.
    let db = p.env.db().await;
    let rows: i64 = db.query_one("SELECT count(*) FROM halakhot", &[]).await.unwrap().get(0);
    assert_eq!(rows, 0);
    nats.restart().await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_form_route_reports_a_processing_failure_with_its_reason() {
    let wait = [("FORM_WAIT_SECS", "30")];
    let p = Pipeline::start(Spec { model: Model::InvalidJson, publish: false, ingest_vars: &wait, ..Spec::default() })
        .await;
    let item = corpus().into_iter().find(|i| i.lang == "en").unwrap();
    let resp = p.post_form(&[("content", item.text.as_str())]).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "processing_failed");
    assert!(v["error"]["message"].as_str().unwrap().contains("not valid JSON"), "{v}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_that_panics_still_removes_its_streams_and_its_database() {
    let (made, names) = tokio::sync::oneshot::channel();
    let failed = tokio::spawn(async move {
        let env = TestEnv::new().await;
        let stream = format!("{}_MADE", env.names.namespace().as_str().to_ascii_uppercase());
        let subject = format!("{}.made", env.names.namespace().as_str());
        env.js
            .create_stream(async_nats::jetstream::stream::Config {
                name: stream.clone(),
                subjects: vec![subject],
                ..Default::default()
            })
            .await
            .unwrap();
        made.send((stream, env.db_name.clone())).unwrap();
        panic!("a failing test (expected: its environment is removed as it unwinds)");
    })
    .await;
    assert!(failed.is_err_and(|e| e.is_panic()));
    let (stream, db_name) = names.await.unwrap();
    let env = TestEnv::new().await;
    assert!(env.js.get_stream(&stream).await.is_err(), "{stream} is still there");
    let db = env.db().await;
    let left: i64 =
        db.query_one("SELECT count(*) FROM pg_database WHERE datname = $1", &[&db_name]).await.unwrap().get(0);
    assert_eq!(left, 0, "{db_name} is still there");
    env.cleanup().await;
}
