//! Cluster-wide settings: fixed when the cluster is created, kept in the
//! replicated state, and checked against each node's local configuration.
//!
//! Placement (pg count, replicas, failure-domain rule), the write quorum
//! and the chunk size of new files must be the same on every node: if they
//! came from each node's own TOML, a failover to a node whose file differs
//! would move every chunk. So the first leader writes them into the raft
//! log ([`crate::command::Op::InitSettings`]); every node reads them from
//! its state machine, and a node whose configuration sets a different
//! value refuses to start. Replicas and write quorum can be changed later
//! through raft ([`crate::command::Op::SetReplicas`], `avalonctl pool set`).

use crate::command::Op;
use crate::config::Config;
use crate::node::MdsNode;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most replicas a cluster can be set to.
pub const MAX_REPLICAS: u32 = 16;

/// How a placement group's members are spread over failure domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailureDomainRule {
    /// At most one copy per failure domain while there are enough distinct
    /// domains, then the best remaining OSDs fill up (`placement.rs`).
    #[default]
    Spread,
}

impl FailureDomainRule {
    /// The rule's name in configuration files and status output.
    pub fn name(self) -> &'static str {
        match self {
            FailureDomainRule::Spread => "spread",
        }
    }

    /// Parses a rule name.
    pub fn parse(s: &str) -> Option<FailureDomainRule> {
        match s.trim() {
            "spread" => Some(FailureDomainRule::Spread),
            _ => None,
        }
    }
}

impl fmt::Display for FailureDomainRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The settings every node must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Chosen at creation (or given as `cluster_id`); names the cluster.
    pub cluster_id: String,
    pub pg_count: u32,
    pub replicas: u32,
    pub write_quorum: u32,
    /// Chunk size of new files (existing files keep theirs).
    pub chunk_size: u32,
    pub failure_domain_rule: FailureDomainRule,
}

/// Why replicas/write quorum values are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("need 1 <= write_quorum ({write_quorum}) <= replicas ({replicas}) <= {MAX_REPLICAS}")]
    BadQuorum { replicas: u32, write_quorum: u32 },
}

/// Checks a replicas / write quorum pair.
pub fn check_quorum(replicas: u32, write_quorum: u32) -> Result<(), SettingsError> {
    if replicas == 0 || replicas > MAX_REPLICAS || write_quorum == 0 || write_quorum > replicas {
        return Err(SettingsError::BadQuorum {
            replicas,
            write_quorum,
        });
    }
    Ok(())
}

/// A cluster id: 128 bits from the clock, the process and the node.
pub fn new_cluster_id(node_id: u64) -> String {
    fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    let now = crate::node::now_ns() as u64;
    let pid = u64::from(std::process::id());
    let a = mix(now ^ (node_id << 48));
    let b = mix(a ^ pid ^ now.rotate_left(17));
    format!("{a:016x}{b:016x}")
}

/// A node's configuration sets a cluster-wide setting to another value
/// than the cluster's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cluster setting `{key}` is {stored} in the cluster's replicated state, but this node's \
     configuration sets it to {local} (`{key}` in the config file or --{flag}). {fix}"
)]
pub struct Mismatch {
    pub key: &'static str,
    pub flag: String,
    pub stored: String,
    pub local: String,
    pub fix: String,
}

impl ClusterSettings {
    /// The settings a node proposes when it creates the cluster (or adopts
    /// them for a cluster that has none yet): its configuration, defaults
    /// where it sets nothing, and a new cluster id unless one is given.
    pub fn bootstrap(cfg: &Config) -> ClusterSettings {
        let d = Config::default_settings();
        let replicas = cfg.replicas.unwrap_or(d.replicas);
        ClusterSettings {
            cluster_id: cfg
                .cluster_id
                .clone()
                .unwrap_or_else(|| new_cluster_id(cfg.id)),
            pg_count: cfg.pg_count.unwrap_or(d.pg_count),
            replicas,
            // The default quorum, at most the copies there are.
            write_quorum: cfg.write_quorum.unwrap_or(d.write_quorum.min(replicas)),
            chunk_size: cfg.chunk_size.unwrap_or(d.chunk_size),
            failure_domain_rule: cfg.failure_domain_rule.unwrap_or_default(),
        }
    }

