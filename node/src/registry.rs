//! The fleet registry on a node: the cloud's view (read to the end before
//! edges are admitted, then followed, closing the connections of edges it
//! stops admitting), and the `node fleet` commands that read and write it.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Subcommand;
use tributary_actors::cloud::{EdgeGate, ListenerMsg};
use tributary_actors::registry::{Change, Entry, Kind, Registry, Status};
use tributary_actors::sink::kafka::registry::KafkaRegistry;

use crate::config;

/// How often a cloud node reads what the registry topic got: the bound on
/// how late a revocation reaches it, beside the broker's own delivery.
pub const REGISTRY_FOLLOW_INTERVAL_MS: u64 = 100;
/// Bound on reading the registry to its end at start.
pub const REGISTRY_CATCH_UP_TIMEOUT_MS: u64 = 30_000;

pub struct Shared {
    view: RwLock<Registry>,
    kafka: KafkaRegistry,
}

/// Opens the registry topic and reads it to its end.
pub async fn open_for_cloud(s: &config::Resolved) -> anyhow::Result<Arc<Shared>> {
    let (bootstrap, topic, node) = (
        s.kafka_bootstrap.clone(),
        s.registry_topic.clone(),
        s.node_id.clone(),
    );
    let shared = tokio::task::spawn_blocking(move || -> anyhow::Result<Shared> {
        let (kafka, view) = open_and_read(&bootstrap, &topic, &node)?;
        Ok(Shared {
            view: RwLock::new(view),
            kafka,
        })
    })
    .await??;
    {
        let view = shared.view.read().unwrap_or_else(|p| p.into_inner());
        let refused = view.entries().filter(|e| !e.status.admits()).count();
        tracing::info!(
            entries = view.len(),
            refused,
            malformed = view.stats().malformed,
            "fleet registry read"
        );
    }
    Ok(Arc::new(shared))
}

/// Opens the registry topic as `reader` and reads it to its end. Blocks.
fn open_and_read(
    bootstrap: &str,
    topic: &str,
    reader: &str,
) -> anyhow::Result<(KafkaRegistry, Registry)> {
    let kafka = KafkaRegistry::open(bootstrap, topic, reader)
        .with_context(|| format!("opening the registry topic {topic} on {bootstrap}"))?;
    let mut view = Registry::new();
    kafka
        .catch_up(
            &mut view,
            Duration::from_millis(REGISTRY_CATCH_UP_TIMEOUT_MS),
        )
        .with_context(|| format!("reading the registry topic {topic}"))?;
    Ok((kafka, view))
}

/// The listener's question: why this edge may not connect, if it may not.
pub fn gate(shared: Arc<Shared>) -> EdgeGate {
    Arc::new(move |edge: &str| {
        shared
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .refusal(Kind::Edge, edge)
    })
}

/// Follows the registry: an edge it stops admitting has its live
/// connection closed by the listener registered as `listener`.
pub fn follow(shared: Arc<Shared>, listener: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(REGISTRY_FOLLOW_INTERVAL_MS));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let changes = {
                let mut view = shared.view.write().unwrap_or_else(|p| p.into_inner());
                shared.kafka.follow(&mut view)
            };
            for change in changes {
                match change {
                    Change::Put {
                        entry,
                        admitted_before,
                    } if entry.kind == Kind::Edge => {
                        let admits = entry.status.admits();
                        tracing::info!(edge = %entry.id, status = entry.status.as_str(), by = %entry.changed_by, "registry: an edge's status changed");
                        if admitted_before && !admits {
                            let reason = format!(
                                "edge {} is {}{}",
                                entry.id,
                                entry.status.as_str(),
                                entry.reason.map(|r| format!(": {r}")).unwrap_or_default()
                            );
                            if let Some(l) = ractor::registry::where_is(listener.clone()) {
                                let l: ractor::ActorRef<ListenerMsg> = l.into();
                                let _ = l.send_message(ListenerMsg::Refuse {
                                    edge: entry.id,
                                    reason,
                                });
                            }
                        }
                    }
                    Change::Malformed => {
                        tracing::warn!("registry: a record that is not an entry was skipped")
                    }
                    Change::OverLimit => {
                        tracing::warn!("registry: an entry past the registry's limit was skipped")
                    }
                    _ => {}
                }
            }
        }
    })
}

#[derive(Subcommand)]
pub enum FleetCommand {
    /// List the registry's entries.
    List {
        /// Only entries of this status (active, suspended, revoked, pending).
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one edge's entry.
    Show { id: String },
    /// Refuse an edge for good: every cloud node closes its connection and
    /// refuses its handshakes. What it committed stays in the log.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Refuse an edge until it is resumed.
    Suspend {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Admit a suspended edge again.
    Resume { id: String },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn who() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("node fleet ({user})")
}

fn print_entries(entries: &[&Entry], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(entries)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<7} {:<10} {:<24} REASON",
        "ID", "KIND", "STATUS", "CHANGED BY"
    );
    for e in entries {
        println!(
            "{:<24} {:<7} {:<10} {:<24} {}",
            e.id,
            e.kind.as_str(),
            e.status.as_str(),
            e.changed_by,
            e.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// Runs one `node fleet` command against the registry topic.
pub fn fleet(
    bootstrap: &str,
    topic: &str,
    json: bool,
    command: FleetCommand,
) -> anyhow::Result<()> {
    let (kafka, view) = open_and_read(bootstrap, topic, &format!("cli-{}", std::process::id()))?;
    let set = |id: String, status: Status, reason: Option<String>| -> anyhow::Result<()> {
        if id.is_empty() || id.contains('/') {
            bail!("{id:?} is not a node id");
        }
        let before = view.get(Kind::Edge, &id);
        if before.is_some_and(|e| e.status == Status::Revoked) && status != Status::Revoked {
            bail!("edge {id} is revoked, and revocation is for good: it must enrol again under a new certificate");
        }
        let entry = Entry {
            id: id.clone(),
            kind: Kind::Edge,
            status,
            labels: before.map(|e| e.labels.clone()).unwrap_or_default(),
            reason,
            changed_ms: now_ms(),
            changed_by: who(),
            first_seen_ms: before.and_then(|e| e.first_seen_ms),
        };
        kafka
            .write(&entry)
            .with_context(|| format!("writing edge {id}'s entry"))?;
        if json {
            println!("{}", serde_json::to_string_pretty(&entry)?);
        } else {
            println!("edge {id} is now {}", status.as_str());
        }
        Ok(())
    };
    match command {
        FleetCommand::List { status } => {
            let entries: Vec<&Entry> = view
                .entries()
                .filter(|e| status.as_deref().is_none_or(|s| e.status.as_str() == s))
                .collect();
            print_entries(&entries, json)
        }
        FleetCommand::Show { id } => match view.get(Kind::Edge, &id) {
            Some(e) => print_entries(&[e], json),
            None => bail!("the registry has no entry for edge {id} (an edge without one is admitted by its certificate)"),
        },
        FleetCommand::Revoke { id, reason } => set(id, Status::Revoked, reason),
        FleetCommand::Suspend { id, reason } => set(id, Status::Suspended, reason),
        FleetCommand::Resume { id } => match view.get(Kind::Edge, &id).map(|e| e.status) {
            Some(Status::Suspended) => set(id, Status::Active, None),
            Some(other) if other != Status::Revoked => {
                bail!("edge {id} is {}, not suspended", other.as_str())
            }
            _ => set(id, Status::Active, None),
        },
    }
}
