//! Which partitions a node should own. Pure: every node runs the same
//! function over the same view (live nodes, lease owners) and the cluster
//! converges to an even spread without a coordinator.
//!
//! Rule: live nodes sorted by id; node `i` of `n` targets ⌊P/n⌋ of the P
//! polled partitions, plus one if `i < P mod n`. A node above its target
//! releases its excess; a node below takes free or expired partitions.
//! Nobody takes a partition that a live lease holds, so no more partitions
//! move than must.
//!
//! Partitions in CDC mode go to the holder of the replication slot's lease,
//! which alone reads their events from the slot; every other node releases
//! those it holds (after a switch of mode) and takes none.

use std::hash::{Hash, Hasher};

use crate::relay::Mode;

/// One partition's lease as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub partition: u32,
    /// Owner of an unexpired lease, if any.
    pub owner: Option<String>,
    pub mode: Mode,
}

/// What a node should change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub acquire: Vec<u32>,
    pub release: Vec<u32>,
}

/// How many of `partitions` the node `me` should own among `live` nodes.
/// `live` need not be sorted; `me` counts as live even if missing from it.
pub fn target(live: &[String], me: &str, partitions: u32) -> usize {
    let mut nodes: Vec<&str> = live.iter().map(String::as_str).collect();
    if !nodes.contains(&me) {
        nodes.push(me);
    }
    nodes.sort_unstable();
    nodes.dedup();
    let n = nodes.len();
    let index = nodes.iter().position(|x| *x == me).unwrap_or(0);
    let p = partitions as usize;
    p / n + usize::from(index < p % n)
}

/// The changes that bring `me` to its target, given the leases and the
/// holder of the slot's lease.
pub fn plan(live: &[String], me: &str, leases: &[LeaseView], slot_owner: Option<&str>) -> Plan {
    let holds_slot = slot_owner == Some(me);
    let mut cdc = Plan::default();
    for l in leases.iter().filter(|l| l.mode == Mode::Cdc) {
        match (&l.owner, holds_slot) {
            (None, true) => cdc.acquire.push(l.partition),
            (Some(o), false) if o == me => cdc.release.push(l.partition),
            _ => {}
        }
    }
    let polled: Vec<&LeaseView> = leases.iter().filter(|l| l.mode == Mode::Poll).collect();
    let mut plan = plan_polled(live, me, &polled);
    plan.acquire.extend(cdc.acquire);
    plan.release.extend(cdc.release);
    plan.acquire.sort_unstable();
    plan.release.sort_unstable();
    plan
}

fn plan_polled(live: &[String], me: &str, leases: &[&LeaseView]) -> Plan {
    let want = target(live, me, leases.len() as u32);
    let mut owned: Vec<u32> = leases
        .iter()
        .filter(|l| l.owner.as_deref() == Some(me))
        .map(|l| l.partition)
        .collect();
    owned.sort_unstable();
    if owned.len() > want {
        // Give up the ones this node ranks lowest, so the choice is stable.
        owned.sort_by_key(|p| std::cmp::Reverse(rank(me, *p)));
        return Plan {
            acquire: Vec::new(),
            release: owned.split_off(want),
        };
    }
    let mut free: Vec<u32> = leases
        .iter()
        .filter(|l| l.owner.is_none())
        .map(|l| l.partition)
        .collect();
    // Each node prefers different free partitions, so nodes that start
    // together do not all race for partition 0.
    free.sort_by_key(|p| std::cmp::Reverse(rank(me, *p)));
    free.truncate(want - owned.len());
    free.sort_unstable();
    Plan {
        acquire: free,
        release: Vec::new(),
    }
}