    /// Compares every setting the configuration sets explicitly (file or
    /// flag) with the stored one; defaults never disagree.
    pub fn check(&self, cfg: &Config) -> Result<(), Mismatch> {
        let changeable = "Remove it from this node's config file and flags (the cluster's value \
             is used), or set it to the cluster's value; change replicas and write quorum with \
             `avalonctl pool set replicas N [--write-quorum M]`.";
        let fixed = "It is fixed when the cluster is created: remove it from this node's config \
             file and flags (the cluster's value is used), or set it to the cluster's value.";
        let mismatch = |key: &'static str, stored: String, local: String, fix: &str| Mismatch {
            key,
            flag: key.replace('_', "-"),
            stored,
            local,
            fix: fix.to_string(),
        };
        if let Some(id) = &cfg.cluster_id {
            if *id != self.cluster_id {
                return Err(mismatch(
                    "cluster_id",
                    format!("{:?}", self.cluster_id),
                    format!("{id:?}"),
                    "This node's data directory belongs to another cluster, or the \
                     configuration names another one: give the right data directory or \
                     cluster_id.",
                ));
            }
        }
        let nums = [
            ("pg_count", cfg.pg_count, self.pg_count, fixed),
            ("replicas", cfg.replicas, self.replicas, changeable),
            (
                "write_quorum",
                cfg.write_quorum,
                self.write_quorum,
                changeable,
            ),
            ("chunk_size", cfg.chunk_size, self.chunk_size, fixed),
        ];
        for (key, local, stored, fix) in nums {
            if let Some(local) = local {
                if local != stored {
                    return Err(mismatch(key, stored.to_string(), local.to_string(), fix));
                }
            }
        }
        if let Some(rule) = cfg.failure_domain_rule {
            if rule != self.failure_domain_rule {
                return Err(mismatch(
                    "failure_domain_rule",
                    format!("{:?}", self.failure_domain_rule.name()),
                    format!("{:?}", rule.name()),
                    fixed,
                ));
            }
        }
        Ok(())
    }
}

/// The settings after `ops` (log entries not applied yet) on top of `cur`
/// (the state machine's): how a restarting node knows the cluster's
/// settings before it serves.
pub fn replay<'a>(
    mut cur: Option<ClusterSettings>,
    ops: impl IntoIterator<Item = &'a Op>,
) -> Option<ClusterSettings> {
    for op in ops {
        replay_one(&mut cur, op);
    }
    cur
}

fn replay_one(cur: &mut Option<ClusterSettings>, op: &Op) {
    match op {
        // Group commit: several clients' commands in one entry.
        Op::Multi(cmds) => cmds.iter().for_each(|c| replay_one(cur, &c.op)),
        Op::InitSettings { settings } if cur.is_none() => *cur = Some(settings.clone()),
        Op::SetReplicas {
            replicas,
            write_quorum,
        } if check_quorum(*replicas, *write_quorum).is_ok() => {
            if let Some(c) = cur.as_mut() {
                c.replicas = *replicas;
                c.write_quorum = *write_quorum;
            }
        }
        _ => {}
    }
}

