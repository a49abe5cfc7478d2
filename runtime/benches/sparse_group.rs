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
//! read bandwidth, and the ratio dense / sparse (W4 against Q4_0, Q8 against Q8_0): from the
//! criterion medians, and the median of 31 interleaved rounds (baseline and sparse kernel
//! alternating, about 2 ms and at least 8 products each), which the noise of a shared
//! machine disturbs less, and the ratio of the two kernels' fastest rounds ("best").
//!
//! `SPARSE_GROUP_QUICK=1` skips criterion and reports the interleaved ratios, with the
//! medians of a few bursts as times: a quick A/B while working on a kernel.
//!
//! Batch (prompt processing): after each shape, the same matrices times a batch of
//! `GROUP_BENCH_BATCH` tokens (default 32; one copy of the matrix), activations quantized
//! inside the timing on both sides: dense `kernels::matmul` with `n` tokens on a one-thread
//! pool (its four-token tiles) against `GroupKernel::matmat`, and the matrix-vector kernel
//! once per token (the path a batch took before `matmat`); ratios as above, interleaved.
//! `GROUP_BENCH_BATCH=0` skips the batches.
//!
//! `GROUP_BENCH_CYCLE_MIB=N` cycles the in-cache shapes over copies totalling N MiB as well
//! (labelled "cycled"): a decode step's regime, where a model's matrices pass through the
//! last-level cache one after another (64 for SmolLM2-135M's size).

mod common;

use common::{Rng, Shape, SHAPES};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use sparrow::kernels::bandwidth::measure_read_bandwidth;
use sparrow::kernels::{matmul, DotKernel, KernelTable, MatmulScratch, ThreadPool};
use sparrow::quant::{self, GgmlType};
use sparrow::sparse::group::{
    encode, prune_tiles, GroupActs, GroupFormat, GroupKernel, GroupMatrix, Values,
};
use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// The sparse cases: (label, group size, values, scale groups, sparsity, rows per tile; 0 for
/// rows that each keep their own groups).
const CASES: [(&str, usize, Values, usize, f64, usize); 15] = [
    ("w4 g16 50%", 16, Values::Q4, 1, 0.5, 0),
    ("w4 g16 75%", 16, Values::Q4, 1, 0.75, 0),
    ("w4 g16 sg2 50%", 16, Values::Q4, 2, 0.5, 0),
    ("w4 g32 50%", 32, Values::Q4, 1, 0.5, 0),
    ("w4 g32 75%", 32, Values::Q4, 1, 0.75, 0),
    ("w4 g16 tile8 50%", 16, Values::Q4, 1, 0.5, 8),
    ("w4 g16 tile8 75%", 16, Values::Q4, 1, 0.75, 8),
    ("w4 g16 tile16 50%", 16, Values::Q4, 1, 0.5, 16),
    ("w4 g16 sg2 tile8 50%", 16, Values::Q4, 2, 0.5, 8),
    ("w4 g32 tile8 50%", 32, Values::Q4, 1, 0.5, 8),
    ("w4 g32 tile8 75%", 32, Values::Q4, 1, 0.75, 8),
    ("q8 g16 50%", 16, Values::Q8, 1, 0.5, 0),
    ("q8 g32 50%", 32, Values::Q8, 1, 0.5, 0),
    ("q8 g16 tile8 50%", 16, Values::Q8, 1, 0.5, 8),
    ("q8 g16 tile8 75%", 16, Values::Q8, 1, 0.75, 8),
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

/// One product on copy `c` of the matrix (the copies cycle for the streamed shape).
type Run<'a> = Box<dyn FnMut(usize) + 'a>;

/// A timed entry: name, weight bytes, copies, the run.
struct Entry<'a> {
    name: String,
    bytes: usize,
    copies: usize,
    run: Run<'a>,
}

