//! A latency histogram fine enough for a p99: log-linear buckets (16 per
//! power of two, so a bucket is at most 1/16 = 6.25 % wide) over
//! microseconds, from 1 µs to about 12 days, in a fixed array.

/// Sub-buckets per power of two.
const SUB: usize = 16;
const SUB_BITS: u32 = 4;
/// Powers of two covered: up to 2^40 µs (about 12.7 days); larger values
/// land in the last bucket.
const POWERS: usize = 41;
pub const HISTOGRAM_BUCKETS: usize = POWERS * SUB;

#[derive(Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Box<[u64; HISTOGRAM_BUCKETS]>,
    total: u64,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: Box::new([0; HISTOGRAM_BUCKETS]),
            total: 0,
            max_us: 0,
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("p50_us", &self.quantile_us(0.5))
            .field("p99_us", &self.quantile_us(0.99))
            .field("max_us", &self.max_us)
            .finish()
    }
}

fn index(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let power = (u64::BITS - 1 - us.leading_zeros()) as usize;
    let sub = ((us >> (power as u32 - SUB_BITS)) & (SUB as u64 - 1)) as usize;
    ((power - SUB_BITS as usize + 1) * SUB + sub).min(HISTOGRAM_BUCKETS - 1)
}

/// The largest value bucket `i` holds.
fn upper_us(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let power = (i / SUB) as u32 + SUB_BITS - 1;
    let sub = (i % SUB) as u64;
    ((SUB as u64 + sub + 1) << (power - SUB_BITS)) - 1
}

impl Histogram {
    pub fn record_us(&mut self, us: u64) {
        self.counts[index(us)] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    /// The value under which `q` (0..=1) of the values fall: the upper
    /// bound of its bucket (at most 6.25 % above the true value).
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper_us(i).min(self.max_us));
            }
        }
        Some(self.max_us)
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// What was recorded since `earlier` (a copy taken before).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let mut out = Histogram::default();
        for ((o, a), b) in out
            .counts
            .iter_mut()
            .zip(self.counts.iter())
            .zip(earlier.counts.iter())
        {
            *o = a.saturating_sub(*b);
        }
        out.total = self.total.saturating_sub(earlier.total);
        out.max_us = self.max_us;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_that_holds_it() {
        let mut prev_upper = None;
        for i in 0..HISTOGRAM_BUCKETS - 1 {
            let u = upper_us(i);
            assert_eq!(index(u), i, "bucket {i} upper {u}");
            assert_eq!(index(u + 1), i + 1, "bucket {i} upper {u} + 1");
            if let Some(p) = prev_upper {
                assert!(u > p);
                // No wider than 1/16 of its values.
                if i >= SUB {
                    assert!((u - p) as f64 <= u as f64 / 16.0 + 1.0, "bucket {i}");
                }
            }
            prev_upper = Some(u);
        }
        assert_eq!(index(u64::MAX), HISTOGRAM_BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let mut h = Histogram::default();
        for us in 1..=10_000u64 {
            h.record_us(us);
        }
        let p50 = h.quantile_us(0.5).unwrap();
        let p99 = h.quantile_us(0.99).unwrap();
        assert!((5_000..=5_000 + 5_000 / 16).contains(&p50), "{p50}");
        assert!((9_900..=10_000).contains(&p99), "{p99}");
        assert_eq!(h.quantile_us(1.0), Some(10_000));
        assert_eq!(Histogram::default().quantile_us(0.5), None);
        let before = h.clone();
        h.record_us(7);
        assert_eq!(h.since(&before).total(), 1);
    }
}
