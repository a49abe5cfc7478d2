//! N:M sparse weights: encoder and decoder round trips, every kernel at every level the
//! running CPU has against the portable kernel, the portable kernel against an f64 product of
//! the decoded operands, and the error cases.
//!
//! Under qemu on aarch64, QEMU_CPU=cortex-a53 / cortex-a76 / max select the NEON, dotprod and
//! i8mm levels.

use proptest::prelude::*;
use sparrow::kernels::Level;
use sparrow::sparse::nm::{
    add_to_row, block_scales, decode_row, encode_row, encode_row_with_mask, generic_dot,
    kept_positions, NmActs, NmFormat, NmKernel, NmValues,
};

/// xorshift, so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Spread magnitudes, outliers, exact zeros and repeated values (ties).
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

fn fmt(n: usize, m: usize, values: NmValues) -> NmFormat {
    NmFormat::new(n, m, values).unwrap()
}

fn formats() -> Vec<NmFormat> {
    let mut v = Vec::new();
    for values in [NmValues::Q8, NmValues::Q4] {
        for (n, m) in [
            (2, 4),
            (4, 8),
            (1, 1),
            (1, 2),
            (1, 4),
            (3, 7),
            (5, 8),
            (8, 16),
            (16, 16),
            (9, 13),
        ] {
            v.push(fmt(n, m, values));
        }
    }
    v
}

fn encoded(f: &NmFormat, w: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; f.row_bytes(w.len()).unwrap()];
    encode_row(f, w, &mut out).unwrap();
    out
}

/// How close two results must be. Every kernel computes each block's integer dot exactly
/// and scales it by the same f32 `d_w * d_x`; they differ only in the order of the f32
/// additions of at most `nb` block terms split over up to 8 lanes, plus the lane reduction.
/// With u = 2^-24, a sum of t terms in any order is within (t - 1) u (1 + O(u)) of the exact
/// sum of the terms, relative to the sum of their magnitudes; two kernels are then within
/// 2 (nb + 8) u of each other, and the product `d_w * d_x` itself adds u per term against
/// the f64 reference. The `vpdpbusd` kernels sum biased terms (activations + 128) and take
/// the bias back in f32, so their terms' magnitudes, and the scale of their tolerance, grow
/// by `256 d_x sum |w|` per block (see [`biased_scale`]).
#[derive(Clone, Copy, Debug)]
struct Close {
    rel: f64,
}

impl Close {
    fn for_blocks(nb: usize) -> Close {
        Close {
            rel: 2.0 * (nb as f64 + 10.0) * 2f64.powi(-24),
        }
    }
    fn check(&self, what: &str, got: f32, want: f64, scale: f64) {
        let tol = self.rel * scale + 1e-30;
        assert!(
            (got as f64 - want).abs() <= tol,
            "{what}: {got} vs {want} (diff {}, tol {tol})",
            (got as f64 - want).abs()
        );
    }
}

/// The exact product of the decoded weights and activations in f64, and the sum of the
/// magnitudes of its terms (the scale of the tolerance).
fn reference(w: &[f32], x: &[f32]) -> (f64, f64) {
    w.iter().zip(x).fold((0.0, 0.0), |(s, m), (&a, &b)| {
        let p = a as f64 * b as f64;
        (s + p, m + p.abs())
    })
}

fn levels() -> Vec<Level> {
    Level::detected()
}

