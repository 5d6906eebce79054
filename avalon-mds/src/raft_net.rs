//! Raft network glue: openraft RPCs over the tonic `Raft` service, with
//! postcard-serialized openraft structs in `RaftMessage.payload`. Every
//! message carries its sender's protocol version: a node refuses a too-old
//! peer, and a node refused as too old stops (it cannot serve in the group).

// openraft's error types are large by design; boxing them would fight its API.
#![allow(clippy::result_large_err)]

use crate::node::{MdsNode, PeerKind};
use crate::raft_store::{NodeId, TypeConfig};
use avalon_proto::limits::MAX_MESSAGE_BYTES;
use avalon_proto::pb::raft_client::RaftClient;
use avalon_proto::pb::raft_server;
use avalon_proto::pb::{AddMdsRequest, Empty, FlushLogRequest, RaftMessage, RemoveMdsRequest};
use avalon_proto::request_id::{self, Stamp, Traced};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Creates one [`NetworkConn`] per peer.
#[derive(Clone)]
pub struct NetworkFactory {
    /// This node's raft id (sent with every message).
    pub id: NodeId,
    /// This node's TLS (its `mds.N` key) for the connections to its peers.
    pub tls: avalon_proto::tls::ClientTls,
    /// The feature bits each peer's answers carried.
    pub features: PeerFeatures,
}

/// Feature bits by MDS id, from the peers' raft messages and answers (the
/// leader learns its followers' versions there, a follower its leader's).
pub type PeerFeatures = Arc<std::sync::Mutex<std::collections::HashMap<NodeId, u64>>>;

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = NetworkConn;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> NetworkConn {
        NetworkConn {
            id: self.id,
            target,
            addr: node.addr.clone(),
            client: None,
            tls: self.tls.clone(),
            features: self.features.clone(),
        }
    }
}

/// A lazily connected client to one peer's `Raft` service.
pub struct NetworkConn {
    id: NodeId,
    target: NodeId,
    addr: String,
    client: Option<RaftClient<Traced>>,
    tls: avalon_proto::tls::ClientTls,
    features: PeerFeatures,
}

#[derive(Clone, Copy)]
enum Kind {
    Append,
    Vote,
    Snapshot,
}

enum CallErr {
    Unreachable(String),
    Network(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl NetworkConn {
    fn client(&mut self) -> Result<RaftClient<Traced>, CallErr> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let ch = self
            .tls
            .channel(
                &self.addr,
                avalon_proto::tls::Dial::Mds,
                Duration::from_secs(1),
            )
            .map_err(|e| CallErr::Unreachable(e.message().to_string()))?;
        let c = RaftClient::with_interceptor(ch, Stamp)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn call<Q: Serialize, P: DeserializeOwned, E: DeserializeOwned>(
        &mut self,
        kind: Kind,
        req: &Q,
        ttl: Duration,
    ) -> Result<Result<P, E>, CallErr> {
        let payload = postcard::to_allocvec(req).map_err(|e| CallErr::Network(e.to_string()))?;
        let mut c = self.client()?;
        let msg = RaftMessage {
            payload: payload.into(),
            version: Some(avalon_proto::version::local()),
            from: self.id,
        };
        let fut = async move {
            match kind {
                Kind::Append => c.append_entries(msg).await,
                Kind::Vote => c.vote(msg).await,
                Kind::Snapshot => c.install_snapshot(msg).await,
            }
        };
        let resp = match tokio::time::timeout(ttl, fut).await {
            Err(_) => return Err(CallErr::Network(format!("timeout after {ttl:?}"))),
            Ok(Err(s)) if avalon_proto::version::is_refusal(&s) => {
                // This node is too old for its peer: nothing to retry.
                tracing::error!(peer = self.target, "{}", s.message());
                eprintln!("avalon-mds: {}", s.message());
                std::process::exit(2);
            }
            Ok(Err(s)) => {
                return Err(if s.code() == tonic::Code::Unavailable {
                    CallErr::Unreachable(s.message().to_string())
                } else {
                    CallErr::Network(format!("{:?}: {}", s.code(), s.message()))
                })
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let peer = format!("MDS {}", self.target);
        if let Err(s) = avalon_proto::version::check("this MDS", &peer, resp.version.as_ref()) {
            tracing::warn!(error = %s.message(), "ignoring a too-old peer's answer");
            return Err(CallErr::Network(s.message().to_string()));
        }
        let features = avalon_proto::version::of_peer(resp.version.as_ref()).features;
        self.features
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.target, features);
        postcard::from_bytes(&resp.payload).map_err(|e| CallErr::Network(e.to_string()))
    }

    fn map<P, E: std::error::Error>(
        &self,
        r: Result<Result<P, RaftError<NodeId, E>>, CallErr>,
    ) -> Result<P, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        match r {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(CallErr::Unreachable(m)) => Err(RPCError::Unreachable(Unreachable::new(&Msg(m)))),
            Err(CallErr::Network(m)) => Err(RPCError::Network(NetworkError::new(&Msg(m)))),
        }
    }
}

impl RaftNetwork<TypeConfig> for NetworkConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // Each call is a request of its own: the peer logs it with this id.
        let r = request_id::scope(
            request_id::fresh(),
            self.call(Kind::Append, &rpc, option.hard_ttl()),
        )
        .await;
        self.map(r)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let ttl = option.hard_ttl().max(Duration::from_secs(5));
        let r = request_id::scope(request_id::fresh(), self.call(Kind::Snapshot, &rpc, ttl)).await;
        self.map(r)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let r = request_id::scope(
            request_id::fresh(),
            self.call(Kind::Vote, &rpc, option.hard_ttl()),
        )
        .await;
        self.map(r)
    }
}

