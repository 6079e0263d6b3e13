//! How a policy's nodePort range splits up, for the operator's metrics and `plan`'s summary.

use crate::crd::PinnedNodePort;
use crate::ports::PortRange;

/// How a policy's nodePort range splits up. Each port of the range is counted once, in the
/// first of these that applies: used (a Service or a retained record holds it), reserved
/// (`spec.nodePorts.reserved`), pinned (`spec.nodePorts.pinned` to a Service that does not hold
/// it now), free. So `used + reserved + pinned + free == total`, and `free` is what the
/// allocator can still hand out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodePortCounts {
    pub total: usize,
    pub used: usize,
    pub reserved: usize,
    pub pinned: usize,
    pub free: usize,
}

impl NodePortCounts {
    pub fn of(
        range: PortRange,
        reserved: &[PortRange],
        pinned: &[PinnedNodePort],
        held: impl IntoIterator<Item = u16>,
    ) -> Self {
        let in_range = |port: u16| range.contains(port).then(|| usize::from(port - range.low));
        let mut taken = vec![false; range.len()];
        let mut mark = |port: u16| match in_range(port).map(|i| std::mem::replace(&mut taken[i], true)) {
            Some(false) => 1,
            _ => 0,
        };
        let used = held.into_iter().map(&mut mark).sum();
        let reserved = reserved
            .iter()
            .filter_map(|r| {
                let low = r.low.max(range.low);
                let high = r.high.min(range.high);
                (low <= high).then_some(low..=high)
            })
            .flatten()
            .map(&mut mark)
            .sum();
        let pinned = pinned
            .iter()
            .filter_map(|p| u16::try_from(p.node_port).ok())
            .map(&mut mark)
            .sum();
        let total = range.len();
        NodePortCounts {
            total,
            used,
            reserved,
            pinned,
            free: total - used - reserved - pinned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_port_counts_count_each_port_once() {
        let range: PortRange = "100-109".parse().unwrap();
        let c = NodePortCounts::of(range, &["105-120".parse().unwrap()], &[], [100, 100, 106, 5000]);
        assert_eq!(
            c,
            NodePortCounts {
                total: 10,
                used: 2,
                reserved: 4,
                pinned: 0,
                free: 4
            }
        );
    }
}
