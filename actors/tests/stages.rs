//! Deterministic tests of the hot-path stages on event-time input: exact
//! aggregates, late and out-of-order readings, gaps, eviction, a flapping
//! threshold and a single injected anomaly.

use tributary_actors::reading::{Metric, Reading, Value};
use tributary_actors::stages::{
    millis, secs, AlertKind, Custom, CustomStage, Filter, Map, Operator, Output, ParamError,
    StageSpec, Threshold, Window, ZScore,
};

const MS: i64 = 1_000;

fn reading(device: &str, t_ms: i64, temperature: f64) -> Reading {
    Reading {
        device_id: device.into(),
        device_ts_us: t_ms * MS,
        edge_ts_us: t_ms * MS + 7,
        stream: None,
        metrics: vec![Metric {
            name: "temperature".into(),
            value: Value::F64(temperature),
            unit: Some("°C".into()),
        }],
    }
}

fn build(spec: impl Into<StageSpec>) -> Box<dyn Operator> {
    spec.into().build("stage-under-test").expect("valid spec")
}

/// (device, window start in ms, [(metric, value)]) of every emitted reading.
type Row = (String, i64, Vec<(String, f64)>);

fn rows(outputs: Vec<Output>) -> Vec<Row> {
    outputs
        .into_iter()
        .map(|o| match o {
            Output::Reading(r) => (
                r.device_id,
                r.device_ts_us / MS,
                r.metrics
                    .into_iter()
                    .map(|m| {
                        let v = match m.value {
                            Value::F64(v) => v,
                            Value::I64(v) => v as f64,
                            other => panic!("unexpected value {other:?}"),
                        };
                        (m.name, v)
                    })
                    .collect(),
            ),
            Output::Alert(a) => panic!("a window emitted an alert: {a:?}"),
        })
        .collect()
}

fn row(device: &str, start_ms: i64, metrics: &[(&str, f64)]) -> Row {
    (
        device.into(),
        start_ms,
        metrics.iter().map(|(n, v)| ((*n).into(), *v)).collect(),
    )
}

fn feed(op: &mut dyn Operator, readings: impl IntoIterator<Item = Reading>) -> Vec<Output> {
    readings.into_iter().flat_map(|r| op.handle(r)).collect()
}

#[test]
fn tumbling_window_emits_exact_aggregates_when_the_watermark_passes_and_nothing_for_gaps() {
    let mut w = build(Window::tumbling(secs(1)).all("temperature"));
    let early = feed(
        w.as_mut(),
        [
            reading("d", 100, 1.0),
            reading("d", 200, 2.0),
            reading("d", 300, 3.0),
            reading("d", 999, 4.0),
        ],
    );
    assert!(
        early.is_empty(),
        "nothing closes before the watermark passes 1 s"
    );

    let first = w.handle(reading("d", 1500, 10.0));
    let Output::Reading(r) = &first[0] else {
        panic!("expected a reading")
    };
    assert_eq!(
        r.edge_ts_us,
        999 * MS + 7,
        "the latest edge time of the window"
    );
    assert_eq!(r.metrics[1].unit.as_deref(), Some("°C"));
    assert_eq!(r.metrics[0].unit, None, "a count has no unit");
    assert_eq!(
        rows(first),
        vec![row(
            "d",
            0,
            &[
                ("temperature.count", 4.0),
                ("temperature.mean", 2.5),
                ("temperature.min", 1.0),
                ("temperature.max", 4.0),
                ("temperature.p95", 4.0),
            ],
        )]
    );

    // A gap from 2 s to 5 s: only the windows that saw readings are emitted.
    let out = rows(w.handle(reading("d", 5200, 20.0)));
    assert_eq!(
        out,
        vec![row(
            "d",
            1000,
            &[
                ("temperature.count", 1.0),
                ("temperature.mean", 10.0),
                ("temperature.min", 10.0),
                ("temperature.max", 10.0),
                ("temperature.p95", 10.0),
            ],
        )]
    );

    // The device falls silent; the driver moves time on.
    assert!(w.advance_watermark(5999 * MS).is_empty());
    let last = rows(w.advance_watermark(6000 * MS));
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].1, 5000);
    let stats = w.stats();
    assert_eq!(
        (stats.readings_in, stats.readings_out, stats.late),
        (6, 3, 0)
    );
}