/// Runs `f(copy)` under criterion and returns the median seconds per iteration.
fn time(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    copies: usize,
    f: &mut Run,
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

/// Seconds per product of `n` products in a row, cycling over the copies from `*next`.
fn burst(e: &mut Entry, n: usize, next: &mut usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        (e.run)(*next % e.copies);
        *next += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// Median over 31 rounds of (baseline time / entry time), each round about 2 ms (at least 8
/// products) of each; also the medians of the round times and the ratio of their minimums.
/// Single-product rounds of the streamed shape also measured the cost of switching between
/// the two kernels' copies (see `benches/sparse_nm.rs`).
fn interleaved(base: &mut Entry, e: &mut Entry) -> (f64, f64, f64, f64) {
    let (mut nb, mut ne) = (0, 0);
    let probe = burst(base, 3, &mut nb).max(burst(e, 3, &mut ne));
    let n = ((2e-3 / probe) as usize).clamp(8, 2000);
    let (mut ratios, mut tb, mut te) = (Times::default(), Times::default(), Times::default());
    for _ in 0..31 {
        let b = burst(base, n, &mut nb);
        let s = burst(e, n, &mut ne);
        ratios.0.push(b / s);
        tb.0.push(b);
        te.0.push(s);
    }
    let min = |t: &Times| t.0.iter().copied().fold(f64::INFINITY, f64::min);
    (
        ratios.median(),
        tb.median(),
        te.median(),
        min(&tb) / min(&te),
    )
}

/// Bytes of the copies of a shape's matrix to cycle over (0: one copy): the streamed shape's,
/// or `GROUP_BENCH_CYCLE_MIB` for the others.
fn cycle_bytes(shape: &Shape) -> usize {
    if shape.stream {
        return shape.stream_bytes();
    }
    std::env::var("GROUP_BENCH_CYCLE_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(0, |mib| mib << 20)
}

/// Dense matrix-vector with the table's entry: `vec_dot` per row, and `rows8` if present.
fn dense<'a>(k: &'a DotKernel, shape: &Shape, w: &[f32], x: &[f32]) -> Vec<Entry<'a>> {
    let (rows, cols) = (shape.rows, shape.cols);
    let (bs, ts) = k.weight_type.block_layout();
    let row_bytes = cols / bs * ts;
    let bytes = rows * row_bytes;
    let mut q = vec![0u8; bytes];
    quant::quantize(k.weight_type, w, &mut q).expect("quantize weights");
    let copies = cycle_bytes(shape).div_ceil(bytes).max(1);
    let mats: std::rc::Rc<Vec<Vec<u8>>> =
        std::rc::Rc::new((0..copies).map(|_| q.clone()).collect());
    let mut act = vec![0u8; k.act_row_bytes(cols).expect("whole blocks")];
    (k.quantize_act)(x, &mut act);
    let act = std::rc::Rc::new(act);
    let mut res = Vec::new();
    {
        let (mats, act) = (mats.clone(), act.clone());
        let mut out = vec![0f32; rows];
        res.push(Entry {
            name: k.name.to_string(),
            bytes,
            copies,
            run: Box::new(move |c| {
                for (o, row) in out.iter_mut().zip(mats[c].chunks_exact(row_bytes)) {
                    *o = (k.vec_dot)(row, &act);
                }
                black_box(&mut out);
            }),
        });
    }
    if let Some(rows8) = k.rows8 {
        let mut out = vec![0f32; rows];
        res.push(Entry {
            name: format!("{}_rows8", k.name),
            bytes,
            copies,
            run: Box::new(move |c| {
                let len = rows / 8 * 8;
                rows8(
                    &mats[c][..len * row_bytes],
                    row_bytes,
                    &act,
                    &mut out[..len],
                );
                black_box(&mut out);
            }),
        });
    }
    res
}

fn bench(c: &mut Criterion) {
    let quick = std::env::var_os("SPARSE_GROUP_QUICK").is_some_and(|v| v != "0");
    let bandwidth = measure_read_bandwidth(1);
    let kernel = GroupKernel::get();
    let table = KernelTable::get();
    let pool = ThreadPool::new(1).expect("one-thread pool");
    let batch: usize = std::env::var("GROUP_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    eprintln!(
        "read bandwidth, 1 thread: {:.2} GB/s; sparse kernel {}, dense table {}",
        bandwidth / 1e9,
        kernel.name,
        table.level().name()
    );
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    for shape in &SHAPES {
        let (rows, cols) = (shape.rows, shape.cols);
        let w = rng.fill(rows * cols);
        let x = rng.fill(cols);
        let xb = rng.fill(batch * cols);
        let id = format!(
            "group/{} {rows}x{cols}{}",
            shape.name,
            if shape.stream {
                " streamed"
            } else if cycle_bytes(shape) > 0 {
                " cycled"
            } else {
                ""
            }
        );
        // The sparse matrices (copies for the streamed shape), skipping in quick mode the
        // cases a filter leaves out.
        let acts = GroupActs::new(&x);
        let mut encoded: Vec<(&str, Values, Vec<Vec<u8>>)> = Vec::new();
        for (label, gs, values, sg, s, tile) in CASES {
            let full = format!("{id}/{label}");
            if quick && !filter.is_empty() && !filter.iter().any(|f| full.contains(f.as_str())) {
                continue;
            }
            let fmt = GroupFormat::new(gs, values)
                .and_then(|f| f.with_scale_groups(sg))
                .and_then(|f| f.with_tile(tile))
                .expect("format");
            let mut pw = w.clone();
            prune_tiles(&mut pw, cols, gs, s, tile.max(1)).expect("prune");
            let enc = encode(&pw, rows, cols, fmt).expect("encode");
            drop(pw);
            let copies = cycle_bytes(shape).div_ceil(enc.len()).max(1);
            encoded.push((label, values, (0..copies).map(|_| enc.clone()).collect()));
        }
        // The entries: dense Q4_0 and Q8_0 (each with rows8 where present), then the cases.
        let mut entries: Vec<(Entry, Option<Values>)> = Vec::new();
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
            if let Some(k) = table.dot(ty) {
                let v = if ty == GgmlType::Q4_0 {
                    Values::Q4
                } else {
                    Values::Q8
                };
                for e in dense(k, shape, &w, &x) {
                    entries.push((e, Some(v)));
                }
            }
        }
        let dense_count = entries.len();
        for (label, values, mats) in &encoded {
            let views: Vec<GroupMatrix> = mats
                .iter()
                .map(|m| GroupMatrix::new(m).expect("valid"))
                .collect();
            let mut out = vec![0f32; rows];
            let acts = &acts;
            entries.push((
                Entry {
                    name: label.to_string(),
                    bytes: mats[0].len(),
                    copies: mats.len(),
                    run: Box::new(move |c| {
                        kernel
                            .matvec(&views[c], acts, &mut out)
                            .expect("shapes match");
                        black_box(&mut out);
                    }),
                },
                Some(*values),
            ));
        }
        // Criterion medians (NaN where skipped).
        let mut secs = vec![f64::NAN; entries.len()];
        if !quick {
            let mut g = c.benchmark_group(&id);
            g.sample_size(10)
                .sampling_mode(SamplingMode::Flat)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(1));
            for (e, s) in entries.iter_mut().zip(&mut secs) {
                let (e, _) = e;
                g.throughput(Throughput::Bytes(e.bytes as u64));
                *s = time(&mut g, &e.name, e.copies, &mut e.run);
            }
            g.finish();
        }
        // In quick mode the dense entries' times are medians of 15 bursts of about 2 ms.
        if quick {
            for i in 0..dense_count {
                let e = &mut entries[i].0;
                let mut next = 0;
                let n = ((2e-3 / burst(e, 3, &mut next)) as usize).clamp(1, 2000);
                let mut t = Times::default();
                for _ in 0..15 {
                    t.0.push(burst(e, n, &mut next));
                }
                secs[i] = t.median();
            }
        }
        // The baseline of each value type: the faster dense entry.
        let base_of = |v: Values, entries: &[(Entry, Option<Values>)], secs: &[f64]| {
            (0..dense_count)
                .filter(|&i| entries[i].1 == Some(v))
                .min_by(|&a, &b| secs[a].total_cmp(&secs[b]))
        };
        let mut il = vec![(f64::NAN, f64::NAN, f64::NAN, f64::NAN); entries.len()];
        let skipped = |s: f64| !quick && s.is_nan();
        for i in dense_count..entries.len() {
            let Some(v) = entries[i].1 else { continue };
            let Some(b) = base_of(v, &entries, &secs) else {
                continue;
            };
            if skipped(secs[i]) || skipped(secs[b]) {
                continue;
            }
            let (lo, hi) = entries.split_at_mut(i);
            il[i] = interleaved(&mut lo[b].0, &mut hi[0].0);
        }
        // A filter that skipped this shape left no times.
        if (0..entries.len()).all(|i| secs[i].is_nan() && il[i].0.is_nan()) {
            continue;
        }
        report(&id, &entries, dense_count, quick, &secs, &il, bandwidth);
        drop(entries);

        // The batch (none with GROUP_BENCH_BATCH=0).
        if batch == 0 {
            continue;
        }
        let bid = format!("group/{} {rows}x{cols} batch {batch}", shape.name);
        let mut entries: Vec<(Entry, Option<Values>)> = Vec::new();
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
            let Some(k) = table.dot(ty) else { continue };
            let v = if ty == GgmlType::Q4_0 {
                Values::Q4
            } else {
                Values::Q8
            };
            let (bs, ts) = k.weight_type.block_layout();
            let mut q = vec![0u8; rows * (cols / bs * ts)];
            quant::quantize(ty, &w, &mut q).expect("quantize weights");
            let mut scratch = MatmulScratch::default();
            let mut y = vec![0f32; batch * rows];
            // Two activation batches in turn: the driver keeps the quantized activations of
            // the call before when they are the same, and each call must quantize, as the
            // sparse side does.
            let mut xs = [xb.clone(), xb.clone()];
            xs[1][0] += 0.25;
            let mut flip = 0;
            let pool = &pool;
            entries.push((
                Entry {
                    name: format!("{}_matmul", k.name),
                    bytes: q.len(),
                    copies: 1,
                    run: Box::new(move |_| {
                        flip ^= 1;
                        let xb = &xs[flip];
                        matmul(pool, &mut scratch, ty, &q, rows, cols, xb, batch, &mut y)
                            .expect("matmul");
                        black_box(&mut y);
                    }),
                },
                Some(v),
            ));
        }
        let dense_count = entries.len();
        for (label, values, mats) in &encoded {
            // Validated once, outside the timing, as a model does at load.
            let mat: &'static [u8] = Box::leak(mats[0].clone().into_boxed_slice());
            let m = GroupMatrix::new(mat).expect("valid");
            for per_token in [false, true] {
                let mut acts: Vec<GroupActs> = (0..batch).map(|_| GroupActs::default()).collect();
                let mut y = vec![0f32; batch * rows];
                let xb = &xb;
                entries.push((
                    Entry {
                        name: format!(
                            "{label} {}",
                            if per_token {
                                "matvec per token"
                            } else {
                                "matmat"
                            }
                        ),
                        bytes: mat.len(),
                        copies: 1,
                        run: Box::new(move |_| {
                            for (a, x) in acts.iter_mut().zip(xb.chunks_exact(cols)) {
                                a.quantize(x);
                            }
                            if per_token {
                                for (a, y) in acts.iter().zip(y.chunks_exact_mut(rows)) {
                                    kernel.matvec(&m, a, y).expect("shapes match");
                                }
                            } else {
                                kernel.matmat(&m, &acts, &mut y).expect("shapes match");
                            }
                            black_box(&mut y);
                        }),
                    },
                    Some(*values),
                ));
            }
        }
        // Quick mode: every time from bursts; else criterion.
        let mut secs = vec![f64::NAN; entries.len()];
        if quick {
            for (i, (e, _)) in entries.iter_mut().enumerate() {
                let mut next = 0;
                let n = ((2e-3 / burst(e, 1, &mut next)) as usize).clamp(1, 2000);
                let mut t = Times::default();
                for _ in 0..9 {
                    t.0.push(burst(e, n, &mut next));
                }
                secs[i] = t.median();
            }
        } else {
            let mut g = c.benchmark_group(&bid);
            g.sample_size(10)
                .sampling_mode(SamplingMode::Flat)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(1));
            for (e, s) in entries.iter_mut().zip(&mut secs) {
                let (e, _) = e;
                g.throughput(Throughput::Bytes(e.bytes as u64));
                *s = time(&mut g, &e.name, e.copies, &mut e.run);
            }
            g.finish();
        }
        let mut il = vec![(f64::NAN, f64::NAN, f64::NAN, f64::NAN); entries.len()];
        for i in dense_count..entries.len() {
            let Some(v) = entries[i].1 else { continue };
            let Some(b) = (0..dense_count).find(|&b| entries[b].1 == Some(v)) else {
                continue;
            };
            let (lo, hi) = entries.split_at_mut(i);
            il[i] = interleaved(&mut lo[b].0, &mut hi[0].0);
        }
        // In quick mode the sparse times are the interleaved rounds' medians, as above.
        report(&bid, &entries, dense_count, quick, &secs, &il, bandwidth);
    }
}

