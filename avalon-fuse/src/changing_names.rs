//! Names this client is changing right now (create, unlink, rename, ...
//! sent to the MDS, not answered yet). Lookups of them ask the MDS and keep
//! nothing: the MDS may have applied the change already, and another mount
//! may have seen it, while this client's cache still holds the name as it
//! was (the MDS recalls other sessions' caches, not the requester's).

use bytes::Bytes;
use dashmap::DashMap;

/// Names with a change of this client in flight (counted: two threads may
/// change one name at once).
#[derive(Default)]
pub struct ChangingNames(DashMap<(u64, Bytes), u32>);

/// One change in flight; its names are released when it is dropped.
pub struct Changing<'a> {
    set: &'a ChangingNames,
    keys: Vec<(u64, Bytes)>,
}

impl ChangingNames {
    /// Marks `names` (directory, name) as being changed until the guard is
    /// dropped.
    pub fn begin(&self, names: &[(u64, &[u8])]) -> Changing<'_> {
        let keys: Vec<(u64, Bytes)> = names
            .iter()
            .map(|(d, n)| (*d, Bytes::copy_from_slice(n)))
            .collect();
        for k in &keys {
            *self.0.entry(k.clone()).or_default() += 1;
        }
        Changing { set: self, keys }
    }

    /// True if a change of `name` in `dir` is in flight.
    pub fn contains(&self, dir: u64, name: &[u8]) -> bool {
        !self.0.is_empty() && self.0.contains_key(&(dir, Bytes::copy_from_slice(name)))
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        for k in self.keys.drain(..) {
            self.set.0.remove_if_mut(&k, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_changing_until_every_guard_is_dropped() {
        let s = ChangingNames::default();
        assert!(!s.contains(1, b"a"));
        let g1 = s.begin(&[(1, b"a"), (2, b"b")]);
        let g2 = s.begin(&[(1, b"a")]);
        assert!(s.contains(1, b"a") && s.contains(2, b"b"));
        assert!(!s.contains(1, b"b"));
        drop(g1);
        assert!(s.contains(1, b"a"));
        assert!(!s.contains(2, b"b"));
        drop(g2);
        assert!(!s.contains(1, b"a"));
    }
}
