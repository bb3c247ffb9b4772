//! A small cluster of real `node` processes for scenario tests: one cloud node
//! writing into Kafka and any number of edges, each optionally behind a fault
//! proxy, all with their own certificates, topics and directories.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::broker::unique_topic;
use crate::checker::{check, consume_all, read_ack_logs, AckLog, Report};
use crate::process::{node_binary, NodeProcess};
use crate::proxy::UdpProxy;

/// Bound on waiting for a node to start or reach a state.
pub const NODE_READY: Duration = Duration::from_secs(60);
/// Bound on a whole workload reaching Kafka.
pub const DRAIN: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);

/// How an edge's simulated devices behave.
#[derive(Debug, Clone)]
pub struct Workload {
    pub devices: usize,
    pub rate_hz: f64,
    /// Readings each device sends before it stops.
    pub readings: u64,
}

impl Workload {
    pub fn total(&self) -> usize {
        self.devices * self.readings as usize
    }
}

pub struct Edge {
    pub id: String,
    pub process: Option<NodeProcess>,
    pub ack_log: PathBuf,
    pub proxy: Option<UdpProxy>,
    args: Vec<String>,
    log: PathBuf,
    program: Program,
}

/// The program the nodes run: `node`, or a binary with its own topology.
#[derive(Debug, Clone)]
pub struct Program {
    pub path: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Program {
    fn node() -> Self {
        Self {
            path: node_binary(),
            env: vec![("RUST_LOG".into(), "info".into())],
        }
    }

    fn spawn(&self, args: &[String], log: &Path) -> NodeProcess {
        NodeProcess::spawn_program(&self.path, args, self.env.iter().cloned(), log)
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.path.display()))
    }
}

impl Edge {
    /// Starts (or restarts, on the same outbox and ack log) the edge process.
    pub fn start(&mut self) {
        let p = self.program.spawn(&self.args, &self.log);
        self.process = Some(p);
    }

    pub fn process(&mut self) -> &mut NodeProcess {
        self.process.as_mut().expect("edge running")
    }

    pub async fn wait_log(&mut self, pattern: &str) -> String {
        self.process()
            .wait_for_log_line(pattern, NODE_READY)
            .await
            .unwrap_or_else(|e| panic!("edge: {e}"))
    }

    /// Waits until the edge has logged `pattern` `count` times since its start.
    pub async fn wait_log_count(&mut self, pattern: &str, count: usize) -> String {
        self.process()
            .wait_for_log_count(pattern, count, NODE_READY)
            .await
            .unwrap_or_else(|e| panic!("edge: {e}"))
    }

    /// Lines of `A` (acknowledged) in the ack log so far.
    pub fn acked(&self) -> usize {
        read_ack_logs([&self.ack_log])
            .map(|a| a.acked.len())
            .unwrap_or(0)
    }

    /// Lines of `A` in the ack log: acknowledged readings, counted even when
    /// several share a device and timestamp.
    pub fn acked_lines(&self) -> usize {
        std::fs::read_to_string(&self.ack_log)
            .map(|t| t.lines().filter(|l| l.starts_with("A ")).count())
            .unwrap_or(0)
    }

    /// Waits, bounded, until the ack log holds at least `n` acknowledged readings.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.acked() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "edge {}: only {} of {n} readings acknowledged after {timeout:?} (reading its ack log: {}); its log ends with:\n{}",
                self.id,
                self.acked(),
                read_ack_logs([&self.ack_log]).map_or_else(|e| e.to_string(), |a| format!("{} acked", a.acked.len())),
                self.process
                    .as_ref()
                    .map_or_else(|| "(not running)".to_string(), |p| p.log_tail())
            );
            // The ack log is a file another process appends to: poll it.
            tokio::time::sleep(POLL).await;
        }
    }

    /// Extra `--key value` settings for the next start.
    pub fn set(&mut self, key: &str, value: &str) {
        let flag = format!("--{key}");
        match self.args.iter().position(|a| *a == flag) {
            Some(i) => self.args[i + 1] = value.to_string(),
            None => {
                self.args.push(flag);
                self.args.push(value.to_string());
            }
        }
    }
}

/// A cloud node beside the fixture's first (`cloud-2`, `cloud-3`, …): the
/// same topics and transactional-id prefix, its own certificate and address.
pub struct MoreCloud {
    pub id: String,
    pub addr: SocketAddr,
    pub process: Option<NodeProcess>,
    args: Vec<String>,
    log: PathBuf,
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub bootstrap: String,
    pub topic: String,
    /// Where the cloud writes the readings it refuses.
    pub refused_topic: String,
    /// The cloud's `transactional_id_prefix`, which also names its stages' group.
    pub txn_prefix: String,
    pub cloud_addr: SocketAddr,
    pub cloud: Option<NodeProcess>,
    pub edges: Vec<Edge>,
    /// Cloud nodes beside the first, from [`Fixture::add_clouds`].
    pub more_clouds: Vec<MoreCloud>,
    cloud_args: Vec<String>,
    cloud_log: PathBuf,
    program: Program,
}

