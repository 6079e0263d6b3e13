//! Which Service wins a virtual server two Services plan.

use std::collections::BTreeMap;

use super::model::ServiceId;
use super::table::VirtualServerKey;

/// Which Services plan each virtual server. The first by namespace/name wins. One claimant is
/// the rule and costs no more than the winner's name; contested keys keep every claimant apart.
#[derive(Clone, Debug, Default)]
pub(super) struct Claims {
    pub(super) winners: BTreeMap<VirtualServerKey, ServiceId>,
    /// Every claimant, sorted, of each key with more than one.
    pub(super) contested: BTreeMap<VirtualServerKey, Vec<ServiceId>>,
}

impl Claims {
    pub(super) fn winner(&self, key: &VirtualServerKey) -> Option<&ServiceId> {
        self.winners.get(key)
    }

    /// The winner of a key, when others claim it too.
    pub(super) fn contested_winner(&self, key: &VirtualServerKey) -> Option<&ServiceId> {
        self.contested.get(key).and_then(|claimants| claimants.first())
    }

    pub(super) fn claim(&mut self, key: VirtualServerKey, id: &ServiceId) {
        let winner = match self.winners.get(&key) {
            None => id.clone(),
            Some(winner) if winner == id => return,
            Some(winner) => {
                let claimants = self.contested.entry(key).or_insert_with(|| vec![winner.clone()]);
                if let Err(at) = claimants.binary_search(id) {
                    claimants.insert(at, id.clone());
                }
                claimants.first().unwrap_or(id).clone()
            }
        };
        self.winners.insert(key, winner);
    }

    pub(super) fn release(&mut self, key: &VirtualServerKey, id: &ServiceId) {
        match self.contested.get_mut(key) {
            Some(claimants) => {
                claimants.retain(|c| c != id);
                if let Some(winner) = claimants.first() {
                    self.winners.insert(*key, winner.clone());
                }
                if claimants.len() < 2 {
                    self.contested.remove(key);
                }
            }
            None => {
                if self.winners.get(key) == Some(id) {
                    self.winners.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use pretty_assertions::assert_eq;
    use proptest::prelude::*;

    use super::*;
    use crate::ipvs::table::test_keys::vs_key;
    use crate::ports::Protocol;

    fn id(i: u8) -> ServiceId {
        ServiceId::new(["a", "b"][usize::from(i % 2)], &format!("s{}", i / 2))
    }

    fn key(k: u8) -> VirtualServerKey {
        vs_key(&format!("10.96.0.{k}"), 80, Protocol::Tcp)
    }

    #[test]
    fn the_first_by_namespace_and_name_wins_and_the_next_takes_over() {
        let mut claims = Claims::default();
        let (b_s0, a_s1) = (ServiceId::new("b", "s0"), ServiceId::new("a", "s1"));
        claims.claim(key(1), &b_s0);
        assert_eq!(claims.winner(&key(1)), Some(&b_s0));
        assert_eq!(
            claims.contested_winner(&key(1)),
            None,
            "one claimant is no contest"
        );
        claims.claim(key(1), &a_s1);
        assert_eq!(claims.winner(&key(1)), Some(&a_s1));
        assert_eq!(claims.contested_winner(&key(1)), Some(&a_s1));
        claims.release(&key(1), &a_s1);
        assert_eq!(claims.winner(&key(1)), Some(&b_s0));
        assert_eq!(claims.contested_winner(&key(1)), None);
        claims.release(&key(1), &b_s0);
        assert_eq!(claims.winner(&key(1)), None);
        assert!(claims.winners.is_empty() && claims.contested.is_empty());
    }

    proptest! {
        /// Any claims and releases leave the winner of each key the least claimant, and keep
        /// only keys with two or more claimants as contested.
        #[test]
        fn claims_agree_with_a_set_of_claimants(ops in prop::collection::vec((any::<bool>(), 0..3u8, 0..5u8), 0..60)) {
            let mut claims = Claims::default();
            let mut model: BTreeMap<u8, BTreeSet<ServiceId>> = BTreeMap::new();
            for (claim, k, i) in ops {
                if claim {
                    claims.claim(key(k), &id(i));
                    model.entry(k).or_default().insert(id(i));
                } else {
                    claims.release(&key(k), &id(i));
                    if let Some(set) = model.get_mut(&k) {
                        set.remove(&id(i));
                    }
                }
                for k in 0..3u8 {
                    let set = model.get(&k).cloned().unwrap_or_default();
                    prop_assert_eq!(claims.winner(&key(k)), set.first());
                    let contested = (set.len() > 1).then(|| set.first()).flatten();
                    prop_assert_eq!(claims.contested_winner(&key(k)), contested);
                    prop_assert_eq!(claims.contested.get(&key(k)).map(Vec::len).unwrap_or(0), if set.len() > 1 { set.len() } else { 0 });
                }
            }
        }
    }
}
