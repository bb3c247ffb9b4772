use std::time::Instant;
use tributary_actors::reading::{Metric, Reading, Value};
use tributary_actors::sink::kafka::{KafkaLog, KafkaSinkConfig};
use tributary_actors::sink::{Hwm, LogSink, SegmentBatch};

#[test]
fn bench() {
    let id = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let config = KafkaSinkConfig {
        readings_topic: format!("bench.{id}.r"),
        hwm_topic: format!("bench.{id}.h"),
        ..KafkaSinkConfig::new(std::env::var("TRIBUTARY_KAFKA_BOOTSTRAP").unwrap())
    };
    let log = KafkaLog::new(config).unwrap();
    let mut w = log.open_edge("edge-bench").unwrap();
    w.high_water_mark().unwrap();
    let mk = |seq: u64| SegmentBatch {
        seq,
        readings: (0..1000)
            .map(|i| Reading {
                device_id: format!("dev-{}", i % 50),
                device_ts_us: i as i64,
                edge_ts_us: i as i64,
                metrics: vec![Metric {
                    name: "t".into(),
                    value: Value::F64(1.5),
                    unit: Some("C".into()),
                }],
            })
            .collect(),
    };
    let sample = serde_json::to_vec(&mk(0).readings[0]).unwrap().len();
    for per_commit in [1usize, 5] {
        let n = 40 / per_commit;
        let mut seq = 1000 * per_commit as u64;
        let t = Instant::now();
        let mut lat = vec![];
        for _ in 0..n {
            let batches: Vec<_> = (0..per_commit)
                .map(|_| {
                    seq += 1;
                    mk(seq)
                })
                .collect();
            let t1 = Instant::now();
            w.commit("edge-bench", Hwm { epoch: 1, seq }, &batches)
                .unwrap();
            lat.push(t1.elapsed());
        }
        let el = t.elapsed();
        lat.sort();
        eprintln!("{per_commit} x 1000 per commit: {n} commits, {:.0} records/s, commit p50 {:?} max {:?}, reading json {sample} B",
            (n * per_commit * 1000) as f64 / el.as_secs_f64(), lat[lat.len()/2], lat[lat.len()-1]);
    }
    eprintln!("{:?}", log.counters().snapshot());
}
