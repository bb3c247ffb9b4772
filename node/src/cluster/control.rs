//! Control calls across the cluster: the cloud asks an edge for its status,
//! to change a stage parameter, or to restart one of its actors.
//!
//! Each edge runs an [`EdgeControl`] actor in two process groups: all edges'
//! ([`EDGE_CONTROL_GROUP`]) and its own ([`edge_control_group`]), through
//! which the cloud finds it (remote actors are not in the name registry).
//! Requests and replies travel as JSON inside ractor's RPC frames. Decoding
//! never panics: ractor drops a message whose decoder panics without a word,
//! so a bad payload becomes [`Wire::Undecodable`] and gets an error answer.

use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, BytesConvertable, RpcReplyPort};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tributary_actors::edge::gateway::GatewayMsg;
use tributary_actors::edge::uplink::UplinkMsg;
use tributary_actors::edge::{GATEWAY_NAME, UPLINK_NAME};
use tributary_cluster::session::RactorClusterMessage;

/// The process group of the cloud's control actors, through which edges find them.
pub const CLOUD_CONTROL_GROUP: &str = "tributary.cloud.control";
/// The process group of every edge's control actor.
pub const EDGE_CONTROL_GROUP: &str = "tributary.edge.control";
/// How long the edge's control actor waits for the gateway.
const GATEWAY_CALL_TIMEOUT_MS: u64 = 2_000;

/// The process group of one edge's control actor.
pub fn edge_control_group(edge_id: &str) -> String {
    format!("{EDGE_CONTROL_GROUP}.{edge_id}")
}

/// What the cloud can ask of an edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The edge's id and uptime: proves the path.
    Status,
    /// Changes a parameter of one of the edge's stages (through its gateway).
    SetStageParam {
        stage: String,
        param: String,
        value: f64,
    },
    /// Kills a local actor registered under `name`, so its supervisor
    /// restarts it. Refused for actors without a supervisor.
    RestartActor { name: String },
    /// Pauses or resumes the edge's uplink: while paused, the outbox keeps
    /// filling and nothing is sent.
    SetUplinkPaused { paused: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlReply {
    Status(EdgeStatus),
    Done,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeStatus {
    pub edge_id: String,
    pub uptime_ms: u64,
}

/// Why a control call did not get a positive answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "find edge {edge}'s control actor: not in process group {group} (is the edge connected?)"
    )]
    NotFound { edge: String, group: String },
    #[error("send the control request to edge {edge}: {reason}")]
    Send { edge: String, reason: String },
    #[error("edge {edge} did not answer within {timeout_ms} ms")]
    Timeout { edge: String, timeout_ms: u64 },
    #[error("edge {edge} dropped the control request without an answer")]
    Dropped { edge: String },
    #[error("decode edge {edge}'s answer: {reason}")]
    Decode { edge: String, reason: String },
    #[error("edge {edge} refused the request: {reason}")]
    Refused { edge: String, reason: String },
}

/// A value carried as JSON. Decoding cannot fail: what does not parse is
/// kept as the parser's complaint, for the receiver to answer with.
#[derive(Debug, Clone, PartialEq)]
pub enum Wire<T> {
    Value(T),
    Undecodable(String),
}

impl<T: Serialize + DeserializeOwned> BytesConvertable for Wire<T> {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            // Serializing these plain enums and structs cannot fail; an empty
            // payload would only turn into an Undecodable at the receiver.
            Wire::Value(v) => serde_json::to_vec(&v).unwrap_or_default(),
            Wire::Undecodable(_) => Vec::new(),
        }
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        match serde_json::from_slice(&bytes) {
            Ok(v) => Wire::Value(v),
            Err(e) => Wire::Undecodable(e.to_string()),
        }
    }
}

/// The answer of an edge's control actor: its reply, or why it refused.
pub type ControlAnswer = Result<ControlReply, String>;

/// The edge control actor's messages. Serializable, so remote actors can
/// call it; the variant name is on the wire, so do not rename it.
#[derive(RactorClusterMessage)]
pub enum EdgeControlMsg {
    #[rpc]
    Call(Wire<ControlRequest>, RpcReplyPort<Wire<ControlAnswer>>),
}

