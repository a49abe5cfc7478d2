//! The thread pool that matrix products and attention run on.

use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A fixed set of worker threads. `run(n, f)` calls `f(0..n)` spread over the workers and
/// the calling thread, and returns when all calls are done.
///
/// Built for many small jobs (a decode step of a small model is a few hundred matrix
/// products of tens of microseconds each): the caller publishes a job with one atomic store,
/// workers that spin on that word pick it up within nanoseconds and claim tasks with a
/// compare-and-swap, and the caller works too. Workers spin for a while after each job, then
/// sleep on a condition variable, so an idle pool costs nothing.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    threads: usize,
}

/// The job being run: a type-erased `&dyn Fn(usize) + Sync` valid while `run` waits.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: u32,
}

// SAFETY: the pointer is only dereferenced while `run`, which owns the closure, waits for
// every claimed task to finish (see `Shared::claim`).
unsafe impl Send for Job {}

struct Shared {
    /// (generation << 32) | index of the next unclaimed task of that generation.
    state: AtomicU64,
    /// Tasks of the current generation that have finished.
    done: AtomicU32,
    /// The job of the current generation, written before `state` announces it.
    job: Mutex<Option<Job>>,
    sleepers: AtomicUsize,
    wake: Condvar,
    shutdown: AtomicBool,
    /// A task of the current job panicked.
    panicked: AtomicBool,
}

/// How long a worker spins on `state` before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

impl Shared {
    /// Claims and runs tasks of generation `gen` until none are left. A claim succeeds only
    /// while `gen` is current, and the caller of `run` waits for every claimed task, so `job`
    /// is alive whenever it is called.
    fn work(&self, gen: u32, job: Job) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if (s >> 32) as u32 != gen || (s as u32) >= job.n {
                return;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SAFETY: see above. A panicking task is caught so that the worker lives
                    // and the count completes; `run` re-raises it in the caller.
                    let task =
                        std::panic::AssertUnwindSafe(|| unsafe { (*job.f)(s as u32 as usize) });
                    if std::panic::catch_unwind(task).is_err() {
                        self.panicked.store(true, Ordering::Release);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    s = self.state.load(Ordering::Acquire);
                }
                Err(now) => s = now,
            }
        }
    }

    fn worker(&self) {
        let mut seen = (self.state.load(Ordering::Acquire) >> 32) as u32;
        loop {
            // Spin for the next generation, then sleep.
            let start = Instant::now();
            let mut spins = 0u32;
            let gen = loop {
                if self.shutdown.load(Ordering::Acquire) {
                    return;
                }
                let g = (self.state.load(Ordering::Acquire) >> 32) as u32;
                if g != seen {
                    break g;
                }
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                    let guard = self.job.lock().unwrap_or_else(|e| e.into_inner());
                    self.sleepers.fetch_add(1, Ordering::AcqRel);
                    let g = (self.state.load(Ordering::Acquire) >> 32) as u32;
                    if g == seen && !self.shutdown.load(Ordering::Acquire) {
                        drop(self.wake.wait(guard));
                    }
                    self.sleepers.fetch_sub(1, Ordering::AcqRel);
                    spins = 0;
                    continue;
                }
                std::hint::spin_loop();
            };
            seen = gen;
            let job = *self.job.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(job) = job {
                self.work(gen, job);
            }
        }
    }
}

impl ThreadPool {
    /// A pool of `threads` workers, the calling thread included (0: one per available core).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            default_threads()
        } else {
            threads
        };
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            done: AtomicU32::new(0),
            job: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..threads {
            let sh = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("sparrow-{i}"))
                .spawn(move || sh.worker())
                .map_err(|e| {
                    Error::InvalidArgument(format!("cannot start {threads} threads: {e}"))
                })?;
            workers.push(h);
        }
        Ok(ThreadPool {
            shared,
            workers,
            threads,
        })
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
        assert!(n < u32::MAX as usize, "too many tasks");
        let sh = &*self.shared;
        let f: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: the lifetime is erased for the workers; this function does not return
        // before every claimed task has finished, and no task can be claimed after that
        // (the generation moves on before the next job is published).
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Job { f, n: n as u32 };
        let gen = {
            let mut slot = sh.job.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(job);
            sh.done.store(0, Ordering::Relaxed);
            let gen = ((sh.state.load(Ordering::Relaxed) >> 32) as u32).wrapping_add(1);
            sh.state.store((gen as u64) << 32, Ordering::Release);
            gen
        };
        if sh.sleepers.load(Ordering::Acquire) > 0 {
            let _guard = sh.job.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        sh.work(gen, job);
        while (sh.done.load(Ordering::Acquire) as usize) < n {
            std::hint::spin_loop();
        }
        if sh.panicked.swap(false, Ordering::AcqRel) {
            panic!("a thread pool task panicked");
        }
    }
}