/// The table of one shape: time, weight GB/s, % of the read bandwidth, and the ratios to the
/// dense entry of the same values (criterion, interleaved median, best rounds).
#[allow(clippy::too_many_arguments)]
fn report(
    id: &str,
    entries: &[(Entry, Option<Values>)],
    dense_count: usize,
    quick: bool,
    secs: &[f64],
    il: &[(f64, f64, f64, f64)],
    bandwidth: f64,
) {
    let base_of = |v: Values| {
        (0..dense_count)
            .filter(|&i| entries[i].1 == Some(v))
            .min_by(|&a, &b| secs[a].total_cmp(&secs[b]))
    };
    eprintln!(
        "  {id:<40} {:<40} {:>9} {:>9} {:>7} {:>11} {:>12} {:>9}",
        "kernel", "us", "GB/s", "% bw", "dense/this", "interleaved", "best"
    );
    for i in 0..entries.len() {
        let e = &entries[i].0;
        let base = entries[i].1.and_then(base_of).map_or(f64::NAN, |b| secs[b]);
        // In quick mode the sparse times are the interleaved rounds' medians.
        let s = if quick && i >= dense_count {
            il[i].2
        } else {
            secs[i]
        };
        if s.is_nan() {
            continue;
        }
        let gbs = e.bytes as f64 / s / 1e9;
        eprintln!(
            "  {id:<40} {:<40} {:>9.1} {gbs:>9.2} {:>6.1}% {:>10.2}x {:>11.2}x {:>8.2}x",
            e.name,
            s * 1e6,
            100.0 * gbs * 1e9 / bandwidth,
            base / s,
            il[i].0,
            il[i].3
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
