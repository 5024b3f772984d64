use herald_contract::v1::DeliveryState as S;

/// Whether a delivery may move `from` → `to`. Transitions are monotonic: terminal states never
/// change, a late `sent` never overwrites `delivered`, and replays change nothing.
pub fn transition_allowed(from: S, to: S) -> bool {
    match from {
        S::Delivered | S::Failed | S::Expired | S::Suppressed => false,
        S::Sent => matches!(to, S::Delivered | S::Failed),
        // A job redelivered after a crash re-enters `sending` with the next attempt.
        S::Sending => !matches!(to, S::Queued | S::Unspecified),
        S::Queued | S::Retrying | S::Deferred | S::Unspecified => {
            to != from && !matches!(to, S::Queued | S::Unspecified)
        }
    }
}

/// A message's state from its deliveries': work in flight shows the most advanced in-flight
/// state; once settled, any success wins over failures.
pub fn aggregate_message_state(states: &[S]) -> Option<S> {
    let in_flight = [S::Sending, S::Retrying, S::Deferred, S::Queued];
    let settled = [S::Sent, S::Delivered, S::Failed, S::Expired, S::Suppressed];
    in_flight
        .into_iter()
        .chain(settled)
        .find(|candidate| states.contains(candidate))
}

/// The message state from per-state delivery counts (as kept in `messages.state_counts`).
pub fn aggregate_counts(counts: &std::collections::BTreeMap<String, i64>) -> Option<S> {
    let states: Vec<S> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .filter_map(|(name, _)| S::from_name(name))
        .collect();
    aggregate_message_state(&states)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_change_and_late_sent_loses() {
        assert!(transition_allowed(S::Queued, S::Sending));
        assert!(transition_allowed(S::Sending, S::Sending));
        assert!(transition_allowed(S::Sending, S::Sent));
        assert!(transition_allowed(S::Sent, S::Delivered));
        assert!(!transition_allowed(S::Delivered, S::Sent));
        assert!(!transition_allowed(S::Delivered, S::Delivered));
        assert!(!transition_allowed(S::Failed, S::Sending));
        assert!(!transition_allowed(S::Sent, S::Sending));
        assert!(!transition_allowed(S::Retrying, S::Queued));
    }

    #[test]
    fn message_state_aggregates() {
        assert_eq!(aggregate_message_state(&[S::Delivered]), Some(S::Delivered));
        assert_eq!(
            aggregate_message_state(&[S::Delivered, S::Sending]),
            Some(S::Sending)
        );
        assert_eq!(
            aggregate_message_state(&[S::Failed, S::Delivered]),
            Some(S::Delivered)
        );
        assert_eq!(
            aggregate_message_state(&[S::Failed, S::Sent]),
            Some(S::Sent)
        );
        assert_eq!(aggregate_message_state(&[S::Failed]), Some(S::Failed));
        assert_eq!(aggregate_message_state(&[]), None);
    }

    #[test]
    fn counts_aggregate_like_states() {
        let counts = std::collections::BTreeMap::from([
            ("delivered".to_string(), 9_999),
            ("sending".to_string(), 1),
            ("queued".to_string(), 0),
        ]);
        assert_eq!(aggregate_counts(&counts), Some(S::Sending));
        let counts = std::collections::BTreeMap::from([("queued".to_string(), 0)]);
        assert_eq!(aggregate_counts(&counts), None);
    }
}