/// Asks edge `edge_id` through its control actor, waiting up to `timeout`.
pub async fn call_edge(
    edge_id: &str,
    request: ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, ControlError> {
    let group = edge_control_group(edge_id);
    // Only a remote member crosses the session: a local one is this very
    // process's edge (two nodes sharing a process, as in tests). A member
    // counts only if the session it came over is certified as that edge's,
    // whatever group it joined. Sessions are numbered in order, so the
    // newest session's member is the live one.
    let control = ractor::pg::get_members(&group)
        .into_iter()
        .filter(|m| !m.get_id().is_local())
        .filter(|m| {
            tributary_cluster::session::certified_peer(m.get_id().node())
                .is_some_and(|p| p.as_str() == edge_id)
        })
        .max_by_key(|m| m.get_id().node())
        .ok_or_else(|| ControlError::NotFound {
            edge: edge_id.to_string(),
            group: group.clone(),
        })?;
    let control: ActorRef<EdgeControlMsg> = control.into();
    let edge = || edge_id.to_string();
    let answer = control
        .call(
            |reply| EdgeControlMsg::Call(Wire::Value(request), reply),
            Some(timeout),
        )
        .await
        .map_err(|e| ControlError::Send {
            edge: edge(),
            reason: e.to_string(),
        })?;
    let wire = match answer {
        ractor::rpc::CallResult::Success(wire) => wire,
        ractor::rpc::CallResult::Timeout => {
            return Err(ControlError::Timeout {
                edge: edge(),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            })
        }
        ractor::rpc::CallResult::SenderError => return Err(ControlError::Dropped { edge: edge() }),
    };
    match wire {
        Wire::Value(Ok(reply)) => Ok(reply),
        Wire::Value(Err(reason)) => Err(ControlError::Refused {
            edge: edge(),
            reason,
        }),
        Wire::Undecodable(reason) => Err(ControlError::Decode {
            edge: edge(),
            reason,
        }),
    }
}

/// The edge's control actor.
#[derive(Clone, Default)]
pub struct EdgeControl;

pub struct EdgeControlState {
    edge_id: String,
    started: Instant,
}

/// The registry name of edge `edge_id`'s control actor. Names are
/// process-global, so two nodes in one process need the id in it.
pub fn edge_control_name(edge_id: &str) -> String {
    format!("{EDGE_CONTROL_GROUP}.{edge_id}")
}

impl Actor for EdgeControl {
    type Msg = EdgeControlMsg;
    type State = EdgeControlState;
    type Arguments = String;

    async fn pre_start(
        &self,
        myself: ActorRef<EdgeControlMsg>,
        edge_id: String,
    ) -> Result<EdgeControlState, ActorProcessingErr> {
        for group in [EDGE_CONTROL_GROUP.to_string(), edge_control_group(&edge_id)] {
            ractor::pg::join(group, vec![myself.get_cell()]);
        }
        Ok(EdgeControlState {
            edge_id,
            started: Instant::now(),
        })
    }

    async fn handle(
        &self,
        _: ActorRef<EdgeControlMsg>,
        msg: EdgeControlMsg,
        state: &mut EdgeControlState,
    ) -> Result<(), ActorProcessingErr> {
        let EdgeControlMsg::Call(request, reply) = msg;
        let answer = match request {
            Wire::Value(request) => {
                let answer = serve(request.clone(), state).await;
                match &answer {
                    Ok(_) => tracing::info!(?request, "control request served"),
                    Err(e) => tracing::warn!(?request, error = %e, "control request refused"),
                }
                answer
            }
            Wire::Undecodable(e) => {
                tracing::warn!(error = %e, "undecodable control request");
                Err(format!("undecodable request: {e}"))
            }
        };
        // The caller may have timed out and gone: nothing to do then.
        let _ = reply.send(Wire::Value(answer));
        Ok(())
    }
}

async fn serve(request: ControlRequest, state: &EdgeControlState) -> ControlAnswer {
    match request {
        ControlRequest::Status => Ok(ControlReply::Status(EdgeStatus {
            edge_id: state.edge_id.clone(),
            uptime_ms: u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })),
        ControlRequest::SetStageParam {
            stage,
            param,
            value,
        } => {
            let gateway: ActorRef<GatewayMsg> = ractor::registry::where_is(GATEWAY_NAME)
                .ok_or("the gateway is not running")?
                .into();
            let result = gateway
                .call(
                    |reply| GatewayMsg::SetStageParam {
                        stage,
                        param,
                        value,
                        reply,
                    },
                    Some(Duration::from_millis(GATEWAY_CALL_TIMEOUT_MS)),
                )
                .await
                .map_err(|e| format!("message the gateway: {e}"))?;
            match result {
                ractor::rpc::CallResult::Success(r) => r.map(|()| ControlReply::Done),
                ractor::rpc::CallResult::Timeout => Err(format!(
                    "the gateway did not answer within {GATEWAY_CALL_TIMEOUT_MS} ms"
                )),
                ractor::rpc::CallResult::SenderError => {
                    Err("the gateway dropped the request".to_string())
                }
            }
        }
        ControlRequest::RestartActor { name } => {
            if name.starts_with(EDGE_CONTROL_GROUP) {
                // Its supervisor would wait for it to stop while it waits
                // for the supervisor's answer.
                return Err(format!(
                    "{name:?} serves this call; a control actor does not restart itself"
                ));
            }
            restart_supervised(&name).await?;
            Ok(ControlReply::Done)
        }
        ControlRequest::SetUplinkPaused { paused } => {
            let uplink: ActorRef<UplinkMsg> = ractor::registry::where_is(UPLINK_NAME)
                .ok_or("the uplink is not running")?
                .into();
            uplink
                .send_message(UplinkMsg::SetPaused(paused))
                .map_err(|e| format!("message the uplink: {e}"))?;
            Ok(ControlReply::Done)
        }
    }
}

/// Asks the supervisor of the local actor registered as `name` to restart
/// it. Refused for actors without one of our supervisors: killing a root, a
/// listener or the node server would end it for good.
pub(crate) async fn restart_supervised(name: &str) -> Result<(), String> {
    use tributary_actors::supervision::SupervisorMsg;
    let actor = ractor::registry::where_is(name)
        .ok_or_else(|| format!("no local actor is registered as {name:?}"))?;
    let supervisor: ActorRef<SupervisorMsg> = actor
        .try_get_supervisor()
        .ok_or_else(|| format!("{name:?} has no supervisor to restart it; refusing to stop it"))?
        .into();
    let answer = supervisor
        .call(
            |reply| SupervisorMsg::RestartChild {
                name: name.to_string(),
                reply,
            },
            Some(Duration::from_millis(GATEWAY_CALL_TIMEOUT_MS)),
        )
        .await
        .map_err(|e| format!("{name:?} is not under a Tributary supervisor: {e}"))?;
    match answer {
        ractor::rpc::CallResult::Success(r) => r,
        ractor::rpc::CallResult::Timeout => Err(format!(
            "the supervisor of {name:?} did not answer within {GATEWAY_CALL_TIMEOUT_MS} ms"
        )),
        ractor::rpc::CallResult::SenderError => {
            Err(format!("the supervisor of {name:?} dropped the request"))
        }
    }
}

/// How much of a cast the cloud's control actor logs.
const CAST_SHOWN_CHARS_MAX: usize = 120;

/// The cloud's control actor: edges find it through [`CLOUD_CONTROL_GROUP`]
/// and greet it once their session is ready, which proves the edge-to-cloud
/// direction of the path control calls take.
#[derive(Clone, Default)]
pub struct CloudControl;

impl Actor for CloudControl {
    type Msg = String;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<String>, _: ()) -> Result<(), ActorProcessingErr> {
        ractor::pg::join(CLOUD_CONTROL_GROUP.to_string(), vec![myself.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<String>,
        msg: String,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        // Any edge can cast here: never log its text at info, nor all of it.
        let shown: String = msg.chars().take(CAST_SHOWN_CHARS_MAX).collect();
        tracing::debug!(msg = %shown.escape_debug(), bytes = msg.len(), "control message over the cluster session");
        Ok(())
    }
}

/// The registry name of cloud `cloud_id`'s control actor.
pub fn cloud_control_name(cloud_id: &str) -> String {
    format!("{CLOUD_CONTROL_GROUP}.{cloud_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trips_and_never_panics_on_garbage() {
        let req = ControlRequest::SetStageParam {
            stage: "scale".into(),
            param: "factor".into(),
            value: 2.5,
        };
        let bytes = Wire::Value(req.clone()).into_bytes();
        assert_eq!(Wire::<ControlRequest>::from_bytes(bytes), Wire::Value(req));
        for garbage in [
            vec![],
            vec![0xff, 0x00, 0x13],
            b"{\"kind\":\"nope\"}".to_vec(),
        ] {
            assert!(matches!(
                Wire::<ControlRequest>::from_bytes(garbage),
                Wire::Undecodable(_)
            ));
        }
        let answer: ControlAnswer = Err("no stage".into());
        let bytes = Wire::Value(answer.clone()).into_bytes();
        assert_eq!(
            Wire::<ControlAnswer>::from_bytes(bytes),
            Wire::Value(answer)
        );
    }
}
