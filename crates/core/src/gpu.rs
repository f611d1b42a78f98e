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
}
