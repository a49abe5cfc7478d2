//! Adapters fused into sparse (pruned) weights: what a delta does on a pruned position, and
//! the row edit the patcher ([`crate::adapter::patch`]) runs on sparse tensors.
//!
//! # The rule
//!
//! A sparse base keeps its sparsity pattern when an adapter is fused into it:
//!
//! - a delta at a **kept** position is added to the kept value, and the row is quantized
//!   again by the encoding's own encoder with the same kept positions. The encoders are
//!   max-abs quantizers, so decoding and re-encoding a block gives back its bytes: only the
//!   blocks (N:M) or scale groups (group-sparse) that hold a delta change, and their scale
//!   only when the delta changes their largest magnitude;
//! - a delta at a **pruned** position is **dropped**. The positions stay pruned, so the
//!   fused model runs the same sparse kernels over the same number of bytes, at the same
//!   speed, and a switch stays a patch of scattered bytes. The patcher counts the dropped
//!   deltas ([`crate::adapter::patch::Stats::dropped`]), and with
//!   [`crate::adapter::patch::Options::residual`] it keeps them (with the rounding of the
//!   kept ones) as the weight's sparse side term, which makes the fused adapter exact at the
//!   cost of computing that term beside the weight.
//!
//! Growing the pattern instead (storing the pruned positions a delta touches) would change
//! the size of N:M rows and of group-sparse buffers, which are read in place from the
//! mapping; dropping is what a pruned model that stays pruned means.
//!
//! Unapplying restores the saved bytes, so the base returns bit for bit either way.

use super::group::{self, GroupMatrix, Values};
use super::nm;
use super::store::{Encoding, SparseMatrix};
use crate::quant::util::{f16_to_f32, f32_to_f16};
use crate::{Error, Result};

/// Buffers of [`add_to_row`], reused across rows.
#[derive(Default)]
pub struct RowScratch {
    w: Vec<f32>,
    keep: Vec<bool>,
    /// The exact sums, when residuals are asked for.
    after: Vec<f32>,
}

/// Where each row of the matrix lies in its bytes `bytes`. A group-sparse buffer is
/// validated first ([`GroupMatrix::new`]), so that its row table can be trusted.
pub fn row_ranges(m: &SparseMatrix, bytes: &[u8]) -> Result<Vec<std::ops::Range<usize>>> {
    match m.encoding {
        Encoding::Nm(_) => {
            let rb = m.row_bytes()?;
            if Some(bytes.len()) != rb.checked_mul(m.rows) {
                return Err(Error::InvalidArgument(format!(
                    "N:M matrix is {} bytes, {} rows of {rb} expected",
                    bytes.len(),
                    m.rows
                )));
            }
            Ok((0..m.rows).map(|r| r * rb..(r + 1) * rb).collect())
        }
        Encoding::Group(_) => {
            let g = GroupMatrix::new(bytes)?;
            if (g.rows(), g.cols()) != (m.rows, m.cols) {
                return Err(Error::InvalidArgument(format!(
                    "group-sparse buffer holds {} x {}, expected {} x {}",
                    g.rows(),
                    g.cols(),
                    m.rows,
                    m.cols
                )));
            }
            Ok((0..m.rows).map(|r| g.row_range(r)).collect())
        }
    }
}