#[test]
fn out_of_order_readings_within_the_lateness_count_and_later_ones_are_late() {
    let mut w = build(
        Window::tumbling(secs(1))
            .count("temperature")
            .mean("temperature")
            .allowed_lateness(millis(500)),
    );
    let quiet = feed(
        w.as_mut(),
        [
            reading("d", 100, 1.0),
            reading("d", 900, 2.0),
            // Watermark 700 ms: [0, 1 s) stays open.
            reading("d", 1200, 3.0),
            // Out of order, but not older than the watermark: aggregated.
            reading("d", 800, 4.0),
        ],
    );
    assert!(quiet.is_empty());
    // Watermark 1.1 s: [0, 1 s) closes with 1, 2 and 4.
    let closed = rows(w.handle(reading("d", 1600, 5.0)));
    assert_eq!(
        closed,
        vec![row(
            "d",
            0,
            &[("temperature.count", 3.0), ("temperature.mean", 7.0 / 3.0)]
        )]
    );
    // Both older than the watermark (1.1 s): late, though 1.05 s falls in an
    // open window; lateness is the contract, not the window.
    assert!(w.handle(reading("d", 1050, 100.0)).is_empty());
    assert!(w.handle(reading("d", 650, 100.0)).is_empty());
    assert_eq!(w.stats().late, 2);

    let rest = rows(w.advance_watermark(2000 * MS));
    assert_eq!(
        rest,
        vec![row(
            "d",
            1000,
            &[("temperature.count", 2.0), ("temperature.mean", 4.0)]
        )]
    );
}

#[test]
fn sliding_windows_overlap_and_close_in_start_order() {
    let mut w = build(
        Window::sliding(secs(2), secs(1))
            .count("temperature")
            .mean("temperature"),
    );
    let out = feed(
        w.as_mut(),
        [
            reading("d", 500, 1.0),
            reading("d", 1500, 3.0),
            reading("d", 2500, 5.0),
        ],
    );
    // At 2.5 s the watermark has passed the end of [-1 s, 1 s) and [0, 2 s).
    let mut all = rows(out);
    all.extend(rows(w.advance_watermark(10_000 * MS)));
    let expected = [
        (-1000, 1.0, 1.0),
        (0, 2.0, 2.0),
        (1000, 2.0, 4.0),
        (2000, 1.0, 5.0),
    ];
    assert_eq!(
        all,
        expected
            .iter()
            .map(|&(start, count, mean)| row(
                "d",
                start,
                &[("temperature.count", count), ("temperature.mean", mean)]
            ))
            .collect::<Vec<_>>()
    );
}

#[test]
fn p95_is_exact_up_to_the_bound_and_sampled_past_it() {
    // 1..=100 in a scrambled but fixed order.
    let values: Vec<f64> = (0..100).map(|i| ((i * 37) % 100 + 1) as f64).collect();
    let readings = |dev: &'static str| {
        values
            .clone()
            .into_iter()
            .enumerate()
            .map(move |(i, v)| reading(dev, i as i64, v))
    };

    let mut exact = build(Window::tumbling(secs(1)).p95("temperature"));
    feed(exact.as_mut(), readings("d"));
    assert_eq!(
        rows(exact.advance_watermark(1000 * MS)),
        vec![row("d", 0, &[("temperature.p95", 95.0)])]
    );

    let mut bounded = build(
        Window::tumbling(secs(1))
            .all("temperature")
            .window_readings_max(10),
    );
    feed(bounded.as_mut(), readings("d"));
    let out = rows(bounded.advance_watermark(1000 * MS));
    let m = &out[0].2;
    assert_eq!(m[0], ("temperature.count".into(), 100.0));
    assert_eq!(m[1], ("temperature.mean".into(), 50.5));
    assert_eq!(m[2], ("temperature.min".into(), 1.0));
    assert_eq!(m[3], ("temperature.max".into(), 100.0));
    assert!((1.0..=100.0).contains(&m[4].1) && m[4].1.fract() == 0.0);
    assert_eq!(bounded.stats().windows_sampled, 1);

    // The sample is deterministic: a replay gives the same p95.
    let mut again = build(
        Window::tumbling(secs(1))
            .all("temperature")
            .window_readings_max(10),
    );
    feed(again.as_mut(), readings("d"));
    assert_eq!(rows(again.advance_watermark(1000 * MS)), out);
}

