//! Topology building: every validation error, and what each node runs.

use tributary_actors::reading::Reading;
use tributary_actors::stages::{
    secs, Custom, CustomStage, Filter, Output, ParamError, Threshold, Window, ZScore,
};
use tributary_actors::topology::{
    ComponentKind, EdgeSelector, Kafka, Mqtt, Role, Simulated, Topology, TopologyError,
};

fn factory() -> Result<Topology, TopologyError> {
    Topology::builder("factory")
        .edge("plant-a", |edge| {
            edge.source("sim", Simulated::devices(100).rate_hz(10.0))
                .source("mqtt", Mqtt::subscribe("plant-a/+/telemetry"))
                .stage(
                    "downsample",
                    "sim",
                    Window::tumbling(secs(1)).mean("temperature"),
                )
        })
        .edge(EdgeSelector::label("line-3"), |edge| {
            edge.source("line-3-sim", Simulated::devices(5))
        })
        .cloud(|cloud| {
            cloud
                .stage(
                    "overheat",
                    "downsample",
                    Threshold::above("temperature.mean", 90.0).for_at_least(secs(5)),
                )
                .stage(
                    "vibration",
                    ["mqtt", "line-3-sim"],
                    ZScore::new("vibration", secs(60), 4.0),
                )
                .sink("alerts", ["overheat", "vibration"], Kafka::topic("alerts"))
        })
        .build()
}

fn names<'a>(components: &[&'a tributary_actors::topology::Component]) -> Vec<&'a str> {
    components.iter().map(|c| c.name.as_str()).collect()
}

#[test]
fn the_factory_builds_and_each_node_gets_its_part() {
    let t = factory().expect("valid");
    assert_eq!(t.name(), "factory");

    let a = t.part_for("plant-a", &[], Role::Edge);
    assert_eq!(names(&a.sources), ["sim", "mqtt"]);
    assert_eq!(names(&a.stages), ["downsample"]);
    assert!(a.sinks.is_empty());
    // Raw "sim" readings stay on the edge: only the downsampled stream and the
    // MQTT stream (which the cloud reads) leave it.
    assert_eq!(a.uplink, ["mqtt", "downsample"]);

    // Matched by label, and only in the edge role.
    let line3 = t.part_for("edge-9", &["line-3"], Role::Edge);
    assert_eq!(names(&line3.sources), ["line-3-sim"]);
    assert_eq!(line3.uplink, ["line-3-sim"]);
    let by_label = t.part_for("edge-7", &["plant-a", "line-3"], Role::Edge);
    assert_eq!(names(&by_label.sources), ["sim", "mqtt", "line-3-sim"]);
    assert!(t.part_for("elsewhere", &["line-4"], Role::Edge).is_empty());
    assert!(t.part_for("plant-a", &[], Role::Cloud).sources.is_empty());

    let cloud = t.part_for("cloud-1", &[], Role::Cloud);
    assert!(cloud.sources.is_empty());
    assert_eq!(names(&cloud.stages), ["overheat", "vibration"]);
    assert_eq!(names(&cloud.sinks), ["alerts"]);
    assert_eq!(cloud.from_log, ["mqtt", "downsample", "line-3-sim"]);
    assert!(cloud.uplink.is_empty());
}

#[test]
fn a_topology_can_be_shared_between_threads() {
    fn shared<T: Send + Sync + Clone>() {}
    shared::<Topology>();
}

#[test]
fn components_come_out_in_topological_order() {
    // Declared before its input: still placed after it.
    let t = Topology::builder("t")
        .cloud(|c| c.sink("out", "hot", Kafka::topic("alerts")))
        .cloud(|c| c.stage("hot", "mean", Threshold::above("temperature.mean", 90.0)))
        .edge(EdgeSelector::all(), |e| {
            e.source("sim", Simulated::devices(1)).stage(
                "mean",
                "sim",
                Window::tumbling(secs(1)).mean("temperature"),
            )
        })
        .build()
        .unwrap();
    let order: Vec<_> = t.components().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(order, ["sim", "mean", "hot", "out"]);
    assert!(!t.part_for("any", &[], Role::Edge).is_empty());
}

