//! Group-sparse matrix-vector speed against the dense kernels of the same quantization, on
//! SmolLM2-135M's shapes, single-threaded.
//!
//! `cargo bench -p sparrow --bench sparse_group [FILTER]`
//!
//! As `benches/kernels.rs`: one iteration is one matrix-vector product as a decode step does
//! it, the activations quantized once outside the timing; `ffn_up 1536x576` and
//! `ffn_down 576x1536` stay in the caches, `output 49152x576` is cycled over copies of the
//! matrix that do not fit in the last-level cache, so its weights stream from memory.
//!
//! Dense: the `KernelTable::get()` entries for Q4_0 and Q8_0 (their `quantize_act`), one row
//! at a time with `vec_dot`, and eight at a time with `rows8` where the entry has it (the
//! decode path of the matmul driver); the faster of the two is the baseline. Sparse:
//! `GroupKernel::get()` on random weights pruned by group magnitude. After each shape a
//! table gives the median time, the weight GB/s, the fraction of the measured single-core
//! read bandwidth, and the ratio dense / sparse (W4 against Q4_0, Q8 against Q8_0).

mod common;

use common::{Rng, Shape, SHAPES};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use sparrow::kernels::bandwidth::measure_read_bandwidth;
use sparrow::kernels::{DotKernel, KernelTable};
use sparrow::quant::{self, GgmlType};
use sparrow::sparse::group::{
    encode, prune, GroupActs, GroupFormat, GroupKernel, GroupMatrix, Values,
};
use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// The sparse cases: (label, group size, values, scale groups, sparsity).
const CASES: [(&str, usize, Values, usize, f64); 7] = [
    ("w4 g16 50%", 16, Values::Q4, 1, 0.5),
    ("w4 g16 75%", 16, Values::Q4, 1, 0.75),
    ("w4 g16 sg2 50%", 16, Values::Q4, 2, 0.5),
    ("w4 g32 50%", 32, Values::Q4, 1, 0.5),
    ("w4 g32 75%", 32, Values::Q4, 1, 0.75),
    ("q8 g16 50%", 16, Values::Q8, 1, 0.5),
    ("q8 g32 50%", 32, Values::Q8, 1, 0.5),
];

#[derive(Default)]
struct Times(Vec<f64>);

