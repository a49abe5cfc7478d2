//! N:M sparse matrix-vector speed against the dense kernels of the same quant, single thread.
//!
//! `cargo bench -p sparrow --bench sparse_nm [FILTER]`
//!
//! One iteration is one matrix-vector product, activation quantization included on both
//! sides: the dense side is the model's own call, [`matmul`] on a one-thread pool for one
//! token (it quantizes the row with the table entry's `quantize_act` and feeds the entry's
//! `rows8` / `rows4` / `vec_dot` exactly as in a decode step); the sparse side quantizes the
//! row ([`NmActs::quantize`], buffers reused) and runs [`NmKernel::matvec`] with the kernel
//! of [`NmKernel::get`]. With `NM_BENCH_ALL=1` every variant the CPU can run
//! ([`NmKernel::variants`]) is measured too. Criterion's
//! throughput is the weight bytes, so it reports weight GB/s. After each shape a line per
//! kernel gives the median time, the weight GB/s, its fraction of the one-core read bandwidth
//! ([`measure_read_bandwidth`]`(1)`), and the ratios dense time / sparse time: from the
//! criterion medians, and (to Q8_0) the median of 31 interleaved rounds, which a noisy
//! shared machine disturbs less.
//!
//! Shapes are SmolLM2-135M's: `ffn_up 1536x576` and `ffn_down 576x1536` stay in the caches;
//! `output 49152x576` is cycled over copies totalling `common::stream_bytes()` (twice
//! the largest cache, at least 128 MiB) so that every iteration streams its weights from
//! memory. Weights are random, pruned by magnitude.
//!
//! Batch (prompt processing): after each shape, the same matrices times a batch of
//! `NM_BENCH_BATCH` tokens (default 32; one copy of the matrix): dense [`matmul`] with `n`
//! tokens (its four-token tiles), against the sparse [`NmKernel::matmat`] (activations
//! quantized per token inside the timing, as in the model) and, for comparison, the
//! matrix-vector kernel run once per token (the path a batch took before `matmat`).
//!
//! `SPARSE_NM_QUICK=1` skips criterion and reports only the interleaved ratios (with the
//! median round times). For quick comparisons while working on a kernel:
//! `NM_BENCH_SHAPES=ffn_up,ffn_down` measures only the shapes named, `NM_BENCH_FORMATS=nm24_q8`
//! only the sparse formats named (`nm24_q8`, `nm48_q8`, `nm24_q4`, `nm48_q4`; the dense
//! entries are always measured), and `NM_BENCH_BATCH=0` skips the batches.

mod common;

/// `x` and a copy with its first value changed: products alternating between the two never
/// find their activations already quantized by the call before.
fn two_rows(x: &[f32]) -> [Vec<f32>; 2] {
    let mut y = x.to_vec();
    y[0] += 0.25;
    [x.to_vec(), y]
}

use common::{Rng, SHAPES};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use sparrow::kernels::bandwidth::measure_read_bandwidth;
use sparrow::kernels::{matmul, KernelTable, MatmulScratch, ThreadPool};
use sparrow::quant::{self, GgmlType};
use sparrow::sparse::nm::{encode_row, NmActs, NmFormat, NmKernel, NmValues};
use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Times(Vec<f64>);