#[test]
fn watermarks_are_per_device() {
    let mut w = build(Window::tumbling(secs(1)).count("temperature"));
    w.handle(reading("slow", 100, 1.0));
    // A device far ahead does not close another device's window or make its
    // readings late: device clocks and buffering differ.
    assert!(w.handle(reading("fast", 60_000, 1.0)).is_empty());
    assert!(w.handle(reading("slow", 500, 1.0)).is_empty());
    assert_eq!(
        rows(w.handle(reading("slow", 1000, 1.0))),
        vec![row("slow", 0, &[("temperature.count", 2.0)])]
    );
    assert_eq!(w.stats().late, 0);
}

#[test]
fn past_devices_max_the_least_recently_seen_device_is_evicted_and_its_windows_emitted() {
    let mut w = build(
        Window::tumbling(secs(1))
            .count("temperature")
            .devices_max(2),
    );
    w.handle(reading("a", 100, 1.0));
    w.handle(reading("b", 100, 1.0));
    w.handle(reading("b", 200, 1.0));
    let out = rows(w.handle(reading("c", 100, 1.0)));
    assert_eq!(out, vec![row("a", 0, &[("temperature.count", 1.0)])]);
    assert_eq!(w.stats().devices_evicted, 1);
    // "b" and "c" are still there.
    assert_eq!(
        rows(w.advance_watermark(1000 * MS)),
        vec![
            row("b", 0, &[("temperature.count", 2.0)]),
            row("c", 0, &[("temperature.count", 1.0)]),
        ]
    );
}

#[test]
fn readings_without_a_numeric_metric_are_skipped() {
    let mut w = build(Window::tumbling(secs(1)).count("temperature"));
    let mut text = reading("d", 100, 1.0);
    text.metrics[0].value = Value::Str("hot".into());
    let mut other = reading("d", 100, 1.0);
    other.metrics[0].name = "pressure".into();
    let mut integer = reading("d", 100, 1.0);
    integer.metrics[0].value = Value::I64(3);
    feed(w.as_mut(), [text, other, integer]);
    assert_eq!(w.stats().skipped, 2);
    assert_eq!(
        rows(w.advance_watermark(1000 * MS)),
        vec![row("d", 0, &[("temperature.count", 1.0)])]
    );
}

fn alert_times_s(outputs: &[Output]) -> Vec<i64> {
    outputs
        .iter()
        .map(|o| o.as_alert().expect("an alert").device_ts_us / (1000 * MS))
        .collect()
}