impl Times {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// Runs `f(copy)` under criterion and returns the median seconds per iteration.
fn time(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    copies: usize,
    mut f: impl FnMut(usize),
) -> f64 {
    let times = RefCell::new(Times::default());
    let mut next = 0usize;
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                f(next);
                next = (next + 1) % copies;
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
}

/// Dense matrix-vector with the table's entry: `vec_dot` per row, and `rows8` if present.
fn dense(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    k: &DotKernel,
    shape: &Shape,
    w: &[f32],
    x: &[f32],
) -> Vec<(String, f64, usize)> {
    let (rows, cols) = (shape.rows, shape.cols);
    let (bs, ts) = k.weight_type.block_layout();
    let row_bytes = cols / bs * ts;
    let bytes = rows * row_bytes;
    let mut q = vec![0u8; bytes];
    quant::quantize(k.weight_type, w, &mut q).expect("quantize weights");
    let copies = shape.stream_bytes.div_ceil(bytes).max(1);
    let mats: Vec<Vec<u8>> = (0..copies).map(|_| q.clone()).collect();
    let mut act = vec![0u8; k.act_row_bytes(cols).expect("whole blocks")];
    (k.quantize_act)(x, &mut act);
    let mut out = vec![0f32; rows];
    let mut res = Vec::new();
    let secs = time(g, k.name, copies, |c| {
        for (o, row) in out.iter_mut().zip(mats[c].chunks_exact(row_bytes)) {
            *o = (k.vec_dot)(row, &act);
        }
        black_box(&mut out);
    });
    res.push((k.name.to_string(), secs, bytes));
    if let Some(rows8) = k.rows8 {
        let name = format!("{}_rows8", k.name);
        let secs = time(g, &name, copies, |c| {
            let m = &mats[c];
            for (r, o) in out.chunks_exact_mut(8).enumerate() {
                let row = |i: usize| &m[(8 * r + i) * row_bytes..(8 * r + i + 1) * row_bytes];
                let v = rows8(
                    [
                        row(0),
                        row(1),
                        row(2),
                        row(3),
                        row(4),
                        row(5),
                        row(6),
                        row(7),
                    ],
                    &act,
                );
                o.copy_from_slice(&v);
            }
            black_box(&mut out);
        });
        res.push((name, secs, bytes));
    }
    res
}

fn bench(c: &mut Criterion) {
    let bandwidth = measure_read_bandwidth(1);
    let kernel = GroupKernel::get();
    let table = KernelTable::get();
    eprintln!(
        "read bandwidth, 1 thread: {:.2} GB/s; sparse kernel {}, dense table {}",
        bandwidth / 1e9,
        kernel.name,
        table.level().name()
    );
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    for shape in &SHAPES {
        let (rows, cols) = (shape.rows, shape.cols);
        let w = rng.fill(rows * cols);
        let x = rng.fill(cols);
        let id = format!(
            "group/{} {rows}x{cols}{}",
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
        // (label, seconds, weight bytes, dense baseline seconds)
        let mut lines: Vec<(String, f64, usize, f64)> = Vec::new();
        let mut best = |ty: GgmlType, g: &mut criterion::BenchmarkGroup<'_, _>| {
            let Some(k) = table.dot(ty) else {
                return f64::NAN;
            };
            let r = dense(g, k, shape, &w, &x);
            let b = r.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
            for (n, s, bytes) in r {
                lines.push((n, s, bytes, b));
            }
            b
        };
        g.throughput(Throughput::Bytes((rows * cols / 32 * 18) as u64));
        let q4 = best(GgmlType::Q4_0, &mut g);
        let q8 = best(GgmlType::Q8_0, &mut g);
        let acts = GroupActs::new(&x);
        for (label, gs, values, sg, s) in CASES {
            let fmt = GroupFormat::new(gs, values)
                .and_then(|f| f.with_scale_groups(sg))
                .expect("format");
            let mut pw = w.clone();
            prune(&mut pw, cols, gs, s).expect("prune");
            let enc = encode(&pw, rows, cols, fmt).expect("encode");
            drop(pw);
            let bytes = enc.len();
            let copies = shape.stream_bytes.div_ceil(bytes).max(1);
            let mats: Vec<Vec<u8>> = (0..copies).map(|_| enc.clone()).collect();
            let views: Vec<GroupMatrix> = mats
                .iter()
                .map(|m| GroupMatrix::new(m).expect("valid"))
                .collect();
            let mut out = vec![0f32; rows];
            g.throughput(Throughput::Bytes(bytes as u64));
            let secs = time(&mut g, label, copies, |c| {
                kernel
                    .matvec(&views[c], &acts, &mut out)
                    .expect("shapes match");
                black_box(&mut out);
            });
            let base = if values == Values::Q4 { q4 } else { q8 };
            lines.push((label.to_string(), secs, bytes, base));
        }
        g.finish();
        // A filter that skipped this shape left no times.
        if lines.iter().all(|l| l.1.is_nan()) {
            continue;
        }
        eprintln!(
            "  {id:<34} {:<28} {:>9} {:>9} {:>7} {:>11}",
            "kernel", "us", "GB/s", "% bw", "dense/this"
        );
        for (name, secs, bytes, base) in lines {
            let gbs = bytes as f64 / secs / 1e9;
            eprintln!(
                "  {id:<34} {name:<28} {:>9.1} {gbs:>9.2} {:>6.1}% {:>10.2}x",
                secs * 1e6,
                100.0 * gbs * 1e9 / bandwidth,
                base / secs
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