impl Times {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// Copies of a matrix totalling at least `stream_bytes` (one when 0).
fn copies(w: Vec<u8>, stream_bytes: usize) -> Vec<Vec<u8>> {
    let n = stream_bytes.div_ceil(w.len()).max(1);
    let mut v: Vec<Vec<u8>> = (1..n).map(|_| w.clone()).collect();
    v.push(w);
    v
}

fn bench_sparse_nm(c: &mut Criterion) {
    let bandwidth = measure_read_bandwidth(1);
    let table = KernelTable::get();
    let pool = ThreadPool::new(1).expect("one-thread pool");
    let all = std::env::var("NM_BENCH_ALL").is_ok_and(|v| v == "1");
    let quick = std::env::var("SPARSE_NM_QUICK").is_ok_and(|v| v == "1");
    let batch: usize = std::env::var("NM_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    eprintln!(
        "read bandwidth, 1 thread: {:.2} GB/s; dense kernels at {}",
        bandwidth / 1e9,
        table.level().name()
    );
    let formats: Vec<NmFormat> = [
        (2, 4, NmValues::Q8),
        (4, 8, NmValues::Q8),
        (2, 4, NmValues::Q4),
        (4, 8, NmValues::Q4),
    ]
    .into_iter()
    .map(|(n, m, v)| NmFormat::new(n, m, v).expect("valid format"))
    .collect();
    let listed = |var: &str, name: &str| {
        std::env::var(var).map_or(true, |v| v.split(',').any(|s| s.trim() == name))
    };
    let formats: Vec<NmFormat> = formats
        .into_iter()
        .filter(|f| listed("NM_BENCH_FORMATS", &format_name(f)))
        .collect();
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let mut report = Vec::new();
    for shape in &SHAPES {
        let (rows, cols) = (shape.rows, shape.cols);
        let f = rng.fill(rows * cols);
        let x = rng.fill(cols);
        let xb = rng.fill(batch * cols);
        if !listed("NM_BENCH_SHAPES", shape.name) {
            continue;
        }
        let id = format!(
            "nm/{} {rows}x{cols}{}",
            shape.name,
            if shape.stream_bytes() > 0 {
                " streamed"
            } else {
                ""
            }
        );
        let mut g = c.benchmark_group(&id);
        g.sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        // (name, weight bytes, one matrix-vector product)
        let mut entries: Vec<(String, usize, Run)> = Vec::new();
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
            let Some(k) = table.dot(ty) else { continue };
            let rb = ty.row_bytes(cols as u64).expect("whole blocks") as usize;
            let mut w = vec![0u8; rows * rb];
            quant::quantize(ty, &f, &mut w).expect("quantize");
            let w_bytes = w.len();
            let weights = copies(w, shape.stream_bytes());
            let mut scratch = MatmulScratch::default();
            let mut y = vec![0f32; rows];
            let mut next = 0;
            // Two activation rows in turn: the driver keeps the quantized activations of the
            // call before when they are the same, and each call must quantize, as the sparse
            // side does.
            let xs = two_rows(&x);
            let pool = &pool;
            let run = move || {
                let wm = &weights[next];
                next = (next + 1) % weights.len();
                matmul(
                    pool,
                    &mut scratch,
                    ty,
                    wm,
                    rows,
                    cols,
                    black_box(&xs[next % 2]),
                    1,
                    &mut y,
                )
                .expect("matmul");
                black_box(&mut y);
            };
            entries.push((format!("dense_{}", k.name), w_bytes, Box::new(run)));
        }
        for (fm, kern) in formats.iter().flat_map(|fm| {
            let best = NmKernel::get(*fm).expect("kernel");
            let mut v = vec![(fm, best)];
            if all {
                for k in NmKernel::variants(*fm).expect("kernels") {
                    if k.name != best.name && k.level != sparrow::kernels::Level::Generic {
                        v.push((fm, k));
                    }
                }
            }
            v
        }) {
            let rb = fm.row_bytes(cols).expect("cols a multiple of the span");
            let mut w = vec![0u8; rows * rb];
            for (src, dst) in f.chunks_exact(cols).zip(w.chunks_exact_mut(rb)) {
                encode_row(fm, src, dst).expect("encode");
            }
            let w_bytes = w.len();
            let weights = copies(w, shape.stream_bytes());
            let mut acts = NmActs::new();
            let mut y = vec![0f32; rows];
            let mut next = 0;
            let x = &x;
            let run = move || {
                let wm = &weights[next];
                next = (next + 1) % weights.len();
                acts.quantize(fm, black_box(x)).expect("activations");
                kern.matvec(wm, &acts, &mut y).expect("matvec");
                black_box(&mut y);
            };
            let name = format!("{} {}", format_name(fm), kern.name);
            entries.push((name, w_bytes, Box::new(run)));
        }

        measure(&mut g, &id, &mut entries, quick, bandwidth, &mut report);
        g.finish();

        if batch == 0 {
            continue;
        }
        // The batch: dense matmul of n tokens, sparse matmat, sparse matvec per token.
        let id = format!("nm/{} {rows}x{cols} batch {batch}", shape.name);
        let mut g = c.benchmark_group(&id);
        g.sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        let mut entries: Vec<(String, usize, Run)> = Vec::new();
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
            let Some(k) = table.dot(ty) else { continue };
            let rb = ty.row_bytes(cols as u64).expect("whole blocks") as usize;
            let mut w = vec![0u8; rows * rb];
            quant::quantize(ty, &f, &mut w).expect("quantize");
            let w_bytes = w.len();
            let mut scratch = MatmulScratch::default();
            let mut y = vec![0f32; batch * rows];
            // As above: every call quantizes its activations.
            let xs = two_rows(&xb);
            let mut flip = 0;
            let pool = &pool;
            let run = move || {
                flip ^= 1;
                matmul(
                    pool,
                    &mut scratch,
                    ty,
                    &w,
                    rows,
                    cols,
                    black_box(&xs[flip]),
                    batch,
                    &mut y,
                )
                .expect("matmul");
                black_box(&mut y);
            };
            entries.push((format!("dense_{}", k.name), w_bytes, Box::new(run)));
        }
        for fm in &formats {
            let kern = NmKernel::get(*fm).expect("kernel");
            let rb = fm.row_bytes(cols).expect("cols a multiple of the span");
            let mut w = vec![0u8; rows * rb];
            for (src, dst) in f.chunks_exact(cols).zip(w.chunks_exact_mut(rb)) {
                encode_row(fm, src, dst).expect("encode");
            }
            let w = std::rc::Rc::new(w);
            // 0: matmat, 1: the matrix-vector kernel per token, 2 (NM_BENCH_ALL=1): matmat
            // with one-row calls only (no two-row tile).
            for how in 0..if all { 3 } else { 2 } {
                let w = w.clone();
                let w_bytes = w.len();
                let mut acts: Vec<NmActs> = (0..batch).map(|_| NmActs::new()).collect();
                let mut y = vec![0f32; batch * rows];
                let xb = &xb;
                let run = move || {
                    for (a, x) in acts.iter_mut().zip(black_box(xb).chunks_exact(cols)) {
                        a.quantize(fm, x).expect("activations");
                    }
                    match how {
                        0 => kern.matmat(&w, &acts, &mut y).expect("matmat"),
                        1 => {
                            for (a, y) in acts.iter().zip(y.chunks_exact_mut(rows)) {
                                kern.matvec(&w, a, y).expect("matvec");
                            }
                        }
                        _ => kern.matmat_by_row(&w, &acts, &mut y).expect("matmat"),
                    }
                    black_box(&mut y);
                };
                let how = ["matmat", "matvec per token", "matmat one-row"][how];
                let name = format!("{} {} {how}", format_name(fm), kern.name);
                entries.push((name, w_bytes, Box::new(run)));
            }
        }
        measure(&mut g, &id, &mut entries, quick, bandwidth, &mut report);
        g.finish();
    }
    eprintln!("summary:");
    for l in report {
        eprintln!("{l}");
    }
}