#[test]
fn a_flapping_threshold_alerts_once_per_held_stretch() {
    let mut t = build(Threshold::above("temperature", 90.0).for_at_least(secs(5)));
    // One reading a second. Above from 0 s to 2 s (too short), below at 3 s,
    // above from 4 s to 10 s, below at 11 s, above again from 12 s to 18 s.
    let series = [
        95.0, 96.0, 97.0, 80.0, 91.0, 91.0, 91.0, 91.0, 91.0, 91.0, 92.0, 85.0, 95.0, 95.0, 95.0,
        95.0, 95.0, 95.0, 95.0,
    ];
    let out = feed(
        t.as_mut(),
        series
            .iter()
            .enumerate()
            .map(|(s, &v)| reading("press-7", s as i64 * 1000, v)),
    );
    assert_eq!(alert_times_s(&out), vec![9, 17]);
    let a = out[0].as_alert().unwrap();
    assert_eq!(a.kind, AlertKind::ThresholdAbove);
    assert_eq!(a.stage, "stage-under-test");
    assert_eq!(a.device_id, "press-7");
    assert_eq!(a.metric, "temperature");
    assert_eq!(a.value, 91.0);
    assert_eq!(a.message, "temperature is 91, above 90 for 5 s");
    assert_eq!(t.stats().alerts_out, 2);
}

#[test]
fn threshold_below_fires_at_once_without_a_duration_and_ignores_older_readings() {
    let mut t = build(Threshold::below("temperature", 0.0));
    assert_eq!(alert_times_s(&t.handle(reading("d", 1000, -1.0))), vec![1]);
    assert!(
        t.handle(reading("d", 2000, -2.0)).is_empty(),
        "held: one alert"
    );
    // Older than the latest: it must not clear the condition.
    assert!(t.handle(reading("d", 500, 5.0)).is_empty());
    assert!(t.handle(reading("d", 3000, -3.0)).is_empty());
    assert_eq!(t.stats().out_of_order, 1);
    // Each device has its own state.
    let other = t.handle(reading("e", 3000, -3.0));
    assert_eq!(other[0].as_alert().unwrap().kind, AlertKind::ThresholdBelow);
}

