//! Per-kernel matrix-vector speed: every entry of the kernel table, at every level the running
//! CPU has, on the shapes of a decode step, single-threaded.
//!
//! `cargo bench -p sparrow --bench kernels [FILTER]`
//!
//! One iteration is one matrix-vector product as a decode step does it: the activation row is
//! quantized once (outside the timing) and `vec_dot` runs once per weight row. Criterion's
//! throughput is the weight bytes of the matrix, so it reports weight GB/s. After each group a
//! line per kernel gives that rate and its fraction of the machine's read bandwidth from one
//! core ([`measure_read_bandwidth`]`(1)`), measured once at the start.
//!
//! Shapes are SmolLM2-135M's (rows x cols; cols is the dot length, rounded up to the block
//! size of formats with larger blocks, e.g. 576 -> 768 for K-quants):
//! - `ffn_up 1536x576` and `ffn_down 576x1536`: small enough (under 4.5 MB even in F32) to
//!   stay in the caches between iterations, so they show what the kernel computes at best;
//! - `output 49152x576`: the vocabulary projection, cycled over enough copies of the matrix
//!   that they do not fit in the last-level cache, so every iteration streams its weights from
//!   memory as a decode step does. This is the case to compare with the bandwidth.
//!
//! Weights are random values quantized with the reference quantizer of each format.

mod common;

use common::{Rng, SHAPES};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use sparrow::kernels::bandwidth::measure_read_bandwidth;
use sparrow::kernels::{DotKernel, KernelTable, Level};
use sparrow::quant::{self, GgmlType};
use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Bytes of `n` elements of `ty` (whole blocks).
fn type_bytes(ty: GgmlType, n: usize) -> usize {
    let (bs, ts) = ty.block_layout();
    n / bs * ts
}

/// Every level the CPU has, and for each weight type the distinct kernels across them (a
/// higher level that leaves an entry as it was adds nothing to measure).
fn kernels_by_type() -> Vec<(GgmlType, Vec<DotKernel>)> {
    let tables: Vec<KernelTable> = Level::detected()
        .into_iter()
        .map(KernelTable::for_level)
        .collect();
    let mut out: Vec<(GgmlType, Vec<DotKernel>)> = Vec::new();
    for t in &tables {
        for e in t.entries() {
            let i = match out.iter().position(|(ty, _)| *ty == e.weight_type) {
                Some(i) => i,
                None => {
                    out.push((e.weight_type, Vec::new()));
                    out.len() - 1
                }
            };
            if !out[i].1.iter().any(|k| k.name == e.name) {
                out[i].1.push(*e);
            }
        }
    }
    out
}

/// Per-iteration times seen by `iter_custom`, for the summary lines.
#[derive(Default)]
struct Times(Vec<f64>);

impl Times {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

fn bench_kernels(c: &mut Criterion) {
    let bandwidth = measure_read_bandwidth(1);
    eprintln!(
        "read bandwidth, 1 thread: {:.2} GB/s (levels: {})",
        bandwidth / 1e9,
        Level::detected()
            .iter()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    for (ty, kernels) in kernels_by_type() {
        let (wbs, _) = ty.block_layout();
        let act_bs = kernels
            .iter()
            .map(|k| k.act_type.block_layout().0)
            .max()
            .unwrap_or(1);
        for shape in &SHAPES {
            let cols = round_up(shape.cols, wbs.max(act_bs));
            let rows = shape.rows;
            let row_bytes = type_bytes(ty, cols);
            let w_bytes = rows * row_bytes;
            let f = rng.fill(rows * cols);
            let mut w = vec![0u8; w_bytes];
            quant::quantize(ty, &f, &mut w).expect("quantize weights");
            drop(f);
            let copies = shape.stream_bytes().div_ceil(w_bytes).max(1);
            let weights: Vec<Vec<u8>> = (0..copies).map(|_| w.clone()).collect();
            drop(w);
            let x = rng.fill(cols);

            let id = format!(
                "{}/{} {rows}x{cols}{}",
                ty.name().to_ascii_lowercase(),
                shape.name,
                if copies > 1 { " streamed" } else { "" }
            );
            let mut g = c.benchmark_group(&id);
            g.throughput(Throughput::Bytes(w_bytes as u64))
                .sample_size(10)
                .sampling_mode(SamplingMode::Flat)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(1));
            let mut summary = Vec::new();
            for k in &kernels {
                let mut act = vec![0u8; k.act_row_bytes(cols).expect("whole blocks")];
                (k.quantize_act)(&x, &mut act);
                let act = act.as_slice();
                let mut out = vec![0f32; rows];
                let mut next = 0usize;
                // Times `pass` (one product of a copy of the weights into `out`) over the
                // copies in turn, as this group's benchmark `name`, and keeps its median.
                let mut measure = |name: String, pass: &mut dyn FnMut(&[u8], &mut [f32])| {
                    let times = RefCell::new(Times::default());
                    g.bench_function(BenchmarkId::from_parameter(&name), |b| {
                        b.iter_custom(|iters| {
                            let t = Instant::now();
                            for _ in 0..iters {
                                let wm = &weights[next];
                                next = (next + 1) % copies;
                                pass(wm, &mut out);
                                black_box(&mut out);
                            }
                            let d = t.elapsed();
                            times
                                .borrow_mut()
                                .0
                                .push(d.as_secs_f64() / iters.max(1) as f64);
                            d
                        })
                    });
                    summary.push((name, times.into_inner().median()));
                };
                let row = |r: usize| r * row_bytes..(r + 1) * row_bytes;
                measure(k.name.to_string(), &mut |wm, out| {
                    for (o, row) in out.iter_mut().zip(wm.chunks_exact(row_bytes)) {
                        *o = (k.vec_dot)(row, act);
                    }
                });
                // The decode path: four or eight rows at a time from the quarters or eighths
                // of the matrix, as the matmul driver feeds them (one call per matrix).
                for (kr, f) in [(4, k.rows4), (8, k.rows8)] {
                    if let Some(f) = f {
                        let len = rows / kr * kr;
                        measure(format!("{}_rows{kr}", k.name), &mut |wm, out| {
                            f(&wm[..len * row_bytes], row_bytes, act, &mut out[..len]);
                        });
                    }
                }
                // The batch paths: two or eight rows by four tokens (the same activation row
                // four times), per weight byte as above, so a quarter of the batch's rate.
                if let Some(tile) = k.tile2x4 {
                    measure(format!("{}_tile2x4", k.name), &mut |wm, out| {
                        for r in (0..rows - 1).step_by(2) {
                            let v = tile([&wm[row(r)], &wm[row(r + 1)]], [act; 4]);
                            out[r] = v[0][0];
                            out[r + 1] = v[1][3];
                        }
                    });
                }
                if let Some(tile) = k.tile8x4 {
                    measure(format!("{}_tile8x4", k.name), &mut |wm, out| {
                        for r in (0..rows - 7).step_by(8) {
                            let v = tile(std::array::from_fn(|i| &wm[row(r + i)]), [act; 4]);
                            out[r] = v[0][0];
                            out[r + 7] = v[7][3];
                        }
                    });
                }
            }
            g.finish();
            for (name, secs) in summary {
                let gbs = w_bytes as f64 / secs / 1e9;
                eprintln!(
                    "  {id:<40} {name:<24} {gbs:>8.2} GB/s  {:>6.1}% of read bandwidth",
                    100.0 * gbs * 1e9 / bandwidth
                );
            }
        }
    }
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