/// Adds `delta` (one value per input of the row, 0 where the adapter does not touch it) to
/// the encoded row `row` in place, by the rule above. Returns how many nonzero deltas fell
/// on pruned positions (and were dropped). With `residual`, pushes `(column, exact -
/// stored)` for every column whose stored value is not the exact sum (pruned positions
/// included), in column order.
///
/// On an error (a row whose bytes do not decode, a sum that overflows the encoding) `row`
/// is unchanged.
pub fn add_to_row(
    m: &SparseMatrix,
    row: &mut [u8],
    delta: &[f32],
    s: &mut RowScratch,
    residual: Option<&mut Vec<(u32, f32)>>,
) -> Result<usize> {
    let cols = m.cols;
    if delta.len() != cols {
        return Err(Error::InvalidArgument(format!(
            "sparse row edit: {} deltas for a row of {cols}",
            delta.len()
        )));
    }
    let (g, values, sg) = match m.encoding {
        // Block by block, only the blocks that a delta reaches.
        Encoding::Nm(f) => return nm::add_to_row(&f, row, delta, residual),
        Encoding::Group(f) => (f.g, f.values, f.scale_groups),
    };
    s.w.resize(cols, 0.0);
    s.keep.resize(cols, false);
    group_decode_row(g, values, sg, row, &mut s.w, &mut s.keep)?;
    let mut dropped = 0;
    if residual.is_some() {
        // The exact sums, for the residual.
        s.after.clear();
        s.after.extend(s.w.iter().zip(delta).map(|(&w, &d)| w + d));
    }
    for ((w, &k), &d) in s.w.iter_mut().zip(&s.keep).zip(delta) {
        if d != 0.0 {
            if k {
                *w += d;
            } else {
                dropped += 1;
            }
        }
    }
    if let Some(i) = s.w.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "sparse row edit: the sum at column {i} is not finite"
        )));
    }
    // Encode into a copy: an encoder error must leave the row as it was.
    let mut out = row.to_vec();
    group_encode_row(g, values, sg, &mut out, &s.w)?;
    row.copy_from_slice(&out);
    if let Some(res) = residual {
        group_decode_row(g, values, sg, row, &mut s.w, &mut s.keep)?;
        for (c, (&want, &got)) in s.after.iter().zip(&s.w).enumerate() {
            if want != got {
                res.push((c as u32, want - got));
            }
        }
    }
    Ok(dropped)
}

/// Decodes an encoded row into `w` (pruned positions 0) and its kept positions into `keep`
/// (both `m.cols` long).
pub fn decode_row(m: &SparseMatrix, row: &[u8], w: &mut [f32], keep: &mut [bool]) -> Result<()> {
    match m.encoding {
        Encoding::Nm(f) => {
            nm::decode_row(&f, row, w)?;
            nm::kept_positions(&f, row, keep)
        }
        Encoding::Group(f) => group_decode_row(f.g, f.values, f.scale_groups, row, w, keep),
    }
}

// ---- group-sparse rows ----------------------------------------------------------------------
//
// A row of the group-sparse layout (see `group`'s module documentation): the count n of
// stored groups (u16), their indices (u8 or u16), ceil(n / sg) f16 scales, then the values of
// the stored groups as one stream cut into chunks of 32 weights. The edit keeps n and the
// indices; it requantizes each scale unit (sg consecutive stored groups) as the encoder
// does, which reproduces the bytes of units whose values did not change.

/// The stored groups of a group-sparse row (their numbers) and the byte offset of its scales.
fn group_row_parts(g: usize, row: &[u8], cols: usize) -> Result<(Vec<usize>, usize)> {
    let bad = |m: &str| Error::InvalidArgument(format!("group-sparse row: {m}"));
    let n_groups = cols / g;
    let n = u16::from_le_bytes(
        row.get(0..2)
            .ok_or_else(|| bad("shorter than its count"))?
            .try_into()
            .unwrap(),
    ) as usize;
    let wide = n_groups > 256;
    let idx_bytes = if wide { 2 * n } else { n };
    let idx = row
        .get(2..2 + idx_bytes)
        .ok_or_else(|| bad("shorter than its index"))?;
    let groups: Vec<usize> = if wide {
        idx.chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .collect()
    } else {
        idx.iter().map(|&b| b as usize).collect()
    };
    if groups.iter().any(|&k| k >= n_groups) || groups.windows(2).any(|p| p[0] >= p[1]) {
        return Err(bad("group numbers out of range or order"));
    }
    Ok((groups, 2 + idx_bytes))
}