/// A deterministic, bounded noise in [-1, 1].
fn noise(i: u64) -> f64 {
    let x = i
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

#[test]
fn one_injected_anomaly_gives_exactly_one_z_score_alert() {
    let mut z = build(ZScore::new("temperature", secs(60), 4.0));
    let out = feed(
        z.as_mut(),
        (0..300u64).map(|s| {
            let spike = if s == 150 { 30.0 } else { 0.0 };
            reading("d", s as i64 * 1000, 60.0 + noise(s) + spike)
        }),
    );
    assert_eq!(alert_times_s(&out), vec![150]);
    let a = out[0].as_alert().unwrap();
    assert_eq!(a.kind, AlertKind::ZScore);
    assert!(a.value > 85.0);
    assert!(a.message.contains("of 59 samples"), "{}", a.message);
}

#[test]
fn z_score_needs_its_minimum_samples_and_a_spread() {
    let mut z = build(ZScore::new("temperature", secs(60), 3.0).min_samples(5));
    // Four samples, then a spike: too few to judge.
    let early = feed(
        z.as_mut(),
        [1.0, 2.0, 1.0, 2.0, 50.0]
            .iter()
            .enumerate()
            .map(|(i, &v)| reading("d", i as i64 * 1000, v)),
    );
    assert!(early.is_empty());

    // A flat line has no spread: the score is undefined, nothing fires.
    let mut flat = build(ZScore::new("temperature", secs(60), 3.0).min_samples(5));
    let out = feed(
        flat.as_mut(),
        (0..20).map(|i| reading("d", i * 1000, if i == 19 { 21.0 } else { 20.0 })),
    );
    assert!(out.is_empty());
}

#[test]
fn z_score_forgets_samples_older_than_its_window() {
    let mut z = build(ZScore::new("temperature", secs(10), 3.0).min_samples(5));
    // Ten noisy samples, then a silence longer than the window: the next
    // reading has no history, so even a wild value cannot fire.
    feed(
        z.as_mut(),
        (0..10).map(|i| reading("d", i * 1000, 20.0 + noise(i as u64))),
    );
    assert!(z.handle(reading("d", 30_000, 500.0)).is_empty());
}

#[test]
fn filter_and_map_are_stateless() {
    let mut f = build(Filter::new(|r: &Reading| r.device_id.starts_with("line-3")));
    assert_eq!(f.handle(reading("line-3/a", 0, 1.0)).len(), 1);
    assert!(f.handle(reading("line-4/a", 0, 1.0)).is_empty());
    assert_eq!((f.stats().readings_in, f.stats().readings_out), (2, 1));

    let mut m = build(Map::new(|mut r: Reading| {
        for metric in &mut r.metrics {
            if let Value::F64(c) = metric.value {
                metric.value = Value::F64(c * 9.0 / 5.0 + 32.0);
                metric.unit = Some("°F".into());
            }
        }
        r
    }));
    let out = m.handle(reading("d", 0, 100.0));
    assert_eq!(
        out[0].as_reading().unwrap().metric("temperature"),
        Some(&Value::F64(212.0))
    );
}

struct EveryNth {
    n: u64,
    seen: u64,
}

impl CustomStage for EveryNth {
    fn name(&self) -> &str {
        "every-nth"
    }

    fn handle(&mut self, reading: Reading) -> Vec<Output> {
        self.seen += 1;
        if self.seen.is_multiple_of(self.n) {
            vec![Output::Reading(reading)]
        } else {
            Vec::new()
        }
    }
}

#[test]
fn a_custom_stage_gets_fresh_state_per_operator_and_is_counted() {
    let spec = StageSpec::from(Custom::new(|| EveryNth { n: 2, seen: 0 }));
    assert_eq!(format!("{spec:?}"), "Custom(\"every-nth\")");
    let mut a = spec.build("a").unwrap();
    assert!(a.handle(reading("d", 0, 1.0)).is_empty());
    assert_eq!(a.handle(reading("d", 1, 1.0)).len(), 1);
    // A second operator (another node, or a restart) starts from scratch.
    let mut b = spec.build("b").unwrap();
    assert!(b.handle(reading("d", 2, 1.0)).is_empty());
    assert_eq!((a.stats().readings_in, a.stats().readings_out), (2, 1));
}

#[test]
fn invalid_parameters_are_refused_before_running() {
    let err = |s: StageSpec| s.build("x").err().expect("refused");
    assert_eq!(
        err(Window::tumbling(secs(0)).mean("t").into()),
        ParamError::Zero {
            param: "window size"
        }
    );
    assert!(matches!(
        err(Window::sliding(secs(1), secs(2)).mean("t").into()),
        ParamError::SlideLongerThanSize { .. }
    ));
    assert!(matches!(
        err(Window::sliding(secs(100), millis(10)).mean("t").into()),
        ParamError::TooManyWindowsPerReading { got: 10_000 }
    ));
    assert_eq!(
        err(Window::tumbling(secs(1)).into()),
        ParamError::NoAggregates
    );
    assert!(matches!(
        err(Window::tumbling(secs(1)).mean("t").max("p").into()),
        ParamError::MixedMetrics { .. }
    ));
    assert!(matches!(
        err(Threshold::above("t", f64::NAN).into()),
        ParamError::NotFinite { .. }
    ));
    assert!(matches!(
        err(ZScore::new("t", secs(60), 0.0).into()),
        ParamError::OutOfRange { .. }
    ));
    assert!(matches!(
        err(ZScore::new("t", secs(60), 3.0).min_samples(1).into()),
        ParamError::OutOfRange { .. }
    ));
    assert_eq!(
        err(Window::tumbling(secs(1)).mean("t").devices_max(0).into()),
        ParamError::Zero {
            param: "devices_max"
        }
    );
}

#[test]
fn alerts_serialize_for_the_alerts_topic() {
    let mut t = build(Threshold::above("temperature", 90.0));
    let out = t.handle(reading("d", 1000, 95.0));
    let json: serde_json::Value =
        serde_json::from_slice(&out[0].as_alert().unwrap().to_json()).unwrap();
    assert_eq!(json["kind"], "threshold-above");
    assert_eq!(json["device_id"], "d");
    assert_eq!(json["device_ts_us"], 1_000_000);
    assert_eq!(json["value"], 95.0);
}