/// Every node: once the cluster's settings are known (a node that joins,
/// or whose cluster has none stored yet, learns them as it catches up),
/// checks them against the configuration once; a mismatch is stored in
/// `refused` and stops the node. The leader writes them if there are none.
pub async fn guard_loop(
    node: &MdsNode,
    stop: CancellationToken,
    refused: &Mutex<Option<Mismatch>>,
) {
    loop {
        let known = node.read_local(|s| s.settings.clone());
        match known {
            Some(s) => {
                if let Err(m) = s.check(&node.cfg) {
                    tracing::error!("{m}");
                    *refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
                    stop.cancel();
                }
                // Checked once: a later `pool set` does not stop running
                // nodes (their next start checks again).
                return;
            }
            None if node.is_leader() => {
                if let Err(e) = node.ensure_settings().await {
                    tracing::debug!(error = %e, "cluster settings not written yet");
                }
            }
            None => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Reads the state's trailing settings field; a state written before the
/// field existed (an older snapshot, in the non-self-describing postcard
/// format) simply ends there, which reads as "no settings yet".
pub fn absent_as_none<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<ClusterSettings>, D::Error> {
    Ok(Option::<ClusterSettings>::deserialize(d).unwrap_or(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> ClusterSettings {
        ClusterSettings {
            cluster_id: "c1".into(),
            pg_count: 256,
            replicas: 3,
            write_quorum: 2,
            chunk_size: 4 << 20,
            failure_domain_rule: FailureDomainRule::Spread,
        }
    }

    #[test]
    fn unset_values_never_disagree() {
        let cfg = Config::default();
        assert_eq!(stored().check(&cfg), Ok(()));
    }

    #[test]
    fn explicit_value_that_differs_is_named() {
        let cfg = Config {
            replicas: Some(2),
            ..Config::default()
        };
        let e = stored().check(&cfg).expect_err("mismatch");
        assert_eq!(e.key, "replicas");
        let msg = e.to_string();
        assert!(msg.contains("`replicas` is 3"), "{msg}");
        assert!(msg.contains("sets it to 2"), "{msg}");
        assert!(msg.contains("avalonctl pool set"), "{msg}");
        let cfg = Config {
            replicas: Some(3),
            chunk_size: Some(1 << 20),
            ..Config::default()
        };
        assert_eq!(stored().check(&cfg).expect_err("chunk").key, "chunk_size");
        let cfg = Config {
            cluster_id: Some("other".into()),
            ..Config::default()
        };
        assert_eq!(stored().check(&cfg).expect_err("id").key, "cluster_id");
    }

    #[test]
    fn bootstrap_takes_config_then_defaults() {
        let cfg = Config {
            replicas: Some(2),
            write_quorum: Some(1),
            ..Config::default()
        };
        let s = ClusterSettings::bootstrap(&cfg);
        assert_eq!((s.replicas, s.write_quorum), (2, 1));
        assert_eq!(s.pg_count, avalon_proto::limits::DEFAULT_PG_COUNT);
        assert_eq!(s.cluster_id.len(), 32);
        assert_eq!(s.check(&cfg), Ok(()));
        let one = Config {
            replicas: Some(1),
            ..Config::default()
        };
        assert!(one.validate().is_ok());
        let s = ClusterSettings::bootstrap(&one);
        assert_eq!((s.replicas, s.write_quorum), (1, 1));
    }

    #[test]
    fn replay_of_unapplied_entries() {
        let init = Op::InitSettings { settings: stored() };
        let set = Op::SetReplicas {
            replicas: 2,
            write_quorum: 1,
        };
        let s = replay(None, [&init, &set]).expect("settings");
        assert_eq!((s.replicas, s.write_quorum, s.pg_count), (2, 1, 256));
        // A second InitSettings does not override; nothing before Init.
        let other = Op::InitSettings {
            settings: ClusterSettings {
                replicas: 1,
                write_quorum: 1,
                ..stored()
            },
        };
        assert_eq!(replay(Some(stored()), [&other]), Some(stored()));
        assert_eq!(replay(None, [&set]), None);
        let multi = Op::Multi(vec![crate::command::MetaCommand {
            now_ns: 0,
            session_id: 0,
            request_id: 0,
            op: set.clone(),
        }]);
        let s = replay(Some(stored()), [&multi]).expect("settings");
        assert_eq!((s.replicas, s.write_quorum), (2, 1));
    }

    #[test]
    fn old_state_without_settings_decodes() {
        // An old snapshot ends where the settings field starts.
        let mut st = crate::namespace::State::new();
        let full = postcard::to_allocvec(&st).expect("encode");
        assert_eq!(full.last(), Some(&0)); // None
        let old = &full[..full.len() - 1];
        let back: crate::namespace::State = postcard::from_bytes(old).expect("decode old");
        assert_eq!(back, st);
        st.settings = Some(stored());
        let new = postcard::to_allocvec(&st).expect("encode");
        let back: crate::namespace::State = postcard::from_bytes(&new).expect("decode new");
        assert_eq!(back.settings, Some(stored()));
    }

    #[test]
    fn quorum_bounds() {
        assert!(check_quorum(3, 2).is_ok());
        assert!(check_quorum(0, 0).is_err());
        assert!(check_quorum(2, 3).is_err());
        assert!(check_quorum(MAX_REPLICAS + 1, 1).is_err());
    }
}
