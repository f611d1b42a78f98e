//! GPU allocation decisions: which device ids a server gets, given what is
//! held. Pure: the hub keeps the allocations in its store and serializes
//! calls, so two starts never get the same exclusive device.

use std::collections::{BTreeMap, HashSet};

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    pub wanted: usize,
    pub free: usize,
    pub total: usize,
    /// Device id → holders ("alice", "bob/lab").
    pub holders: BTreeMap<String, Vec<String>>,
}

impl Shortage {
    /// What a user is told.
    pub fn for_users(&self) -> String {
        format!(
            "not enough free GPUs: {} wanted, {} of {} free; try again when a server stops",
            self.wanted, self.free, self.total
        )
    }

    /// What an admin is told: who holds them.
    pub fn for_admins(&self) -> String {
        let held: Vec<String> = self.holders.iter().map(|(d, h)| format!("{d}: {}", h.join(", "))).collect();
        format!("{}; held by {}", self.for_users(), if held.is_empty() { "nobody".into() } else { held.join("; ") })
    }
}

/// Picks `want` devices from `devices`. A device is free when nobody holds
/// it; a shared device may have several holders and is used after the free
/// ones, least-held first.
pub fn allocate(
    devices: &[String],
    shared: &HashSet<String>,
    held: &[(String, String)],
    want: usize,
) -> Result<Vec<String>, Shortage> {
    let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (d, h) in held {
        holders.entry(d.clone()).or_default().push(h.clone());
    }
    let mut free: Vec<&String> = devices.iter().filter(|d| !holders.contains_key(*d)).collect();
    let mut shareable: Vec<&String> =
        devices.iter().filter(|d| shared.contains(*d) && holders.contains_key(*d)).collect();
    shareable.sort_by_key(|d| holders.get(*d).map(Vec::len).unwrap_or(0));
    let free_count = free.len() + shareable.len();
    if want > free_count {
        return Err(Shortage { wanted: want, free: free_count, total: devices.len(), holders });
    }
    free.extend(shareable);
    Ok(free.into_iter().take(want).cloned().collect())
}

/// The node a device id of the inventory is on: `node:device` is a Swarm
/// node's, a plain id berth's own node's (`None`).
pub fn node_of(id: &str) -> Option<&str> {
    id.split_once(':').map(|(n, _)| n)
}

/// [`allocate`], with every device of one server on one node (see
/// [`node_of`]): among the nodes that can give `want` (only `on`, when
/// given), the one left with the fewest free devices, so larger blocks stay
/// whole. The shortage reported is the best node's.
pub fn allocate_on_one_node(
    devices: &[String],
    shared: &HashSet<String>,
    held: &[(String, String)],
    want: usize,
    on: Option<Option<&str>>,
) -> Result<Vec<String>, Shortage> {
    let mut nodes: BTreeMap<Option<&str>, Vec<String>> = BTreeMap::new();
    for d in devices {
        nodes.entry(node_of(d)).or_default().push(d.clone());
    }
    if let Some(only) = on {
        nodes.retain(|n, _| *n == only);
    }
    let mut best: Option<(usize, Vec<String>)> = None;
    let mut shortage: Option<Shortage> = None;
    for devs in nodes.values() {
        match allocate(devs, shared, held, want) {
            Ok(ids) => {
                let free = devs.iter().filter(|d| !held.iter().any(|(h, _)| h == *d)).count();
                let left = free.saturating_sub(ids.len());
                if best.as_ref().is_none_or(|(l, _)| left < *l) {
                    best = Some((left, ids));
                }
            }
            Err(s) => {
                if shortage.as_ref().is_none_or(|b| s.free > b.free) {
                    shortage = Some(s);
                }
            }
        }
    }
    match (best, shortage) {
        (Some((_, ids)), _) => Ok(ids),
        (None, Some(s)) => Err(s),
        (None, None) => Err(Shortage { wanted: want, free: 0, total: 0, holders: BTreeMap::new() }),
    }
}

/// The most devices one node has.
pub fn largest_node(devices: &[String]) -> usize {
    let mut count: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    for d in devices {
        *count.entry(node_of(d)).or_default() += 1;
    }
    count.into_values().max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("GPU-{i}")).collect()
    }

    #[test]
    fn exclusive_devices_go_once() {
        let devices = ids(4);
        let mut held: Vec<(String, String)> = Vec::new();
        let mut given = Vec::new();
        for i in 0..8 {
            match allocate(&devices, &HashSet::new(), &held, 1) {
                Ok(got) => {
                    held.push((got[0].clone(), format!("u{i}")));
                    given.push(got[0].clone());
                }
                Err(s) => {
                    assert_eq!((s.wanted, s.free, s.total), (1, 0, 4));
                    assert!(s.for_admins().contains("GPU-0: u0"), "{}", s.for_admins());
                    assert!(!s.for_users().contains("u0"));
                }
            }
        }
        given.sort();
        assert_eq!(given, devices, "four distinct ids");
    }

    #[test]
    fn shared_devices_take_several_holders() {
        let devices = ids(2);
        let shared: HashSet<String> = ["GPU-1".to_string()].into();
        let held = vec![("GPU-0".to_string(), "a".to_string()), ("GPU-1".to_string(), "b".to_string())];
        assert_eq!(allocate(&devices, &shared, &held, 1).unwrap(), vec!["GPU-1".to_string()]);
        assert!(allocate(&devices, &shared, &held, 2).is_err());
        assert_eq!(allocate(&devices, &shared, &[], 2).unwrap(), ids(2), "free devices first");
        assert!(allocate(&[], &shared, &[], 1).is_err());
        assert_eq!(allocate(&devices, &shared, &[], 0).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn one_servers_devices_come_from_one_node_the_tightest_that_fits() {
        let devices: Vec<String> = ["0", "1", "w1:a", "w1:b", "w1:c", "w2:a", "w2:b"].map(String::from).to_vec();
        let none = HashSet::new();
        // Two: berth's node (two free) fits exactly; w1 would keep one left.
        assert_eq!(allocate_on_one_node(&devices, &none, &[], 2, None).unwrap(), vec!["0", "1"]);
        // Three: only w1 has three.
        assert_eq!(allocate_on_one_node(&devices, &none, &[], 3, None).unwrap(), vec!["w1:a", "w1:b", "w1:c"]);
        // One, with berth's node full and w1:a held: w2 has two, w1 two: the first tightest.
        let held = vec![("0".into(), "u".into()), ("1".into(), "v".into()), ("w1:a".into(), "x".into())];
        let got = allocate_on_one_node(&devices, &none, &held, 2, None).unwrap();
        assert!(got == vec!["w1:b", "w1:c"] || got == vec!["w2:a", "w2:b"], "{got:?}");
        // Never split over nodes: four free in all, at most two on one node.
        let s = allocate_on_one_node(&devices, &none, &held, 3, None).unwrap_err();
        assert_eq!((s.wanted, s.free), (3, 2));
        // Held to one node (where the user's volumes are).
        assert_eq!(allocate_on_one_node(&devices, &none, &[], 1, Some(Some("w2"))).unwrap(), vec!["w2:a"]);
        let s = allocate_on_one_node(&devices, &none, &held, 1, Some(None)).unwrap_err();
        assert_eq!((s.free, s.total), (0, 2));
        assert_eq!(largest_node(&devices), 3);
        assert_eq!(largest_node(&[]), 0);
    }
}