/// `nm24_q8` for 2:4 with Q8 values.
fn format_name(f: &NmFormat) -> String {
    let q = match f.values {
        NmValues::Q8 => "q8",
        NmValues::Q4 => "q4",
    };
    format!("nm{}{}_{q}", f.n, f.m)
}

/// A timed entry: name, weight bytes, one product.
type Run<'a> = Box<dyn FnMut() + 'a>;

/// Seconds per product of `n` products in a row.
fn burst(run: &mut Run, n: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        run();
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// Times the entries (criterion medians; in `quick` mode medians of 15 bursts of about
/// 2 ms), then the ratio of each sparse entry to the dense entry of its value precision
/// (Q8 values to Q8_0, Q4 to Q4_0; dense Q4_0 to Q8_0) measured interleaved, and adds a
/// line per entry to `report`.
fn measure(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: &str,
    entries: &mut [(String, usize, Run)],
    quick: bool,
    bandwidth: f64,
    report: &mut Vec<String>,
) {
    // (name, weight bytes, median seconds)
    let mut results: Vec<(String, usize, f64)> = Vec::new();
    for (name, w_bytes, run) in entries.iter_mut() {
        let secs = if quick {
            let n = ((2e-3 / burst(run, 2)) as usize).clamp(1, 1000);
            let mut t = Times::default();
            for _ in 0..15 {
                t.0.push(burst(run, n));
            }
            t.median()
        } else {
            let times = RefCell::new(Times::default());
            g.throughput(Throughput::Bytes(*w_bytes as u64));
            g.bench_function(BenchmarkId::from_parameter(&*name), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        run();
                    }
                    let d = t.elapsed();
                    times
                        .borrow_mut()
                        .0
                        .push(d.as_secs_f64() / iters.max(1) as f64);
                    d
                })
            });
            times.into_inner().median()
        };
        results.push((name.clone(), *w_bytes, secs));
    }

    // The noise of a shared machine hits runs minutes apart differently: the ratio to the
    // dense entry of the same precision is also measured interleaved, dense and sparse
    // alternating in rounds of about 2 ms (at least 8 products) each, and its median over 31
    // rounds reported.
    let find = |ty: &str| entries.iter().position(|e| e.0.contains(ty));
    let (q8, q4) = (find("q8_0_q8_0"), find("q4_0_q8_0"));
    let mut interleaved = vec![f64::NAN; entries.len()];
    for i in 0..entries.len() {
        let base = if entries[i].0.starts_with("dense_") {
            q8.filter(|&d| d != i)
        } else if entries[i].0.contains("_q4 ") {
            q4
        } else {
            q8
        };
        let Some(d) = base else { continue };
        let (lo, hi) = entries.split_at_mut(d.max(i));
        let (dense_run, run) = if d < i {
            (&mut lo[d].2, &mut hi[0].2)
        } else {
            (&mut hi[0].2, &mut lo[i].2)
        };
        // At least 8 products a round: with one product of the streamed shape per round
        // (each from a different copy), the ratio also measured what a switch between the
        // two kernels' copies costs (2:4 Q8 0.87-1.25x of Q8_0 in single-product rounds,
        // 1.56x in rounds of five, on the Intel VM).
        let n = ((2e-3 / results[d].2) as usize).clamp(8, 1000);
        let mut ratios = Times::default();
        for _ in 0..31 {
            let td = burst(dense_run, n);
            ratios.0.push(td / burst(run, n));
        }
        interleaved[i] = ratios.median();
    }

    let dense = |ty: &str| {
        results
            .iter()
            .find(|r| r.0.starts_with("dense_") && r.0.contains(ty))
            .map_or(f64::NAN, |r| r.2)
    };
    let (dq8, dq4) = (dense("q8_0_q8_0"), dense("q4_0_q8_0"));
    for ((name, bytes, secs), il) in results.iter().zip(&interleaved) {
        let gbs = *bytes as f64 / secs / 1e9;
        let line = format!(
            "  {id:<36} {name:<50} {:>9.1} us {gbs:>6.2} GB/s {:>5.1}% bw  q8_0/this {:>5.2}x  q4_0/this {:>5.2}x  same-quant dense/this interleaved {il:>5.2}x",
            secs * 1e6,
            100.0 * gbs * 1e9 / bandwidth,
            dq8 / secs,
            dq4 / secs,
        );
        eprintln!("{line}");
        report.push(line);
    }
}

criterion_group!(benches, bench_sparse_nm);
criterion_main!(benches);
