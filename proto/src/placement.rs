//! Where a channel goes when it needs a node: one rule for every chooser (the coordinator's
//! re-homes and pinned starts, farmctl's `start`, a node forwarding a viewer or draining).
//!
//! Room is counted in weight units (a copy 1, a transcode its profile's `weight`): a node's `load`
//! from its heartbeat against its `capacity` (0 = unlimited). The candidate with the most room
//! wins; ties go to the smallest node id, so every chooser that sees the same farm picks the same
//! node.

/// What a node with `capacity` (0 = unlimited) and `load` can still take.
pub fn free(capacity: u64, load: u64) -> u64 {
    if capacity == 0 {
        u64::MAX / 2
    } else {
        capacity.saturating_sub(load)
    }
}

/// Of the candidates `(id, free, item)`, the item of the one with the most room, if any has room;
/// ties go to the smallest id. Callers pass only live nodes that take channels (not draining, not
/// excluded).
pub fn roomiest<'a, T>(candidates: impl IntoIterator<Item = (&'a str, u64, T)>) -> Option<T> {
    candidates
        .into_iter()
        .filter(|&(_, free, _)| free > 0)
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(_, _, item)| item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_room_wins_and_ties_go_to_the_smallest_id() {
        let pick = |c: &[(&'static str, u64)]| roomiest(c.iter().map(|&(id, free)| (id, free, id)));
        assert_eq!(pick(&[("b", 2), ("a", 1), ("c", 2)]), Some("b"));
        assert_eq!(pick(&[("c", 2), ("b", 2)]), Some("b"));
        assert_eq!(pick(&[("a", 0), ("b", 0)]), None);
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn capacity_zero_is_unlimited_and_load_beyond_capacity_is_full() {
        assert!(free(0, 1_000) > 1_000_000);
        assert_eq!(free(4, 3), 1);
        assert_eq!(free(4, 9), 0);
    }
}