impl ThreadPool {
    /// Runs `f(j, r0, r1)` over the row ranges of several parts in one [`ThreadPool::run`]:
    /// part j of `parts[j] = (rows, per)` is cut into ranges of `per` rows (the last one
    /// shorter), one task each. Products by the same activations use it to dispatch all
    /// their matrices' tasks at once.
    pub fn run_ranges(&self, parts: &[(usize, usize)], f: impl Fn(usize, usize, usize) + Sync) {
        // Task i is task i - start[j] of part j.
        let mut start = Vec::with_capacity(parts.len() + 1);
        start.push(0);
        for &(rows, per) in parts {
            start.push(start[start.len() - 1] + rows.div_ceil(per.max(1)));
        }
        self.run(start[parts.len()], |task| {
            let j = start.partition_point(|&s| s <= task) - 1;
            let (rows, per) = parts[j];
            let r0 = (task - start[j]) * per;
            f(j, r0, (r0 + per).min(rows));
        });
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _guard = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
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
pub struct DisjointOut<'a, T = f32> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: tasks write disjoint elements (the contract of `write` and `part`), and the borrow
// of the slice outlives every task because `ThreadPool::run` returns only when all are done.
unsafe impl<T: Send> Send for DisjointOut<'_, T> {}
unsafe impl<T: Send> Sync for DisjointOut<'_, T> {}

impl<'a, T> DisjointOut<'a, T> {
    pub fn new(out: &'a mut [T]) -> Self {
        DisjointOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// Elements `at..at + len`, for one task to fill.
    ///
    /// # Safety
    /// No other task may write or read these indices while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, at: usize, len: usize) -> &mut [T] {
        assert!(
            at <= self.len && len <= self.len - at,
            "write out of bounds"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(at), len)
    }
}

impl<T: Copy> DisjointOut<'_, T> {
    /// Copies `src` to `at..at + src.len()`.
    ///
    /// # Safety
    /// No other task may write or read these indices while the pool runs.
    pub unsafe fn write(&self, at: usize, src: &[T]) {
        self.part(at, src.len()).copy_from_slice(src);
    }

    /// Writes one element.
    ///
    /// # Safety
    /// As for [`write`](Self::write).
    pub unsafe fn set(&self, at: usize, v: T) {
        assert!(at < self.len, "write out of bounds");
        *self.ptr.add(at) = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of every part is in exactly one range, ranges are at most `per` long, and
    /// parts with no rows get no task.
    #[test]
    fn run_ranges_covers_every_row_once() {
        let pool = ThreadPool::new(2).unwrap();
        let parts = [(40usize, 16usize), (0, 4), (7, 7), (9, 2), (1, 8)];
        let seen: Vec<Vec<AtomicUsize>> = parts
            .iter()
            .map(|&(rows, _)| (0..rows).map(|_| AtomicUsize::new(0)).collect())
            .collect();
        pool.run_ranges(&parts, |j, r0, r1| {
            assert!(r0 < r1 && r1 - r0 <= parts[j].1, "part {j}: {r0}..{r1}");
            for c in &seen[j][r0..r1] {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
        for (j, rows) in seen.iter().enumerate() {
            for (r, c) in rows.iter().enumerate() {
                assert_eq!(c.load(Ordering::Relaxed), 1, "part {j} row {r}");
            }
        }
    }
    use std::sync::atomic::AtomicUsize;

    /// Every index exactly once, over many jobs of every size, with sleeps in between so
    /// that workers go to sleep and are woken.
    #[test]
    fn runs_every_task_once() {
        for threads in [1, 2, 3, 5] {
            let pool = ThreadPool::new(threads).unwrap();
            for round in 0..300 {
                let n = round % 37;
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                for (i, h) in hits.iter().enumerate() {
                    assert_eq!(
                        h.load(Ordering::Relaxed),
                        1,
                        "task {i} of {n}, {threads} threads"
                    );
                }
                if round % 100 == 99 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// A panicking task reaches the caller as a panic instead of hanging the pool, and the
    /// pool keeps working afterwards.
    #[test]
    fn a_panicking_task_panics_the_caller() {
        let pool = ThreadPool::new(2).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, |i| {
                if i == 37 {
                    panic!("task 37");
                }
            })
        }));
        assert!(r.is_err());
        let hits = AtomicUsize::new(0);
        pool.run(64, |_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn results_reach_the_caller() {
        let pool = ThreadPool::new(2).unwrap();
        let mut out = vec![0.0f32; 1000];
        let dst = DisjointOut::new(&mut out);
        pool.run(1000, |i| unsafe { dst.set(i, i as f32) });
        assert!(out.iter().enumerate().all(|(i, v)| *v == i as f32));
    }
}
