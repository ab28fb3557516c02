//! The step counter and the non-finite guard's skip count: one owner, [`StepCounters`],
//! held by the engine that steps (CPU or GPU).
//!
//! A step is decided either on the host (the CPU path, and the GPU path without the
//! guard: the host knows the step applies) or on the device (the GPU path with the
//! non-finite guard: the device applies or skips the step and keeps its own copy of the
//! counters, which come back in small asynchronous readbacks). Device-decided steps are
//! submissions whose outcome is unknown until their readback settles them, so the
//! counter the next step sees is one of a window of values.

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

/// The raw step counter (Keras' `_iterations`) and the skip count.
///
/// Each device-decided step is submission number `n` (1, 2, ...) and ends with a
/// readback of the device's counters. The last readback that arrived tells the counter
/// `raw` as of submission `settled_at`; each later submission may have applied or
/// skipped its step, so the next step's counter is one of
/// `raw ..= raw + (submitted - settled_at)`: the window of plans the host writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct StepCounters {
    raw: u64,
    skipped: u64,
    settled_at: u64,
    submitted: u64,
}

impl StepCounters {
    /// Counters known exactly: nothing is in flight.
    pub(crate) fn new(raw: u64, skipped: u64) -> Self {
        StepCounters {
            raw,
            skipped,
            settled_at: 0,
            submitted: 0,
        }
    }

    /// Records a host-decided step (nothing may be in flight): applied or skipped.
    pub(crate) fn record(&mut self, applied: bool) {
        debug_assert_eq!(
            self.in_flight(),
            0,
            "a host-decided step with steps in flight"
        );
        if applied {
            self.raw += 1;
        } else {
            self.skipped += 1;
        }
    }

    /// The counter values the next step may see: `(first, count)`.
    pub(crate) fn window(&self) -> (u64, usize) {
        (self.raw, (self.in_flight() + 1) as usize)
    }

    /// Records one more device-decided submission and returns its number.
    pub(crate) fn submit(&mut self) -> u64 {
        self.submitted += 1;
        self.submitted
    }

    /// Records the counters read back after submission `at`; stale or impossible
    /// readbacks (not after the last settled one, or from the future) are ignored.
    pub(crate) fn settle(&mut self, at: u64, raw: u64, skipped: u64) -> bool {
        if at <= self.settled_at || at > self.submitted {
            return false;
        }
        self.raw = raw;
        self.skipped = skipped;
        self.settled_at = at;
        true
    }

    /// Submissions whose outcome is not known yet.
    pub(crate) fn in_flight(&self) -> u64 {
        self.submitted - self.settled_at
    }

    /// The step counter as of the last settled step.
    pub(crate) fn raw(&self) -> u64 {
        self.raw
    }

    /// Skipped steps as of the last settled step.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The counts as a report.
    pub(crate) fn report(&self) -> SkippedSteps {
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
        let mut l = StepCounters::new(10, 2);
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

    #[test]
    fn host_decided_steps_count_directly() {
        let mut l = StepCounters::new(0, 0);
        l.record(true);
        l.record(false);
        l.record(true);
        assert_eq!((l.raw(), l.skipped(), l.window()), (2, 1, (2, 1)));
    }
}
