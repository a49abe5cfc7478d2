//! The shared kernel test suite: every entry of the kernel table, at every level the running
//! CPU supports, against the portable table (bit for bit: the plugs keep the portable
//! summation orders), and the portable entries against an f64 reference over the decoded
//! operands. A kernel is covered the moment it is registered.
//!
//! Under qemu on aarch64, QEMU_CPU=cortex-a53 / cortex-a76 / max select the NEON, dotprod and
//! i8mm levels (see .ci/run).

use proptest::prelude::*;
use sparrow::kernels::{DotKernel, KernelTable, Level, RowsFn, VecDotFn};
use sparrow::quant::{self, GgmlType};

/// How close two results must be.
#[derive(Clone, Copy, Debug)]
enum Approx {
    /// The same bits.
    Exact,
    /// |a - b| <= rel * scale, where scale is the sum of |w_i x_i| (the size of the terms).
    Close(f64),
}

/// A small deterministic generator (xorshift), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Values with the shapes that matter: spread magnitudes, outliers, exact zeros and
    /// repeated values (ties in the quantizers).
    fn row(&mut self, n: usize) -> Vec<f32> {
        let scale = [0.01f32, 1.0, 37.0][(self.next() % 3) as usize];
        (0..n)
            .map(|_| match self.next() % 16 {
                0 => 0.0,
                1 => 12.0 * scale * self.unit(),
                2 => 0.5 * scale,
                _ => scale * self.unit(),
            })
            .collect()
    }
}

fn levels() -> Vec<Level> {
    Level::detected()
        .into_iter()
        .filter(|l| *l != Level::Generic)
        .collect()
}

/// The block size that a row of weights and its activations both need.
fn row_unit(k: &DotKernel) -> usize {
    k.weight_type.block_size().max(k.act_type.block_size())
}

fn f16_at(bytes: &[u8], at: usize) -> f64 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f64()
}

fn quantized(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len() as u64).unwrap() as usize];
    quant::quantize(ty, x, &mut out).unwrap();
    out
}

fn decoded(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    quant::dequantize(ty, bytes, &mut out).unwrap();
    out
}

/// Every dot of an entry (the per-token one and the batch orders), with a name.
fn dots(k: &DotKernel) -> Vec<(&'static str, VecDotFn)> {
    let mut v = vec![("vec_dot", k.vec_dot)];
    v.extend(k.gemm.map(|f| ("gemm", f)));
    v.extend(k.tiled.map(|f| ("tiled", f)));
    v
}

fn check(what: &str, got: f32, want: f32, approx: Approx, scale: f64) {
    match approx {
        Approx::Exact => assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{what}: {got} vs {want} (bits differ)"
        ),
        Approx::Close(rel) => assert!(
            ((got as f64) - (want as f64)).abs() <= rel * scale.max(1e-30),
            "{what}: {got} vs {want} (tolerance {rel} x {scale})"
        ),
    }
}

