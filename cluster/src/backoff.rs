//! Reconnect delays: exponential, capped, with "equal jitter".
//!
//! Sans-IO: it only computes delays; the caller sleeps. Equal jitter (half the
//! ceiling fixed, half random) rather than full jitter, because a reconnect
//! loop must never spin: every delay is at least half its ceiling. The jitter
//! spreads edges that lost the cloud at the same instant, so they do not all
//! dial back at once. A seed makes the sequence replayable in simulation.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

#[derive(Clone, Debug)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    attempt: u32,
    rng: SmallRng,
}

impl Backoff {
    /// Delays start near `initial_ms` and double per attempt up to `max_ms`.
    /// `initial_ms` is raised to 1 and `max_ms` to `initial_ms` if below.
    pub fn new(initial_ms: u64, max_ms: u64, seed: u64) -> Self {
        let initial_ms = initial_ms.max(1);
        Self {
            initial_ms,
            max_ms: max_ms.max(initial_ms),
            attempt: 0,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// The ceiling of the next delay: `initial_ms * 2^attempt`, capped.
    fn ceiling_ms(&self) -> u64 {
        // Past 63 doublings every u64 overflows; the cap applies long before.
        let factor = 1u64.checked_shl(self.attempt.min(63)).unwrap_or(u64::MAX);
        self.initial_ms.saturating_mul(factor).min(self.max_ms)
    }

    /// The delay before the next attempt, in `[ceiling / 2, ceiling]`, never zero.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling_ms();
        // Rounded up, so even a 1 ms ceiling never yields a zero delay.
        let floor = ceiling.div_ceil(2);
        let delay = self.rng.random_range(floor..=ceiling);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(delay)
    }

    /// Starts over after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_respected_and_delays_grow() {
        let mut b = Backoff::new(100, 5_000, 7);
        let mut ceiling = 100u64;
        for _ in 0..40 {
            let d = b.next_delay().as_millis() as u64;
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d} outside [{}, {ceiling}]",
                ceiling / 2
            );
            assert!(d > 0);
            ceiling = (ceiling * 2).min(5_000);
        }
        // At the cap, every delay stays within [max/2, max].
        for _ in 0..100 {
            let d = b.next_delay().as_millis() as u64;
            assert!((2_500..=5_000).contains(&d), "{d}");
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(10, 10_000, 1);
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.attempts(), 10);
        b.reset();
        assert_eq!(b.attempts(), 0);
        let d = b.next_delay().as_millis();
        assert!((5..=10).contains(&d), "{d}");
    }

    #[test]
    fn deterministic_for_a_seed() {
        let run = |seed| {
            let mut b = Backoff::new(50, 3_000, seed);
            (0..20).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn degenerate_arguments_never_spin_or_overflow() {
        let mut b = Backoff::new(0, 0, 0);
        for _ in 0..200 {
            assert_eq!(b.next_delay(), Duration::from_millis(1));
        }
        let mut b = Backoff::new(u64::MAX / 2, u64::MAX, 0);
        for _ in 0..200 {
            assert!(b.next_delay() >= Duration::from_millis(u64::MAX / 4));
        }
    }
}
