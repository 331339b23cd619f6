//! Operator actions against a real server: replay and dead-letter redrive.

use std::time::Duration;

use halakha_common::envelope::{Enriched, Ingested, Published};
use halakha_nats::Stage;
use halakha_nats::ops::{self, Report};
use halakha_tests::fakes::{self, Model};
use halakha_tests::{API_KEY, Pipeline, S, Spec, corpus};
use serde_json::{Value, json};

async fn submit_batch(p: &Pipeline, n: usize) -> Vec<String> {
    let body: Vec<Value> = corpus()
        .into_iter()
        .filter(|i| i.lang != "ru")
        .skip(200)
        .take(n)
        .map(|i| json!({"content": i.text, "idempotency_key": i.id}))
        .collect();
    let v: Value = p
        .http
        .post(format!("{}/v1/halakhot/batch", p.base))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_sequence_range_reprocesses_exactly_those_messages_and_a_dry_run_nothing() {
    let p = Pipeline::start(Spec { publish: false, ..Spec::default() }).await;
    submit_batch(&p, 10).await;
    let _: Vec<Enriched> = p.env.collect(S::Enriched, 10, Duration::from_secs(60)).await;
    let stored: Vec<Ingested> = p.env.collect(S::Ingested, 10, Duration::from_secs(10)).await;

    let mut spec = ops::Replay { stage: Stage::Enrich, from: 3, to: Some(6), dry_run: true, ..Default::default() };
    let dry = ops::replay(&p.env.js, &p.env.names, &spec, |_| {}).await.unwrap();
    assert_eq!(dry, Report { found: 4, sent: 0, skipped: 0 });
    assert_eq!(p.env.stream_len(S::Ingested).await, 10, "a dry run sends nothing");

    let mut seen = Vec::new();
    spec.dry_run = false;
    let report = ops::replay(&p.env.js, &p.env.names, &spec, |seq| seen.push(seq)).await.unwrap();
    assert_eq!(report, Report { found: 4, sent: 4, skipped: 0 });
    assert_eq!(seen, vec![3, 4, 5, 6]);
    let all: Vec<Enriched> = p.env.collect(S::Enriched, 14, Duration::from_secs(60)).await;
    p.env.wait_idle(S::Ingested, "enrich", Duration::from_secs(30)).await;
    assert_eq!(p.env.stream_len(S::Enriched).await, 14, "exactly four more");
    let again: Vec<&str> = all[10..].iter().map(|e| e.id.as_str()).collect();
    let mut expected: Vec<&str> = stored[2..6].iter().map(|m| m.id.as_str()).collect();
    let mut got = again.clone();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected, "those four, with their business ids");

    // By id, and by time: only what is asked for.
    let by_id = ops::Replay { stage: Stage::Enrich, from: 1, ids: vec![stored[8].id.clone()], ..Default::default() };
    assert_eq!(ops::replay(&p.env.js, &p.env.names, &by_id, |_| {}).await.unwrap().sent, 1);
    let future = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let later = ops::Replay { stage: Stage::Enrich, from: 1, since: Some(future), ..Default::default() };
    assert_eq!(ops::replay(&p.env.js, &p.env.names, &later, |_| {}).await.unwrap(), Report::default());
    let all: Vec<Enriched> = p.env.collect(S::Enriched, 15, Duration::from_secs(60)).await;
    assert_eq!(all[14].id, stored[8].id);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redriving_a_dead_letter_ends_with_the_item_published_and_the_entry_gone() {
    let p = Pipeline::start(Spec { model: Model::InvalidJson, ..Spec::default() }).await;
    let ids = submit_batch(&p, 1).await;
    let dead = p.env.dead_letters(1, Duration::from_secs(30)).await;
    assert_eq!(dead[0].stage, "enrich");
    let entries = ops::dlq_list(&p.env.js, &p.env.names, Some(Stage::Enrich)).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert!(ops::dlq_list(&p.env.js, &p.env.names, Some(Stage::Publish)).await.unwrap().is_empty());
    let seq = entries[0].seq;

    // A dry run changes nothing.
    let dry = ops::dlq_redrive(&p.env.js, &p.env.names, &[seq], true, None, |_| {}).await.unwrap();
    assert_eq!(dry, Report { found: 1, sent: 0, skipped: 0 });
    assert_eq!(ops::dlq_list(&p.env.js, &p.env.names, None).await.unwrap().len(), 1);
    assert_eq!(p.env.stream_len(S::Ingested).await, 1);

    // The model is fixed; the entry goes back where it failed.
    p.openai.reset().await;
    fakes::mount_openai(&p.openai, Model::Faithful).await;
    let report = ops::dlq_redrive(&p.env.js, &p.env.names, &[seq], false, None, |_| {}).await.unwrap();
    assert_eq!(report, Report { found: 1, sent: 1, skipped: 0 });
    let published: Vec<Published> = p.env.collect(S::Published, 1, Duration::from_secs(30)).await;
    assert_eq!(published[0].id, ids[0]);
    assert!(ops::dlq_list(&p.env.js, &p.env.names, None).await.unwrap().is_empty(), "the entry is gone");
    p.env.wait_for_status(&p.base, &ids[0], Duration::from_secs(10), |v| v["status"] == "published").await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_matches_the_servers_consumer_info_and_the_topology_has_no_drift() {
    let p = Pipeline::start(Spec { model: Model::HANG, publish: false, ..Spec::default() }).await;
    submit_batch(&p, 3).await;
    // enrich holds what it took (the model hangs): unacknowledged work.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while p.completions() == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = ops::status(&p.env.js, &p.env.names).await.unwrap();
    for s in status.stages.iter().filter(|s| s.present) {
        let info = p.env.js.get_stream(&s.stream).await.unwrap().consumer_info(&s.consumer).await.unwrap();
        assert_eq!(
            (s.pending, s.ack_pending, s.redelivered),
            (info.num_pending, info.num_ack_pending as u64, info.num_redelivered as u64),
            "{}",
            s.stage
        );
    }
    assert!(!status.stages.iter().find(|s| s.stage == "publish").unwrap().present, "publish never ran here");
    let enrich = status.stages.iter().find(|s| s.stage == "enrich").unwrap();
    assert!(enrich.ack_pending >= 1 && enrich.last_active.is_some(), "{enrich:?}");
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["stages"].as_array().unwrap().len(), 3);

    // Every consumer is running: only the publish stage's is missing here.
    let diffs = ops::topology_diff(&p.env.js, &p.env.names).await.unwrap();
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(diffs[0].object.ends_with("/publish") && diffs[0].server == "missing");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_dead_letters_of_one_stage_leaves_the_others() {
    let p = Pipeline::start(Spec { model: Model::InvalidJson, publish: false, ..Spec::default() }).await;
    submit_batch(&p, 2).await;
    p.env.js.publish(p.env.names.subject(S::Submitted), "not json".into()).await.unwrap().await.unwrap();
    let _ = p.env.dead_letters(3, Duration::from_secs(30)).await;
    let status = ops::status(&p.env.js, &p.env.names).await.unwrap();
    let depth: Vec<(String, u64)> = status.stages.iter().map(|s| (s.stage.clone(), s.dead_letters)).collect();
    assert_eq!(depth, vec![("ingest".into(), 1), ("enrich".into(), 2), ("publish".into(), 0)]);
    assert_eq!(ops::dlq_purge(&p.env.js, &p.env.names, Some(Stage::Enrich)).await.unwrap(), 2);
    let left = ops::dlq_list(&p.env.js, &p.env.names, None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].entry.stage, "ingest");
    let filter = ops::DlqFilter { reason: Some("NOT A VALID".into()), ..Default::default() };
    assert_eq!(ops::dlq_find(&p.env.js, &p.env.names, &filter).await.unwrap().len(), 1);
    let filter = ops::DlqFilter { reason: Some("quota".into()), ..Default::default() };
    assert!(ops::dlq_find(&p.env.js, &p.env.names, &filter).await.unwrap().is_empty());
    p.stop().await;
}
