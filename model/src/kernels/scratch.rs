//! Reused f32 buffers for the hand-written training step ([`crate::layer_grad`]).
//!
//! A step allocates and frees the same few dozen buffer sizes layer after layer, and the
//! same again every step. Through the allocator each new buffer was zero-filled (calloc's
//! memset was 3.7% of a step) or page-faulted in, although most are overwritten by a product
//! before anything reads them. A [`Buf`] goes back to a shared pool when dropped, and comes
//! out again as it is, stale values included, for a destination that is written in full.
//!
//! The pool is bounded by what a step uses: [`end_step`] frees the buffers that the step
//! just finished did not use, so batches of changing sequence lengths do not pile up buffers
//! of every length ever seen.
//!
//! Pooling can be turned off ([`set_pooling`]); the gradient-checkpointed step does, since it
//! is chosen to save memory: pooled buffers that a step does not need again right away cannot
//! be carved up for other sizes as freed memory is (8 to 13 MiB more at the peak of a
//! checkpointed step at the benchmark's shape, for 2% more speed).

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Free buffers by capacity, each with the step in which it was last handed back.
struct Pool {
    /// Off: buffers are allocated and freed as usual.
    on: bool,
    step: u64,
    free: BTreeMap<usize, Vec<(Vec<f32>, u64)>>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    on: true,
    step: 0,
    free: BTreeMap::new(),
});

/// Whether buffers go back to the pool and come out of it (on by default). Turning it off
/// frees what the pool holds.
pub(crate) fn set_pooling(on: bool) {
    let mut pool = lock(&POOL);
    pool.on = on;
    if !on {
        pool.free.clear();
    }
}

fn lock(pool: &'static Mutex<Pool>) -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock leaves the pool consistent (every operation on it is a
    // single insert or remove), so a poisoned lock is still usable.
    pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An f32 buffer that returns to the pool when dropped.
pub(crate) struct Buf {
    values: Vec<f32>,
    pool: &'static Mutex<Pool>,
}

impl Buf {
    /// `len` values to be overwritten before they are read: a pooled buffer of at least `len`
    /// and at most twice that capacity, holding whatever its last user left, or new zeros.
    pub(crate) fn for_overwrite(len: usize) -> Self {
        Self::from_pool(&POOL, len)
    }

    fn from_pool(from: &'static Mutex<Pool>, len: usize) -> Self {
        let reused = {
            let mut pool = lock(from);
            if !pool.on {
                return Self {
                    values: vec![0f32; len],
                    pool: from,
                };
            }
            let capacity = pool.free.range(len..=len.saturating_mul(2)).next().map(|(&c, _)| c);
            capacity.and_then(|c| {
                let list = pool.free.get_mut(&c)?;
                let (values, _) = list.pop()?;
                if list.is_empty() {
                    pool.free.remove(&c);
                }
                Some(values)
            })
        };
        let values = match reused {
            Some(mut v) => {
                // Within capacity: truncating or growing writes no more than the growth.
                v.resize(len, 0.0);
                v
            }
            None => vec![0f32; len],
        };
        Self { values, pool: from }
    }

    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        let mut b = Self::for_overwrite(len);
        b.fill(0.0);
        b
    }

    /// A copy of `values`.
    pub(crate) fn copy_of(values: &[f32]) -> Self {
        let mut b = Self::for_overwrite(values.len());
        b.copy_from_slice(values);
        b
    }

    /// The values as a plain vector, leaving the pool (for a tensor that outlives the step).
    pub(crate) fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.values)
    }
}

impl Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.values
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let values = std::mem::take(&mut self.values);
        if values.capacity() == 0 {
            return;
        }
        let mut pool = lock(self.pool);
        if !pool.on {
            return;
        }
        let step = pool.step;
        pool.free.entry(values.capacity()).or_default().push((values, step));
    }
}

/// Ends a step: frees the pooled buffers that it did not hand back, and starts the next.
pub(crate) fn end_step() {
    end_step_of(&POOL);
}

fn end_step_of(pool: &'static Mutex<Pool>) {
    let mut pool = lock(pool);
    let step = pool.step;
    pool.free.retain(|_, list| {
        list.retain(|(_, last)| *last == step);
        !list.is_empty()
    });
    pool.step += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_their_values_and_unused_ones_are_freed_at_the_end_of_a_step() {
        // A pool of this test's own: the shared one is used by other tests meanwhile.
        let own: &'static Mutex<Pool> = Box::leak(Box::new(Mutex::new(Pool {
            on: true,
            step: 0,
            free: BTreeMap::new(),
        })));
        let len = 12_345;
        let mut a = Buf::from_pool(own, len);
        a.fill(7.0);
        let address = a.as_ptr();
        drop(a);
        let b = Buf::from_pool(own, len - 5);
        assert_eq!(b.as_ptr(), address, "a buffer of enough capacity is reused");
        assert!(b.iter().all(|&v| v == 7.0), "as it was left");
        drop(b);
        assert!(
            Buf::from_pool(own, 2 * len + 1).iter().all(|&v| v == 0.0),
            "too large a buffer is not handed out"
        );
        assert!(lock(own).free.contains_key(&len), "the buffer is back in the pool");

        end_step_of(own); // handed back during this step: kept
        assert!(lock(own).free.contains_key(&len));
        end_step_of(own); // not used during the next: freed
        assert!(lock(own).free.is_empty());
    }
}
