//! The MQTT source actor: a thin driver around [`MqttCore`]. It feeds the
//! core what its broker link and the gateway say, sends the core's readings
//! to the gateway and its acknowledgements to the link, and keeps time.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::config::MqttConfig;
use super::core::{MqttCore, MqttStatus, RecordKeys};
use super::link::{LinkEvent, LinkStats, MqttConnector, MqttLink, TcpBroker};
use crate::clock::SharedClock;
use crate::edge::gateway::{AnswerSink, GatewayMsg, IngestBatch, SourceAnswer};
use crate::edge::EdgeNames;

pub const MQTT_NAME: &str = "tributary.mqtt";
/// How often the source looks at its timers and logs its summaries.
const TICK_MS: u64 = 25;
/// Bound on a call to the gateway (reading back the records, saving a new
/// session's generation).
const GATEWAY_CALL_MS: u64 = 10_000;

/// The source's arguments.
#[derive(Clone)]
pub struct MqttSourceArgs {
    pub config: MqttConfig,
    /// Where the edge's gateway is registered.
    pub names: EdgeNames,
    /// Stamps readings without a `ts`.
    pub clock: SharedClock,
    /// The broker: [`TcpBroker`] for real.
    pub connector: Arc<dyn MqttConnector>,
}

impl MqttSourceArgs {
    /// A source on a real broker.
    pub fn new(config: MqttConfig, names: EdgeNames, clock: SharedClock) -> Self {
        Self {
            config,
            names,
            clock,
            connector: Arc::new(TcpBroker),
        }
    }
}

/// What the source reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSourceStatus {
    pub core: MqttStatus,
    pub link: LinkStats,
}

pub enum MqttMsg {
    Link(LinkEvent),
    Gateway(SourceAnswer),
    Tick,
    Status(RpcReplyPort<MqttSourceStatus>),
}

impl ractor::Message for MqttMsg {}

/// The gateway's answers, as messages to the source.
struct Answers(ActorRef<MqttMsg>);

impl AnswerSink for Answers {
    fn answer(&self, answer: SourceAnswer) {
        let _ = self.0.send_message(MqttMsg::Gateway(answer));
    }
}

#[derive(Clone, Default)]
pub struct MqttSource;

pub struct MqttSourceState {
    core: MqttCore<OwnedSemaphorePermit>,
    link: Box<dyn MqttLink>,
    names: EdgeNames,
    clock: SharedClock,
    answers: Arc<dyn AnswerSink>,
    /// This incarnation's source nonce for the gateway.
    source: u64,
}

impl MqttSourceState {
    /// Sends what the core has for the gateway and the broker.
    fn drive(&mut self) {
        let now = Instant::now().into_std();
        while let Some(forward) = self.core.poll_forward(now) {
            let Some(gateway) = self.names.where_is_gateway() else {
                self.core.handle_gateway_away(now);
                break;
            };
            tracing::trace!(
                first_n = forward.first_n,
                items = forward.items.len(),
                first = ?forward.items.first().map(|i| (&i.reading.device_id, i.reading.metric("n"))),
                "mqtt: forwarding"
            );
            let batch = IngestBatch {
                source: self.source,
                first_n: forward.first_n,
                items: forward.items,
                answers: self.answers.clone(),
            };
            if gateway
                .send_message(GatewayMsg::IngestBatch(batch))
                .is_err()
            {
                self.core.handle_gateway_away(now);
                break;
            }
        }
        while let Some((connection, pkid, permit)) = self.core.poll_ack() {
            self.link.ack_holding(connection, pkid, permit);
        }
        if self.core.poll_reconnect() {
            tracing::info!("mqtt: reconnecting to get back the messages left unacked");
            self.link.reconnect();
        }
    }
}