/// `n` rows of `k` random activations quantized for `f`.
fn random_acts(f: &NmFormat, rng: &mut Rng, n: usize, k: usize) -> Vec<NmActs> {
    (0..n)
        .map(|_| {
            let mut a = NmActs::new();
            a.quantize(f, &rng.row(k)).unwrap();
            a
        })
        .collect()
}
#[test]
fn row_bytes_of_the_fast_formats() {
    let q8 = fmt(2, 4, NmValues::Q8);
    assert_eq!(q8.block_span(), 64);
    assert_eq!(q8.block_bytes(), 44);
    assert_eq!(q8.row_bytes(576).unwrap(), 9 * 44);
    assert_eq!(fmt(2, 4, NmValues::Q4).block_bytes(), 28);
    assert_eq!(fmt(4, 8, NmValues::Q8).block_bytes(), 48);
    assert_eq!(fmt(4, 8, NmValues::Q4).block_bytes(), 32);
    // 3:7: 10 groups, 30 values over 70 inputs, 3 planes of 4 bytes.
    let f = fmt(3, 7, NmValues::Q4);
    assert_eq!((f.block_values(), f.block_span()), (30, 70));
    assert_eq!(f.block_bytes(), 4 + 12 + 15);
}

/// The layout drawn in the module doc, byte for byte, on a hand-made 2:4 block.
#[test]
fn layout_of_a_2_4_block() {
    let f = fmt(2, 4, NmValues::Q8);
    // Group t keeps positions 1 and 3 with values t + 1 and -(t + 1), scaled so d = 1.
    let mut w = vec![0f32; 64];
    for t in 0..16 {
        w[4 * t + 1] = (t + 1) as f32;
        w[4 * t + 3] = -((t + 1) as f32);
    }
    w[3] = -127.0;
    // Two blocks, the second twice the first: the head holds both scales and both value
    // sums, then the bodies.
    let w2: Vec<f32> = w
        .iter()
        .chain(w.iter())
        .enumerate()
        .map(|(i, v)| if i < 64 { *v } else { 2.0 * v })
        .collect();
    let row = encoded(&f, &w2);
    assert_eq!(row.len(), 2 * 44);
    assert_eq!(&row[..2], &half::f16::from_f32(1.0).to_le_bytes());
    assert_eq!(&row[2..4], &half::f16::from_f32(2.0).to_le_bytes());
    // Values t + 1 and -(t + 1) cancel but for group 0's -127 in place of -1: sum -126 in
    // both blocks (the second block's levels are the first's, at twice the scale).
    assert_eq!(&row[4..6], &(-126i16).to_le_bytes());
    assert_eq!(&row[6..8], &(-126i16).to_le_bytes());
    for body in [&row[8..48], &row[48..88]] {
        // Index 1 (kept values 2t) and 3 (2t + 1), in one digit plane: byte b holds values
        // b, b + 8, b + 16, b + 24, all of b's parity, so 01010101 for even b and 11111111
        // for odd.
        assert_eq!(
            &body[..8],
            &[0x55, 0xFF, 0x55, 0xFF, 0x55, 0xFF, 0x55, 0xFF]
        );
        assert_eq!(body[8] as i8, 1);
        assert_eq!(body[9] as i8, -127);
        assert_eq!(body[10] as i8, 2);
    }
}

