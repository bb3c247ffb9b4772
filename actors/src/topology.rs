//! Topologies defined in code: sources, stages and sinks placed on edge or
//! cloud nodes.
//!
//! ```
//! use tributary_actors::stages::{secs, Threshold, Window};
//! use tributary_actors::topology::{Kafka, Mqtt, Simulated, Topology};
//!
//! let topology = Topology::builder("factory")
//!     .edge("plant-a", |edge| edge
//!         .source("sim", Simulated::devices(100).rate_hz(10.0))
//!         .source("mqtt", Mqtt::subscribe("plant-a/+/telemetry"))
//!         .stage("downsample", "sim", Window::tumbling(secs(1)).mean("temperature")))
//!     .cloud(|cloud| cloud
//!         .stage("overheat", "downsample",
//!             Threshold::above("temperature.mean", 90.0).for_at_least(secs(5)))
//!         .sink("alerts", "overheat", Kafka::topic("alerts")))
//!     .build()?;
//! assert_eq!(topology.components().len(), 5);
//! # Ok::<(), tributary_actors::topology::TopologyError>(())
//! ```
//!
//! # Design
//! - **A value.** A [`Topology`] is plain data (specs, not running state), so
//!   one value can run in one process or be split across nodes: each node asks
//!   [`Topology::part_for`] what it runs and builds fresh operators from the
//!   specs.
//! - **Placement.** Sources run on edges; stages on edges (preprocessing
//!   before the outbox) or on the cloud; sinks on the cloud. The builder's
//!   shape enforces that. An edge block runs on every edge node its
//!   [`EdgeSelector`] matches, by node id or label.
//! - **Data flows edge to cloud.** A cloud component may read any stream; an
//!   edge component only streams of its own edge block, since edges do not
//!   exchange data and the cloud sends none down.
//! - **Validated before anything starts.** [`TopologyBuilder::build`] returns
//!   the first problem found as a [`TopologyError`]; a built topology is
//!   acyclic and stored in topological order.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

pub use tributary_cluster::tls::Role;

use crate::edge::device::Signal;
use crate::stages::{ParamError, StageSpec, StreamKind};

/// Component names become parts of actor names and of log record headers.
pub const NAME_BYTES_MAX: usize = crate::reading::STREAM_NAME_BYTES_MAX;
/// A simulated device ticks at most once per millisecond.
pub const SIMULATED_RATE_HZ_MAX: f64 = 1000.0;
/// Kafka's own limit on a topic name.
pub const KAFKA_TOPIC_BYTES_MAX: usize = 249;

/// Why a topology was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    #[error("topology {topology:?} has no source: nothing would flow")]
    Empty { topology: String },
    #[error("{name:?} is not a valid name: use 1 to {NAME_BYTES_MAX} ASCII letters, digits, '-', '_' or '.'")]
    BadName { name: String },
    #[error("the name {name:?} is used twice")]
    DuplicateName { name: String },
    #[error("{component:?} is placed on an edge selector that is empty")]
    EmptySelector { component: String },
    #[error("{component:?} has invalid parameters: {error}")]
    InvalidParams {
        component: String,
        #[source]
        error: ParamError,
    },
    #[error("{component:?} has no input")]
    NoInput { component: String },
    #[error("{component:?} reads {input:?}, which is not in the topology")]
    UnknownInput { component: String, input: String },
    #[error("{component:?} reads {input:?}, which is a sink and has no output")]
    InputIsSink { component: String, input: String },
    #[error("stage {component:?} reads {input:?}, which emits alerts: stages take readings, so send alerts to a sink")]
    InputCarriesAlerts { component: String, input: String },
    #[error("{component:?} runs on {placement} but reads {input:?}, which runs on {input_placement}: data flows from an edge to the cloud only, and edges do not exchange data")]
    InputNotOnPlacement {
        component: String,
        placement: String,
        input: String,
        input_placement: String,
    },
    #[error("{component:?} raises alerts but is placed on an edge: alerts are written exactly once by the cloud, so place detectors on the cloud (edge stages may filter, map and window)")]
    AlertsOnEdge { component: String },
    /// The path follows the data: each component reads the one before it.
    #[error("cycle: {}", path.join(" -> "))]
    Cycle { path: Vec<String> },
}