fn one_source(
    name: &str,
) -> impl FnOnce(tributary_actors::topology::EdgeBuilder) -> tributary_actors::topology::EdgeBuilder + '_
{
    move |e| e.source(name, Simulated::devices(1))
}

#[test]
fn an_empty_topology_is_refused() {
    let err = Topology::builder("nothing").build().unwrap_err();
    assert_eq!(
        err,
        TopologyError::Empty {
            topology: "nothing".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "topology \"nothing\" has no source: nothing would flow"
    );
    // Stages without a source are empty too.
    let err = Topology::builder("t")
        .cloud(|c| c.stage("s", "x", Filter::new(|_| true)))
        .build()
        .unwrap_err();
    assert!(matches!(err, TopologyError::Empty { .. }));
}

#[test]
fn an_unknown_input_is_named() {
    let err = Topology::builder("t")
        .edge("e", |e| {
            e.source("sim", Simulated::devices(1)).stage(
                "mean",
                "smi",
                Window::tumbling(secs(1)).mean("t"),
            )
        })
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        TopologyError::UnknownInput {
            component: "mean".into(),
            input: "smi".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "\"mean\" reads \"smi\", which is not in the topology"
    );
}

#[test]
fn a_cycle_is_refused_with_its_path() {
    let keep = || Filter::new(|_| true);
    let err = Topology::builder("t")
        .edge("e", one_source("sim"))
        .cloud(|c| {
            c.stage("a", ["sim", "c"], keep())
                .stage("b", "a", keep())
                .stage("c", "b", keep())
        })
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        TopologyError::Cycle {
            path: vec!["a".into(), "b".into(), "c".into(), "a".into()]
        }
    );
    assert_eq!(err.to_string(), "cycle: a -> b -> c -> a");

    let err = Topology::builder("t")
        .edge("e", |e| {
            e.source("sim", Simulated::devices(1))
                .stage("self", ["sim", "self"], keep())
        })
        .build()
        .unwrap_err();
    assert_eq!(err.to_string(), "cycle: self -> self");
}

#[test]
fn a_duplicate_name_is_refused_across_placements() {
    let err = Topology::builder("t")
        .edge("e", one_source("sim"))
        .cloud(|c| c.sink("sim", "sim", Kafka::topic("readings")))
        .build()
        .unwrap_err();
    assert_eq!(err, TopologyError::DuplicateName { name: "sim".into() });
}

#[test]
fn a_stage_placed_where_its_input_does_not_exist_is_refused() {
    // An edge stage reading a cloud stage: data does not flow down.
    let err = Topology::builder("t")
        .edge("e", |e| {
            e.source("sim", Simulated::devices(1))
                .stage("local", "smooth", Filter::new(|_| true))
        })
        .cloud(|c| c.stage("smooth", "sim", Window::tumbling(secs(1)).mean("t")))
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        TopologyError::InputNotOnPlacement {
            component: "local".into(),
            placement: "edge \"e\"".into(),
            input: "smooth".into(),
            input_placement: "the cloud".into(),
        }
    );
    assert!(err
        .to_string()
        .contains("data flows from an edge to the cloud only"));

    // Nor does it flow sideways, between edge blocks.
    let err = Topology::builder("t")
        .edge("plant-a", one_source("a-sim"))
        .edge(EdgeSelector::id("plant-b"), |e| {
            e.stage("b-mean", "a-sim", Window::tumbling(secs(1)).mean("t"))
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(err, TopologyError::InputNotOnPlacement { ref component, .. } if component == "b-mean")
    );
}

