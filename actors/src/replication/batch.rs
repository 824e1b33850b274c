//! When a batch of change events is handed to the producer before its
//! transaction commits: a pure policy, no I/O.
//!
//! A batch closes at `postgres.max_batch_events` events or
//! `postgres.max_batch_bytes` bytes of row data, whichever comes first, so a
//! transaction of a thousand huge rows is never held whole. Sizes are the
//! bytes PostgreSQL sent (the pgoutput message's length), known without any
//! encoding; a change that alone exceeds the byte limit is a batch of its own.

/// The limits of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BatchLimit {
    /// Most events (`postgres.max_batch_events`).
    pub events: usize,
    /// Most bytes of row data (`postgres.max_batch_bytes`).
    pub bytes: usize,
}

/// What the batch being built holds so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct BatchSize {
    /// Events in it.
    pub events: usize,
    /// Bytes of row data in it.
    pub bytes: usize,
}

impl BatchLimit {
    /// Whether the batch must be handed over before a change of
    /// `next_bytes` joins it: it holds something and would pass the byte
    /// limit. Keeps every batch under the limit unless one change alone is over it.
    pub fn closes_before(&self, size: BatchSize, next_bytes: usize) -> bool {
        size.events > 0 && size.bytes.saturating_add(next_bytes) > self.bytes
    }

    /// Whether the batch is full and must be handed over now.
    pub fn is_full(&self, size: BatchSize) -> bool {
        size.events >= self.events || size.bytes >= self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: BatchLimit = BatchLimit {
        events: 3,
        bytes: 100,
    };

    /// Feed changes of `sizes` bytes through the policy as the stream does;
    /// the batches handed over, as the sizes of their changes.
    fn batches(sizes: &[usize]) -> Vec<Vec<usize>> {
        let (mut out, mut batch, mut size) = (Vec::new(), Vec::new(), BatchSize::default());
        let mut hand_over = |batch: &mut Vec<usize>, size: &mut BatchSize| {
            out.push(std::mem::take(batch));
            *size = BatchSize::default();
        };
        for &n in sizes {
            if LIMIT.closes_before(size, n) {
                hand_over(&mut batch, &mut size);
            }
            batch.push(n);
            size.events += 1;
            size.bytes += n;
            if LIMIT.is_full(size) {
                hand_over(&mut batch, &mut size);
            }
        }
        if !batch.is_empty() {
            out.push(batch);
        }
        out
    }

    #[test]
    fn a_batch_closes_at_its_event_limit() {
        assert_eq!(batches(&[1, 1, 1, 1, 1]), [vec![1, 1, 1], vec![1, 1]]);
    }

    #[test]
    fn a_batch_closes_before_it_would_pass_its_byte_limit() {
        assert_eq!(batches(&[40, 40, 40]), [vec![40, 40], vec![40]]);
        assert_eq!(batches(&[50, 50, 1]), [vec![50, 50], vec![1]]);
    }

    #[test]
    fn a_change_above_the_byte_limit_is_a_batch_of_its_own() {
        assert_eq!(
            batches(&[10, 500, 10, 1000]),
            [vec![10], vec![500], vec![10], vec![1000]]
        );
        assert_eq!(batches(&[500]), [vec![500]]);
    }

    #[test]
    fn an_empty_batch_never_closes_before_a_change() {
        assert!(!LIMIT.closes_before(BatchSize::default(), usize::MAX));
    }
}
