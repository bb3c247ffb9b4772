//! Bad input on real processes: invalid settings, a certificate from another CA, a Hello
//! that lies about who is speaking, garbage on the uplink stream and a damaged outbox.
//! Each must end in a clear error (an exit naming what is wrong, or a refused
//! connection with a log line), never a crash, and must not cost a good edge anything it
//! already had acknowledged.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use tributary_cluster::quic::QuicConfig;
use tributary_cluster::tls::{NodeId, NodeIdentity};
use tributary_cluster::uplink::frame::{encode, FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION};
use tributary_cluster::uplink::link::{DialedUplink, EdgeConnector};
use tributary_cluster::uplink::{Frame, SegmentFrame};
use tributary_tests::broker::shared_bootstrap;
use tributary_tests::checker::{check, consume_all, read_ack_logs, Report};
use tributary_tests::fixture::{
    assert_exactly_once, edge_tls_dir, make_pki, Fixture, Workload, DRAIN,
};
use tributary_tests::process::{node_binary, NodeProcess};

/// A node refusing its settings does so before it opens anything: this is generous.
const EXIT_BOUND: Duration = Duration::from_secs(15);
/// Bound on the cloud closing a misbehaving connection. The Hello timeout (5 s) is the
/// slowest path by which the cloud may give up on one.
const CLOSE_BOUND: Duration = Duration::from_secs(10);
/// Bound on a Welcome: the cloud first opens the edge's transactional writer.
const WELCOME_BOUND: Duration = Duration::from_secs(30);
/// Bound on the cloud reporting more committed readings than before.
const PROGRESS_BOUND: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
/// How many of the cloud's warnings a test prints for the record.
const WARNINGS_SHOWN_MAX: usize = 8;

// ---------------------------------------------------------------------------------------
// 1. Invalid settings
// ---------------------------------------------------------------------------------------

