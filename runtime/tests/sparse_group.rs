//! Group-sparse weights (`sparrow::sparse::group`): encoder and decoder round trips, every
//! kernel of every level this CPU has against the portable kernel (bit for bit), the portable
//! kernel against an f64 product of the decoded weights and activations, and hostile buffers.

use proptest::prelude::*;
use sparrow::kernels::Level;
use sparrow::sparse::group::{
    encode, prune, prune_tiles, GroupActs, GroupFormat, GroupKernel, GroupMatrix, Values, CHUNK,
    HEADER_BYTES,
};

/// xorshift64*: reproducible values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        u as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn fill(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn formats() -> Vec<GroupFormat> {
    let mut v = Vec::new();
    for g in [4, 8, 16, 32] {
        for values in [Values::Q4, Values::Q8] {
            for sg in [1, 2, 4, 8] {
                if let Ok(f) = GroupFormat::new(g, values).and_then(|f| f.with_scale_groups(sg)) {
                    v.push(f);
                    // Tiles of 8 rows (the test matrices end with a shorter tile).
                    v.push(f.with_tile(8).unwrap());
                }
            }
        }
    }
    v
}

/// Pruned random weights and their encoding.
fn pruned(
    rows: usize,
    cols: usize,
    fmt: GroupFormat,
    sparsity: f64,
    seed: u64,
) -> (Vec<f32>, Vec<u8>) {
    let mut w = Rng(seed | 1).fill(rows * cols);
    prune_tiles(&mut w, cols, fmt.g, sparsity, fmt.tile.max(1)).unwrap();
    let bytes = encode(&w, rows, cols, fmt).unwrap();
    (w, bytes)
}

/// Per-element ceiling of |w - decoded| for a weight whose scale block has largest magnitude
/// `amax`: Q4 levels are within one step |d| = amax / 8 (half a step, except the level 16
/// clamped to 15), Q8 within half a step amax / 127; the f16 rounding of d adds at most
/// 2^-11 relative per step, times at most 8 (Q4) or 127 (Q8) steps.
fn ceiling(values: Values, amax: f32) -> f32 {
    match values {
        Values::Q4 => amax / 8.0 * (1.0 + 8.0 / 2048.0) + 1e-7,
        Values::Q8 => amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-7,
    }
}

/// Checks the decoded matrix against the pruned f32 weights: dropped groups exact zeros,
/// stored values within the format's ceiling.
fn check_round_trip(w: &[f32], m: &GroupMatrix) {
    let fmt = m.format();
    let (g, cols) = (fmt.g, m.cols());
    let dec = m.decode();
    assert_eq!(dec.len(), w.len());
    for (row, drow) in w.chunks_exact(cols).zip(dec.chunks_exact(cols)) {
        let stored: Vec<usize> = (0..cols / g)
            .filter(|&i| row[i * g..(i + 1) * g].iter().any(|&v| v != 0.0))
            .collect();
        for i in 0..cols / g {
            if !stored.contains(&i) {
                assert!(drow[i * g..(i + 1) * g].iter().all(|&v| v == 0.0));
            }
        }
        for blk in stored.chunks(fmt.scale_groups) {
            let amax = blk
                .iter()
                .flat_map(|&i| &row[i * g..(i + 1) * g])
                .fold(0.0f32, |m, v| m.max(v.abs()));
            let lim = ceiling(fmt.values, amax);
            for &i in blk {
                for t in i * g..(i + 1) * g {
                    let e = (row[t] - drow[t]).abs();
                    assert!(
                        e <= lim,
                        "col {t}: {} vs {} (ceiling {lim})",
                        row[t],
                        drow[t]
                    );
                }
            }
        }
    }
}

