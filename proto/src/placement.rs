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

/// The candidate `(id, free)` with the most room, if any has room; ties go to the smallest id.
/// Callers pass only live nodes that take channels (not draining, not excluded).
pub fn roomiest<'a>(candidates: impl IntoIterator<Item = (&'a str, u64)>) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|&(_, free)| free > 0)
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_room_wins_and_ties_go_to_the_smallest_id() {
        assert_eq!(roomiest([("b", 2), ("a", 1), ("c", 2)]), Some("b"));
        assert_eq!(roomiest([("c", 2), ("b", 2)]), Some("b"));
        assert_eq!(roomiest([("a", 0), ("b", 0)]), None);
        assert_eq!(roomiest(std::iter::empty()), None);
    }

    #[test]
    fn capacity_zero_is_unlimited_and_load_beyond_capacity_is_full() {
        assert!(free(0, 1_000) > 1_000_000);
        assert_eq!(free(4, 3), 1);
        assert_eq!(free(4, 9), 0);
    }
}
