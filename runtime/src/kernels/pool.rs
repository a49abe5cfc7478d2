//! The thread pool that matrix products and attention run on.

use crate::{Error, Result};

/// A fixed set of worker threads. `run(n, f)` calls `f(0..n)` spread over the workers and
/// returns when all calls are done.
pub struct ThreadPool {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl ThreadPool {
    /// A pool of `threads` workers (0: one per available core).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            default_threads()
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sparrow-{i}"))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("cannot start {threads} threads: {e}")))?;
        Ok(ThreadPool { pool, threads })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every `i` in `0..n`, in parallel.
    pub fn run(&self, n: usize, f: impl Fn(usize) + Sync) {
        if n <= 1 || self.threads == 1 {
            (0..n).for_each(f);
            return;
        }
        self.pool.install(|| {
            use rayon::prelude::*;
            (0..n).into_par_iter().for_each(&f);
        });
    }
}

/// The number of cores available to this process.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// An output slice that parallel tasks write to at disjoint indices.
///
/// Writes are bounds-checked; the caller guarantees that no two tasks write the same index.
pub struct DisjointOut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks write disjoint elements (the contract of `write`), and the borrow of the
// slice outlives every task because `ThreadPool::run` returns only when all are done.
unsafe impl Send for DisjointOut<'_> {}
unsafe impl Sync for DisjointOut<'_> {}

impl<'a> DisjointOut<'a> {
    pub fn new(out: &'a mut [f32]) -> Self {
        DisjointOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Copies `src` to `at..at + src.len()`.
    ///
    /// # Safety
    /// No other task may write or read these indices while the pool runs.
    pub unsafe fn write(&self, at: usize, src: &[f32]) {
        assert!(
            at <= self.len && src.len() <= self.len - at,
            "write out of bounds"
        );
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len());
    }

    /// Writes one element.
    ///
    /// # Safety
    /// As for [`write`](Self::write).
    pub unsafe fn set(&self, at: usize, v: f32) {
        assert!(at < self.len, "write out of bounds");
        *self.ptr.add(at) = v;
    }
}