/// Every kernel of every level the CPU has gives the portable kernel's bits; the portable
/// kernel is within a rounding bound of the f64 product of what it multiplies.
///
/// The bound: each product term w * x reaches the result through the f32 scale product
/// d_w * d_x (one rounding), the fused multiply-add into its lane accumulator (one per chunk
/// of its lane, at most `chunks`), and the three additions of the final fold, all relative
/// 2^-24 of at most the sum of |w x|; the lanes' integer sums and their f32 conversion are
/// exact (|lane| <= 4 * 128 * 127 < 2^24). The reference itself rounds the activations
/// q * d_x to f32 (one more). Hence (chunks + 5) * 2^-24 * sum |w x|, with 1 % slack.
fn check_kernels(m: &GroupMatrix, x: &[f32]) {
    let acts = GroupActs::new(x);
    let mut want = vec![0.0f32; m.rows()];
    GroupKernel::generic().matvec(m, &acts, &mut want).unwrap();
    for level in Level::detected() {
        let k = GroupKernel::for_level(level);
        let mut got = vec![f32::NAN; m.rows()];
        k.matvec(m, &acts, &mut got).unwrap();
        for (r, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{} row {r}: {a} vs {b}", k.name);
        }
        // A share of the rows, as a thread computes it.
        if m.rows() > 1 {
            let mut part = vec![0.0f32; m.rows() - 1];
            k.matvec_rows(m, &acts, 1, &mut part).unwrap();
            assert_eq!(part, want[1..]);
        }
    }
    // Five tokens (a group of four and one more), this one first.
    let mut xs = vec![x.to_vec()];
    for t in 0..4 {
        xs.push(Rng(x.len() as u64 * 31 + t).fill(x.len()));
    }
    check_matmat(m, &xs);
    let w = m.decode();
    let xd = acts.dequantize();
    let cols = m.cols();
    for (r, row) in w.chunks_exact(cols).enumerate() {
        let exact: f64 = row
            .iter()
            .zip(&xd)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        let mag: f64 = row
            .iter()
            .zip(&xd)
            .map(|(&a, &b)| (a as f64 * b as f64).abs())
            .sum();
        let stored = row
            .chunks_exact(m.format().g)
            .filter(|g| g.iter().any(|&v| v != 0.0))
            .count();
        // Fused multiply-adds per accumulator: one per chunk (rows of their own), one per
        // group (tiles, two accumulators).
        let fmas = if m.format().tile > 0 {
            stored.div_ceil(2) as f64
        } else {
            (stored * m.format().g).div_ceil(CHUNK) as f64
        };
        let tol = (fmas + 5.0) * 2f64.powi(-24) * mag * 1.01 + 1e-30;
        let err = (want[r] as f64 - exact).abs();
        assert!(
            err <= tol,
            "row {r}: {} vs {exact} (tolerance {tol})",
            want[r]
        );
    }
}

