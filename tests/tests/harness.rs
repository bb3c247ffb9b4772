//! The harness against a real Kafka: private brokers survive kill -9 with their committed
//! data, `consume_all` honours `read_committed`, and the checker reads the records back.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tributary_actors::reading::{Metric, Reading, Value};
use tributary_tests::broker::{
    create_topic, partition_count, shared_bootstrap, unique_topic, Broker,
};
use tributary_tests::checker::{
    check, consume_all, AckLog, ConsumedReading, EDGE_HEADER, EPOCH_HEADER, SEQ_HEADER,
};

/// The bound on every Kafka wait in these tests; the broker may be busy with other tests.
const KAFKA_WAIT: Duration = Duration::from_secs(60);

fn reading(device: &str, ts: i64) -> Reading {
    Reading {
        device_id: device.into(),
        device_ts_us: ts,
        edge_ts_us: ts + 1,
        stream: None,
        metrics: vec![Metric {
            name: "temperature".into(),
            value: Value::F64(20.5),
            unit: None,
        }],
    }
}

/// Whether to commit, and the records as (device, device_ts_us, seq).
type Batch<D> = (bool, Vec<(D, i64, u64)>);

/// One transaction per batch; a batch marked `false` is flushed to the log and aborted,
/// so that `read_committed` has something to skip.
fn produce_transactions(
    bootstrap: String,
    topic: String,
    transactional_id: String,
    batches: Vec<Batch<String>>,
) -> Result<(), KafkaError> {
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("transactional.id", &transactional_id)
        .set("enable.idempotence", "true")
        .create()?;
    producer.init_transactions(KAFKA_WAIT)?;
    for (commit, records) in batches {
        producer.begin_transaction()?;
        for (device, ts, seq) in records {
            let value = reading(&device, ts).to_json();
            let seq = seq.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: EDGE_HEADER,
                    value: Some("edge-h"),
                })
                .insert(Header {
                    key: EPOCH_HEADER,
                    value: Some("1"),
                })
                .insert(Header {
                    key: SEQ_HEADER,
                    value: Some(seq.as_str()),
                });
            producer
                .send(
                    BaseRecord::to(&topic)
                        .key(&device)
                        .payload(&value)
                        .headers(headers),
                )
                .map_err(|(e, _)| e)?;
        }
        if commit {
            producer.commit_transaction(KAFKA_WAIT)?;
        } else {
            producer.flush(KAFKA_WAIT)?;
            producer.abort_transaction(KAFKA_WAIT)?;
        }
    }
    Ok(())
}

async fn produce(bootstrap: &str, topic: &str, transactional_id: &str, batches: Vec<Batch<&str>>) {
    let batches = batches
        .into_iter()
        .map(|(c, rs)| {
            (
                c,
                rs.into_iter()
                    .map(|(d, t, s)| (d.to_owned(), t, s))
                    .collect(),
            )
        })
        .collect();
    let (b, t, id) = (
        bootstrap.to_owned(),
        topic.to_owned(),
        transactional_id.to_owned(),
    );
    tokio::task::spawn_blocking(move || produce_transactions(b, t, id, batches))
        .await
        .expect("the producing task ran")
        .expect("transactions go through");
}

fn keys(records: &[ConsumedReading]) -> BTreeSet<(String, i64)> {
    records
        .iter()
        .map(|r| (r.device_id.clone(), r.device_ts_us))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_broker_keeps_committed_transactions_across_kill_and_restart() {
    let mut broker = Broker::start_private()
        .await
        .expect("a private broker starts");
    let bootstrap = broker.bootstrap();
    let topic = unique_topic("harness-txn");
    create_topic(&bootstrap, &topic, 2, false)
        .await
        .expect("the topic is created");
    let txn_id = unique_topic("harness-producer");

    produce(
        &bootstrap,
        &topic,
        &txn_id,
        vec![
            (true, vec![("press-1", 100, 1), ("pump-2", 200, 2)]),
            (false, vec![("press-1", 101, 3)]),
        ],
    )
    .await;

    let consumed = consume_all(&bootstrap, &topic, 2, KAFKA_WAIT)
        .await
        .expect("consumed");
    let committed: BTreeSet<_> = [("press-1".to_string(), 100), ("pump-2".to_string(), 200)].into();
    assert_eq!(
        keys(&consumed),
        committed,
        "read_committed sees exactly the committed txn"
    );
    assert_eq!(consumed.len(), 2);
    let press = consumed.iter().find(|r| r.device_id == "press-1").unwrap();
    assert_eq!(
        (press.edge.as_deref(), press.epoch, press.seq),
        (Some("edge-h"), Some(1), Some(1)),
        "the headers are decoded"
    );

    let acks = AckLog {
        acked: committed.iter().cloned().collect(),
        dropped: Default::default(),
    };
    let report = check(&consumed, &acks);
    assert!(
        report.is_exactly_once() && report.unexpected.is_empty(),
        "{report}"
    );

    broker.kill().await.expect("kill -9 the broker");
    broker
        .restart()
        .await
        .expect("the broker restarts on its data");

    let again = consume_all(&bootstrap, &topic, 2, KAFKA_WAIT)
        .await
        .expect("consumed again");
    assert_eq!(keys(&again), committed, "committed data survives kill -9");
    assert_eq!(again.len(), 2);

    // The transaction coordinator recovered too: the same transactional id commits again.
    produce(
        &bootstrap,
        &topic,
        &txn_id,
        vec![(true, vec![("pump-2", 201, 4)])],
    )
    .await;
    let after = consume_all(&bootstrap, &topic, 3, KAFKA_WAIT)
        .await
        .expect("consumed after");
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(keys(&after).contains(&("pump-2".to_string(), 201)));

    broker.stop().await.expect("a graceful stop");
    assert!(!broker.is_running());
}

#[tokio::test]
async fn shared_broker_makes_compacted_topics_and_reads_empty_ones_to_the_end() {
    let bootstrap = shared_bootstrap();
    let topic = unique_topic("harness-compacted");
    create_topic(&bootstrap, &topic, 3, true)
        .await
        .expect("the topic is created");
    // Creating it again is not an error: scenarios may share setup code.
    create_topic(&bootstrap, &topic, 3, true)
        .await
        .expect("creation is idempotent");
    assert_eq!(partition_count(&bootstrap, &topic).await.unwrap(), 3);

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let configs = admin
        .describe_configs([&ResourceSpecifier::Topic(&topic)], &AdminOptions::new())
        .await
        .unwrap();
    let config = configs.into_iter().next().unwrap().unwrap();
    let policy = config.get("cleanup.policy").and_then(|e| e.value.clone());
    assert_eq!(policy.as_deref(), Some("compact"));

    // Fewer records than expected, but every partition is at its end: the records are
    // returned when the time is up, for the checker to name what is missing.
    let consumed = consume_all(&bootstrap, &topic, 1, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(consumed.is_empty(), "{consumed:?}");
}