struct Exit {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `node` with `args` to its exit, bounded: a node that is still running after
/// [`EXIT_BOUND`] is killed and the test fails.
async fn run_node_to_exit(dir: &Path, name: &str, args: &[&str]) -> Exit {
    let out_path = dir.join(format!("{name}.stdout"));
    let err_path = dir.join(format!("{name}.stderr"));
    let file = |p: &Path| std::fs::File::create(p).expect("creating an output file");
    let mut child = Command::new(node_binary())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file(&out_path))
        .stderr(file(&err_path))
        .spawn()
        .expect("spawning node");
    let deadline = tokio::time::Instant::now() + EXIT_BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().expect("checking the child") {
            break status;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "node {args:?} still running after {EXIT_BOUND:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        // std's Child has no async wait: poll it.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Exit {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// Asserts a clean refusal: a non-zero exit code (not a signal), stderr naming every one
/// of `names`, and no panic anywhere in the output.
fn assert_refused(case: &str, exit: &Exit, names: &[&str]) {
    let all = format!("{}{}", exit.stdout, exit.stderr);
    assert!(
        !all.contains("panicked"),
        "{case}: the node panicked:\n{all}"
    );
    match exit.status.code() {
        Some(0) => panic!("{case}: the node accepted it and exited 0:\n{all}"),
        Some(_) => {}
        None => panic!(
            "{case}: the node died of a signal ({}):\n{all}",
            exit.status
        ),
    }
    for name in names {
        assert!(
            exit.stderr.contains(name),
            "{case}: stderr does not name {name:?}:\n{}",
            exit.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_settings_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    make_pki(&pki, &["edge-1"]);
    let pki_s = pki.to_str().expect("utf-8");
    let edge_dir = edge_tls_dir(&pki, "edge-1");
    let edge_s = edge_dir.to_str().expect("utf-8");
    let edge = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = ["--role", "edge", "--node-id", "edge-1", "--tls-dir", edge_s]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let write = |name: &str, text: &str| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("writing a config file");
        p.to_str().expect("utf-8").to_string()
    };
    let unknown_key = write("unknown.toml", "outbox_byte_max = 5\n");
    let wrong_type = write("wrong-type.toml", "device_count = \"ten\"\n");
    let missing_tls = dir.path().join("no-such-pki");
    let missing_tls = missing_tls.to_str().expect("utf-8");

    let mut unknown = edge(&[]);
    unknown.extend(["--config".to_string(), unknown_key.clone()]);
    let mut typed = edge(&[]);
    typed.extend(["--config".to_string(), wrong_type.clone()]);
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "zero device rate",
            edge(&["--device-rate-hz", "0"]),
            vec!["device_rate_hz"],
        ),
        (
            "unknown full policy",
            edge(&["--full-policy", "drop-newest"]),
            vec!["--full-policy", "drop-newest"],
        ),
        (
            "unknown TOML key",
            unknown,
            vec!["outbox_byte_max", unknown_key.as_str()],
        ),
        (
            "TOML value of the wrong type",
            typed,
            vec!["device_count", wrong_type.as_str()],
        ),
        (
            "node id with capitals and an underscore",
            ["--role", "edge", "--node-id", "Bad_Id", "--tls-dir", pki_s]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            vec!["node_id"],
        ),
        (
            "missing certificate directory",
            [
                "--role",
                "edge",
                "--node-id",
                "edge-1",
                "--tls-dir",
                missing_tls,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            vec![missing_tls],
        ),
        (
            "the CA's key in an edge's tls_dir",
            ["--role", "edge", "--node-id", "edge-1", "--tls-dir", pki_s]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            vec!["ca.key"],
        ),
        (
            "missing config file",
            edge(&["--config", "/nonexistent/tributary.toml"]),
            vec!["/nonexistent/tributary.toml"],
        ),
        (
            "certificate of the wrong role",
            ["--role", "cloud", "--node-id", "edge-1", "--tls-dir", pki_s]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            vec!["edge-1", "role"],
        ),
    ];
    for (i, (case, args, names)) in cases.iter().enumerate() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let exit = run_node_to_exit(dir.path(), &format!("case-{i}"), &args).await;
        eprintln!("{case}: {} -> {}", exit.status, exit.stderr.trim());
        assert_refused(case, &exit, names);
    }
}

// ---------------------------------------------------------------------------------------
// Helpers for the tests against a running cloud
// ---------------------------------------------------------------------------------------

/// The last `readings_committed` the cloud's "cloud flow" report logged, 0 if none yet.
fn cloud_committed(cloud: &NodeProcess) -> u64 {
    let text = std::fs::read_to_string(cloud.log_path()).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("cloud flow"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("readings_committed="))
                .and_then(|n| n.parse().ok())
        })
        .next_back()
        .unwrap_or(0)
}

/// Waits, bounded, until the cloud reports more than `above` committed readings, or
/// all `total` of them: the evidence that it still serves good edges. Fails early if
/// the cloud exited.
async fn wait_committed_above(f: &mut Fixture, above: u64, total: usize) -> u64 {
    let deadline = tokio::time::Instant::now() + PROGRESS_BOUND;
    loop {
        assert_cloud_up(f);
        let now = cloud_committed(f.cloud());
        if now > above || now >= total as u64 {
            return now;
        }
        if tokio::time::Instant::now() >= deadline {
            let edges: Vec<String> = f
                .edges
                .iter()
                .filter_map(|e| e.process.as_ref())
                .map(|p| p.log_tail())
                .collect();
            panic!(
                "the cloud committed nothing beyond {above} readings in {PROGRESS_BOUND:?}; its \
                 log ends with:\n{}\nthe edges' logs end with:\n{}",
                f.cloud().log_tail(),
                edges.join("\n---\n")
            );
        }
        // The report is a log line of another process: poll it.
        tokio::time::sleep(POLL).await;
    }
}

fn assert_cloud_up(f: &mut Fixture) {
    let exit = f.cloud().exited().expect("checking the cloud");
    assert!(
        exit.is_none(),
        "the cloud exited ({exit:?}); its log ends with:\n{}",
        f.cloud().log_tail()
    );
}