/// One row of `cols` against one activation row, for every level's entry of `ty`.
fn compare_row(ty: GgmlType, cols: usize, seed: u64) {
    let generic = KernelTable::generic();
    let g = generic.dot(ty).unwrap();
    let mut rng = Rng(seed | 1);
    let w = quantized(ty, &rng.row(cols));
    let x = rng.row(cols);
    let mut ga = vec![0u8; g.act_row_bytes(cols).unwrap()];
    (g.quantize_act)(&x, &mut ga);

    // The portable entry against f64 over the decoded operands: what is left is float
    // rounding in the sums.
    let wd = decoded(ty, &w, cols);
    let ad = decoded(g.act_type, &ga, cols);
    let mut exact: f64 = wd.iter().zip(&ad).map(|(a, b)| *a as f64 * *b as f64).sum();
    if g.act_type == GgmlType::Q8_1 {
        // The min term uses the block sum `s` stored in f16, not the sum of the decoded
        // activations: w = d q + m, so the kernel computes sum(w a) + m (s - sum(a)).
        let wb = ty.row_bytes(32).unwrap() as usize;
        for (b, blk) in ad.chunks(32).enumerate() {
            let m = f16_at(&w, b * wb + 2);
            let s = f16_at(&ga, b * 36 + 2);
            let sum: f64 = blk.iter().map(|v| *v as f64).sum();
            exact += m * (s - sum);
        }
    }
    let scale: f64 = wd
        .iter()
        .zip(&ad)
        .map(|(a, b)| (*a as f64 * *b as f64).abs())
        .sum();
    for (name, f) in dots(g) {
        check(
            &format!("{} {name} vs f64, cols {cols}", g.name),
            f(&w, &ga),
            exact as f32,
            Approx::Close(1e-5),
            scale,
        );
    }

    for level in levels() {
        let table = KernelTable::for_level(level);
        let k = table.dot(ty).unwrap();
        let mut ka = vec![0u8; k.act_row_bytes(cols).unwrap()];
        (k.quantize_act)(&x, &mut ka);
        assert_eq!(
            ka[..ga.len()],
            ga[..],
            "{} quantize_act differs from portable, cols {cols}",
            k.name
        );
        for ((name, f), (_, gf)) in dots(k).into_iter().zip(dots(g)) {
            check(
                &format!("{} {name} vs portable, cols {cols}, seed {seed}", k.name),
                f(&w, &ka),
                gf(&w, &ga),
                Approx::Exact,
                scale,
            );
        }
    }
}

/// CI runs under an emulated CPU (qemu's QEMU_CPU, see .ci/run) set SPARROW_EXPECT_LEVEL to
/// the level that CPU must reach (`neon`, `dotprod`, `i8mm`, or an x86 level), so that a
/// detection that silently falls back to a lower level (and leaves that level's kernels
/// untested) fails the run instead of passing it.
#[test]
fn expected_level_is_detected() {
    let Ok(want) = std::env::var("SPARROW_EXPECT_LEVEL") else {
        return;
    };
    let want = want.trim().to_ascii_lowercase();
    let detected = Level::detected();
    let level = detected.iter().copied().find(|l| l.name() == want);
    let names: Vec<&str> = detected.iter().map(|l| l.name()).collect();
    let Some(level) = level else {
        panic!("SPARROW_EXPECT_LEVEL={want}, but this CPU's levels are {names:?}");
    };
    assert_eq!(KernelTable::for_level(level).level(), level);
    eprintln!("SPARROW_EXPECT_LEVEL={want}: detected {names:?}");
}

#[test]
fn every_level_has_every_portable_entry() {
    let generic = KernelTable::generic();
    for level in Level::detected() {
        let t = KernelTable::for_level(level);
        assert_eq!(t.level(), level);
        for g in generic.entries() {
            let k = t
                .dot(g.weight_type)
                .unwrap_or_else(|| panic!("{level:?} lacks {}", g.weight_type));
            assert_eq!(k.act_type, g.act_type, "{}", k.name);
            assert_eq!(k.gemm.is_some(), g.gemm.is_some(), "{}", k.name);
            assert_eq!(k.tiled.is_some(), g.tiled.is_some(), "{}", k.name);
            assert!(k.level <= level, "{} registered above {level:?}", k.name);
            assert!(
                k.name.starts_with(k.level.name()),
                "{} should be named after its level {}",
                k.name,
                k.level.name()
            );
        }
    }
}

#[test]
fn every_entry_matches_the_portable_kernel_on_model_shapes() {
    for g in KernelTable::generic().entries() {
        let unit = row_unit(g);
        for (i, cols) in [576usize, 1536, 2048, 256, 32].into_iter().enumerate() {
            if cols % unit == 0 {
                compare_row(g.weight_type, cols, 0x9E37_79B9 + i as u64);
            }
        }
    }
}

/// Rows of one block, where the loop bodies run once and the tails are everything.
#[test]
fn bug_single_block_rows() {
    for g in KernelTable::generic().entries() {
        compare_row(g.weight_type, row_unit(g), 17);
    }
}