/// Which edge nodes run an edge block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeSelector {
    /// A node with this id, or carrying this label: what a plain string means.
    IdOrLabel(String),
    Id(String),
    Label(String),
    All,
}

impl EdgeSelector {
    pub fn id(id: impl Into<String>) -> Self {
        EdgeSelector::Id(id.into())
    }

    pub fn label(label: impl Into<String>) -> Self {
        EdgeSelector::Label(label.into())
    }

    pub fn all() -> Self {
        EdgeSelector::All
    }

    pub fn matches(&self, node_id: &str, labels: &[&str]) -> bool {
        match self {
            EdgeSelector::IdOrLabel(s) => node_id == s || labels.contains(&s.as_str()),
            EdgeSelector::Id(id) => node_id == id,
            EdgeSelector::Label(l) => labels.contains(&l.as_str()),
            EdgeSelector::All => true,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            EdgeSelector::IdOrLabel(s) | EdgeSelector::Id(s) | EdgeSelector::Label(s) => {
                s.is_empty()
            }
            EdgeSelector::All => false,
        }
    }
}

impl From<&str> for EdgeSelector {
    fn from(s: &str) -> Self {
        EdgeSelector::IdOrLabel(s.to_owned())
    }
}

impl From<String> for EdgeSelector {
    fn from(s: String) -> Self {
        EdgeSelector::IdOrLabel(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Edge(EdgeSelector),
    Cloud,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Edge(EdgeSelector::IdOrLabel(s)) => write!(f, "edge {s:?}"),
            Placement::Edge(EdgeSelector::Id(s)) => write!(f, "edge id {s:?}"),
            Placement::Edge(EdgeSelector::Label(s)) => write!(f, "edges labelled {s:?}"),
            Placement::Edge(EdgeSelector::All) => f.write_str("every edge"),
            Placement::Cloud => f.write_str("the cloud"),
        }
    }
}

/// Simulated devices: `Simulated::devices(100).rate_hz(10.0)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulated {
    pub devices: usize,
    pub rate_hz: f64,
    pub seed: u64,
    /// Device ids are `<prefix><index>`.
    pub id_prefix: String,
    pub signal: Signal,
}

impl Simulated {
    pub fn devices(count: usize) -> Self {
        Self {
            devices: count,
            rate_hz: 1.0,
            seed: 0,
            id_prefix: "sim-".into(),
            signal: Signal::default(),
        }
    }

    pub fn rate_hz(mut self, hz: f64) -> Self {
        self.rate_hz = hz;
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn id_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.id_prefix = prefix.into();
        self
    }

    pub fn signal(mut self, signal: Signal) -> Self {
        self.signal = signal;
        self
    }

    /// The period between a device's readings.
    pub fn interval_ms(&self) -> u64 {
        (1000.0 / self.rate_hz).round().max(1.0) as u64
    }

    /// The devices this source runs on an edge, stamping `stream` on their
    /// readings; they run until stopped.
    pub fn devices_config(&self, stream: &str) -> crate::edge::DevicesConfig {
        crate::edge::DevicesConfig {
            count: self.devices,
            interval_ms: self.interval_ms(),
            signal: self.signal.clone(),
            seed: self.seed,
            id_prefix: self.id_prefix.clone(),
            readings_max: 0,
            stream: Some(stream.to_string()),
            stop_at_us: None,
        }
    }

    fn validate(&self) -> Result<(), ParamError> {
        if self.devices == 0 {
            return Err(ParamError::Zero {
                param: "simulated devices",
            });
        }
        if !(self.rate_hz > 0.0 && self.rate_hz <= SIMULATED_RATE_HZ_MAX) {
            return Err(ParamError::OutOfRange {
                param: "rate_hz",
                got: self.rate_hz.to_string(),
                expected: "above 0 and at most 1000",
            });
        }
        Ok(())
    }
}