#[test]
fn round_trip_keeps_the_largest_and_bounds_the_error() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for f in formats() {
        for _ in 0..4 {
            let k = f.block_span() * (1 + (rng.next() % 4) as usize);
            let w = rng.row(k);
            let row = encoded(&f, &w);
            let mut dec = vec![0f32; k];
            let mut kept = vec![false; k];
            decode_row(&f, &row, &mut dec).unwrap();
            kept_positions(&f, &row, &mut kept).unwrap();
            let scales = block_scales(&f, &row);
            for g in 0..k / f.m {
                let r = g * f.m..(g + 1) * f.m;
                assert_eq!(
                    kept[r.clone()].iter().filter(|&&b| b).count(),
                    f.n,
                    "{f:?} group {g}"
                );
                let min_kept = r
                    .clone()
                    .filter(|&i| kept[i])
                    .map(|i| w[i].abs())
                    .fold(f32::INFINITY, f32::min);
                let max_pruned = r
                    .clone()
                    .filter(|&i| !kept[i])
                    .map(|i| w[i].abs())
                    .fold(0.0, f32::max);
                assert!(
                    min_kept >= max_pruned,
                    "{f:?} group {g}: kept {min_kept} < pruned {max_pruned}"
                );
            }
            for (b, &d) in scales.iter().enumerate() {
                let s = f.block_span();
                let d = d.abs() as f64;
                let amax = (b * s..(b + 1) * s)
                    .filter(|&i| kept[i])
                    .map(|i| w[i].abs() as f64)
                    .fold(0.0, f64::max);
                // Half a step, plus what the f16 rounding of the scale moves the largest
                // value past the last level (127 d for Q8, 8 d for Q4's extreme side; the
                // other side of Q4 reaches only 7 d, one whole step).
                let bound = match f.values {
                    NmValues::Q8 => 0.5 * d + (amax - 127.0 * d).max(0.0),
                    NmValues::Q4 => d + (amax - 8.0 * d).max(0.0),
                } * (1.0 + 1e-6)
                    + 1e-30;
                for i in b * s..(b + 1) * s {
                    if kept[i] {
                        let e = (w[i] as f64 - dec[i] as f64).abs();
                        assert!(
                            e <= bound,
                            "{f:?} input {i}: {} -> {} (bound {bound})",
                            w[i],
                            dec[i]
                        );
                    } else {
                        assert_eq!(dec[i], 0.0, "{f:?} pruned input {i}");
                    }
                }
            }
        }
    }
}

#[test]
fn explicit_mask_is_kept_exactly() {
    let mut rng = Rng(77);
    for f in formats() {
        let k = 2 * f.block_span();
        let w = rng.row(k);
        // A rotating choice: positions (g + r) % M of group g.
        let mut keep = vec![false; k];
        for g in 0..k / f.m {
            for r in 0..f.n {
                keep[g * f.m + (g + r) % f.m] = true;
            }
        }
        let mut row = vec![0u8; f.row_bytes(k).unwrap()];
        encode_row_with_mask(&f, &w, &keep, &mut row).unwrap();
        let mut got = vec![false; k];
        kept_positions(&f, &row, &mut got).unwrap();
        assert_eq!(got, keep, "{f:?}");
    }
}

/// The block-by-block edit writes what decoding the row, adding the deltas at the kept
/// positions and encoding it again with the same mask writes; it counts the deltas on pruned
/// positions, reports the same residual (exact sum - stored, in column order), and on a sum
/// that is not finite errs with the row unchanged. Deltas are sparse, so that some blocks
/// are untouched and keep their bytes.
#[test]
fn block_edit_matches_a_whole_row_re_encode() {
    let mut rng = Rng(4242);
    for f in formats() {
        let k = 3 * f.block_span();
        let row0 = encoded(&f, &rng.row(k));
        for density in [0.0, 0.02, 0.3, 1.0] {
            let delta: Vec<f32> = (0..k)
                .map(|_| {
                    let hit = (rng.next() % 1000) as f64 / 1000.0 < density;
                    if hit {
                        0.05 * rng.unit()
                    } else {
                        0.0
                    }
                })
                .collect();
            // The whole-row way.
            let (mut w, mut keep) = (vec![0f32; k], vec![false; k]);
            decode_row(&f, &row0, &mut w).unwrap();
            kept_positions(&f, &row0, &mut keep).unwrap();
            let exact: Vec<f32> = w.iter().zip(&delta).map(|(a, b)| a + b).collect();
            let mut dropped = 0;
            for c in 0..k {
                if delta[c] != 0.0 {
                    if keep[c] {
                        w[c] += delta[c];
                    } else {
                        dropped += 1;
                    }
                }
            }
            let mut want = vec![0u8; row0.len()];
            encode_row_with_mask(&f, &w, &keep, &mut want).unwrap();
            let mut stored = vec![0f32; k];
            decode_row(&f, &want, &mut stored).unwrap();
            let want_res: Vec<(u32, f32)> = (0..k)
                .filter(|&c| exact[c] != stored[c])
                .map(|c| (c as u32, exact[c] - stored[c]))
                .collect();
            // The block edit.
            let mut row = row0.clone();
            let mut res = Vec::new();
            let got = add_to_row(&f, &mut row, &delta, Some(&mut res)).unwrap();
            assert_eq!(got, dropped, "{f:?} density {density}: dropped");
            assert_eq!(row, want, "{f:?} density {density}: bytes");
            assert_eq!(res, want_res, "{f:?} density {density}: residual");
            if density == 0.0 {
                assert_eq!(row, row0, "{f:?}: no delta, same bytes");
            }
        }
        // A sum that is not finite: an error, the row unchanged.
        let mut row = row0.clone();
        let mut delta = vec![0f32; k];
        delta[k - 1] = f32::INFINITY;
        delta[0] = 1.0;
        let mut keep = vec![false; k];
        kept_positions(&f, &row0, &mut keep).unwrap();
        if keep[k - 1] {
            let e = add_to_row(&f, &mut row, &delta, None).unwrap_err();
            assert!(e.to_string().contains("not finite"), "{e}");
            assert_eq!(row, row0, "{f:?}: unchanged after an error");
        }
        // A delta of the wrong length.
        assert!(add_to_row(&f, &mut row, &delta[1..], None).is_err());
        assert_eq!(row, row0);
    }
}

