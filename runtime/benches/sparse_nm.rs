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
//! `output 49152x576` is cycled over copies totalling 128 MiB so that every iteration streams
//! its weights from memory. Weights are random, pruned by magnitude.

mod common;

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
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let mut report = Vec::new();
    for shape in &SHAPES {
        let (rows, cols) = (shape.rows, shape.cols);
        let f = rng.fill(rows * cols);
        let x = rng.fill(cols);
        let id = format!(
            "nm/{} {rows}x{cols}{}",
            shape.name,
            if shape.stream_bytes > 0 {
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
        type Run<'a> = Box<dyn FnMut() + 'a>;
        let mut entries: Vec<(String, usize, Run)> = Vec::new();
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
            let Some(k) = table.dot(ty) else { continue };
            let rb = ty.row_bytes(cols as u64).expect("whole blocks") as usize;
            let mut w = vec![0u8; rows * rb];
            quant::quantize(ty, &f, &mut w).expect("quantize");
            let w_bytes = w.len();
            let weights = copies(w, shape.stream_bytes);
            let mut scratch = MatmulScratch::default();
            let mut y = vec![0f32; rows];
            let mut next = 0;
            let (pool, x) = (&pool, &x);
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
                    black_box(x),
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
            let weights = copies(w, shape.stream_bytes);
            let mut acts = NmActs::new();
            let mut y = vec![0f32; rows];
            let mut next = 0;
            let q = match fm.values {
                NmValues::Q8 => "q8",
                NmValues::Q4 => "q4",
            };
            let x = &x;
            let run = move || {
                let wm = &weights[next];
                next = (next + 1) % weights.len();
                acts.quantize(fm, black_box(x)).expect("activations");
                kern.matvec(wm, &acts, &mut y).expect("matvec");
                black_box(&mut y);
            };
            let name = format!("nm{}{}_{q} {}", fm.n, fm.m, kern.name);
            entries.push((name, w_bytes, Box::new(run)));
        }

        // (name, weight bytes, median seconds)
        let mut results: Vec<(String, usize, f64)> = Vec::new();
        for (name, w_bytes, run) in entries.iter_mut() {
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
            results.push((name.clone(), *w_bytes, times.into_inner().median()));
        }
        g.finish();

        // The noise of a shared machine hits runs minutes apart differently: the ratio to
        // dense Q8_0 is also measured interleaved, dense and sparse alternating in rounds of
        // about 2 ms each, and its median over 31 rounds reported.
        let mut interleaved = vec![f64::NAN; entries.len()];
        if let Some(d) = entries.iter().position(|e| e.0.contains("q8_0_q8_0")) {
            let (dense_run, rest) = {
                let (a, b) = entries.split_at_mut(d + 1);
                (&mut a[d].2, b)
            };
            for (i, (_, _, run)) in rest.iter_mut().enumerate() {
                let n = ((2e-3 / results[d].2) as usize).clamp(1, 1000);
                let mut ratios = Times::default();
                for _ in 0..31 {
                    let t = Instant::now();
                    for _ in 0..n {
                        dense_run();
                    }
                    let td = t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    for _ in 0..n {
                        run();
                    }
                    ratios.0.push(td / t.elapsed().as_secs_f64());
                }
                interleaved[d + 1 + i] = ratios.median();
            }
            interleaved[d] = 1.0;
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
                "  {id:<30} {name:<38} {:>8.1} us {gbs:>6.2} GB/s {:>5.1}% bw  q8_0/this {:>5.2}x (interleaved {il:>5.2}x)  q4_0/this {:>5.2}x",
                secs * 1e6,
                100.0 * gbs * 1e9 / bandwidth,
                dq8 / secs,
                dq4 / secs,
            );
            eprintln!("{line}");
            report.push(line);
        }
    }
    eprintln!("summary:");
    for l in report {
        eprintln!("{l}");
    }
}

criterion_group!(benches, bench_sparse_nm);
criterion_main!(benches);