/// A free UDP port on loopback (the cloud's QUIC port).
pub fn free_udp_addr() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("binding a UDP socket");
    s.local_addr().expect("local addr")
}

fn node(args: &[&str]) {
    let out = std::process::Command::new(node_binary())
        .args(args)
        .output()
        .expect("running node");
    assert!(
        out.status.success(),
        "node {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates a CA and certificates for `cloud-1` and the given edges in `dir`
/// (the cloud's tls_dir), and each edge's own tls_dir, without the CA's
/// key, in `dir/<edge>` (see [`edge_tls_dir`]).
pub fn make_pki(dir: &Path, edges: &[&str]) {
    let d = dir.to_str().expect("utf-8 path");
    node(&["certs", "init", "--dir", d]);
    node(&[
        "certs", "issue", "--dir", d, "--id", "cloud-1", "--role", "cloud",
    ]);
    for e in edges {
        let out = edge_tls_dir(dir, e);
        let out = out.to_str().expect("utf-8 path");
        node(&[
            "certs", "issue", "--dir", d, "--id", e, "--role", "edge", "--out", out,
        ]);
    }
}

/// Issues `edge`'s certificate again, carrying `labels`, into the PKI that
/// [`make_pki`] laid out in `dir` (and the edge's own tls_dir).
pub fn label_edge(dir: &Path, edge: &str, labels: &[&str]) {
    let d = dir.to_str().expect("utf-8 path");
    let out = edge_tls_dir(dir, edge);
    let labels = labels.join(",");
    node(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--id",
        edge,
        "--role",
        "edge",
        "--labels",
        &labels,
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);
}

/// An edge's tls_dir as [`make_pki`] lays it out.
pub fn edge_tls_dir(pki: &Path, edge: &str) -> PathBuf {
    pki.join(edge)
}

impl Fixture {
    /// Sets up certificates and topics names; starts nothing yet.
    pub fn new(name: &str, bootstrap: &str, edge_ids: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tributary-{name}-"))
            .tempdir()
            .expect("tempdir");
        let pki = dir.path().join("pki");
        make_pki(&pki, edge_ids);
        let topic = unique_topic(&format!("{name}-readings"));
        let hwm = unique_topic(&format!("{name}-hwm"));
        let refused_topic = unique_topic(&format!("{name}-refused"));
        let txn_prefix = unique_topic(&format!("{name}-txn"));
        let cloud_addr = free_udp_addr();
        let cloud_args: Vec<String> = [
            "--role",
            "cloud",
            "--node-id",
            "cloud-1",
            "--tls-dir",
            pki.to_str().expect("utf-8"),
            "--listen-addr",
            &cloud_addr.to_string(),
            "--kafka-bootstrap",
            bootstrap,
            "--readings-topic",
            &topic,
            "--hwm-topic",
            &hwm,
            "--refused-topic",
            &refused_topic,
            "--transactional-id-prefix",
            &txn_prefix,
            "--transaction-timeout-ms",
            "10000",
            "--commit-timeout-ms",
            "8000",
            "--report-interval-ms",
            "1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cloud_log = dir.path().join("cloud.log");
        let edges = edge_ids
            .iter()
            .map(|id| {
                let ack_log = dir.path().join(format!("{id}.acks"));
                let args: Vec<String> = [
                    "--role",
                    "edge",
                    "--node-id",
                    id,
                    "--tls-dir",
                    edge_tls_dir(&pki, id).to_str().expect("utf-8"),
                    "--cloud-addr",
                    &cloud_addr.to_string(),
                    "--outbox-dir",
                    dir.path()
                        .join(format!("{id}.outbox"))
                        .to_str()
                        .expect("utf-8"),
                    "--ack-log",
                    ack_log.to_str().expect("utf-8"),
                    "--commit-interval-ms",
                    "20",
                    "--segment-readings-max",
                    "50",
                    "--reconnect-backoff-initial-ms",
                    "50",
                    "--reconnect-backoff-max-ms",
                    "500",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                Edge {
                    id: id.to_string(),
                    process: None,
                    ack_log,
                    proxy: None,
                    args,
                    log: dir.path().join(format!("{id}.log")),
                    program: Program::node(),
                }
            })
            .collect();
        Fixture {
            dir,
            bootstrap: bootstrap.to_string(),
            topic,
            refused_topic,
            txn_prefix,
            cloud_addr,
            cloud: None,
            edges,
            more_clouds: Vec::new(),
            cloud_args,
            cloud_log,
            program: Program::node(),
        }
    }

    /// Runs every node (started after this) as `path` with `env` added:
    /// a binary that passes its own topology to `tributary_node::run_cli`.
    pub fn with_program(mut self, path: PathBuf, env: &[(&str, &str)]) -> Self {
        let mut program = Program::node();
        program.path = path;
        program
            .env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        for e in &mut self.edges {
            e.program = program.clone();
        }
        self.program = program;
        self
    }

    /// The PKI's directory (the cloud's tls_dir; edge `e`'s is `pki/<e>`).
    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// Gives edge `i` a certificate carrying `labels` (before its start).
    pub fn label_edge(&self, i: usize, labels: &[&str]) {
        label_edge(&self.pki(), &self.edges[i].id, labels);
    }

    /// Adds `--<flag> <value>` to the cloud's arguments (before its start).
    pub fn set_cloud(&mut self, flag: &str, value: &str) {
        self.cloud_args.push(format!("--{flag}"));
        self.cloud_args.push(value.to_string());
    }

    /// Starts (or restarts) the cloud and waits until it listens.
    pub async fn start_cloud(&mut self) {
        let mut p = self.program.spawn(&self.cloud_args, &self.cloud_log);
        p.wait_for_log_line("cloud listening for edges", NODE_READY)
            .await
            .unwrap_or_else(|e| panic!("cloud: {e}"));
        self.cloud = Some(p);
    }

    pub fn cloud(&mut self) -> &mut NodeProcess {
        self.cloud.as_mut().expect("cloud running")
    }

    /// Adds `n` cloud nodes (`cloud-2`, …) with the first one's settings,
    /// and gives every edge all of them (before their start). Settings given
    /// to the first cloud later with `set_cloud` apply to it alone.
    pub fn add_clouds(&mut self, n: usize) {
        let pki = self.dir.path().join("pki");
        for _ in 0..n {
            let id = format!("cloud-{}", self.more_clouds.len() + 2);
            node(&[
                "certs",
                "issue",
                "--dir",
                pki.to_str().expect("utf-8 path"),
                "--id",
                &id,
                "--role",
                "cloud",
            ]);
            let addr = free_udp_addr();
            let mut args = self.cloud_args.clone();
            for (flag, value) in [
                ("--node-id", id.clone()),
                ("--listen-addr", addr.to_string()),
            ] {
                let i = args
                    .iter()
                    .position(|a| a == flag)
                    .expect("the cloud's flag");
                args[i + 1] = value;
            }
            let log = self.dir.path().join(format!("{id}.log"));
            self.more_clouds.push(MoreCloud {
                id,
                addr,
                process: None,
                args,
                log,
            });
        }
        let all: Vec<String> = std::iter::once(self.cloud_addr)
            .chain(self.more_clouds.iter().map(|c| c.addr))
            .map(|a| a.to_string())
            .collect();
        let all = all.join(",");
        for e in &mut self.edges {
            e.set("cloud-addr", &all);
        }
    }

    /// Starts (or restarts) cloud node `i` of [`Fixture::more_clouds`] and
    /// waits until it listens.
    pub async fn start_more_cloud(&mut self, i: usize) {
        let c = &mut self.more_clouds[i];
        let mut p = self.program.spawn(&c.args, &c.log);
        p.wait_for_log_line("cloud listening for edges", NODE_READY)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.id));
        c.process = Some(p);
    }

    /// The ends of every running node's log, for a failing test to print.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        let nodes = self
            .cloud
            .iter()
            .map(|p| ("cloud-1", p))
            .chain(
                self.more_clouds
                    .iter()
                    .filter_map(|c| c.process.as_ref().map(|p| (c.id.as_str(), p))),
            )
            .chain(
                self.edges
                    .iter()
                    .filter_map(|e| e.process.as_ref().map(|p| (e.id.as_str(), p))),
            );
        for (id, p) in nodes {
            out.push_str(&format!("\n---- {id}'s log ends with:\n{}", p.log_tail()));
        }
        out
    }

    /// Puts a fault proxy between edge `i` and the cloud (before its start).
    pub async fn proxy_edge(&mut self, i: usize) {
        let (proxy, addr) = UdpProxy::start(self.cloud_addr)
            .await
            .expect("starting the proxy");
        let edge = &mut self.edges[i];
        edge.set("cloud-addr", &addr.to_string());
        edge.proxy = Some(proxy);
    }

    /// Sets the workload of edge `i` (before its start).
    pub fn workload(&mut self, i: usize, w: &Workload) {
        let e = &mut self.edges[i];
        e.set("device-count", &w.devices.to_string());
        e.set("device-rate-hz", &w.rate_hz.to_string());
        e.set("device-readings-max", &w.readings.to_string());
    }

    pub fn ack_logs(&self) -> AckLog {
        read_ack_logs(self.edges.iter().map(|e| e.ack_log.clone())).expect("reading the ack logs")
    }

    /// Reads the topic back once every acknowledged reading can be there, and checks it.
    pub async fn check(&self) -> Report {
        let acks = self.ack_logs();
        let expected = acks.acked.len() - acks.dropped.intersection(&acks.acked).count();
        let consumed = consume_all(&self.bootstrap, &self.topic, expected, DRAIN)
            .await
            .expect("consuming the readings topic");
        check(&consumed, &acks)
    }
}

/// Panics with the report when it is not exactly-once.
pub fn assert_exactly_once(report: &Report) {
    assert!(report.is_exactly_once(), "not exactly once:\n{report}");
    assert!(
        report.acked > 0,
        "nothing was acknowledged: the scenario did not run"
    );
}