/// The cloud is running, never panicked, and (for the record) what it warned about.
fn assert_cloud_healthy(f: &mut Fixture) {
    assert_cloud_up(f);
    let log = std::fs::read_to_string(f.cloud().log_path()).expect("reading the cloud log");
    assert!(!log.contains("panicked"), "the cloud panicked:\n{log}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    for line in warnings.iter().take(WARNINGS_SHOWN_MAX) {
        eprintln!("cloud: {line}");
    }
    eprintln!("cloud: {} warnings in all", warnings.len());
}

/// Checks the topic against the ack logs of the given edges only: the others' readings
/// (acknowledged into an outbox the cloud refused to drain) are not expected in Kafka.
async fn check_edges(f: &Fixture, edges: &[usize]) -> Report {
    let acks = read_ack_logs(edges.iter().map(|&i| f.edges[i].ack_log.clone()))
        .expect("reading the ack logs");
    let expected = acks.acked.len() - acks.dropped.intersection(&acks.acked).count();
    let consumed = consume_all(&f.bootstrap, &f.topic, expected, DRAIN)
        .await
        .expect("consuming the readings topic");
    check(&consumed, &acks)
}

/// Connects to the cloud as `id` (whose certificate is in the fixture's PKI), from this
/// test process. The uplink stream is open; nothing is sent yet.
/// Dials as `edge`, says Hello and waits for the Welcome.
async fn dial_welcomed(f: &Fixture, edge: &str) -> DialedUplink {
    let mut up = dial_as(f, edge).await;
    up.writer.send(&hello(edge)).await.expect("sending Hello");
    wait_welcome(&mut up).await;
    up
}

async fn dial_as(f: &Fixture, id: &str) -> DialedUplink {
    tributary_cluster::install_crypto_provider();
    let pki = f.dir.path().join("pki");
    let identity = NodeIdentity::load_from_dir(&pki, &NodeId::new(id).expect("valid id"))
        .expect("loading the identity");
    let connector = EdgeConnector::new(
        &identity,
        f.cloud_addr,
        QuicConfig::default(),
        FRAME_BYTES_MAX_DEFAULT,
    )
    .expect("creating the connector");
    tokio::time::timeout(CLOSE_BOUND, connector.connect())
        .await
        .expect("connecting timed out")
        .expect("connecting to the cloud")
}

fn hello(edge_id: &str) -> Frame {
    Frame::Hello {
        edge_id: edge_id.into(),
        epoch: 1,
        next_seq: 1,
    }
}