/// Devices publishing to an MQTT broker: `Mqtt::subscribe("plant-a/+/telemetry")`.
/// The first `+` level of a message's topic is its device id.
#[derive(Debug, Clone, PartialEq)]
pub struct Mqtt {
    pub topic_filter: String,
    pub qos: u8,
}

impl Mqtt {
    /// Subscribes with QoS 1: a message is acked once its reading is in the outbox.
    pub fn subscribe(topic_filter: impl Into<String>) -> Self {
        Self {
            topic_filter: topic_filter.into(),
            qos: 1,
        }
    }

    pub fn qos(mut self, qos: u8) -> Self {
        self.qos = qos;
        self
    }

    /// The index of the topic level that names the device.
    pub fn device_level(&self) -> Option<usize> {
        self.topic_filter.split('/').position(|l| l == "+")
    }

    fn validate(&self) -> Result<(), ParamError> {
        let levels: Vec<_> = self.topic_filter.split('/').collect();
        let wildcard_ok = levels.iter().enumerate().all(|(i, l)| {
            (*l == "#" && i + 1 == levels.len()) || !l.contains(['#', '+']) || *l == "+"
        });
        if self.topic_filter.is_empty() || !wildcard_ok || self.device_level().is_none() {
            return Err(ParamError::OutOfRange {
                param: "MQTT topic filter",
                got: format!("{:?}", self.topic_filter),
                expected: "a valid filter with a + level for the device id",
            });
        }
        if self.qos > 2 {
            return Err(ParamError::OutOfRange {
                param: "MQTT QoS",
                got: self.qos.to_string(),
                expected: "0, 1 or 2",
            });
        }
        Ok(())
    }
}

/// A Kafka topic on the cloud's cluster: `Kafka::topic("alerts")`. Written
/// exactly once, in the transaction that commits the consumed offsets.
#[derive(Debug, Clone, PartialEq)]
pub struct Kafka {
    pub topic: String,
}

