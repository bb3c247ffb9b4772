//! Reports from edges to the cloud over the cluster session.
//!
//! The cloud runs a [`DashboardInbox`] in [`DASHBOARD_GROUP`]; each edge
//! casts its report to the group's remote members once a second. A cast to
//! a partitioned cloud is lost, which is right: the next report supersedes
//! it, and the cloud shows the last one it got, marked stale.

use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tributary_cluster::session::RactorClusterMessage;

use super::report::{now_ms, NodeReport};
use super::Hub;
use crate::cluster::control::Wire;

/// The process group of the cloud's dashboard inbox.
pub const DASHBOARD_GROUP: &str = "tributary.cloud.dashboard";

/// Serializable, so edges can cast to it; the variant name is on the wire.
#[derive(RactorClusterMessage)]
pub enum InboxMsg {
    Report(Wire<NodeReport>),
}

pub struct DashboardInbox;

impl Actor for DashboardInbox {
    type Msg = InboxMsg;
    type State = Arc<Mutex<Hub>>;
    type Arguments = Arc<Mutex<Hub>>;

    async fn pre_start(
        &self,
        myself: ActorRef<InboxMsg>,
        hub: Arc<Mutex<Hub>>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(DASHBOARD_GROUP.to_string(), vec![myself.get_cell()]);
        Ok(hub)
    }

    async fn handle(
        &self,
        _: ActorRef<InboxMsg>,
        msg: InboxMsg,
        hub: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            InboxMsg::Report(Wire::Value(report)) => {
                hub.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .put_report(report, now_ms());
            }
            InboxMsg::Report(Wire::Undecodable(reason)) => {
                tracing::warn!(%reason, "an edge's dashboard report does not decode; dropped");
            }
        }
        Ok(())
    }
}

/// Sends `report` to every remote dashboard inbox (the cloud's).
pub fn send_report(report: &NodeReport) {
    for member in ractor::pg::get_members(&DASHBOARD_GROUP.to_string()) {
        if member.get_id().is_local() {
            continue;
        }
        let inbox: ActorRef<InboxMsg> = member.into();
        let _ = inbox.cast(InboxMsg::Report(Wire::Value(report.clone())));
    }
}