/// Waits, bounded, until the cloud has closed this connection; returns the reason.
async fn wait_closed(up: &mut DialedUplink, case: &str) -> String {
    // Drain whatever the cloud sent before closing (a Refuse, say) until the stream ends.
    let drained = tokio::time::timeout(CLOSE_BOUND, async {
        let mut frames = Vec::new();
        loop {
            match up.reader.recv().await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) | Err(_) => return frames,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{case}: the cloud kept the uplink open for {CLOSE_BOUND:?}"));
    let reason = tokio::time::timeout(CLOSE_BOUND, up.handle.closed())
        .await
        .unwrap_or_else(|_| panic!("{case}: the connection outlived {CLOSE_BOUND:?}"));
    eprintln!("{case}: closed ({reason}) after frames {drained:?}");
    reason
}

/// Waits, bounded, for the cloud's Welcome on a fresh uplink.
async fn wait_welcome(up: &mut DialedUplink) {
    let frame = tokio::time::timeout(WELCOME_BOUND, up.reader.recv())
        .await
        .expect("no Welcome in time")
        .expect("reading the Welcome");
    assert!(
        matches!(frame, Some(Frame::Welcome { .. })),
        "expected Welcome, got {frame:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. A certificate from another CA
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_certified_by_another_ca_are_refused_and_the_good_edge_flows() {
    let w = Workload {
        devices: 2,
        rate_hz: 50.0,
        readings: 50,
    };
    let mut f = Fixture::new(
        "wrongca",
        &shared_bootstrap(),
        &["edge-1", "edge-2", "edge-3"],
    );
    // edge-2's certificate comes from a foreign CA but it trusts the real one, so only
    // the cloud's check of the client certificate can refuse it.
    let foreign = f.dir.path().join("pki-foreign");
    make_pki(&foreign, &["edge-2"]);
    let foreign_edge = edge_tls_dir(&foreign, "edge-2");
    std::fs::copy(f.dir.path().join("pki/ca.pem"), foreign_edge.join("ca.pem"))
        .expect("trusting the real CA");
    f.edges[1].set("tls-dir", foreign_edge.to_str().expect("utf-8"));
    // edge-3 lives wholly in another PKI: it refuses the cloud as well.
    let stranger = f.dir.path().join("pki-stranger");
    make_pki(&stranger, &["edge-3"]);
    f.edges[2].set(
        "tls-dir",
        edge_tls_dir(&stranger, "edge-3").to_str().expect("utf-8"),
    );
    f.start_cloud().await;
    for i in 0..3 {
        f.workload(i, &w);
        f.edges[i].start();
    }
    // Two failures each prove that the bad edges retry rather than give up.
    for i in 1..3 {
        f.edges[i]
            .process()
            .wait_for_log_count("connecting to the cloud failed", 2, DRAIN)
            .await
            .unwrap_or_else(|e| panic!("refused edge: {e}"));
    }
    let line = f
        .cloud()
        .wait_for_log_count("handshake refused", 4, DRAIN)
        .await
        .unwrap_or_else(|e| panic!("cloud: {e}"));
    eprintln!("cloud: {line}");
    f.edges[0].wait_acked(w.total(), DRAIN).await;
    let report = check_edges(&f, &[0]).await;
    assert_exactly_once(&report);
    assert_eq!(report.consumed, w.total(), "{report}");
    assert!(
        report.unexpected.is_empty(),
        "readings of a refused edge reached the log:\n{report}"
    );
    for i in 1..3 {
        assert!(
            f.edges[i].process().exited().unwrap().is_none(),
            "refused edge {} exited instead of retrying",
            f.edges[i].id
        );
    }
    assert_cloud_healthy(&mut f);
}

// ---------------------------------------------------------------------------------------
// 3. A Hello that names another edge
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_naming_another_edge_is_refused() {
    let mut f = Fixture::new("idmismatch", &shared_bootstrap(), &["edge-1", "edge-2"]);
    f.start_cloud().await;

    // edge-2's certificate, claiming to be edge-1.
    let mut up = dial_as(&f, "edge-2").await;
    up.writer
        .send(&hello("edge-1"))
        .await
        .expect("sending Hello");
    let reason = wait_closed(&mut up, "edge-2 claiming edge-1").await;
    assert!(
        reason.contains("edge-1") && reason.contains("certificate"),
        "the close reason does not say why: {reason}"
    );
    let line = f
        .cloud()
        .wait_for_log_line("edge refused", CLOSE_BOUND)
        .await
        .unwrap_or_else(|e| panic!("cloud: {e}"));
    assert!(line.contains("edge-1"), "{line}");

    // An id that is not even a valid node id.
    let mut up = dial_as(&f, "edge-2").await;
    up.writer
        .send(&hello("Bad_Id"))
        .await
        .expect("sending Hello");
    let reason = wait_closed(&mut up, "an invalid edge id").await;
    assert!(reason.contains("Bad_Id"), "{reason}");
    f.cloud()
        .wait_for_log_count("edge refused", 2, CLOSE_BOUND)
        .await
        .unwrap_or_else(|e| panic!("cloud: {e}"));

    // The cloud still serves an honest edge.
    let _honest = dial_welcomed(&f, "edge-2").await;
    assert_cloud_healthy(&mut f);
}

// ---------------------------------------------------------------------------------------
// 4. Garbage on the uplink stream
// ---------------------------------------------------------------------------------------

/// Deterministic noise (xorshift64), so that a failure replays.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_uplink_closes_only_that_connection() {
    // Long enough (15 s) to outlast the garbage rounds, so each round can see progress.
    let w = Workload {
        devices: 2,
        rate_hz: 50.0,
        readings: 750,
    };
    let mut f = Fixture::new("garbage", &shared_bootstrap(), &["edge-1", "edge-2"]);
    f.start_cloud().await;
    f.workload(0, &w);
    f.edges[0].start();
    let mut committed = wait_committed_above(&mut f, 0, w.total()).await;

    // (a) Noise where Hello belongs; finishing the stream bounds the cloud's wait even if
    // the noise happens to announce a short frame.
    let mut up = dial_as(&f, "edge-2").await;
    up.writer
        .send_raw(&noise(256, 0x9E37_79B9_7F4A_7C15))
        .await
        .expect("sending noise");
    up.writer.finish();
    wait_closed(&mut up, "(a) noise").await;
    f.cloud()
        .wait_for_log_count("edge broke the protocol", 1, CLOSE_BOUND)
        .await
        .unwrap_or_else(|e| panic!("cloud: {e}"));
    committed = wait_committed_above(&mut f, committed, w.total()).await;

    // (a') Noise in a well-formed envelope: a plausible length and version 1, so the
    // body decoder meets it.
    let mut up = dial_as(&f, "edge-2").await;
    let body = noise(64, 0xDEAD_BEEF);
    let mut framed = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    framed.push(PROTOCOL_VERSION);
    framed.extend_from_slice(&body);
    up.writer.send_raw(&framed).await.expect("sending noise");
    wait_closed(&mut up, "(a') framed noise").await;
    f.cloud()
        .wait_for_log_count("edge broke the protocol", 2, CLOSE_BOUND)
        .await
        .unwrap_or_else(|e| panic!("cloud: {e}"));
    committed = wait_committed_above(&mut f, committed, w.total()).await;

    // (b) A frame announcing 4 GiB: refused from its length alone, nothing allocated.
    let mut up = dial_as(&f, "edge-2").await;
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[PROTOCOL_VERSION, 0, 0, 0]);
    up.writer.send_raw(&huge).await.expect("sending the prefix");
    wait_closed(&mut up, "(b) 4 GiB prefix").await;
    let line = f
        .cloud()
        .wait_for_log_count("edge broke the protocol", 3, CLOSE_BOUND)
        .await
        .unwrap_or_else(|e| panic!("cloud: {e}"));
    assert!(line.contains("frame_bytes_max"), "{line}");
    committed = wait_committed_above(&mut f, committed, w.total()).await;

    // (c) A valid Hello, then a frame of protocol version 99.
    let mut up = dial_welcomed(&f, "edge-2").await;
    let mut bad_version = encode(&Frame::Ack {
        epoch: 1,
        seq_through: 1,
    });
    bad_version[4] = 99;
    up.writer
        .send_raw(&bad_version)
        .await
        .expect("sending the frame");
    wait_closed(&mut up, "(c) version 99").await;
    let line = f
        .cloud()
        .wait_for_log_line("protocol version 99", CLOSE_BOUND)
        .await
        .unwrap_or_else(|e| panic!("cloud: {e}"));
    assert!(line.contains("edge-2"), "{line}");
    committed = wait_committed_above(&mut f, committed, w.total()).await;

    // (d) A valid Hello, then a segment whose checksum does not match its bytes.
    let mut up = dial_welcomed(&f, "edge-2").await;
    let mut seg = SegmentFrame::new(1, 1, 1, noise(64, 7));
    seg.crc32 ^= 1;
    up.writer
        .send(&Frame::Segment(seg))
        .await
        .expect("sending the segment");
    wait_closed(&mut up, "(d) bad checksum").await;
    f.cloud()
        .wait_for_log_line("fails its checksum", CLOSE_BOUND)
        .await
        .unwrap_or_else(|e| panic!("cloud: {e}"));
    wait_committed_above(&mut f, committed, w.total()).await;

    // The good edge lost nothing and got nothing twice; edge-2's garbage wrote nothing.
    f.edges[0].wait_acked(w.total(), DRAIN).await;
    let report = check_edges(&f, &[0]).await;
    assert_exactly_once(&report);
    assert_eq!(report.consumed, w.total(), "{report}");
    assert_cloud_healthy(&mut f);
}

// ---------------------------------------------------------------------------------------
// 5. A damaged outbox
// ---------------------------------------------------------------------------------------

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating the copy");
    for entry in std::fs::read_dir(from).expect("listing the outbox") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copying a file");
        }
    }
}