fn group_decode_row(
    g: usize,
    values: Values,
    sg: usize,
    row: &[u8],
    w: &mut [f32],
    keep: &mut [bool],
) -> Result<()> {
    let (groups, scales_at) = group_row_parts(g, row, w.len())?;
    let n = groups.len();
    let values_at = scales_at + 2 * n.div_ceil(sg);
    let need = values_at + (n * g).div_ceil(group::CHUNK) * values.chunk_bytes();
    if row.len() != need {
        return Err(Error::InvalidArgument(format!(
            "group-sparse row is {} bytes, its {n} stored groups need {need}",
            row.len()
        )));
    }
    w.fill(0.0);
    keep.fill(false);
    for (k, &grp) in groups.iter().enumerate() {
        let at = scales_at + 2 * (k / sg);
        let d = f16_to_f32([row[at], row[at + 1]]);
        for e in 0..g {
            let q = group_level(values, &row[values_at..], k * g + e);
            w[grp * g + e] = d * q as f32;
            keep[grp * g + e] = true;
        }
    }
    Ok(())
}

/// The signed level of weight `p` of a row's value stream.
fn group_level(values: Values, stream: &[u8], p: usize) -> i32 {
    let (c, j) = (p / 32, p % 32);
    match values {
        Values::Q8 => stream[c * 32 + j] as i8 as i32,
        Values::Q4 => {
            let b = stream[c * 16 + j % 16];
            (if j < 16 { b & 0xF } else { b >> 4 }) as i32 - 8
        }
    }
}

fn set_group_level(values: Values, stream: &mut [u8], p: usize, q: i32) {
    let (c, j) = (p / 32, p % 32);
    match values {
        Values::Q8 => stream[c * 32 + j] = q as i8 as u8,
        Values::Q4 => {
            let b = &mut stream[c * 16 + j % 16];
            let v = (q + 8) as u8 & 0xF;
            *b = if j < 16 {
                (*b & 0xF0) | v
            } else {
                (*b & 0x0F) | (v << 4)
            };
        }
    }
}

