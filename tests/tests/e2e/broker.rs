//! The stages' publisher against a real server, through its outbox: every
//! send is stored and answered to its own caller, and acks settle their
//! deliveries. (That the outbox joins sends into fewer writes is measured
//! by the bench, not asserted here: in a test process the client library
//! joins most of them already, docs/PERFORMANCE.md.)

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use futures::StreamExt;
use halakha_nats::Publisher;
use halakha_tests::TestEnv;

/// A stream of the environment's own (removed with it) on `<ns>.<what>`.
async fn test_stream(env: &TestEnv, what: &str) -> (String, String) {
    let ns = env.names.namespace().as_str().to_owned();
    let name = format!("{}_{}", ns.to_ascii_uppercase(), what.to_ascii_uppercase());
    let subject = format!("{ns}.{what}");
    env.js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    (name, subject)
}

/// A durable pull consumer `durable` on the stream `name`, explicit acks,
/// redelivering only after 60 s (longer than any of these tests).
async fn test_consumer(env: &TestEnv, name: &str, durable: &str) -> consumer::PullConsumer {
    let s = env.js.get_stream(name).await.unwrap();
    s.create_consumer(consumer::pull::Config {
        durable_name: Some(durable.into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_concurrent_publish_through_one_publisher_is_stored_and_answered_to_its_own_caller() {
    let env = TestEnv::new().await;
    let (name, subject) = test_stream(&env, "outbox").await;
    let publisher = Publisher::new(env.js.clone());
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let (publisher, subject) = (publisher.clone(), subject.clone());
            tokio::spawn(async move {
                let ack = publisher.publish(&subject, &format!("m{i}"), format!("p{i}").into(), None).await.unwrap();
                (i, ack)
            })
        })
        .collect();
    let stream = env.js.get_stream(&name).await.unwrap();
    let mut seqs = std::collections::BTreeSet::new();
    for task in tasks {
        let (i, ack) = task.await.unwrap();
        assert!(!ack.duplicate, "m{i} was new");
        // The PubAck this caller got names the message this caller sent.
        let stored = stream.get_raw_message(ack.sequence).await.unwrap();
        assert_eq!(stored.payload, bytes::Bytes::from(format!("p{i}")), "sequence {} answered to m{i}", ack.sequence);
        assert!(seqs.insert(ack.sequence));
    }
    assert_eq!(seqs.len(), 300);
    // De-duplication still holds through the outbox.
    let again = publisher.publish(&subject, "m7", "p7".into(), None).await.unwrap();
    assert!(again.duplicate);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_sent_through_the_publisher_settle_their_deliveries() {
    let env = TestEnv::new().await;
    let (name, subject) = test_stream(&env, "acks").await;
    let publisher = Publisher::new(env.js.clone());
    for i in 0..40 {
        publisher.publish(&subject, &format!("a{i}"), "x".into(), None).await.unwrap();
    }
    let mut c = test_consumer(&env, &name, "acks").await;
    let mut batch = c.fetch().max_messages(40).expires(Duration::from_secs(5)).messages().await.unwrap();
    let mut acks = Vec::new();
    while let Some(msg) = batch.next().await {
        let (msg, publisher) = (msg.unwrap(), publisher.clone());
        acks.push(tokio::spawn(async move { publisher.ack(&msg).await }));
    }
    assert_eq!(acks.len(), 40);
    for ack in acks {
        ack.await.unwrap().unwrap();
    }
    // The acks left on the publisher's connection: once the server has
    // answered a ping sent after them, it has read them all.
    env.nats.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = c.info().await.unwrap();
        if info.num_ack_pending == 0 {
            assert_eq!(info.num_pending, 0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} deliveries still unacknowledged", info.num_ack_pending);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_a_pull_request_the_runner_stopped_waiting_for_goes_back_to_the_broker_at_once() {
    let env = TestEnv::new().await;
    let (name, subject) = test_stream(&env, "late").await;
    let c = test_consumer(&env, &name, "late").await;
    // A pull request, and a message the broker delivers to it that nobody
    // has read yet: what a request past its expiry can still bring.
    let batch = c.batch().max_messages(1).expires(Duration::from_secs(30)).messages().await.unwrap();
    env.js.publish(subject, "late".into()).await.unwrap().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.clone().info().await.unwrap().num_ack_pending == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the message was never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recorder = halakha_common::metrics::install_recorder();
    halakha_nats::runner::hand_back_late("late-test", batch, Duration::from_secs(10)).await;
    // Counted, for the operators to see.
    let page = halakha_common::metrics::render(&recorder);
    assert_eq!(
        halakha_tests::sample(&page, "halakha_stage_late_deliveries_total", "stage=\"late-test\""),
        Some(1.0),
        "the late delivery is not counted:\n{page}"
    );
    // Handed back: the next pull has it at once, not after `ack_wait`.
    let mut again = c.fetch().max_messages(1).expires(Duration::from_secs(5)).messages().await.unwrap();
    let msg = again.next().await.expect("the message came back").unwrap();
    assert_eq!(msg.payload, bytes::Bytes::from("late"));
    assert_eq!(msg.info().unwrap().delivered, 2);
    env.cleanup().await;
}