#[test]
fn invalid_stage_parameters_are_refused() {
    let err = Topology::builder("t")
        .edge("e", |e| {
            e.source("sim", Simulated::devices(1)).stage(
                "mean",
                "sim",
                Window::tumbling(secs(0)).mean("t"),
            )
        })
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        TopologyError::InvalidParams {
            component: "mean".into(),
            error: ParamError::Zero {
                param: "window size"
            }
        }
    );
    assert_eq!(
        err.to_string(),
        "\"mean\" has invalid parameters: window size is zero"
    );

    let bad_source = Topology::builder("t")
        .edge("e", |e| e.source("sim", Simulated::devices(0)))
        .build()
        .unwrap_err();
    assert!(
        matches!(bad_source, TopologyError::InvalidParams { ref component, .. } if component == "sim")
    );

    let no_device_level = Topology::builder("t")
        .edge("e", |e| e.source("mqtt", Mqtt::subscribe("plant-a/#")))
        .build()
        .unwrap_err();
    assert!(matches!(
        no_device_level,
        TopologyError::InvalidParams { .. }
    ));

    let bad_topic = Topology::builder("t")
        .edge("e", one_source("sim"))
        .cloud(|c| c.sink("out", "sim", Kafka::topic("no spaces")))
        .build()
        .unwrap_err();
    assert!(
        matches!(bad_topic, TopologyError::InvalidParams { ref component, .. } if component == "out")
    );
}

#[test]
fn names_inputs_and_selectors_are_checked() {
    let bad_name = Topology::builder("t")
        .edge("e", one_source("has space"))
        .build()
        .unwrap_err();
    assert_eq!(
        bad_name,
        TopologyError::BadName {
            name: "has space".into()
        }
    );

    let no_input = Topology::builder("t")
        .edge("e", one_source("sim"))
        .cloud(|c| c.sink("out", Vec::<String>::new(), Kafka::topic("t")))
        .build()
        .unwrap_err();
    assert_eq!(
        no_input,
        TopologyError::NoInput {
            component: "out".into()
        }
    );

    let from_sink = Topology::builder("t")
        .edge("e", one_source("sim"))
        .cloud(|c| {
            c.sink("out", "sim", Kafka::topic("t"))
                .stage("after", "out", Filter::new(|_| true))
        })
        .build()
        .unwrap_err();
    assert!(matches!(from_sink, TopologyError::InputIsSink { .. }));

    let from_alerts = Topology::builder("t")
        .edge("e", one_source("sim"))
        .cloud(|c| {
            c.stage("hot", "sim", Threshold::above("t", 1.0)).stage(
                "mean",
                "hot",
                Window::tumbling(secs(1)).mean("t"),
            )
        })
        .build()
        .unwrap_err();
    assert_eq!(
        from_alerts,
        TopologyError::InputCarriesAlerts {
            component: "mean".into(),
            input: "hot".into()
        }
    );

    let empty_selector = Topology::builder("t")
        .edge("", one_source("sim"))
        .build()
        .unwrap_err();
    assert!(matches!(
        empty_selector,
        TopologyError::EmptySelector { .. }
    ));
}

struct Debounce {
    last: Option<String>,
}

impl CustomStage for Debounce {
    fn name(&self) -> &str {
        "debounce"
    }

    fn handle(&mut self, reading: Reading) -> Vec<Output> {
        let key = format!("{:?}", reading.metrics);
        if self.last.as_ref() == Some(&key) {
            return Vec::new();
        }
        self.last = Some(key);
        vec![Output::Reading(reading)]
    }
}

#[test]
fn a_custom_stage_plugs_into_the_builder_and_runs_from_the_part() {
    let t = Topology::builder("t")
        .edge("e", |e| {
            e.source("sim", Simulated::devices(1)).stage(
                "debounce",
                "sim",
                Custom::new(|| Debounce { last: None }),
            )
        })
        .cloud(|c| c.sink("out", "debounce", Kafka::topic("readings")))
        .build()
        .unwrap();
    let part = t.part_for("e", &[], Role::Edge);
    let ComponentKind::Stage(spec) = &part.stages[0].kind else {
        panic!("expected a stage")
    };
    let mut op = spec.build(&part.stages[0].name).unwrap();
    let r = Reading {
        device_id: "d".into(),
        device_ts_us: 0,
        edge_ts_us: 0,
        stream: None,
        metrics: vec![],
    };
    assert_eq!(op.handle(r.clone()).len(), 1);
    assert!(op.handle(r).is_empty());
    assert_eq!(part.uplink, ["debounce"]);
}
