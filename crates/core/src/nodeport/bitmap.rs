//! A bitmap over a port range: one bit per port, scanned a 64-bit word at a time.
//!
//! The API server keeps nodePorts in the same shape (allocator/bitmap.go); a 2768-port range
//! is 44 words, so "first free port" is a few dozen instructions instead of a set lookup per port.

use crate::ports::PortRange;

/// Which ports of a range are in use. Ports outside the range are never set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortBitmap {
    range: PortRange,
    words: Vec<u64>,
    count: usize,
}

impl PortBitmap {
    pub fn new(range: PortRange) -> Self {
        PortBitmap {
            range,
            words: vec![0; range.len().div_ceil(64)],
            count: 0,
        }
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Marks a port used. Returns whether it was free before; a port outside the range is
    /// ignored and returns false.
    pub fn set(&mut self, port: u16) -> bool {
        let Some(offset) = self.offset(port) else {
            return false;
        };
        let (word, bit) = (offset / 64, 1u64 << (offset % 64));
        let was_free = self.words[word] & bit == 0;
        self.words[word] |= bit;
        self.count += usize::from(was_free);
        was_free
    }

    /// Whether a port is used. Ports outside the range are reported as not used.
    pub fn test(&self, port: u16) -> bool {
        self.offset(port)
            .is_some_and(|offset| self.words[offset / 64] & (1u64 << (offset % 64)) != 0)
    }

    /// Marks a port free again. Returns whether it was used.
    pub fn clear(&mut self, port: u16) -> bool {
        let Some(offset) = self.offset(port) else {
            return false;
        };
        let (word, bit) = (offset / 64, 1u64 << (offset % 64));
        let was_used = self.words[word] & bit != 0;
        self.words[word] &= !bit;
        self.count -= usize::from(was_used);
        was_used
    }

    /// Number of used ports.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Number of used ports inside `within` (clipped to the bitmap's range).
    pub(crate) fn count_in(&self, within: PortRange) -> usize {
        let Some((from, to)) = self.clip(within) else {
            return 0;
        };
        let (first, last) = (from / 64, to / 64);
        (first..=last)
            .map(|w| (self.words[w] & word_mask(w, from, to)).count_ones() as usize)
            .sum()
    }

    /// The first free port of `within` at or after `start`, wrapping around to the start of
    /// `within` once. `within` is clipped to the bitmap's range; a `start` outside it begins
    /// the scan at its low end.
    pub fn first_free(&self, within: PortRange, start: u16) -> Option<u16> {
        let (from, to) = self.clip(within)?;
        let begin = match self.offset(start) {
            Some(offset) if (from..=to).contains(&offset) => offset,
            _ => from,
        };
        let found = self.first_zero(begin, to).or_else(|| {
            if begin > from {
                self.first_zero(from, begin - 1)
            } else {
                None
            }
        })?;
        Some(self.range.low + found as u16)
    }

    fn offset(&self, port: u16) -> Option<usize> {
        self.range
            .contains(port)
            .then(|| usize::from(port - self.range.low))
    }

    /// `within` as inclusive bit offsets, or None when it does not meet the bitmap's range.
    fn clip(&self, within: PortRange) -> Option<(usize, usize)> {
        if !self.range.overlaps(&within) {
            return None;
        }
        let low = within.low.max(self.range.low);
        let high = within.high.min(self.range.high);
        Some((
            usize::from(low - self.range.low),
            usize::from(high - self.range.low),
        ))
    }

    /// First clear bit in the inclusive offsets `from..=to`.
    fn first_zero(&self, from: usize, to: usize) -> Option<usize> {
        let (first, last) = (from / 64, to / 64);
        (first..=last).find_map(|w| {
            let free = !self.words[w] & word_mask(w, from, to);
            (free != 0).then(|| w * 64 + free.trailing_zeros() as usize)
        })
    }
}

/// The bits of word `w` that lie inside the inclusive offsets `from..=to`.
fn word_mask(w: usize, from: usize, to: usize) -> u64 {
    let mut mask = u64::MAX;
    if w == from / 64 {
        mask &= u64::MAX << (from % 64);
    }
    if w == to / 64 {
        mask &= u64::MAX >> (63 - to % 64);
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(low: u16, high: u16) -> PortRange {
        PortRange::new(low, high).unwrap()
    }

    #[test]
    fn set_test_clear_count() {
        let mut bitmap = PortBitmap::new(range(30000, 30199));
        assert!(bitmap.set(30000));
        assert!(
            !bitmap.set(30000),
            "setting twice reports the port was already used"
        );
        assert!(bitmap.set(30199));
        assert!(
            !bitmap.set(29999) && !bitmap.set(30200),
            "outside the range is ignored"
        );
        assert_eq!(bitmap.count(), 2);
        assert!(bitmap.test(30000) && bitmap.test(30199) && !bitmap.test(30001));
        assert!(!bitmap.test(1));
        assert!(bitmap.clear(30000));
        assert!(!bitmap.clear(30000));
        assert_eq!(bitmap.count(), 1);
        assert_eq!(bitmap.count_in(range(30100, 40000)), 1);
        assert_eq!(bitmap.count_in(range(1, 30198)), 0);
    }

    #[test]
    fn first_free_scans_forward_and_wraps_within_the_sub_range() {
        let mut bitmap = PortBitmap::new(PortRange::DEFAULT_NODE_PORTS);
        let sub = range(31000, 31199);
        for port in 31000..=31150 {
            bitmap.set(port);
        }
        // (start, expected)
        let cases = [
            (31000, Some(31151)),
            (31160, Some(31160)),
            (31199, Some(31199)),
            (30000, Some(31151)), // start outside the sub-range begins at its low end
        ];
        for (start, want) in cases {
            assert_eq!(bitmap.first_free(sub, start), want, "start {start}");
        }
        for port in 31151..=31198 {
            bitmap.set(port);
        }
        assert_eq!(bitmap.first_free(sub, 31199), Some(31199));
        bitmap.set(31199);
        assert_eq!(bitmap.first_free(sub, 31100), None, "full sub-range");
        bitmap.clear(31003);
        assert_eq!(
            bitmap.first_free(sub, 31100),
            Some(31003),
            "wraps to the sub-range start"
        );
        assert_eq!(bitmap.first_free(range(31300, 31300), 0), Some(31300));
        assert_eq!(bitmap.first_free(range(40000, 40010), 40000), None, "no overlap");
        assert_eq!(
            bitmap.first_free(range(32760, 40000), 32767),
            Some(32767),
            "clipped"
        );
    }

    #[test]
    fn word_boundaries() {
        let mut bitmap = PortBitmap::new(range(100, 100 + 64 * 3 - 1));
        for port in bitmap.range().iter() {
            bitmap.set(port);
        }
        assert_eq!(bitmap.count(), 192);
        for free in [100u16, 163, 164, 227, 291] {
            bitmap.clear(free);
            assert_eq!(bitmap.first_free(bitmap.range(), 100), Some(free));
            assert_eq!(bitmap.first_free(bitmap.range(), 291), Some(free), "wraps");
            assert_eq!(bitmap.count_in(range(free, free)), 0);
            bitmap.set(free);
        }
        let single = PortBitmap::new(range(65535, 65535));
        assert_eq!(single.first_free(single.range(), 65535), Some(65535));
    }
}