fn list_dir(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("listing") {
        let entry = entry.expect("a directory entry");
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            out.extend(list_dir(&entry.path()));
        } else {
            out.push((entry.path(), meta.len()));
        }
    }
    out.sort();
    out
}

/// What the gateway's "outbox opened" line says about the store it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Opened {
    epoch: u64,
    sealed_through: u64,
    segments: u64,
}

impl Opened {
    fn parse(line: &str) -> Opened {
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        };
        Opened {
            epoch: field("epoch"),
            sealed_through: field("sealed_through"),
            segments: field("segments"),
        }
    }
}

/// How an edge met a damaged outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Exited non-zero with an error that names the outbox.
    Refused,
    /// Opened it and kept running.
    Opened(Opened),
}

/// Starts the edge on `outbox` and waits, bounded, for it either to open the outbox (and
/// then kills it) or to exit. A crash (a signal, a Rust panic) or an exit whose error does
/// not name the outbox fails the test.
async fn open_outbox(f: &mut Fixture, outbox: &Path, case: &str) -> Outcome {
    let outbox_s = outbox.to_str().expect("utf-8").to_string();
    let log_path = f.dir.path().join("edge-1.log");
    let edge = &mut f.edges[0];
    edge.set("outbox-dir", &outbox_s);
    edge.start();
    let p = edge.process();
    let outcome = match p.wait_for_log_line("outbox opened", EXIT_BOUND).await {
        Ok(line) => {
            p.kill9().unwrap();
            Outcome::Opened(Opened::parse(&line))
        }
        Err(e) => {
            let status = p
                .wait_exit(EXIT_BOUND)
                .await
                .unwrap_or_else(|_| panic!("{case}: neither opened the outbox nor exited: {e}"));
            // The edges share one log file, but each case has its own outbox path.
            let log = std::fs::read_to_string(&log_path).expect("reading the edge log");
            let error = log
                .lines()
                .find(|l| l.contains(&outbox_s) && l.contains("outbox store"))
                .unwrap_or_else(|| {
                    panic!("{case}: exited {status}, no error names the outbox {outbox_s}:\n{log}")
                });
            eprintln!("{case}: exited {status}: {}", error.trim());
            assert!(
                status.code().is_some_and(|c| c != 0),
                "{case}: not a clean error exit ({status})"
            );
            Outcome::Refused
        }
    };
    let log = std::fs::read_to_string(&log_path).expect("reading the edge log");
    // "panicked at" is what Rust's panic hook prints, even for a panic that is caught.
    assert!(
        !log.contains("panicked at"),
        "{case}: the edge panicked:\n{log}"
    );
    eprintln!("{case}: {outcome:?}");
    outcome
}