// ------------------------------------------------------------------ server

/// The `Raft` gRPC service of one node.
pub struct RaftService {
    pub node: Arc<MdsNode>,
}

fn decode<T: DeserializeOwned>(m: &RaftMessage) -> Result<T, Status> {
    postcard::from_bytes(&m.payload)
        .map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = postcard::to_allocvec(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage {
        payload: payload.into(),
        version: Some(avalon_proto::version::local()),
        from: 0,
    }))
}

impl RaftService {
    /// Checks and remembers the version of the peer that sent `m` (a refusal
    /// is logged when that peer's version changes, not on every message).
    fn check_peer(&self, m: &RaftMessage) -> Result<(), Status> {
        let peer = if m.from == 0 {
            "an MDS".to_string()
        } else {
            format!("MDS {}", m.from)
        };
        let sent = avalon_proto::version::of_peer(m.version.as_ref());
        if m.from != 0 {
            // A follower learns the leader's features here, so that after a
            // failover it knows those of a predecessor that is now silent.
            self.node
                .peer_features
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(m.from, sent.features);
        }
        let known = self.node.peer_version(PeerKind::Mds, m.from);
        self.node.version_seen(PeerKind::Mds, m.from, sent);
        avalon_proto::version::check("this MDS", &peer, m.version.as_ref())
            .map(|_| ())
            .inspect_err(|s| {
                if known.as_ref() != Some(&avalon_proto::version::of_peer(m.version.as_ref())) {
                    tracing::warn!(error = %s.message(), "refusing a peer");
                }
            })
    }
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.check_peer(req.get_ref())?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        encode(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check_peer(req.get_ref())?;
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        // A (recent) leader refuses while its followers would (openraft's
        // leader lease): it may have granted client leases that a new
        // leader's wait counts on having ended (`fresh_leader.rs`).
        // openraft 0.9 has a leader vote as soon as the candidate's log is
        // long enough. The answer carries no log id, so the candidate just
        // counts a refusal.
        if rpc.vote.leader_id().voted_for() != Some(self.node.id) && self.node.holds_leader_lease()
        {
            let vote = self.node.raft.metrics().borrow().vote;
            let refused: Result<VoteResponse<NodeId>, RaftError<NodeId>> = Ok(VoteResponse {
                vote,
                vote_granted: false,
                last_log_id: None,
            });
            return encode(&refused);
        }
        encode(&self.node.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.check_peer(req.get_ref())?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        encode(&self.node.raft.install_snapshot(rpc).await)
    }

    async fn flush_log(&self, req: Request<FlushLogRequest>) -> Result<Response<Empty>, Status> {
        let upto = req.into_inner().upto;
        let wait = crate::log_sync::SYNC_TIMEOUT;
        if self.node.log_sync.log().flush_upto(upto, wait).await {
            Ok(Response::new(Empty {}))
        } else {
            Err(Status::unavailable(format!(
                "raft log not on disk up to {upto} within {wait:?}"
            )))
        }
    }

    async fn add_mds(&self, req: Request<AddMdsRequest>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        if req.id == 0 || req.addr.is_empty() {
            return Err(Status::invalid_argument("id and addr are required"));
        }
        self.node.check_leader()?;
        let raft = &self.node.raft;
        raft.add_learner(
            req.id,
            BasicNode {
                addr: req.addr.clone(),
            },
            true,
        )
        .await
        .map_err(|e| self.node.raft_err(e))?;
        let mut members: std::collections::BTreeSet<NodeId> = self.node.voter_ids();
        members.insert(req.id);
        raft.change_membership(members, false)
            .await
            .map_err(|e| self.node.raft_err(e))?;
        tracing::info!(id = req.id, addr = %req.addr, "added MDS");
        Ok(Response::new(Empty {}))
    }

    async fn remove_mds(&self, req: Request<RemoveMdsRequest>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        self.node.check_leader()?;
        let mut members = self.node.voter_ids();
        if !members.remove(&req.id) {
            return Err(Status::not_found(format!("MDS {} is not a member", req.id)));
        }
        if members.is_empty() {
            return Err(Status::failed_precondition("cannot remove the last MDS"));
        }
        self.node
            .raft
            .change_membership(members, false)
            .await
            .map_err(|e| self.node.raft_err(e))?;
        tracing::info!(id = req.id, "removed MDS");
        Ok(Response::new(Empty {}))
    }
}