/// Rendezvous weight of (node, partition).
fn rank(node: &str, partition: u32) -> u64 {
    let mut h = ahash::AHasher::default();
    node.hash(&mut h);
    partition.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i:02}")).collect()
    }

    /// Runs every node's plan in turn until nothing changes; returns the
    /// owners and the number of rounds.
    fn converge(live: &[String], owners: &mut BTreeMap<u32, Option<String>>) -> usize {
        for round in 1..=10 {
            let mut changed = false;
            for me in live {
                let view: Vec<LeaseView> = owners
                    .iter()
                    .map(|(p, o)| LeaseView {
                        partition: *p,
                        owner: o.clone(),
                        mode: Mode::Poll,
                    })
                    .collect();
                let plan = plan(live, me, &view, None);
                for p in plan.release {
                    owners.insert(p, None);
                    changed = true;
                }
                for p in plan.acquire {
                    assert!(owners[&p].is_none(), "{me} took a held partition {p}");
                    owners.insert(p, Some(me.clone()));
                    changed = true;
                }
            }
            if !changed {
                return round;
            }
        }
        panic!("no convergence in 10 rounds");
    }

    fn counts(owners: &BTreeMap<u32, Option<String>>) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for o in owners.values().flatten() {
            *c.entry(o.clone()).or_default() += 1;
        }
        c
    }

    #[test]
    fn targets_add_up_and_differ_by_at_most_one() {
        for p in [1u32, 7, 16, 64, 256] {
            for n in 1..=50 {
                let live = nodes(n);
                let t: Vec<usize> = live.iter().map(|me| target(&live, me, p)).collect();
                assert_eq!(t.iter().sum::<usize>(), p as usize, "p={p} n={n}");
                let (lo, hi) = (t.iter().min().unwrap(), t.iter().max().unwrap());
                assert!(hi - lo <= 1, "p={p} n={n}: {t:?}");
            }
        }
    }

    #[test]
    fn converges_to_an_even_spread_for_1_to_50_nodes() {
        for n in 1..=50 {
            let live = nodes(n);
            let mut owners: BTreeMap<u32, Option<String>> = (0..256).map(|p| (p, None)).collect();
            converge(&live, &mut owners);
            let c = counts(&owners);
            assert!(
                owners.values().all(Option::is_some),
                "n={n}: unowned partitions"
            );
            let (lo, hi) = (256 / n, 256usize.div_ceil(n));
            assert!(c.values().all(|k| *k >= lo && *k <= hi), "n={n}: {c:?}");
        }
    }

    #[test]
    fn a_joining_node_moves_only_what_it_must() {
        for n in 1..50 {
            let mut live = nodes(n);
            let mut owners: BTreeMap<u32, Option<String>> = (0..256).map(|p| (p, None)).collect();
            converge(&live, &mut owners);
            let before = owners.clone();
            live.push("node-zz".into());
            converge(&live, &mut owners);
            let moved = before.iter().filter(|(p, o)| owners[p] != **o).count();
            let newcomer = counts(&owners).get("node-zz").copied().unwrap_or(0);
            // Each partition the newcomer now has moved once; any other move
            // is rebalancing between the old nodes caused by the change of
            // index order, at most one per old node.
            assert!(newcomer >= 256 / (n + 1));
            assert!(
                moved <= newcomer + n,
                "n={n}: moved {moved}, newcomer has {newcomer}"
            );
        }
    }

    #[test]
    fn a_leaving_node_s_partitions_spread_over_the_survivors() {
        for n in 2..=50 {
            let mut live = nodes(n);
            let mut owners: BTreeMap<u32, Option<String>> = (0..256).map(|p| (p, None)).collect();
            converge(&live, &mut owners);
            let gone = live.remove(n / 2);
            let orphaned = owners
                .values()
                .filter(|o| o.as_deref() == Some(gone.as_str()))
                .count();
            let before = owners.clone();
            // Its leases expire.
            for o in owners.values_mut() {
                if o.as_deref() == Some(gone.as_str()) {
                    *o = None;
                }
            }
            converge(&live, &mut owners);
            let moved = before.iter().filter(|(p, o)| owners[p] != **o).count();
            assert!(owners.values().all(Option::is_some));
            assert!(
                moved <= orphaned + n,
                "n={n}: moved {moved}, orphaned {orphaned}"
            );
            let c = counts(&owners);
            let (lo, hi) = (256 / (n - 1), 256usize.div_ceil(n - 1));
            assert!(c.values().all(|k| *k >= lo && *k <= hi), "n={n}: {c:?}");
        }
    }

    #[test]
    fn a_single_node_takes_everything_free_and_nothing_held() {
        let live = nodes(1);
        let leases = vec![
            LeaseView {
                partition: 0,
                owner: None,
                mode: Mode::Poll,
            },
            LeaseView {
                partition: 1,
                owner: Some("ghost".into()),
                mode: Mode::Poll,
            },
            LeaseView {
                partition: 2,
                owner: None,
                mode: Mode::Poll,
            },
        ];
        let p = plan(&live, "node-00", &leases, None);
        assert_eq!(p.acquire, vec![0, 2]);
        assert!(p.release.is_empty());
    }

    fn view(partition: u32, owner: Option<&str>, mode: Mode) -> LeaseView {
        LeaseView {
            partition,
            owner: owner.map(String::from),
            mode,
        }
    }

    #[test]
    fn cdc_partitions_go_to_the_slot_holder_and_polled_ones_spread_over_everyone() {
        let live = nodes(2);
        let (a, b) = ("node-00", "node-01");
        let leases = vec![
            view(0, None, Mode::Cdc),
            view(1, Some(a), Mode::Cdc),
            view(2, None, Mode::Poll),
            view(3, None, Mode::Poll),
            view(4, Some(b), Mode::Cdc),
        ];
        // b holds the slot: it takes the free CDC partition and keeps its
        // own; a releases the CDC partition it still holds from polling.
        // Each node also targets one of the two polled partitions.
        let polled = |p: &Plan| p.acquire.iter().filter(|x| [2, 3].contains(*x)).count();
        let for_b = plan(&live, b, &leases, Some(b));
        assert!(for_b.acquire.contains(&0), "{for_b:?}");
        assert_eq!(polled(&for_b), 1, "{for_b:?}");
        assert!(for_b.release.is_empty());
        let for_a = plan(&live, a, &leases, Some(b));
        assert_eq!(for_a.release, vec![1]);
        assert!(!for_a.acquire.contains(&0), "{for_a:?}");
        assert_eq!(polled(&for_a), 1, "{for_a:?}");
        // Nobody holds the slot: CDC partitions stay where they are and
        // nobody takes the free one.
        let nobody = plan(&live, a, &leases, None);
        assert_eq!(nobody.release, vec![1]);
        assert!(!nobody.acquire.contains(&0));
    }
}