/// Every kernel at every level, rows 1..9 (the four-row variant and its tail), against the
/// portable kernel and the portable kernel against the f64 product.
fn check_kernels(f: &NmFormat, k: usize, rows: usize, rng: &mut Rng) {
    let rb = f.row_bytes(k).unwrap();
    let mut w = Vec::with_capacity(rows * rb);
    let mut dec = Vec::with_capacity(rows * k);
    for _ in 0..rows {
        let r = encoded(f, &rng.row(k));
        let mut d = vec![0f32; k];
        decode_row(f, &r, &mut d).unwrap();
        w.extend_from_slice(&r);
        dec.extend_from_slice(&d);
    }
    for level in levels() {
        let kern = NmKernel::for_level(*f, level).unwrap();
        assert!(kern.level <= level, "{} at {level:?}", kern.name);
    }
    // Uniform activations, and spiky ones (one large value per block span, the others a
    // thousand times smaller), where the biased kernels' correction is large against the
    // dot itself.
    let uniform = rng.row(k);
    let spiky: Vec<f32> = rng
        .row(k)
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if i % f.block_span() == 7 {
                *v
            } else {
                v * 1e-3
            }
        })
        .collect();
    let mut a = NmActs::new();
    for x in [&spiky, &uniform] {
        a.quantize(f, x).unwrap();
        check_matvec(f, k, rows, &w, &dec, &a);
    }
    // Five tokens (a group of four and one more), this row's activations among them.
    let mut acts = vec![a];
    for _ in 0..4 {
        let mut b = NmActs::new();
        b.quantize(f, &rng.row(k)).unwrap();
        acts.push(b);
    }
    check_matmat(f, &w, &acts);
}

/// Every kernel's matrix-vector products against the portable kernel's, and those against
/// the f64 product of the decoded weights and activations.
fn check_matvec(f: &NmFormat, k: usize, rows: usize, w: &[u8], dec: &[f32], a: &NmActs) {
    let rb = f.row_bytes(k).unwrap();
    let xd = a.decoded();
    let tol = Close::for_blocks(k / f.block_span());
    let mut want = Vec::new();
    for r in 0..rows {
        let (exact, scale) = reference(&dec[r * k..(r + 1) * k], &xd);
        let got = generic_dot(f, &w[r * rb..(r + 1) * rb], a);
        tol.check(
            &format!("{f:?} k {k} row {r}: generic vs f64"),
            got,
            exact,
            scale,
        );
        want.push((got, scale, biased_scale(f, &dec[r * k..(r + 1) * k], a)));
    }
    for kern in NmKernel::variants(*f).unwrap() {
        let mut y = vec![0f32; rows];
        kern.matvec(w, a, &mut y).unwrap();
        let mut y1 = vec![0f32; rows];
        kern.matvec_by_row(w, a, &mut y1).unwrap();
        for r in 0..rows {
            let (g, scale, biased) = want[r];
            // The `vpdpbusd` kernels (x86 AVX-512) sum activations biased by 128 and take the
            // bias back in f32: their terms are as large as the biased ones.
            let scale = if kern.level == Level::Avx512 {
                scale + biased
            } else {
                scale
            };
            let what = format!("{} {f:?} k {k} row {r}", kern.name);
            tol.check(&format!("{what} (matvec)"), y[r], g as f64, scale);
            tol.check(&format!("{what} (by row)"), y1[r], g as f64, scale);
        }
    }
}