/// Writes `s.w` at the stored groups of `row` (whose structure [`group_decode_row`] checked),
/// each scale unit quantized as `group::encode` does (Q4_0's rule for Q4, Q8_0's for Q8; a
/// test holds the two to the same bytes).
fn group_encode_row(g: usize, values: Values, sg: usize, row: &mut [u8], w: &[f32]) -> Result<()> {
    let (groups, scales_at) = group_row_parts(g, row, w.len())?;
    let n = groups.len();
    let values_at = scales_at + 2 * n.div_ceil(sg);
    let mut out = row.to_vec();
    let mut unit = Vec::with_capacity(sg * g);
    for (u, members) in groups.chunks(sg).enumerate() {
        unit.clear();
        for &grp in members {
            unit.extend_from_slice(&w[grp * g..(grp + 1) * g]);
        }
        let d = match values {
            Values::Q4 => {
                // The value of largest magnitude (the first on ties) maps to level 0.
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in &unit {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                max / -8.0
            }
            Values::Q8 => unit.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0,
        };
        let dh = f32_to_f16(d);
        if !f16_to_f32(dh).is_finite() {
            return Err(Error::InvalidArgument(
                "group-sparse row edit: a scale overflows f16".into(),
            ));
        }
        out[scales_at + 2 * u..scales_at + 2 * u + 2].copy_from_slice(&dh);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (e, &v) in unit.iter().enumerate() {
            let q = match values {
                Values::Q4 => ((v * id + 8.5) as i8).min(15) as i32 - 8,
                Values::Q8 => crate::quant::util::roundf(v * id) as i8 as i32,
            };
            set_group_level(values, &mut out[values_at..], u * sg * g + e, q);
        }
    }
    row.copy_from_slice(&out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::group::GroupFormat;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The row edit of a group-sparse matrix writes the bytes `group::encode` writes for the
    /// decoded matrix with the kept deltas added, and a zero delta writes nothing new.
    #[test]
    fn group_row_edit_matches_the_group_encoder() {
        let (rows, cols) = (6, 512);
        for (g, values, sg) in [
            (16, Values::Q4, 1),
            (16, Values::Q8, 1),
            (8, Values::Q4, 2),
            (4, Values::Q8, 4),
        ] {
            let fmt = GroupFormat::new(g, values)
                .unwrap()
                .with_scale_groups(sg)
                .unwrap();
            let mut w = noise(rows * cols, g as u64);
            group::prune(&mut w, cols, g, 0.5).unwrap();
            let bytes = group::encode(&w, rows, cols, fmt).unwrap();
            let m = SparseMatrix {
                encoding: Encoding::Group(fmt),
                rows,
                cols,
            };
            let dec = GroupMatrix::new(&bytes).unwrap().decode();
            let ranges = row_ranges(&m, &bytes).unwrap();
            let mut s = RowScratch::default();
            for (r, range) in ranges.iter().enumerate() {
                // Nothing added: the same bytes.
                let mut row = bytes[range.clone()].to_vec();
                let dropped = add_to_row(&m, &mut row, &vec![0.0; cols], &mut s, None).unwrap();
                assert_eq!(
                    (dropped, &row[..]),
                    (0, &bytes[range.clone()]),
                    "{fmt:?} row {r}"
                );
                // Deltas everywhere: kept ones as the encoder has them, pruned ones dropped.
                let delta: Vec<f32> = noise(cols, 100 + r as u64)
                    .iter()
                    .map(|v| v * 0.05)
                    .collect();
                let mut want = dec.clone();
                let mut pruned = 0;
                for (c, &d) in delta.iter().enumerate() {
                    let grp = &dec[r * cols + c / g * g..r * cols + c / g * g + g];
                    if grp.iter().any(|&v| v != 0.0) {
                        want[r * cols + c] += d;
                    } else {
                        pruned += 1;
                    }
                }
                let enc = group::encode(&want, rows, cols, fmt).unwrap();
                let want_ranges = row_ranges(&m, &enc).unwrap();
                let dropped = add_to_row(&m, &mut row, &delta, &mut s, None).unwrap();
                assert_eq!(dropped, pruned);
                assert_eq!(&row[..], &enc[want_ranges[r].clone()], "{fmt:?} row {r}");
            }
        }
    }

    /// Bad input: a delta of the wrong length, a group-sparse row whose count or group
    /// numbers do not fit, a sum that is not finite: an error, and the row unchanged.
    #[test]
    fn bad_rows_and_deltas_are_refused_unchanged() {
        let (rows, cols) = (2, 64);
        let fmt = GroupFormat::new(16, Values::Q8).unwrap();
        let mut w = noise(rows * cols, 7);
        group::prune(&mut w, cols, 16, 0.5).unwrap();
        let bytes = group::encode(&w, rows, cols, fmt).unwrap();
        let m = SparseMatrix {
            encoding: Encoding::Group(fmt),
            rows,
            cols,
        };
        let range = row_ranges(&m, &bytes).unwrap()[0].clone();
        let mut s = RowScratch::default();
        let row0 = bytes[range].to_vec();
        let cases: Vec<(Vec<u8>, Vec<f32>, &str)> = vec![
            (row0.clone(), vec![0.0; cols - 1], "deltas for a row"),
            (
                {
                    let mut r = row0.clone();
                    r[0] = 200;
                    r
                },
                vec![0.0; cols],
                "group-sparse row",
            ),
            (
                {
                    let mut r = row0.clone();
                    r[2] = 9;
                    r
                },
                vec![0.0; cols],
                "group numbers",
            ),
            (row0.clone(), vec![f32::INFINITY; cols], "not finite"),
        ];
        for (mut row, delta, msg) in cases {
            let before = row.clone();
            let e = add_to_row(&m, &mut row, &delta, &mut s, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(msg), "{e}");
            assert_eq!(row, before);
        }
    }
}
