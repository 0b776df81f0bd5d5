//! Which nodes hold which group.
//!
//! Every group has up to [`REPLICATION_FACTOR`] voters, chosen from the
//! cluster's nodes in id order starting at an offset that moves by one per
//! group, so that with N nodes each node is the first voter of about 1/N of
//! the groups. The first voter is the group's preferred leader. Every other
//! node of the cluster follows the group as a learner: it applies the log
//! (so reads answer on any node) without counting for the quorum.

use std::collections::BTreeMap;

use crate::{GroupId, NodeId};

/// Voters per group: a group keeps serving while a majority of them lives.
pub const REPLICATION_FACTOR: usize = 3;

/// The nodes of the cluster, by id, with the address each is reached at.
pub type Nodes = BTreeMap<NodeId, String>;

/// The voters of `group`, preferred leader first.
pub fn voters(group: GroupId, nodes: &Nodes) -> Vec<NodeId> {
    let ids: Vec<NodeId> = nodes.keys().copied().collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let start = group as usize % ids.len();
    (0..REPLICATION_FACTOR.min(ids.len())).map(|i| ids[(start + i) % ids.len()]).collect()
}

/// The nodes that follow `group` without voting.
pub fn learners(group: GroupId, nodes: &Nodes) -> Vec<NodeId> {
    let voters = voters(group, nodes);
    nodes.keys().copied().filter(|id| !voters.contains(id)).collect()
}

/// The node that bootstraps `group` when the cluster is first created: its
/// lowest-id voter, so that exactly one node does it.
pub fn bootstrapper(group: GroupId, nodes: &Nodes) -> Option<NodeId> {
    voters(group, nodes).into_iter().min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u64) -> Nodes {
        (1..=n).map(|id| (id, format!("10.0.0.{id}:5122"))).collect()
    }

    #[test]
    fn one_node_holds_everything() {
        for group in 0..9 {
            assert_eq!(voters(group, &nodes(1)), vec![1]);
            assert!(learners(group, &nodes(1)).is_empty());
            assert_eq!(bootstrapper(group, &nodes(1)), Some(1));
        }
    }

    #[test]
    fn three_nodes_vote_on_every_group_with_leaders_spread() {
        let cluster = nodes(3);
        let mut preferred = BTreeMap::<NodeId, usize>::new();
        for group in 0..9 {
            let v = voters(group, &cluster);
            let mut sorted = v.clone();
            sorted.sort();
            assert_eq!(sorted, vec![1, 2, 3]);
            assert!(learners(group, &cluster).is_empty());
            *preferred.entry(v[0]).or_default() += 1;
        }
        assert_eq!(preferred.values().copied().collect::<Vec<_>>(), vec![3, 3, 3]);
    }

    #[test]
    fn larger_clusters_keep_three_voters_and_the_rest_learn() {
        let cluster = nodes(5);
        let mut preferred = BTreeMap::<NodeId, usize>::new();
        for group in 0..10 {
            let v = voters(group, &cluster);
            assert_eq!(v.len(), 3);
            let l = learners(group, &cluster);
            assert_eq!(l.len(), 2);
            assert!(l.iter().all(|id| !v.contains(id)));
            assert_eq!(bootstrapper(group, &cluster), v.iter().copied().min());
            *preferred.entry(v[0]).or_default() += 1;
        }
        assert_eq!(preferred.values().copied().collect::<Vec<_>>(), vec![2, 2, 2, 2, 2]);
    }

    #[test]
    fn two_nodes_both_vote() {
        for group in 0..4 {
            assert_eq!(voters(group, &nodes(2)).len(), 2);
        }
    }
}