/// Starts an edge with a finite workload while its link is cut, kills it once every
/// reading is in the outbox, and returns the fixture, the outbox and what it holds.
async fn filled_outbox(name: &str) -> (Fixture, PathBuf, Opened) {
    let w = Workload {
        devices: 2,
        rate_hz: 100.0,
        readings: 100,
    };
    let mut f = Fixture::new(name, &shared_bootstrap(), &["edge-1"]);
    f.start_cloud().await;
    f.proxy_edge(0).await;
    f.edges[0].proxy.as_ref().unwrap().cut();
    f.workload(0, &w);
    f.edges[0].start();
    f.edges[0].wait_acked(w.total(), DRAIN).await;
    f.edges[0].process().kill9().unwrap();
    let pristine = f.dir.path().join("edge-1.outbox");
    eprintln!("sled's files after kill -9: {:?}", list_dir(&pristine));
    // Restarts bring no new readings: what Kafka must hold is what was accepted above.
    f.edges[0].set("device-count", "0");
    // A copy opened undamaged says what the outbox holds.
    let baseline = f.dir.path().join("baseline.outbox");
    copy_dir(&pristine, &baseline);
    let Outcome::Opened(held) = open_outbox(&mut f, &baseline, "undamaged copy").await else {
        panic!("the undamaged copy did not open");
    };
    assert!(
        held.segments > 0,
        "nothing sealed before the kill: {held:?}"
    );
    (f, pristine, held)
}

