//! Chunk versions that order histories, not counts.
//!
//! A chunk's version is one `u64`: the cluster map epoch its primary wrote
//! it under in the high [`EPOCH_BITS`] bits, a counter in the rest. Every
//! comparison of versions (peering keeps the highest, a probe's newer copy
//! is pulled) is a plain `u64` comparison, so a copy written under a newer
//! map wins over any number of writes made under an older one.
//!
//! Why: a primary cut off from its replicas still takes writes from
//! clients that reach it; each fails its quorum but leaves a new version on
//! the primary's copy. Once the MDS marks it down, the next primary writes
//! the acknowledged history under a newer epoch. With plain counters, the
//! cut-off copy (more failed writes than the others had acknowledged ones)
//! won peering and replaced the acknowledged data on every member. Ceph's
//! eversion (epoch, version) is the same idea.
//!
//! Versions written before this scheme are small counters: epoch 0, so
//! every later epoch-stamped version orders after them.

/// Bits of a version that hold the map epoch.
pub const EPOCH_BITS: u32 = 24;
/// Bits of a version that hold the counter.
const COUNTER_BITS: u32 = 64 - EPOCH_BITS;
/// The largest epoch a version can name; a map past it stops stamping
/// (versions then count on in the last epoch stamped).
pub const MAX_EPOCH: u64 = (1 << EPOCH_BITS) - 1;

/// The map epoch version `v` was stamped under (0: before stamping).
pub fn epoch_of(v: u64) -> u64 {
    v >> COUNTER_BITS
}

/// The counter part of version `v`.
pub fn counter_of(v: u64) -> u64 {
    v & ((1 << COUNTER_BITS) - 1)
}

/// The version a primary gives the write after `current`, under map epoch
/// `epoch` (0: do not stamp, as when a replica could not compare stamped
/// versions). `None` when the counter is exhausted.
pub fn next(current: u64, epoch: u64) -> Option<u64> {
    let counter = counter_of(current).checked_add(1)?;
    if counter >> COUNTER_BITS != 0 {
        return None;
    }
    let stamp = epoch_of(current).max(if epoch <= MAX_EPOCH { epoch } else { 0 });
    Some((stamp << COUNTER_BITS) | counter)
}

/// `epoch:counter`, for logs and messages.
pub fn display(v: u64) -> String {
    format!("{}:{}", epoch_of(v), counter_of(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_epoch_orders_after_any_count_of_an_older_one() {
        // The cut-off primary: many failed writes under epoch 7.
        let mut cut = next(0, 7).unwrap();
        for _ in 0..1000 {
            cut = next(cut, 7).unwrap();
        }
        // The new primary: one acknowledged write under epoch 8, on top of
        // the last version both shared.
        let acked = next(next(0, 7).unwrap(), 8).unwrap();
        assert!(acked > cut);
        assert_eq!(epoch_of(acked), 8);
        assert_eq!(counter_of(acked), 2);
    }

    #[test]
    fn unstamped_versions_count_on_and_order_before_stamped_ones() {
        assert_eq!(next(41, 0), Some(42));
        let stamped = next(42, 1).unwrap();
        assert_eq!(display(stamped), "1:43");
        assert!(stamped > 1 << 30);
        // Not stamping keeps the epoch a version already has.
        assert_eq!(next(stamped, 0), Some(stamped + 1));
        // An older map never lowers the stamp.
        assert_eq!(epoch_of(next(stamped, 0).unwrap()), 1);
    }

    #[test]
    fn epochs_past_the_field_and_exhausted_counters() {
        assert_eq!(epoch_of(next(5, MAX_EPOCH + 1).unwrap()), 0);
        assert_eq!(epoch_of(next(5, MAX_EPOCH).unwrap()), MAX_EPOCH);
        let full = (3 << COUNTER_BITS) | ((1 << COUNTER_BITS) - 1);
        assert_eq!(next(full, 3), None);
    }
}