/// Raw weight bytes (every nibble and bit pattern, Q8_0 quants of -128) with finite scales.
#[test]
fn every_entry_matches_on_raw_weight_bytes() {
    let generic = KernelTable::generic();
    for g in generic.entries() {
        let ty = g.weight_type;
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            continue; // raw float bytes are NaNs and infinities, not a kernel question
        }
        let cols = 4 * row_unit(g);
        let mut rng = Rng(0xDEAD_BEEF);
        let mut w: Vec<u8> = (0..ty.row_bytes(cols as u64).unwrap())
            .map(|_| rng.next() as u8)
            .collect();
        // Scales (and mins) from a real quantization, so they are finite.
        let real = quantized(ty, &rng.row(cols));
        let block_bytes = ty.row_bytes(ty.block_size() as u64).unwrap() as usize;
        for (b, r) in w.chunks_mut(block_bytes).zip(real.chunks(block_bytes)) {
            match ty {
                GgmlType::Q6_K => b[block_bytes - 2..].copy_from_slice(&r[block_bytes - 2..]),
                GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q4_1 | GgmlType::Q5_1 => {
                    b[..4].copy_from_slice(&r[..4])
                }
                _ => b[..2].copy_from_slice(&r[..2]),
            }
        }
        let x = rng.row(cols);
        let mut ga = vec![0u8; g.act_row_bytes(cols).unwrap()];
        (g.quantize_act)(&x, &mut ga);
        for level in levels() {
            let t = KernelTable::for_level(level);
            let k = t.dot(ty).unwrap();
            let mut ka = vec![0u8; k.act_row_bytes(cols).unwrap()];
            (k.quantize_act)(&x, &mut ka);
            for ((name, f), (_, gf)) in dots(k).into_iter().zip(dots(g)) {
                check(
                    &format!("{} {name} on raw bytes", k.name),
                    f(&w, &ka),
                    gf(&w, &ga),
                    Approx::Exact,
                    0.0,
                );
            }
        }
    }
}

/// Activation quantizers on rows of zeros, ties and a lone outlier.
#[test]
fn quantize_act_edge_rows() {
    let generic = KernelTable::generic();
    let rows: Vec<Vec<f32>> = vec![
        vec![0.0; 256],
        (0..256).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect(),
        (0..256)
            .map(|i| if i == 77 { 1e6 } else { 1e-3 * i as f32 })
            .collect(),
        (0..256).map(|i| -(i as f32) / 2.0).collect(),
    ];
    for level in levels() {
        let t = KernelTable::for_level(level);
        for k in t.entries() {
            let g = generic.dot(k.weight_type).unwrap();
            for (ri, x) in rows.iter().enumerate() {
                let mut a = vec![0u8; k.act_row_bytes(256).unwrap()];
                let mut b = vec![0u8; g.act_row_bytes(256).unwrap()];
                (k.quantize_act)(x, &mut a);
                (g.quantize_act)(x, &mut b);
                assert_eq!(a[..b.len()], b[..], "{} quantize_act, row {ri}", k.name);
            }
        }
    }
}