type Damage = fn(&Path);

fn truncate_db_to_zero(d: &Path) {
    let db = std::fs::OpenOptions::new().write(true).open(d.join("db"));
    db.unwrap().set_len(0).unwrap();
}

fn truncate_db_to_half(d: &Path) {
    let len = std::fs::metadata(d.join("db")).unwrap().len();
    let db = std::fs::OpenOptions::new().write(true).open(d.join("db"));
    db.unwrap().set_len(len / 2).unwrap();
}

fn overwrite_db_with_noise(d: &Path) {
    let len = std::fs::metadata(d.join("db")).unwrap().len();
    std::fs::write(d.join("db"), noise(len as usize, 3)).unwrap();
}

fn overwrite_conf_with_noise(d: &Path) {
    std::fs::write(d.join("conf"), noise(64, 5)).unwrap();
}

/// Damages copies of a filled outbox and opens each; then delivers the undamaged one.
/// Returns what the outbox held and what each damage led to.
async fn damage_and_deliver(
    name: &str,
    damages: &[(&str, Damage)],
) -> (Opened, Vec<(String, Outcome)>) {
    let (mut f, pristine, held) = filled_outbox(name).await;
    let accepted = f.edges[0].acked();
    let mut outcomes = Vec::new();
    for (i, (case, damage)) in damages.iter().enumerate() {
        let copy = f.dir.path().join(format!("damaged-{i}.outbox"));
        copy_dir(&pristine, &copy);
        damage(&copy);
        let outcome = open_outbox(&mut f, &copy, case).await;
        outcomes.push((case.to_string(), outcome));
    }
    eprintln!("undamaged: {held:?}; damaged: {outcomes:?}");

    // The original outbox still delivers everything it accepted, exactly once.
    f.edges[0].proxy.as_ref().unwrap().heal();
    let outcome = open_outbox_and_run(&mut f, &pristine).await;
    assert_eq!(outcome, held, "the original outbox changed");
    let report = f.check().await;
    assert_exactly_once(&report);
    assert_eq!(report.acked, accepted);
    assert_eq!(report.consumed, accepted, "{report}");
    (held, outcomes)
}

/// Starts the edge on `outbox` and leaves it running.
async fn open_outbox_and_run(f: &mut Fixture, outbox: &Path) -> Opened {
    f.edges[0].set("outbox-dir", outbox.to_str().expect("utf-8"));
    f.edges[0].start();
    Opened::parse(&f.edges[0].wait_log("outbox opened").await)
}

/// What a damaged outbox may lead to: a refusal that names it, or an outbox that still
/// holds every segment it held, under the same epoch.
fn assert_nothing_lost_silently(held: Opened, outcomes: &[(String, Outcome)]) {
    for (case, outcome) in outcomes {
        assert!(
            *outcome == Outcome::Refused || *outcome == Outcome::Opened(held),
            "{case}: the edge opened the damaged outbox as {outcome:?}, but it held {held:?}: \
             acknowledged readings were lost without an error"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_outbox_config_is_refused_by_path() {
    let (_, outcomes) = damage_and_deliver(
        "damagedconf",
        &[("conf overwritten with noise", overwrite_conf_with_noise)],
    )
    .await;
    assert_eq!(outcomes[0].1, Outcome::Refused, "{outcomes:?}");
}

/// sled 0.34 recovers its log to the last valid record and treats an empty or unreadable
/// `db` file as a new database: on its own, a truncated `db` would roll the outbox back
/// (same epoch, fewer segments) and an emptied or overwritten one would become a fresh
/// outbox, and acknowledged readings would be gone without a word. The outbox's guard file
/// catches both: the edge must refuse such an outbox, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_outbox_db_never_loses_acknowledged_readings_silently() {
    let (held, outcomes) = damage_and_deliver(
        "damageddb",
        &[
            ("db truncated to 0 bytes", truncate_db_to_zero),
            ("db truncated to half", truncate_db_to_half),
            ("db overwritten with noise", overwrite_db_with_noise),
        ],
    )
    .await;
    assert_nothing_lost_silently(held, &outcomes);
}