impl Actor for MqttSource {
    type Msg = MqttMsg;
    type State = MqttSourceState;
    type Arguments = MqttSourceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MqttMsg>,
        args: MqttSourceArgs,
    ) -> Result<MqttSourceState, ActorProcessingErr> {
        let config = args.config;
        config.validate()?;
        let gateway = args
            .names
            .where_is_gateway()
            .ok_or("the gateway is not running")?;
        let keys = RecordKeys::new(&config.client_id);
        let entries = ractor::call_t!(
            gateway,
            GatewayMsg::ReadState,
            GATEWAY_CALL_MS,
            keys.prefix().to_vec()
        )
        .map_err(|e| format!("reading the MQTT records back from the outbox: {e}"))?;
        let core = MqttCore::new(config.clone(), &entries);
        tracing::info!(
            broker = %format!("{}:{}", config.host, config.port),
            client_id = %config.client_id,
            topic = %config.topic,
            device_level = config.device_level,
            records = core.status().records,
            inflight_max = config.inflight_max,
            "mqtt source starting"
        );
        let events = myself.clone();
        let sink =
            Arc::new(move |e: LinkEvent| events.send_message(MqttMsg::Link(e)).map_err(|_| ()));
        let permits = Arc::new(Semaphore::new(config.inflight_max));
        let link = args.connector.connect(&config, sink, permits);
        myself.send_interval(Duration::from_millis(TICK_MS), || MqttMsg::Tick);
        // A nonce that differs between incarnations and replays under a
        // simulated clock.
        let source = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (config.client_id.as_str(), args.clock.now_us()).hash(&mut h);
            h.finish()
        };
        Ok(MqttSourceState {
            core,
            link,
            names: args.names,
            clock: args.clock,
            answers: Arc::new(Answers(myself.clone())),
            source,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<MqttMsg>,
        msg: MqttMsg,
        state: &mut MqttSourceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MqttMsg::Link(LinkEvent::Connected {
                connection,
                session_present,
            }) => {
                state.core.handle_connected(connection, session_present);
                if let Some(changes) = state.core.poll_state() {
                    // A new broker session: its generation must be durable
                    // before any of its messages is taken (see the core).
                    let gateway = state
                        .names
                        .where_is_gateway()
                        .ok_or("the gateway is not running")?;
                    ractor::call_t!(gateway, GatewayMsg::WriteState, GATEWAY_CALL_MS, changes)
                        .map_err(|e| format!("saving the MQTT session's generation: {e}"))?
                        .map_err(|e| format!("saving the MQTT session's generation: {e}"))?;
                }
                // Always (re)subscribe: a kept session may hold another
                // filter from an earlier configuration.
                state.link.subscribe(&state.core.config().topic)?;
                tracing::info!(
                    session_present,
                    connection,
                    held = state.core.held(),
                    "mqtt connected"
                );
            }
            MqttMsg::Link(LinkEvent::Subscribed { ok }) => {
                if !ok {
                    return Err(format!(
                        "the broker refused the subscription to {}",
                        state.core.config().topic
                    )
                    .into());
                }
                tracing::info!(topic = %state.core.config().topic, "mqtt subscribed");
            }
            MqttMsg::Link(LinkEvent::Publish {
                connection,
                message,
                permit,
            }) => {
                let now = Instant::now().into_std();
                let now_us = state.clock.now_us();
                state
                    .core
                    .handle_publish(now, now_us, connection, message, permit);
                state.drive();
            }
            MqttMsg::Link(LinkEvent::Publishes {
                connection,
                messages,
            }) => {
                let now = Instant::now().into_std();
                let now_us = state.clock.now_us();
                for (message, permit) in messages {
                    state
                        .core
                        .handle_publish(now, now_us, connection, message, permit);
                }
                state.drive();
            }
            MqttMsg::Link(LinkEvent::Overflow { connection }) => {
                state.core.handle_overflow(connection);
                state.drive();
            }
            MqttMsg::Link(LinkEvent::Disconnected { connection, error }) => {
                let was = state.core.status().connected;
                state.core.handle_disconnect(connection);
                if was {
                    tracing::warn!(%error, connection, held = state.core.held(), "mqtt connection lost; reconnecting");
                } else {
                    tracing::debug!(%error, "mqtt connection attempt failed");
                }
            }
            MqttMsg::Gateway(answer) => {
                tracing::trace!(?answer, "mqtt: the gateway answered");
                state.core.handle_answer(Instant::now().into_std(), answer);
                state.drive();
            }
            MqttMsg::Tick => {
                state.link.tick();
                state.core.log_malformed(Instant::now().into_std(), true);
                state.drive();
            }
            MqttMsg::Status(reply) => {
                let _ = reply.send(MqttSourceStatus {
                    core: state.core.status(),
                    link: state.link.stats(),
                });
            }
        }
        Ok(())
    }
}
