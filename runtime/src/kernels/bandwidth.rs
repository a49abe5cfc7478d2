//! Memory read bandwidth, measured: the roof that decode speed is held against.
//!
//! A decode step reads every weight of the model once, and a model is much larger than the
//! last-level cache, so the best a decode step can do is the time it takes to stream the
//! weights from memory. [`measure_read_bandwidth`] measures that streaming rate on the running
//! machine: sequential reads of a buffer far larger than the last-level cache (512 MiB; 32 MiB
//! of L3 on the development machine), split into one contiguous part per thread, each thread
//! summing its part as 64-bit words. The loop is the simplest thing a matrix-vector kernel
//! could be: loads and an add per word, which the compiler vectorises, so the rate is that of
//! the memory system (hardware prefetchers included), not of the arithmetic.
//!
//! It is read bandwidth only (no writes, no copies, unlike STREAM's copy/triad figures), from
//! `threads` cores at once, as the best of a few passes over the buffer after it has been
//! written once (so every page is mapped to its own memory and none is the shared zero page).

use std::sync::Barrier;
use std::time::Instant;

/// Size of the buffer [`measure_read_bandwidth`] streams: 16 times a 32 MiB L3, so that
/// almost every byte of a pass comes from memory.
pub const BUFFER_BYTES: usize = 512 << 20;

/// Passes over the buffer; the fastest one is reported.
pub const PASSES: usize = 5;

/// Bytes per second of streaming reads from memory by `threads` threads (0: one per core),
/// over a [`BUFFER_BYTES`] buffer, best of [`PASSES`] passes.
pub fn measure_read_bandwidth(threads: usize) -> f64 {
    measure_read_bandwidth_with(BUFFER_BYTES, threads, PASSES)
}

/// [`measure_read_bandwidth`] with another buffer size (rounded down to whole 64-byte lines,
/// at least one line per thread) and number of passes (at least one).
pub fn measure_read_bandwidth_with(buffer_bytes: usize, threads: usize, passes: usize) -> f64 {
    let threads = if threads == 0 {
        super::default_threads()
    } else {
        threads
    };
    // Whole cache lines for each thread.
    let lines_per_thread = (buffer_bytes / 64 / threads).max(1);
    let words_per_thread = lines_per_thread * 8;
    let words = words_per_thread * threads;
    let mut buf: Vec<u64> = Vec::with_capacity(words);
    // Written in parallel, each part by the thread that will read it (first touch).
    {
        let spare = &mut buf.spare_capacity_mut()[..words];
        std::thread::scope(|s| {
            for (t, part) in spare.chunks_mut(words_per_thread).enumerate() {
                s.spawn(move || {
                    let base = (t * words_per_thread) as u64;
                    for (i, w) in part.iter_mut().enumerate() {
                        w.write(
                            base.wrapping_add(i as u64)
                                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        );
                    }
                });
            }
        });
    }
    // SAFETY: every one of the first `words` elements was written above (the chunks cover the
    // slice), and u64 has no invalid bit patterns.
    unsafe { buf.set_len(words) };

    let passes = passes.max(1);
    let bytes = (words * 8) as f64;
    // Workers start a pass together and the main thread times from the release of the start
    // barrier to the last worker reaching the end barrier.
    let start = Barrier::new(threads + 1);
    let end = Barrier::new(threads + 1);
    let mut best = f64::INFINITY;
    std::thread::scope(|s| {
        for part in buf.chunks(words_per_thread) {
            let (start, end) = (&start, &end);
            s.spawn(move || {
                for _ in 0..passes {
                    start.wait();
                    std::hint::black_box(sum_words(std::hint::black_box(part)));
                    end.wait();
                }
            });
        }
        for _ in 0..passes {
            start.wait();
            let t0 = Instant::now();
            end.wait();
            best = best.min(t0.elapsed().as_secs_f64());
        }
    });
    bytes / best.max(1e-9)
}

/// The sum of `words` (wrapping). Integer addition reassociates freely, so the compiler
/// vectorises this into wide loads and adds with several accumulators; the loop is bound by
/// the loads.
#[inline(never)]
fn sum_words(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |a, &w| a.wrapping_add(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_is_finite_and_positive() {
        for threads in [1, 2] {
            let bw = measure_read_bandwidth(threads);
            assert!(bw.is_finite() && bw > 0.0, "{threads} threads: {bw}");
            // Anything real is between 100 MB/s and 10 TB/s.
            assert!(bw > 1e8 && bw < 1e13, "{threads} threads: {bw} B/s");
        }
    }

    #[test]
    fn small_buffers_and_odd_sizes_work() {
        let bw = measure_read_bandwidth_with(1000, 3, 0);
        assert!(bw.is_finite() && bw > 0.0, "{bw}");
    }

    #[test]
    fn sum_is_the_wrapping_sum() {
        let v: Vec<u64> = (0..1001u64).map(|i| i.wrapping_mul(u64::MAX / 7)).collect();
        let want = v.iter().fold(0u64, |a, &w| a.wrapping_add(w));
        assert_eq!(sum_words(&v), want);
    }
}