impl Kafka {
    pub fn topic(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
        }
    }

    fn validate(&self) -> Result<(), ParamError> {
        let t = &self.topic;
        let legal = t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if t.is_empty() || t.len() > KAFKA_TOPIC_BYTES_MAX || !legal || t == "." || t == ".." {
            return Err(ParamError::OutOfRange {
                param: "Kafka topic",
                got: format!("{t:?}"),
                expected: "1 to 249 ASCII letters, digits, '.', '_' or '-'",
            });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Simulated(Simulated),
    Mqtt(Mqtt),
}

impl From<Simulated> for Source {
    fn from(s: Simulated) -> Self {
        Source::Simulated(s)
    }
}

impl From<Mqtt> for Source {
    fn from(s: Mqtt) -> Self {
        Source::Mqtt(s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Sink {
    Kafka(Kafka),
}

impl From<Kafka> for Sink {
    fn from(s: Kafka) -> Self {
        Sink::Kafka(s)
    }
}

#[derive(Debug, Clone)]
pub enum ComponentKind {
    Source(Source),
    Stage(StageSpec),
    Sink(Sink),
}

/// One source, stage or sink of a topology.
#[derive(Debug, Clone)]
pub struct Component {
    pub name: String,
    pub placement: Placement,
    /// The names of the streams it reads; empty for a source.
    pub inputs: Vec<String>,
    pub kind: ComponentKind,
}

impl Component {
    fn new(
        name: impl Into<String>,
        placement: Placement,
        inputs: Vec<String>,
        kind: ComponentKind,
    ) -> Self {
        Self {
            name: name.into(),
            placement,
            inputs,
            kind,
        }
    }

    /// What it emits; `None` for a sink.
    pub fn output(&self) -> Option<StreamKind> {
        match &self.kind {
            ComponentKind::Source(_) => Some(StreamKind::Readings),
            ComponentKind::Stage(s) => Some(s.output()),
            ComponentKind::Sink(_) => None,
        }
    }

    fn validate(&self) -> Result<(), ParamError> {
        match &self.kind {
            ComponentKind::Source(Source::Simulated(s)) => s.validate(),
            ComponentKind::Source(Source::Mqtt(m)) => m.validate(),
            ComponentKind::Stage(s) => s.validate(),
            ComponentKind::Sink(Sink::Kafka(k)) => k.validate(),
        }
    }
}

/// The inputs of a stage or sink: one name, or several.
pub trait Inputs {
    fn into_inputs(self) -> Vec<String>;
}

impl Inputs for &str {
    fn into_inputs(self) -> Vec<String> {
        vec![self.to_owned()]
    }
}

impl Inputs for String {
    fn into_inputs(self) -> Vec<String> {
        vec![self]
    }
}

impl<const N: usize> Inputs for [&str; N] {
    fn into_inputs(self) -> Vec<String> {
        self.iter().map(|s| (*s).to_owned()).collect()
    }
}

impl Inputs for Vec<String> {
    fn into_inputs(self) -> Vec<String> {
        self
    }
}

impl Inputs for Vec<&str> {
    fn into_inputs(self) -> Vec<String> {
        self.into_iter().map(str::to_owned).collect()
    }
}

/// Listing an input twice would deliver its readings twice.
fn dedup(inputs: impl Inputs) -> Vec<String> {
    let mut seen = HashSet::new();
    inputs
        .into_inputs()
        .into_iter()
        .filter(|i| seen.insert(i.clone()))
        .collect()
}

/// A validated topology, its components in topological order (each after
/// its inputs, otherwise in declaration order).
#[derive(Debug, Clone)]
pub struct Topology {
    name: String,
    components: Vec<Component>,
}

/// What one node runs.
#[derive(Debug, Clone, Default)]
pub struct Part<'a> {
    pub sources: Vec<&'a Component>,
    /// In topological order: start and feed them in this order.
    pub stages: Vec<&'a Component>,
    pub sinks: Vec<&'a Component>,
    /// Streams this edge node produces that leave it, through the outbox:
    /// those the cloud reads, and those nothing reads (which go to the log).
    pub uplink: Vec<&'a str>,
    /// Edge streams that this cloud node's components read from the log.
    pub from_log: Vec<&'a str>,
}

impl Part<'_> {
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.stages.is_empty() && self.sinks.is_empty()
    }
}

impl Topology {
    pub fn builder(name: impl Into<String>) -> TopologyBuilder {
        TopologyBuilder {
            name: name.into(),
            components: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every component, in topological order.
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// What the node `node_id`, carrying `labels`, runs in `role`. A process
    /// that plays both roles asks once per role.
    pub fn part_for(&self, node_id: &str, labels: &[&str], role: Role) -> Part<'_> {
        let runs_here = |c: &Component| match (&c.placement, role) {
            (Placement::Edge(sel), Role::Edge) => sel.matches(node_id, labels),
            (Placement::Cloud, Role::Cloud) => true,
            _ => false,
        };
        let mut part = Part::default();
        for c in self.components.iter().filter(|c| runs_here(c)) {
            match c.kind {
                ComponentKind::Source(_) => part.sources.push(c),
                ComponentKind::Stage(_) => part.stages.push(c),
                ComponentKind::Sink(_) => part.sinks.push(c),
            }
        }
        match role {
            Role::Edge => {
                part.uplink = part
                    .sources
                    .iter()
                    .chain(&part.stages)
                    .filter(|c| {
                        let mut readers = self
                            .components
                            .iter()
                            .filter(|r| r.inputs.contains(&c.name))
                            .peekable();
                        readers.peek().is_none() || readers.any(|r| r.placement == Placement::Cloud)
                    })
                    .map(|c| c.name.as_str())
                    .collect();
            }
            Role::Cloud => {
                let mut from_log = BTreeSet::new();
                for c in part.stages.iter().chain(&part.sinks) {
                    for i in &c.inputs {
                        if let Some(input) = self.component(i) {
                            if matches!(input.placement, Placement::Edge(_)) {
                                from_log.insert(input.name.as_str());
                            }
                        }
                    }
                }
                // In topological order rather than by name, like everything else.
                part.from_log = self
                    .components
                    .iter()
                    .map(|c| c.name.as_str())
                    .filter(|n| from_log.contains(n))
                    .collect();
            }
        }
        part
    }
}

pub struct TopologyBuilder {
    name: String,
    components: Vec<Component>,
}

impl TopologyBuilder {
    /// Sources and stages that run on every edge node `selector` matches.
    pub fn edge(
        mut self,
        selector: impl Into<EdgeSelector>,
        block: impl FnOnce(EdgeBuilder) -> EdgeBuilder,
    ) -> Self {
        let edge = block(EdgeBuilder {
            placement: Placement::Edge(selector.into()),
            components: Vec::new(),
        });
        self.components.extend(edge.components);
        self
    }

    /// Stages and sinks that run on the cloud.
    pub fn cloud(mut self, block: impl FnOnce(CloudBuilder) -> CloudBuilder) -> Self {
        let cloud = block(CloudBuilder {
            components: Vec::new(),
        });
        self.components.extend(cloud.components);
        self
    }

    /// Checks the topology, in this order: that it has a source, names,
    /// selectors, parameters, inputs (existence, kind, placement), and cycles.
    pub fn build(self) -> Result<Topology, TopologyError> {
        let components = self.components;
        if !components
            .iter()
            .any(|c| matches!(c.kind, ComponentKind::Source(_)))
        {
            return Err(TopologyError::Empty {
                topology: self.name,
            });
        }
        let mut by_name = HashMap::new();
        for (i, c) in components.iter().enumerate() {
            if !valid_name(&c.name) {
                return Err(TopologyError::BadName {
                    name: c.name.clone(),
                });
            }
            if by_name.insert(c.name.as_str(), i).is_some() {
                return Err(TopologyError::DuplicateName {
                    name: c.name.clone(),
                });
            }
        }
        for c in &components {
            if matches!(&c.placement, Placement::Edge(sel) if sel.is_empty()) {
                return Err(TopologyError::EmptySelector {
                    component: c.name.clone(),
                });
            }
            c.validate().map_err(|error| TopologyError::InvalidParams {
                component: c.name.clone(),
                error,
            })?;
            if matches!(c.placement, Placement::Edge(_)) && c.output() == Some(StreamKind::Alerts) {
                return Err(TopologyError::AlertsOnEdge {
                    component: c.name.clone(),
                });
            }
        }
        for c in &components {
            check_inputs(c, &components, &by_name)?;
        }
        let order = topological_order(&components, &by_name)?;
        let mut slots: Vec<_> = components.into_iter().map(Some).collect();
        let components = order.into_iter().filter_map(|i| slots[i].take()).collect();
        Ok(Topology {
            name: self.name,
            components,
        })
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_inputs(
    c: &Component,
    components: &[Component],
    by_name: &HashMap<&str, usize>,
) -> Result<(), TopologyError> {
    if matches!(c.kind, ComponentKind::Source(_)) {
        return Ok(());
    }
    if c.inputs.is_empty() {
        return Err(TopologyError::NoInput {
            component: c.name.clone(),
        });
    }
    for name in &c.inputs {
        let Some(input) = by_name.get(name.as_str()).map(|&i| &components[i]) else {
            return Err(TopologyError::UnknownInput {
                component: c.name.clone(),
                input: name.clone(),
            });
        };
        let err_input = || (c.name.clone(), name.clone());
        match input.output() {
            None => {
                let (component, input) = err_input();
                return Err(TopologyError::InputIsSink { component, input });
            }
            Some(StreamKind::Alerts) if matches!(c.kind, ComponentKind::Stage(_)) => {
                let (component, input) = err_input();
                return Err(TopologyError::InputCarriesAlerts { component, input });
            }
            Some(_) => {}
        }
        let reachable = match (&c.placement, &input.placement) {
            (Placement::Cloud, _) => true,
            (Placement::Edge(here), Placement::Edge(there)) => here == there,
            (Placement::Edge(_), Placement::Cloud) => false,
        };
        if !reachable {
            return Err(TopologyError::InputNotOnPlacement {
                component: c.name.clone(),
                placement: c.placement.to_string(),
                input: name.clone(),
                input_placement: input.placement.to_string(),
            });
        }
    }
    Ok(())
}

/// Kahn's algorithm, taking the earliest declared component among the ready
/// ones so that the order is stable; what is left over holds a cycle.
fn topological_order(
    components: &[Component],
    by_name: &HashMap<&str, usize>,
) -> Result<Vec<usize>, TopologyError> {
    let inputs: Vec<Vec<usize>> = components
        .iter()
        .map(|c| c.inputs.iter().map(|i| by_name[i.as_str()]).collect())
        .collect();
    let mut readers = vec![Vec::new(); components.len()];
    for (i, ins) in inputs.iter().enumerate() {
        for &j in ins {
            readers[j].push(i);
        }
    }
    let mut waiting: Vec<usize> = inputs.iter().map(Vec::len).collect();
    let mut ready: BTreeSet<usize> = (0..components.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(components.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &r in &readers[i] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.insert(r);
            }
        }
    }
    if order.len() == components.len() {
        return Ok(order);
    }
    // Every component left waits on another one left, so walking inputs
    // among them must come back to a component already visited.
    let left = |i: usize| waiting[i] > 0;
    let mut walk: Vec<usize> = Vec::new();
    let mut at = (0..components.len())
        .find(|&i| left(i))
        .expect("a component is left over");
    while !walk.contains(&at) {
        walk.push(at);
        at = *inputs[at]
            .iter()
            .find(|&&j| left(j))
            .expect("a left-over component reads another left-over one");
    }
    let start = walk.iter().position(|&i| i == at).expect("just found");
    let mut cycle: Vec<usize> = walk[start..].iter().rev().copied().collect();
    // Start from the earliest declared member, as a reader would.
    let first = (0..cycle.len()).min_by_key(|&k| cycle[k]).unwrap_or(0);
    cycle.rotate_left(first);
    cycle.push(cycle[0]);
    let path = cycle.iter().map(|&i| components[i].name.clone()).collect();
    Err(TopologyError::Cycle { path })
}

/// The sources and stages of one edge block.
pub struct EdgeBuilder {
    placement: Placement,
    components: Vec<Component>,
}

impl EdgeBuilder {
    pub fn source(mut self, name: impl Into<String>, source: impl Into<Source>) -> Self {
        self.components.push(Component::new(
            name,
            self.placement.clone(),
            Vec::new(),
            ComponentKind::Source(source.into()),
        ));
        self
    }

    /// A stage reading `inputs` (a name, or an array of names) of this block.
    pub fn stage(
        mut self,
        name: impl Into<String>,
        inputs: impl Inputs,
        stage: impl Into<StageSpec>,
    ) -> Self {
        self.components.push(Component::new(
            name,
            self.placement.clone(),
            dedup(inputs),
            ComponentKind::Stage(stage.into()),
        ));
        self
    }
}

/// The stages and sinks of the cloud.
pub struct CloudBuilder {
    components: Vec<Component>,
}

impl CloudBuilder {
    /// A stage reading `inputs`: any edge's streams (through the log) or
    /// other cloud stages.
    pub fn stage(
        mut self,
        name: impl Into<String>,
        inputs: impl Inputs,
        stage: impl Into<StageSpec>,
    ) -> Self {
        self.components.push(Component::new(
            name,
            Placement::Cloud,
            dedup(inputs),
            ComponentKind::Stage(stage.into()),
        ));
        self
    }

    pub fn sink(
        mut self,
        name: impl Into<String>,
        inputs: impl Inputs,
        sink: impl Into<Sink>,
    ) -> Self {
        self.components.push(Component::new(
            name,
            Placement::Cloud,
            dedup(inputs),
            ComponentKind::Sink(sink.into()),
        ));
        self
    }
}