/// A multi-row / multi-token kernel of every entry that has one gives each (row, token) pair
/// the bits of `vec_dot`. `call` runs the kernel on `rows` weight rows and `toks` activation
/// rows and returns `[row][token]`.
fn pairs_match_vec_dot(
    what: &str,
    rows: usize,
    toks: usize,
    seed: u64,
    call: impl Fn(&DotKernel, &[&[u8]], &[&[u8]]) -> Option<Vec<Vec<f32>>>,
) {
    for level in Level::detected() {
        let t = KernelTable::for_level(level);
        for k in t.entries() {
            for (i, cols) in [576usize, 1536, 32, 256].into_iter().enumerate() {
                if cols % row_unit(k) != 0 {
                    continue;
                }
                let mut rng = Rng(seed + i as u64);
                let w: Vec<Vec<u8>> = (0..rows)
                    .map(|_| quantized(k.weight_type, &rng.row(cols)))
                    .collect();
                let acts: Vec<Vec<u8>> = (0..toks)
                    .map(|_| {
                        let mut a = vec![0u8; k.act_row_bytes(cols).unwrap()];
                        (k.quantize_act)(&rng.row(cols), &mut a);
                        a
                    })
                    .collect();
                let wr: Vec<&[u8]> = w.iter().map(|v| &v[..]).collect();
                let ar: Vec<&[u8]> = acts.iter().map(|v| &v[..]).collect();
                let Some(got) = call(k, &wr, &ar) else { break };
                for (r, wrow) in w.iter().enumerate() {
                    for (j, a) in acts.iter().enumerate() {
                        check(
                            &format!("{} {what} row {r} token {j}, cols {cols}", k.name),
                            got[r][j],
                            (k.vec_dot)(wrow, a),
                            Approx::Exact,
                            0.0,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn vec_dot4_matches_vec_dot() {
    pairs_match_vec_dot("vec_dot4", 1, 4, 77, |k, w, a| {
        let f = k.vec_dot4?;
        Some(vec![f(w[0], [a[0], a[1], a[2], a[3]]).to_vec()])
    });
}

/// The K-quants' four-token batch orders give each token the bits of their one-token form.
#[test]
fn gemm4_and_tiled4_match_their_one_token_forms() {
    for level in Level::detected() {
        let t = KernelTable::for_level(level);
        for k in t.entries() {
            let pairs = [(k.gemm4, k.gemm, "gemm4"), (k.tiled4, k.tiled, "tiled4")];
            for (four, one, what) in pairs {
                let (Some(four), Some(one)) = (four, one) else {
                    continue;
                };
                for (i, cols) in [256usize, 1536, 768].into_iter().enumerate() {
                    let mut rng = Rng(211 + i as u64);
                    let w = quantized(k.weight_type, &rng.row(cols));
                    let acts: Vec<Vec<u8>> = (0..4)
                        .map(|_| {
                            let mut a = vec![0u8; k.act_row_bytes(cols).unwrap()];
                            (k.quantize_act)(&rng.row(cols), &mut a);
                            a
                        })
                        .collect();
                    let got = four(&w, [&acts[0], &acts[1], &acts[2], &acts[3]]);
                    for (j, a) in acts.iter().enumerate() {
                        check(
                            &format!("{} {what} token {j}, cols {cols}", k.name),
                            got[j],
                            one(&w, a),
                            Approx::Exact,
                            0.0,
                        );
                    }
                }
            }
        }
    }
}

/// A `RowsFn` over `rows` rows (three steps of K): every result is its row's `vec_dot`, so
/// the parts of the slice are mapped back to the right rows.
fn rows_call(f: Option<RowsFn>, w: &[&[u8]], a: &[u8]) -> Option<Vec<Vec<f32>>> {
    let f = f?;
    let rb = w[0].len();
    let mut y = vec![f32::NAN; w.len()];
    f(&w.concat(), rb, a, &mut y);
    Some(y.into_iter().map(|v| vec![v]).collect())
}

#[test]
fn rows4_matches_vec_dot() {
    pairs_match_vec_dot("rows4", 12, 1, 91, |k, w, a| rows_call(k.rows4, w, a[0]));
}

#[test]
fn rows8_matches_vec_dot() {
    pairs_match_vec_dot("rows8", 24, 1, 97, |k, w, a| rows_call(k.rows8, w, a[0]));
}

#[test]
fn tile2x4_matches_vec_dot() {
    pairs_match_vec_dot("tile2x4", 2, 4, 133, |k, w, a| {
        let f = k.tile2x4?;
        Some(
            f([w[0], w[1]], [a[0], a[1], a[2], a[3]])
                .map(|r| r.to_vec())
                .to_vec(),
        )
    });
}

#[test]
fn tile8x4_matches_vec_dot() {
    pairs_match_vec_dot("tile8x4", 8, 4, 139, |k, w, a| {
        let f = k.tile8x4?;
        let rs: [&[u8]; 8] = std::array::from_fn(|i| w[i]);
        Some(f(rs, [a[0], a[1], a[2], a[3]]).map(|r| r.to_vec()).to_vec())
    });
}

/// xorshift values in [-0.5, 0.5), `n` at a time.
fn noise(mut seed: u64) -> impl FnMut(usize) -> Vec<f32> {
    move |n| {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }
}

/// The product driver's scratch quantizes a batch once for consecutive products by the same
/// activations and weight type, and again for anything else: a chain of products (same x,
/// other types, the same type again, x changed in place, other shapes, batches large enough
/// to quantize on several threads) gives the bits of a fresh scratch for every call.
#[test]
fn matmul_scratch_reuses_only_identical_activations() {
    use sparrow::kernels::{matmul, MatmulScratch, ThreadPool};
    let pool = ThreadPool::new(2).unwrap();
    let (rows, cols) = (24, 256);
    let mut next = noise(0x9e37_79b9_7f4a_7c15);
    let w32 = next(rows * cols);
    let types = [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q5_0,
    ];
    let ws: Vec<Vec<u8>> = types.iter().map(|&ty| quantized(ty, &w32)).collect();
    let mut kept = MatmulScratch::default();
    for n in [1usize, 4, 20] {
        let mut x = next(n * cols);
        for step in 0..10 {
            if step == 6 {
                // The same buffer, other values.
                x[3] += 0.25;
            }
            let i = [0, 1, 0, 0, 2, 3, 3, 2, 1, 0][step];
            let (ty, w) = (types[i], &ws[i]);
            let mut got = vec![0f32; n * rows];
            matmul(&pool, &mut kept, ty, w, rows, cols, &x, n, &mut got).unwrap();
            let mut want = vec![0f32; n * rows];
            let mut fresh = MatmulScratch::default();
            matmul(&pool, &mut fresh, ty, w, rows, cols, &x, n, &mut want).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{ty} n {n} step {step}");
        }
    }
}

/// Products by shared activations in one dispatch give, matrix by matrix, the bits of
/// separate products; a matrix of the wrong size is an error.
#[test]
fn matmul_shared_matches_separate_products() {
    use sparrow::kernels::{matmul, matmul_shared, MatmulScratch, ThreadPool};
    let pool = ThreadPool::new(2).unwrap();
    let cols = 256;
    let rows = [40usize, 8, 24];
    let mut next = noise(0x2545_f491_4f6c_dd1d);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
    ] {
        let ws: Vec<Vec<u8>> = rows
            .iter()
            .map(|&r| quantized(ty, &next(r * cols)))
            .collect();
        for n in [1usize, 4, 20] {
            let x = next(n * cols);
            let mut outs: Vec<Vec<f32>> = rows.iter().map(|&r| vec![f32::NAN; n * r]).collect();
            let parts = ws
                .iter()
                .zip(&rows)
                .zip(outs.iter_mut())
                .map(|((w, &r), o)| (&w[..], r, &mut o[..]))
                .collect();
            let mut scratch = MatmulScratch::default();
            matmul_shared(&pool, &mut scratch, ty, parts, cols, &x, n).unwrap();
            for ((w, &r), got) in ws.iter().zip(&rows).zip(&outs) {
                let mut want = vec![0f32; n * r];
                let mut fresh = MatmulScratch::default();
                matmul(&pool, &mut fresh, ty, w, r, cols, &x, n, &mut want).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(got), bits(&want), "{ty} n {n} rows {r}");
            }
        }
        // The second matrix one row short of its stated size.
        let x = next(cols);
        let mut o = [vec![0f32; rows[0]], vec![0f32; rows[1]]];
        let [o0, o1] = &mut o;
        let short = &ws[1][..ws[1].len() - ty.row_bytes(cols as u64).unwrap() as usize];
        let parts = vec![
            (&ws[0][..], rows[0], &mut o0[..]),
            (short, rows[1], &mut o1[..]),
        ];
        let mut scratch = MatmulScratch::default();
        let e = matmul_shared(&pool, &mut scratch, ty, parts, cols, &x, 1).unwrap_err();
        assert!(e.to_string().contains("matmul shapes"), "{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any whole number of blocks, any data: the same bits as the portable kernel.
    #[test]
    fn any_row_length(blocks in 1usize..24, which in 0usize..64, seed in any::<u64>()) {
        let generic = KernelTable::generic();
        let entries: Vec<&DotKernel> = generic.entries().collect();
        let g = entries[which % entries.len()];
        let cols = (blocks * row_unit(g)).min(8192);
        compare_row(g.weight_type, cols, seed);
    }
}