/// Every level's matrix-matrix product gives, token for token, the bits of the portable
/// matrix-vector kernel (so of every level's), over all rows and over a share of them.
fn check_matmat(m: &GroupMatrix, xs: &[Vec<f32>]) {
    let acts: Vec<GroupActs> = xs.iter().map(|x| GroupActs::new(x)).collect();
    let (n, rows) = (acts.len(), m.rows());
    let mut want = vec![0.0f32; n * rows];
    for (a, w) in acts.iter().zip(want.chunks_exact_mut(rows.max(1))) {
        GroupKernel::generic().matvec(m, a, w).unwrap();
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for level in Level::detected() {
        let k = GroupKernel::for_level(level);
        let mut got = vec![f32::NAN; n * rows];
        k.matmat(m, &acts, &mut got).unwrap();
        assert_eq!(bits(&got), bits(&want), "{} {n} tokens", k.name);
        if rows > 1 {
            let c = rows - 1;
            let mut part = vec![f32::NAN; n * c];
            k.matmat_rows(m, &acts, 1, &mut part).unwrap();
            for t in 0..n {
                assert_eq!(
                    bits(&part[t * c..(t + 1) * c]),
                    bits(&want[t * rows + 1..(t + 1) * rows]),
                    "{} rows 1.., token {t} of {n}",
                    k.name
                );
            }
        }
    }
}

/// Batches of 1..9 tokens (none, one or two groups of four, and every remainder) over rows
/// that cross the kernels' row chunks.
#[test]
fn matmat_every_token_count() {
    for (i, fmt) in formats().into_iter().enumerate() {
        let (_, bytes) = pruned(71, 128, fmt, 0.5, 300 + i as u64);
        let m = GroupMatrix::new(&bytes).unwrap();
        for n in 1..=9u64 {
            let xs: Vec<Vec<f32>> = (0..n).map(|t| Rng(7 * n + t).fill(128)).collect();
            check_matmat(&m, &xs);
        }
    }
}

/// SmolLM2-135M's shapes (576 and 1536 columns) at g16 and g32, 50 % and 75 %, with a batch
/// of 7.
#[test]
fn matmat_model_shapes() {
    for (i, (g, values, s)) in [
        (16, Values::Q4, 0.5),
        (16, Values::Q4, 0.75),
        (32, Values::Q4, 0.5),
        (16, Values::Q8, 0.5),
    ]
    .into_iter()
    .enumerate()
    {
        for tile in [0, 8] {
            let fmt = GroupFormat::new(g, values)
                .and_then(|f| f.with_tile(tile))
                .unwrap();
            for (cols, rows) in [(576, 40), (1536, 19)] {
                let (_, bytes) = pruned(rows, cols, fmt, s, 500 + i as u64);
                let m = GroupMatrix::new(&bytes).unwrap();
                let xs: Vec<Vec<f32>> = (0..7).map(|t| Rng(60 + t).fill(cols)).collect();
                check_matmat(&m, &xs);
                check_kernels(&m, &xs[0]);
            }
        }
    }
}

#[test]
fn matmat_errors() {
    let fmt = GroupFormat::new(16, Values::Q4).unwrap();
    let (_, bytes) = pruned(3, 64, fmt, 0.5, 1);
    let m = GroupMatrix::new(&bytes).unwrap();
    let a = GroupActs::new(&Rng(2).fill(64));
    let short = GroupActs::new(&Rng(2).fill(32));
    for level in Level::detected() {
        let k = GroupKernel::for_level(level);
        let mut y = [0.0f32; 8];
        assert!(k.matmat(&m, &[a.clone(), a.clone()], &mut y[..5]).is_err());
        assert!(k
            .matmat(&m, &[a.clone(), short.clone()], &mut y[..6])
            .is_err());
        assert!(k
            .matmat_rows(&m, std::slice::from_ref(&a), 1, &mut y[..3])
            .is_err());
        assert!(k.matmat_rows(&m, &[], 0, &mut y[..1]).is_err());
        assert!(k
            .matmat_rows(&m, &[a.clone(), a.clone()], 0, &mut y[..3])
            .is_err());
        k.matmat_rows(&m, &[], 0, &mut []).unwrap();
    }
}

#[test]
fn round_trip_every_format_and_sparsity() {
    for (i, fmt) in formats().into_iter().enumerate() {
        for s in [0.0, 0.5, 0.75, 1.0] {
            let (w, bytes) = pruned(5, 192, fmt, s, 7 + i as u64);
            let m = GroupMatrix::new(&bytes).unwrap();
            assert_eq!(m.rows(), 5);
            assert_eq!(m.cols(), 192);
            assert_eq!(m.format(), fmt);
            let groups = 192 / fmt.g;
            let kept = groups - (s * groups as f64).round() as usize;
            assert_eq!(m.stored_groups(), 5 * kept, "{fmt:?} at {s}");
            check_round_trip(&w, &m);
        }
    }
}

#[test]
fn byte_counts_at_g16() {
    // W4, g = 16, a 576-wide row at 50 %: a 2-byte count, 18 one-byte group numbers (36
    // groups), 18 f16 scales, 18 groups of 8 bytes; with a scale per 2 groups, 9 scales.
    let f = GroupFormat::new(16, Values::Q4).unwrap();
    assert_eq!(f.row_bytes(576, 18), 2 + 18 + 36 + 9 * 16);
    assert_eq!(
        f.with_scale_groups(2).unwrap().row_bytes(576, 18),
        2 + 18 + 18 + 9 * 16
    );
    // 75 %: 9 groups, the last chunk half padding.
    assert_eq!(f.row_bytes(576, 9), 2 + 9 + 18 + 5 * 16);
    let (_, bytes) = pruned(3, 576, f, 0.5, 3);
    assert_eq!(
        bytes.len(),
        HEADER_BYTES + 4 * 4 + 3 * (2 + 18 + 36 + 9 * 16)
    );
    // Over 256 groups a row's group numbers take two bytes.
    assert_eq!(f.row_bytes(16 * 257, 1), 2 + 2 + 2 + 16);
    assert_eq!(f.row_bytes(16 * 256, 1), 2 + 1 + 2 + 16);
}

#[test]
fn kernels_agree_every_format_and_sparsity() {
    for (i, fmt) in formats().into_iter().enumerate() {
        for s in [0.0, 0.5, 0.75, 1.0] {
            let (_, bytes) = pruned(9, 320, fmt, s, 100 + i as u64);
            let m = GroupMatrix::new(&bytes).unwrap();
            let x = Rng(55 + i as u64).fill(320);
            check_kernels(&m, &x);
        }
    }
}

/// Tiles of 16 and 32 rows, longer than the kernels' blocks (eight rows on x86, four on
/// aarch64), over 77 rows (whole tiles and a last one of 13); `check_kernels` also computes
/// rows 1.. as a thread would, starting inside a tile.
#[test]
fn kernels_agree_tiles_of_16_and_32() {
    let mut i = 0;
    for g in [4, 8, 16, 32] {
        for values in [Values::Q4, Values::Q8] {
            // One scale per group, and per 32 weights.
            for sg in [1, (32 / g).min(8)] {
                for tile in [16, 32] {
                    let fmt = GroupFormat::new(g, values)
                        .and_then(|f| f.with_scale_groups(sg))
                        .and_then(|f| f.with_tile(tile))
                        .unwrap();
                    for s in [0.0, 0.5, 0.75] {
                        i += 1;
                        let (_, bytes) = pruned(77, 40 * g, fmt, s, 300 + i);
                        let m = GroupMatrix::new(&bytes).unwrap();
                        check_kernels(&m, &Rng(77 + i).fill(40 * g));
                    }
                }
            }
        }
    }
}

#[test]
fn fully_pruned_rows_are_zero() {
    let fmt = GroupFormat::new(16, Values::Q4).unwrap();
    let (_, bytes) = pruned(4, 64, fmt, 1.0, 9);
    let m = GroupMatrix::new(&bytes).unwrap();
    let acts = GroupActs::new(&Rng(2).fill(64));
    for level in Level::detected() {
        let mut y = vec![1.0f32; 4];
        GroupKernel::for_level(level)
            .matvec(&m, &acts, &mut y)
            .unwrap();
        assert_eq!(y, vec![0.0; 4]);
    }
}

/// A row whose stored weights fill a partial last chunk (g = 8, 3 groups: 24 of 32 weights)
/// and a column count that is not a multiple of 32 (the activations are padded).
#[test]
fn tail_of_a_partial_chunk() {
    for values in [Values::Q4, Values::Q8] {
        let fmt = GroupFormat::new(8, values).unwrap();
        let mut w = Rng(4).fill(2 * 40);
        for row in w.chunks_exact_mut(40) {
            row[8..16].fill(0.0);
            row[24..32].fill(0.0);
        }
        let bytes = encode(&w, 2, 40, fmt).unwrap();
        let m = GroupMatrix::new(&bytes).unwrap();
        assert_eq!(m.stored_groups(), 6);
        check_round_trip(&w, &m);
        check_kernels(&m, &Rng(8).fill(40));
    }
}

/// Rows of more than 256 groups (two-byte group numbers) and more than 64 activation blocks
/// (the AVX-512 preparation gathers the activation scales instead of permuting registers);
/// also 17..=64 blocks (two and four registers).
#[test]
fn wide_rows() {
    for (i, (g, cols)) in [
        (4, 4 * 300),
        (16, 16 * 136),
        (8, 8 * 260),
        (32, 32 * 70),
        (16, 800),
    ]
    .into_iter()
    .enumerate()
    {
        for values in [Values::Q4, Values::Q8] {
            for sg in [1, 2] {
                let Ok(fmt) = GroupFormat::new(g, values).and_then(|f| f.with_scale_groups(sg))
                else {
                    continue;
                };
                for s in [0.5, 0.75] {
                    let (w, bytes) = pruned(6, cols, fmt, s, 40 + i as u64);
                    let m = GroupMatrix::new(&bytes).unwrap();
                    check_round_trip(&w, &m);
                    check_kernels(&m, &Rng(90 + i as u64).fill(cols));
                }
            }
        }
    }
}

/// Tiled rows lie plane by plane (row i of every tile, then row i + 1): eight-row blocks
/// then read eight sequential streams. A tiled buffer with its rows in row order (as files
/// tiled before this placement had them) is refused, naming the placement.
#[test]
fn tiled_rows_lie_plane_by_plane() {
    let fmt = GroupFormat::new(16, Values::Q4)
        .and_then(|f| f.with_tile(8))
        .unwrap();
    let rows = 20;
    let (_, bytes) = pruned(rows, 64, fmt, 0.5, 21);
    let m = GroupMatrix::new(&bytes).unwrap();
    let starts: Vec<usize> = (0..rows).map(|r| m.row_range(r).start).collect();
    let mut order: Vec<usize> = (0..rows).collect();
    order.sort_by_key(|&r| starts[r]);
    assert_eq!(
        order,
        [0, 8, 16, 1, 9, 17, 2, 10, 18, 3, 11, 19, 4, 12, 5, 13, 6, 14, 7, 15]
    );
    for w in order.windows(2) {
        assert_eq!(m.row_range(w[0]).end, m.row_range(w[1]).start);
    }
    // The same rows in row order.
    let table = HEADER_BYTES + 4 * (rows + 1);
    let mut row_order = bytes[..table].to_vec();
    for r in 0..rows {
        let at = row_order.len() as u32;
        row_order[HEADER_BYTES + 4 * r..HEADER_BYTES + 4 * r + 4]
            .copy_from_slice(&at.to_le_bytes());
        row_order.extend_from_slice(&bytes[m.row_range(r)]);
    }
    let e = err(&row_order);
    assert!(
        e.contains("plane by plane") && e.contains("pruned again"),
        "{e}"
    );
}

/// Tiles drop the groups of smallest norm over their rows, the same in every row; a tile
/// whose rows store other groups than its first is refused.
#[test]
fn tiles_share_their_groups() {
    // Two rows of four groups of 4, tile of 2: group 1 is small in row 0 only, group 2 small
    // in both; over the tile, groups 2 and then 1 are the smallest.
    let mut w = vec![1.0f32; 32];
    w[4..8].fill(0.1);
    w[8..12].fill(0.05);
    w[24..28].fill(0.2);
    let mut per_row = w.clone();
    prune_tiles(&mut w, 16, 4, 0.5, 2).unwrap();
    let zero = |w: &[f32]| -> Vec<bool> {
        w.chunks_exact(4)
            .map(|g| g.iter().all(|&v| v == 0.0))
            .collect()
    };
    assert_eq!(
        zero(&w),
        [false, true, true, false, false, true, true, false]
    );
    // Row by row, row 1 drops group 2 and group 0 (of three equal norms, the earliest).
    prune(&mut per_row, 16, 4, 0.5).unwrap();
    assert_eq!(zero(&per_row)[4..], [true, false, true, false][..]);
    assert_eq!(zero(&per_row)[..4], [false, true, true, false][..]);
    assert!(prune_tiles(&mut w, 16, 4, 0.5, 0).is_err());

    let fmt = GroupFormat::new(16, Values::Q4)
        .and_then(|f| f.with_tile(8))
        .unwrap();
    let (_, good) = pruned(4, 64, fmt, 0.5, 21);
    let m = GroupMatrix::new(&good).unwrap();
    assert_eq!(m.format().tile, 8);
    // A row of the tile that is not all zero in a group the others drop: stored by all.
    let mut w = Rng(3).fill(4 * 64);
    for r in 0..4 {
        w[r * 64 + 16 * r..r * 64 + 16 * r + 16].fill(0.0);
    }
    let m2 = encode(&w, 4, 64, fmt).unwrap();
    assert_eq!(GroupMatrix::new(&m2).unwrap().stored_groups(), 16);
    // Row 1 (the second of tile 0) with another group number than row 0.
    let table = HEADER_BYTES + 4 * 5;
    let r1 = u32::from_le_bytes(good[HEADER_BYTES + 4..HEADER_BYTES + 8].try_into().unwrap());
    assert_eq!(good[table..table + 4], good[r1 as usize..r1 as usize + 4]);
    // Another increasing pair of group numbers for row 1.
    let (i0, i1) = (good[r1 as usize + 2], good[r1 as usize + 3]);
    let mut bad = good.clone();
    match (i0 + 1..4).find(|&v| v != i1) {
        Some(v) => bad[r1 as usize + 3] = v,
        None => bad[r1 as usize + 2] = (0..i1).find(|&v| v != i0).unwrap(),
    }
    let e = err(&bad);
    assert!(e.contains("row 1") && e.contains("other groups"), "{e}");
    // The same buffer read as untiled is valid.
    let mut untiled = good.clone();
    untiled[15] = 0;
    GroupMatrix::new(&untiled).unwrap();
}

#[test]
fn prune_drops_the_smallest_groups() {
    let mut w: Vec<f32> = (0..32)
        .map(|i| ((i / 4) as f32 + 1.0) * if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    // Groups of 4 with norms growing with the index; make group 5 the smallest.
    w[20..24].fill(0.01);
    prune(&mut w, 32, 4, 0.5).unwrap();
    let zero: Vec<bool> = w
        .chunks_exact(4)
        .map(|g| g.iter().all(|&v| v == 0.0))
        .collect();
    assert_eq!(zero, [true, true, true, false, false, true, false, false]);
    assert!(prune(&mut w, 32, 4, 1.5).is_err());
    assert!(prune(&mut w, 30, 4, 0.5).is_err());
    assert!(prune(&mut w, 32, 5, 0.5).is_err());
}

#[test]
fn bad_formats_and_inputs_are_errors() {
    assert!(GroupFormat::new(12, Values::Q4).is_err());
    assert!(GroupFormat::new(32, Values::Q4)
        .unwrap()
        .with_scale_groups(2)
        .is_err());
    assert!(GroupFormat::new(16, Values::Q8)
        .unwrap()
        .with_scale_groups(3)
        .is_err());
    let fmt = GroupFormat::new(8, Values::Q4).unwrap();
    assert!(encode(&[0.0; 12], 1, 12, fmt).is_err());
    assert!(encode(&[0.0; 16], 2, 16, fmt).is_err());
    assert!(encode(&[f32::NAN; 16], 1, 16, fmt).is_err());
    let (_, bytes) = pruned(3, 64, fmt, 0.5, 1);
    let m = GroupMatrix::new(&bytes).unwrap();
    let k = GroupKernel::get();
    let mut y = vec![0.0; 3];
    assert!(k.matvec(&m, &GroupActs::new(&[0.5; 32]), &mut y).is_err());
    assert!(k
        .matvec(&m, &GroupActs::new(&[0.5; 64]), &mut y[..2])
        .is_err());
    assert!(k
        .matvec_rows(&m, &GroupActs::new(&[0.5; 64]), 2, &mut y[..2])
        .is_err());
    assert!(k
        .matvec_rows(&m, &GroupActs::new(&[0.5; 64]), usize::MAX, &mut y[..2])
        .is_err());
}

#[track_caller]
fn err(bytes: &[u8]) -> String {
    match GroupMatrix::new(bytes) {
        Ok(_) => panic!("accepted a bad buffer"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_headers_and_offsets_are_rejected() {
    let fmt = GroupFormat::new(16, Values::Q4).unwrap();
    let (_, good) = pruned(3, 64, fmt, 0.5, 11);
    GroupMatrix::new(&good).unwrap();
    let table = HEADER_BYTES + 16;
    let patch = |at: usize, b: &[u8]| {
        let mut v = good.clone();
        v[at..at + b.len()].copy_from_slice(b);
        v
    };
    assert!(err(&patch(0, b"SPGX")).contains("magic"));
    // The first layout (a bitmap per row) is named and refused.
    let old = err(&patch(0, b"SPG1"));
    assert!(old.contains("version 1") && old.contains("prune"), "{old}");
    assert!(err(&patch(4, &u32::MAX.to_le_bytes())).contains("offset table"));
    assert!(err(&patch(4, &2u32.to_le_bytes())).contains("row 0 starts"));
    assert!(err(&patch(8, &63u32.to_le_bytes())).contains("multiple"));
    assert!(err(&patch(8, &0u32.to_le_bytes())).contains("multiple"));
    // 16 * 65536 columns: one group more than a u16 count can hold.
    assert!(err(&patch(8, &(16u32 << 16).to_le_bytes())).contains("more than 65535"));
    // 16 * 257 columns: two-byte group numbers, so row 0's length no longer fits.
    assert!(err(&patch(8, &(16u32 * 257).to_le_bytes())).contains("row 0"));
    assert!(err(&patch(12, &[12])).contains("group size"));
    assert!(err(&patch(13, &[2])).contains("value type"));
    assert!(err(&patch(14, &[4])).contains("per scale"));
    assert!(err(&patch(15, &[1])).contains("tiles of 1 rows"));
    assert!(err(&patch(15, &[3])).contains("tiles of 3 rows"));
    assert!(err(&patch(HEADER_BYTES, &0u32.to_le_bytes())).contains("row 0 starts"));
    // Row 2 starts inside row 1, and past the buffer.
    let r2 = u32::from_le_bytes(
        good[HEADER_BYTES + 8..HEADER_BYTES + 12]
            .try_into()
            .unwrap(),
    );
    assert!(err(&patch(HEADER_BYTES + 8, &(r2 - 1).to_le_bytes())).contains("row 2 starts"));
    assert!(err(&patch(HEADER_BYTES + 8, &u32::MAX.to_le_bytes())).contains("row 2 starts"));
    // The table's end entry disagrees with the rows.
    let end = (good.len() as u32 - 1).to_le_bytes();
    assert!(err(&patch(HEADER_BYTES + 12, &end)).contains("offset table says"));
    // Row 0 (4 groups, 2 stored): count, group numbers at +2, +3, scales at +4.
    assert_eq!(good[table..table + 2], [2, 0]);
    let (i0, i1) = (good[table + 2], good[table + 3]);
    assert!(i0 < i1 && i1 < 4);
    // More stored groups than the row has, and a count that disagrees with the row's length.
    assert!(err(&patch(table, &[5, 0])).contains("the row has 4"));
    assert!(err(&patch(table, &[0xFF, 0xFF])).contains("the row has 4"));
    // (Three stored groups: the third group number read is a scale byte.)
    assert!(err(&patch(table, &[3, 0])).contains("row 0: stored group 2"));
    assert!(err(&patch(table, &[1, 0])).contains("stored groups take"));
    // Group numbers out of order, repeated, or past the last group.
    assert!(err(&patch(table + 2, &[i1, i0])).contains("increase"));
    assert!(err(&patch(table + 2, &[i1, i1])).contains("increase"));
    assert!(err(&patch(table + 3, &[4])).contains("increase"));
    assert!(err(&patch(table + 3, &[0xFF])).contains("increase"));
    // A row shorter than its count.
    let short = {
        let mut v = good.clone();
        v.truncate(table + 1);
        v
    };
    assert!(GroupMatrix::new(&short).is_err());
    // A scale that is infinite or NaN.
    assert!(err(&patch(table + 4, &[0x00, 0x7C])).contains("not finite"));
    assert!(err(&patch(table + 4, &[0x01, 0x7E])).contains("not finite"));
    // Extra bytes after the last row.
    let mut longer = good.clone();
    longer.push(0);
    assert!(err(&longer).contains("rows end"));
}

/// A row of two bytes whose count says 0 is valid (an empty row); two-byte group numbers
/// are checked as the one-byte ones.
#[test]
fn empty_rows_and_wide_group_numbers() {
    let fmt = GroupFormat::new(4, Values::Q8).unwrap();
    let cols = 4 * 300;
    let mut w = Rng(5).fill(2 * cols);
    // Row 0 empty, row 1 keeps groups 3 and 299.
    w[..cols].fill(0.0);
    for (i, v) in w[cols..].iter_mut().enumerate() {
        if i / 4 != 3 && i / 4 != 299 {
            *v = 0.0;
        }
    }
    let good = encode(&w, 2, cols, fmt).unwrap();
    let m = GroupMatrix::new(&good).unwrap();
    assert_eq!(m.stored_groups(), 2);
    check_kernels(&m, &Rng(6).fill(cols));
    let table = HEADER_BYTES + 12;
    assert_eq!(good[table..table + 2], [0, 0]);
    let r1 = table + 2;
    assert_eq!(good[r1..r1 + 6], [2, 0, 3, 0, 43, 1]);
    let patch = |at: usize, b: &[u8]| {
        let mut v = good.clone();
        v[at..at + b.len()].copy_from_slice(b);
        v
    };
    assert!(err(&patch(r1 + 4, &[44, 1])).contains("increase"));
    assert!(err(&patch(r1 + 4, &[3, 0])).contains("increase"));
    assert!(err(&patch(r1 + 2, &[44, 1])).contains("increase"));
    GroupMatrix::new(&patch(r1 + 4, &[42, 1])).unwrap();
}

#[test]
fn every_truncation_is_rejected() {
    let fmt = GroupFormat::new(8, Values::Q8)
        .unwrap()
        .with_scale_groups(2)
        .unwrap();
    let (_, good) = pruned(4, 96, fmt, 0.5, 12);
    for len in 0..good.len() {
        assert!(
            GroupMatrix::new(&good[..len]).is_err(),
            "prefix of {len} bytes"
        );
    }
}

/// Every single-byte corruption is either rejected, or (value bytes, in-range offsets) read
/// as another valid matrix that every kernel runs on without a fault, giving the portable
/// kernel's bits.
#[test]
fn corrupted_bytes_never_fault() {
    for fmt in [
        GroupFormat::new(4, Values::Q4).unwrap(),
        GroupFormat::new(16, Values::Q8)
            .unwrap()
            .with_scale_groups(2)
            .unwrap(),
    ] {
        let (_, good) = pruned(3, 64, fmt, 0.5, 13);
        for at in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut b = good.clone();
                b[at] ^= flip;
                if let Ok(m) = GroupMatrix::new(&b) {
                    let _ = m.decode();
                    // (A corrupted column count can still describe valid rows.)
                    let acts = GroupActs::new(&Rng(3).fill(m.cols()));
                    let mut want = vec![0.0; m.rows()];
                    GroupKernel::generic().matvec(&m, &acts, &mut want).unwrap();
                    for level in Level::detected() {
                        let mut y = vec![0.0; m.rows()];
                        GroupKernel::for_level(level)
                            .matvec(&m, &acts, &mut y)
                            .unwrap();
                        let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "byte {at} ^ {flip:#x}: {y:?} vs {want:?}");
                    }
                    let xs: Vec<Vec<f32>> = (0..5).map(|t| Rng(t).fill(m.cols())).collect();
                    check_matmat(&m, &xs);
                }
            }
        }
    }
}

#[test]
fn selected_kernel_is_a_detected_level() {
    let k = GroupKernel::get();
    assert!(Level::detected().contains(&k.level), "{k:?}");
    assert_eq!(
        GroupKernel::for_level(Level::Generic).name,
        "generic_matvec_group"
    );
}

fn format_strategy() -> impl Strategy<Value = GroupFormat> {
    (0usize..4, any::<bool>(), 0usize..4, 0usize..3).prop_filter_map(
        "scale groups",
        |(gi, q8, si, ti)| {
            let g = [4, 8, 16, 32][gi];
            let v = if q8 { Values::Q8 } else { Values::Q4 };
            let f = GroupFormat::new(g, v)
                .ok()?
                .with_scale_groups(1 << si)
                .ok()?;
            f.with_tile([0, 8, 16][ti]).ok()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn prop_round_trip_and_kernels(
        fmt in format_strategy(),
        rows in 1usize..40,
        groups in 1usize..40,
        si in 0usize..4,
        seed in any::<u64>(),
    ) {
        let cols = groups * fmt.g;
        let s = [0.0, 0.5, 0.75, 1.0][si];
        let (w, bytes) = pruned(rows, cols, fmt, s, seed);
        let m = GroupMatrix::new(&bytes).unwrap();
        let kept = groups - (s * groups as f64).round() as usize;
        prop_assert_eq!(m.stored_groups(), rows * kept);
        check_round_trip(&w, &m);
        check_kernels(&m, &Rng(seed ^ 0x9e37_79b9).fill(cols));
    }
}

/// A file's group-sparse tensor is read only with the layout key of this build: tensors of
/// the bitmap layout (no key, or 1) are refused with a message that says to prune again.
#[test]
fn group_layout_key_is_checked() {
    use sparrow::gguf::{Metadata, TensorInfo, Value};
    use sparrow::quant::GgmlType;
    use sparrow::sparse::group::LAYOUT_VERSION;
    use sparrow::sparse::store::{read, Encoding};
    let t = TensorInfo {
        name: "w".into(),
        shape: vec![100],
        ty: GgmlType::I8,
        offset: 0,
        n_bytes: 100,
    };
    let md = |layout: Option<u32>| {
        let mut md = Metadata::default();
        md.insert("sparrow.sparse.version".into(), Value::U32(1));
        if let Some(v) = layout {
            md.insert("sparrow.sparse.w.layout".into(), Value::U32(v));
        }
        for (k, v) in [
            ("encoding", Value::String("group".into())),
            ("g", Value::U32(16)),
            ("values", Value::String("q4".into())),
            ("scale_groups", Value::U32(1)),
            ("rows", Value::U64(2)),
            ("cols", Value::U64(64)),
        ] {
            md.insert(format!("sparrow.sparse.w.{k}"), v);
        }
        md
    };
    let s = read(&md(Some(LAYOUT_VERSION)), &t).unwrap().unwrap();
    assert!(matches!(s.encoding, Encoding::Group(_)));
    for layout in [None, Some(1), Some(LAYOUT_VERSION + 1)] {
        let e = read(&md(layout), &t).unwrap_err().to_string();
        assert!(e.contains("layout") && e.contains("prune"), "{e}");
    }
}
