//! The opt-in non-finite guard: a step whose gradients hold NaN or an infinity is
//! skipped whole (parameters, slots, the step counter untouched) and counted.
//!
//! Off by default, since Keras lets non-finite values flow through (see
//! `tests/non_finite.rs`). The CPU path checks the gradients before the step
//! ([`crate::cpu`]). The GPU
//! path checks them on the device, inside the step's own dispatches, so no readback
//! stalls a step: the device keeps the step counter, and the host learns it (and the
//! skip count) from small asynchronous readbacks, bookkept by [`Ledger`].
//!
//! "Non-finite" is judged on the gradient as the optimizer first sees it: the raw
//! gradient divided by `loss_scale_factor`. Finite gradients whose norm overflows f32
//! are not caught: they are applied with Keras' result.

/// What the non-finite guard has counted, as read by
/// [`RmsProp::skipped_steps`](crate::RmsProp::skipped_steps) without waiting for the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SkippedSteps {
    /// Steps skipped because a gradient was NaN or infinite, among the steps whose
    /// outcome is known.
    pub skipped: u64,
    /// Steps submitted to the GPU whose outcome is not known yet (always 0 on the CPU
    /// path). After [`RmsProp::synchronize`](crate::RmsProp::synchronize) it is 0 and
    /// `skipped` is exact.
    pub in_flight: u64,
}

/// The host's knowledge of the device-side counters under the guard.
///
/// Each GPU step is submission number `n` (1, 2, ...) and ends with a readback of the
/// counters. The last readback that arrived tells the step counter `raw` as of
/// submission `settled_at`; each later submission may have applied or skipped its step,
/// so the next step's counter is one of `raw ..= raw + (submitted - settled_at)`: the
/// plan window the host writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ledger {
    raw: u64,
    skipped: u64,
    settled_at: u64,
    submitted: u64,
}

impl Ledger {
    /// Counters known exactly: nothing is in flight.
    pub fn new(raw: u64, skipped: u64) -> Self {
        Ledger {
            raw,
            skipped,
            settled_at: 0,
            submitted: 0,
        }
    }

    /// The counter values the next step may see: `(first, count)`.
    pub fn window(&self) -> (u64, usize) {
        (self.raw, (self.in_flight() + 1) as usize)
    }

    /// Records one more submission and returns its number.
    pub fn submit(&mut self) -> u64 {
        self.submitted += 1;
        self.submitted
    }

    /// Records the counters read back after submission `at`; stale or impossible
    /// readbacks (not after the last settled one, or from the future) are ignored.
    pub fn settle(&mut self, at: u64, raw: u64, skipped: u64) -> bool {
        if at <= self.settled_at || at > self.submitted {
            return false;
        }
        self.raw = raw;
        self.skipped = skipped;
        self.settled_at = at;
        true
    }

    /// Submissions whose outcome is not known yet.
    pub fn in_flight(&self) -> u64 {
        self.submitted - self.settled_at
    }

    /// The step counter as of the last settled submission.
    pub fn raw(&self) -> u64 {
        self.raw
    }

    /// Skipped steps as of the last settled submission.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The counts as a report.
    pub fn report(&self) -> SkippedSteps {
        SkippedSteps {
            skipped: self.skipped,
            in_flight: self.in_flight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_with_steps_in_flight_and_shrinks_on_settle() {
        let mut l = Ledger::new(10, 2);
        assert_eq!(l.window(), (10, 1));
        assert_eq!(l.submit(), 1);
        assert_eq!(l.submit(), 2);
        assert_eq!(l.submit(), 3);
        assert_eq!(l.window(), (10, 4));
        // submission 1 applied its step, submission 2 skipped
        assert!(l.settle(2, 11, 3));
        assert_eq!(l.window(), (11, 2));
        assert_eq!(
            l.report(),
            SkippedSteps {
                skipped: 3,
                in_flight: 1
            }
        );
        // older and future readbacks change nothing
        assert!(!l.settle(1, 10, 2));
        assert!(!l.settle(9, 99, 0));
        assert_eq!((l.raw(), l.skipped()), (11, 3));
        assert!(l.settle(3, 12, 3));
        assert_eq!(l.window(), (12, 1));
        assert_eq!(l.in_flight(), 0);
    }
}