/// The magnitude that biasing the activations by 128 (of the quantized scale) adds to a
/// biased kernel's terms, twice: in the biased dot and in its correction.
fn biased_scale(f: &NmFormat, w: &[f32], a: &NmActs) -> f64 {
    let span = f.block_span();
    w.chunks_exact(span)
        .zip(a.scales())
        .map(|(wb, &d)| 256.0 * d as f64 * wb.iter().map(|v| v.abs() as f64).sum::<f64>())
        .sum()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every kernel's matrix-matrix product (with and without the two-row tile) gives, for each
/// token, the bits of the same kernel's matrix-vector product for that token, and for the
/// portable kernel those of `generic_dot`.
fn check_matmat(f: &NmFormat, w: &[u8], acts: &[NmActs]) {
    let n = acts.len();
    let rb = f.row_bytes(acts[0].len()).unwrap();
    let rows = w.len() / rb;
    for kern in NmKernel::variants(*f).unwrap() {
        let mut y = vec![f32::NAN; n * rows];
        kern.matmat(w, acts, &mut y).unwrap();
        let mut y1 = vec![f32::NAN; n * rows];
        kern.matmat_by_row(w, acts, &mut y1).unwrap();
        for (t, a) in acts.iter().enumerate() {
            let mut want = vec![f32::NAN; rows];
            kern.matvec(w, a, &mut want).unwrap();
            if kern.level == Level::Generic {
                for (r, v) in want.iter().enumerate() {
                    let g = generic_dot(f, &w[r * rb..(r + 1) * rb], a);
                    assert_eq!(v.to_bits(), g.to_bits(), "{f:?} row {r}");
                }
            }
            let what = format!("{} {f:?} {rows} rows, token {t} of {n}", kern.name);
            assert_eq!(bits(&y[t * rows..(t + 1) * rows]), bits(&want), "{what}");
            assert_eq!(
                bits(&y1[t * rows..(t + 1) * rows]),
                bits(&want),
                "{what}, by row"
            );
        }
    }
}

/// Batches of 1..9 tokens (none, one or two groups of four, and every remainder) over rows
/// that cross the kernels' row chunks and leave an odd row to the one-row call.
#[test]
fn matmat_every_token_count() {
    let mut rng = Rng(0x0bad_cafe_f00d_1234);
    for f in formats() {
        for (blocks, rows) in [(1, 71), (3, 5)] {
            let k = blocks * f.block_span();
            let w: Vec<u8> = (0..rows).flat_map(|_| encoded(&f, &rng.row(k))).collect();
            for n in 1..=9 {
                let acts = random_acts(&f, &mut rng, n, k);
                check_matmat(&f, &w, &acts);
            }
        }
    }
}

/// SmolLM2-135M's shapes (576 and 1536 inputs) for the SIMD formats, with a batch of 7.
#[test]
fn matmat_model_shapes() {
    let mut rng = Rng(0x5151_2323_4545_6767);
    for values in [NmValues::Q8, NmValues::Q4] {
        for (n, m) in [(2, 4), (4, 8)] {
            let f = fmt(n, m, values);
            for (k, rows) in [(576, 40), (1536, 19)] {
                let w: Vec<u8> = (0..rows).flat_map(|_| encoded(&f, &rng.row(k))).collect();
                let acts = random_acts(&f, &mut rng, 7, k);
                check_matmat(&f, &w, &acts);
            }
        }
    }
}

#[test]
fn matmat_errors() {
    let f = fmt(2, 4, NmValues::Q8);
    let mut rng = Rng(5);
    let w = encoded(&f, &rng.row(128));
    let mut a = NmActs::new();
    a.quantize(&f, &rng.row(128)).unwrap();
    let mut short = NmActs::new();
    short.quantize(&f, &rng.row(64)).unwrap();
    for kern in NmKernel::variants(f).unwrap() {
        let mut y = [0f32; 4];
        assert!(kern
            .matmat(&w, &[a.clone(), a.clone()], &mut y[..3])
            .is_err());
        assert!(kern
            .matmat(&w[1..], std::slice::from_ref(&a), &mut y[..1])
            .is_err());
        assert!(kern
            .matmat(&w, &[a.clone(), short.clone()], &mut y[..2])
            .is_err());
        assert!(kern.matmat(&w, &[], &mut y[..1]).is_err());
        kern.matmat(&w, &[], &mut []).unwrap();
    }
}

#[test]
fn every_kernel_against_the_portable_one() {
    let mut rng = Rng(0xfeed_beef_1234_5678);
    for f in formats() {
        for blocks in [1, 2, 9] {
            check_kernels(&f, blocks * f.block_span(), 9, &mut rng);
        }
    }
}

#[test]
fn the_simd_formats_have_simd_kernels() {
    let best = *Level::detected().last().unwrap();
    for values in [NmValues::Q8, NmValues::Q4] {
        for (n, m) in [(2, 4), (4, 8)] {
            let k = NmKernel::for_level(fmt(n, m, values), best).unwrap();
            if best == Level::Generic {
                assert_eq!(k.name, "generic_dot_nm");
            } else {
                assert_ne!(k.level, Level::Generic, "{n}:{m} {values:?} at {best:?}");
                assert!(k.has_rows4() || cfg!(target_arch = "aarch64"), "{}", k.name);
            }
        }
    }
}

/// Activations with an outlier and exact zeros, and weights at the extremes of both value
/// formats (-127 and Q4's level 0), where a saturating or sign-dropping kernel would differ.
#[test]
fn bug_extremes_of_values_and_activations() {
    for f in [
        fmt(2, 4, NmValues::Q8),
        fmt(4, 8, NmValues::Q8),
        fmt(2, 4, NmValues::Q4),
        fmt(4, 8, NmValues::Q4),
    ] {
        let k = 3 * f.block_span();
        let w: Vec<f32> = (0..k)
            .map(|i| {
                if i % 3 == 0 {
                    -1.0
                } else {
                    1.0 - (i % 5) as f32 * 0.01
                }
            })
            .collect();
        let mut x: Vec<f32> = (0..k)
            .map(|i| if i % 7 == 0 { 0.0 } else { -1.0 })
            .collect();
        x[5] = 1000.0;
        let rows = 5;
        let row = encoded(&f, &w);
        let mut a = NmActs::new();
        a.quantize(&f, &x).unwrap();
        let g = generic_dot(&f, &row, &a);
        let mut dec = vec![0f32; k];
        decode_row(&f, &row, &mut dec).unwrap();
        let (exact, scale) = reference(&dec, &a.decoded());
        let tol = Close::for_blocks(3);
        tol.check("generic", g, exact, scale);
        let w4: Vec<u8> = (0..rows).flat_map(|_| row.iter().copied()).collect();
        for kern in NmKernel::variants(f).unwrap() {
            let mut y = vec![0f32; rows];
            kern.matvec(&w4, &a, &mut y).unwrap();
            for v in y {
                tol.check(kern.name, v, g as f64, scale);
            }
        }
    }
}

#[test]
fn errors_not_panics() {
    assert!(NmFormat::new(0, 4, NmValues::Q8).is_err());
    assert!(NmFormat::new(5, 4, NmValues::Q8).is_err());
    assert!(NmFormat::new(2, 17, NmValues::Q4).is_err());
    let bad = NmFormat {
        n: 3,
        m: 2,
        values: NmValues::Q8,
    };
    assert!(bad.row_bytes(64).is_err());
    assert!(NmKernel::for_level(bad, Level::Generic).is_err());

    let f = fmt(2, 4, NmValues::Q8);
    assert!(f.row_bytes(63).is_err());
    assert!(f.row_bytes(32).is_err());
    let w = vec![1.0f32; 128];
    let mut out = vec![0u8; f.row_bytes(128).unwrap()];
    // Wrong output length, wrong row length, non-finite weights, bad masks.
    assert!(encode_row(&f, &w, &mut out[1..]).is_err());
    assert!(encode_row(&f, &w[..100], &mut out).is_err());
    let mut nan = w.clone();
    nan[7] = f32::NAN;
    assert!(encode_row(&f, &nan, &mut out).is_err());
    let mut keep = vec![true; 128];
    assert!(encode_row_with_mask(&f, &w, &keep, &mut out).is_err());
    keep.truncate(64);
    assert!(encode_row_with_mask(&f, &w, &keep, &mut out).is_err());
    let huge = vec![1e30f32; 128];
    assert!(encode_row(&f, &huge, &mut out).is_err());

    encode_row(&f, &w, &mut out).unwrap();
    let mut dec = vec![0f32; 128];
    assert!(decode_row(&f, &out, &mut dec[..64]).is_err());
    assert!(decode_row(&f, &out[..40], &mut dec).is_err());
    // Two equal indices in group 0 (both 0): clear the digits of kept values 0 and 1 (bits
    // 0 and 1 of bytes 0 and 1 of the digit plane of block 0, after the head's 2 scales and
    // 2 sums).
    let mut corrupt = out.clone();
    corrupt[8] &= !3;
    corrupt[9] &= !3;
    assert!(decode_row(&f, &corrupt, &mut dec).is_err());
    // A stored value sum that is not the sum of the block's values.
    let mut bad_sum = out.clone();
    bad_sum[4] ^= 1;
    assert!(decode_row(&f, &bad_sum, &mut dec).is_err());
    assert!(kept_positions(&f, &bad_sum, &mut [false; 128]).is_err());
    let mut kept = vec![false; 128];
    assert!(kept_positions(&f, &corrupt, &mut kept).is_err());

    // Kernels: mismatched lengths and activations of another format are errors; a corrupt
    // row is read without panicking.
    let mut a = NmActs::new();
    assert!(a.quantize(&f, &w[..100]).is_err());
    a.quantize(&f, &w).unwrap();
    let other = fmt(1, 4, NmValues::Q8);
    let mut a_other = NmActs::new();
    a_other.quantize(&other, &w).unwrap();
    for kern in NmKernel::variants(f).unwrap() {
        assert!(kern.dot(&out[..41], &a).is_err());
        assert!(kern.dot(&out, &a_other).is_err());
        let mut y = vec![0f32; 3];
        assert!(kern.matvec(&out, &a, &mut y).is_err());
        assert!(kern.dot(&corrupt, &a).unwrap().is_finite());
        let mut y = vec![0f32; 1];
        kern.matvec(&out, &a, &mut y).unwrap();
        assert_eq!(y[0], kern.dot(&out, &a).unwrap());
    }
}

/// Arbitrary bytes (a corrupt or hostile file) never make a kernel panic.
#[test]
fn arbitrary_bytes_do_not_panic() {
    let mut rng = Rng(99);
    for f in formats() {
        let k = 2 * f.block_span();
        let rb = f.row_bytes(k).unwrap();
        let bytes: Vec<u8> = (0..4 * rb).map(|_| rng.next() as u8).collect();
        let mut a = NmActs::new();
        a.quantize(&f, &rng.row(k)).unwrap();
        for kern in NmKernel::variants(f).unwrap() {
            // A scale can be an f16 NaN or infinity, so the numbers are anything; the four-row
            // variant still computes what the one-row kernel does, row for row.
            let (mut y, mut y1) = (vec![0f32; 4], vec![0f32; 4]);
            kern.matvec(&bytes, &a, &mut y).unwrap();
            kern.matvec_by_row(&bytes, &a, &mut y1).unwrap();
            assert_eq!(bits(&y), bits(&y1), "{}", kern.name);
        }
        // And the matrix-matrix product those of the matrix-vector one, token for token.
        let acts = random_acts(&f, &mut rng, 5, k);
        check_matmat(&f, &bytes, &acts);
        let mut dec = vec![0f32; k];
        let _ = decode_row(&f, &bytes[..rb], &mut dec);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn kernels_over_shapes(
        nm in prop::sample::select(vec![(2usize, 4usize), (4, 8), (1, 4), (3, 7), (8, 16), (2, 2)]),
        q4 in any::<bool>(),
        blocks in 1usize..12,
        rows in 1usize..11,
        seed in any::<u64>(),
    ) {
        let f = fmt(nm.0, nm.1, if q4 { NmValues::Q4 } else { NmValues::Q8 });
        let mut rng = Rng(seed | 1);
        check_kernels(&f, blocks * f.block_span(), rows, &mut rng);
    }

    #[test]
    fn matmat_over_shapes(
        nm in prop::sample::select(vec![(2usize, 4usize), (4, 8), (1, 4), (3, 7)]),
        q4 in any::<bool>(),
        blocks in 1usize..12,
        rows in 1usize..80,
        n in 1usize..10,
        seed in any::<u64>(),
    ) {
        let f = fmt(nm.0, nm.1, if q4 { NmValues::Q4 } else { NmValues::Q8 });
        let mut rng = Rng(seed | 1);
        let k = blocks * f.block_span();
        let w: Vec<u8> = (0..rows).flat_map(|_| encoded(&f, &rng.row(k))).collect();
        let acts = random_acts(&f, &mut rng, n, k);
        check_matmat(&f, &w, &acts);
    }
}

/// The activation quantizer (SIMD where the CPU has it) against the portable formula: the
/// same scale, and every value rounded ties-to-even, NaN to 0, clamped to +-127; with exact
/// ties, infinities, NaN, zero blocks and subnormals.
#[test]
fn activations_quantize_as_the_formula_says() {
    let mut rng = Rng(0xacac_1234);
    for f in [fmt(2, 4, NmValues::Q8), fmt(3, 7, NmValues::Q4)] {
        let s = f.block_span();
        let mut x = rng.row(6 * s);
        // Block 1: exact ties (amax 127 makes id 1).
        for (i, v) in x[s..2 * s].iter_mut().enumerate() {
            *v = (i as f32 - 32.0) + 0.5;
        }
        x[s] = 127.0;
        // Block 2 zeros, block 3 NaN and an infinity, block 4 subnormals, block 5 NaN only.
        x[2 * s..3 * s].fill(0.0);
        x[3 * s + 1] = f32::NAN;
        x[3 * s + 5] = f32::NEG_INFINITY;
        x[4 * s..5 * s].fill(1e-40);
        x[4 * s + 3] = -3e-39;
        x[5 * s + 7] = f32::NAN;
        let mut a = NmActs::new();
        a.quantize(&f, &x).unwrap();
        for (b, xb) in x.chunks_exact(s).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            assert_eq!(
                a.scales()[b].to_bits(),
                (amax / 127.0).to_bits(),
                "block {b}"
            );
            for (i, &v) in xb.iter().enumerate() {
                let want = ((v * id).round_ties_even() as i32).clamp(-127, 127) as i8;
                assert_eq!(
                    a.values()[b * s + i],
                    want,
                    "{f:?} block {b} value {i} ({v})"
                );
            }
        }
    }
}
