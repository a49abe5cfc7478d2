//! N:M structured sparse weights: in every group of M consecutive input weights of a row, N
//! are kept (1 <= N <= M <= 16; 2:4 and 4:8 have SIMD kernels), quantized per block of kept
//! values in the manner of Q8_0 or Q4_0.
//!
//! # Byte layout
//!
//! Layout 2 (the `sparrow.sparse.NAME.layout` of a stored matrix, see `sparse::store`;
//! layout 1 had no value sums).
//!
//! A row of K inputs is a sequence of blocks, each covering `G` consecutive groups, where
//! `G = 32 / N` rounded down (so a block holds `B = G * N` kept values: 32 whenever N divides
//! 32, e.g. 2:4 and 4:8) and spans `S = G * M` inputs (64 for 2:4 and 4:8). K must be a
//! multiple of S. Every block has the same size, so a row is `K / S * block_bytes` bytes and a
//! matrix is rows x row_bytes, readable in place at any byte offset (no alignment is assumed).
//! The row starts with a head: the `K / S` block scales d (f16, little-endian), then the
//! `K / S` value sums (i16, little-endian: the sum of the block's signed quantized values,
//! `q_j` or `level - 8`, which the `vpdpbusd` kernels need, see below); then come the block
//! bodies.
//!
//! Kept values are numbered `j = t * N + r` for the r-th kept input (in increasing position)
//! of group t of the block. Each has an in-group index of `P = ceil(log2 M)` bits (2 for 2:4,
//! 3 for 4:8, 4 for M > 8, 0 for M = 1), stored in `P / 2` (rounded down) digit planes of
//! 2 bits per value, `D = ceil(B / 4)` bytes each (8 when B = 32), then, when P is odd, one
//! bit plane of `L = ceil(B / 8)` bytes (4 when B = 32) for the top bit. A block body:
//!
//! ```text
//! (P / 2) * D            digits  digit plane k (k = 0 first) holds bits 2k and 2k + 1 of
//!                                index j in bits 2 (j / D) and 2 (j / D) + 1 of byte j % D
//! then (P % 2) * L       top     bit P - 1 of index j in bit j / L of byte j % L
//! then, Q8: B bytes      i8 q_j                      w = d * q_j
//!       Q4: ceil(B/2)    level (0..15) of value j in the low nibble of byte j for
//!                        j < ceil(B/2), else in the high nibble of byte j - ceil(B/2);
//!                                                    w = d * (level - 8)
//! ```
//!
//! With its scale and sum, a 2:4 block with Q8 values is 44 bytes per 64 inputs (dense Q8_0:
//! 68), with Q4 28 (Q4_0: 36); 4:8 is 48 and 32.
//!
//! The planes are transposed so that SIMD kernels decode them without a table: when B = 32, a
//! digit plane is one u64 whose byte j % 8 holds index j's digit at bit 2 (j / 8), so an AVX2
//! kernel broadcasts it, shifts the four qwords by 0, 2, 4, 6 (`vpsrlvq`) and masks with 3 to
//! get the 32 digits one per byte (2:4 needs nothing else); the bit plane is one u32 whose
//! byte j % 4 holds bit j / 4, undone by a per-dword shift by 0..8 (`vpsrlvd`). NEON does the
//! same with per-byte shifts (`ushl`). The Q4 nibbles follow Q4_0 so that the 32 levels
//! unpack the way Q4_0's do.
//!
//! # Kernels
//!
//! `y[r] = dot(row r, x)`: the activations are quantized once per call ([`NmActs`]) to i8 in
//! blocks of S inputs, one f32 scale per block (`127 / amax`, ties to even, as
//! `kernels/act.rs` does for Q8_0; AVX2 where the CPU has it, with the same results), and
//! kept also biased to u8 (`q + 128`) for `vpdpbusd`, whose first operand is unsigned: its
//! kernels compute each block's `sum (q_x + 128) w` and take `128 sum_b` back with the stored
//! sum, where the others move the weights' signs onto the activations. Per block, the kept
//! weights are multiplied by the activations at their positions in exact i32 arithmetic; the
//! block's sum is scaled by `d_w * d_x` and accumulated in f32. The SIMD kernels gather the
//! activations a block needs with byte shuffles (`pshufb`, `vpermb` on x86, `tbl` on
//! aarch64) driven by the decoded indices, and accumulate in 8 (x86) or 4 (aarch64) f32
//! lanes: they differ from the portable kernel only in the order of the f32 additions (the
//! integer parts are exact), which the tests bound, except the `vpdpbusd` ones, which
//! subtract `d_w * d_x * 128 sum_b` in f32 (8 or 16 blocks at a time, off the per-block
//! path): their rounding is relative to the biased terms, which the tests bound as such.
//!
//! Kernels read rows they did not validate (a memory-mapped model), so no byte pattern makes
//! them panic or read outside the row; a corrupt row (an index >= M, indices not strictly
//! increasing within a group, or a value sum that is not the sum of the values) gives an
//! unspecified number. [`decode_row`] and [`kept_positions`] check the indices and the sums
//! and report such rows as errors.
//!
//! Batches (prompt processing) go through [`NmKernel::matmat`]: four tokens per pass over a
//! row (`tokens4`), and where the level has one (AVX-512, NEON, sdot) a tile of two rows
//! times four tokens (`tile2x4`), each block's indices and weights decoded once for the
//! four tokens and each token's activations loaded once for the rows. Every (row, token)
//! keeps its own accumulator and goes through the operations of the same level's one-row
//! kernel in the same order, so a batch gives, bit for bit, what that kernel gives token by
//! token.

use crate::error::{Error, Result};
use crate::kernels::Level;
use crate::quant::util::{f16_to_f32, f32_to_f16};

/// The byte layout this build reads and writes (stored as `sparrow.sparse.NAME.layout`).
pub const LAYOUT: u32 = 2;

/// Largest M supported (indices fit in 4 bits).
pub const MAX_M: usize = 16;
/// Kept values per block when N divides it.
pub const BLOCK_VALUES: usize = 32;

/// How the kept values are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NmValues {
    /// i8 per value, f16 scale per block: w = d * q (as Q8_0).
    Q8,
    /// 4-bit level per value, f16 scale per block: w = d * (level - 8) (as Q4_0).
    Q4,
}

/// An N:M sparse encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NmFormat {
    pub n: usize,
    pub m: usize,
    pub values: NmValues,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

impl NmFormat {
    /// A checked format: 1 <= n <= m <= [`MAX_M`].
    pub fn new(n: usize, m: usize, values: NmValues) -> Result<NmFormat> {
        let f = NmFormat { n, m, values };
        f.check()?;
        Ok(f)
    }

    /// Errors unless 1 <= n <= m <= [`MAX_M`].
    pub fn check(&self) -> Result<()> {
        if self.n == 0 || self.n > self.m || self.m > MAX_M {
            return Err(invalid(format!(
                "N:M format {}:{}: need 1 <= N <= M <= {MAX_M}",
                self.n, self.m
            )));
        }
        Ok(())
    }

    /// Groups per block (G).
    pub fn groups_per_block(&self) -> usize {
        BLOCK_VALUES / self.n
    }

    /// Kept values per block (B).
    pub fn block_values(&self) -> usize {
        self.groups_per_block() * self.n
    }

    /// Inputs per block (S): K must be a multiple of it.
    pub fn block_span(&self) -> usize {
        self.groups_per_block() * self.m
    }

    /// Bits per in-group index (P).
    pub fn index_bits(&self) -> usize {
        if self.m <= 1 {
            0
        } else {
            (usize::BITS - (self.m - 1).leading_zeros()) as usize
        }
    }

    /// Bytes per bit plane (L).
    pub fn plane_bytes(&self) -> usize {
        self.block_values().div_ceil(8)
    }

    /// Bytes per digit plane (D).
    pub fn digit_bytes(&self) -> usize {
        self.block_values().div_ceil(4)
    }

    /// Offset of the top-bit plane in a block's body (after the digit planes).
    fn top_offset(&self) -> usize {
        self.index_bits() / 2 * self.digit_bytes()
    }

    fn values_offset(&self) -> usize {
        self.top_offset() + self.index_bits() % 2 * self.plane_bytes()
    }

    fn value_bytes(&self) -> usize {
        match self.values {
            NmValues::Q8 => self.block_values(),
            NmValues::Q4 => self.block_values().div_ceil(2),
        }
    }

    /// Bytes per block: its f16 scale, its value sum and its body.
    pub fn block_bytes(&self) -> usize {
        4 + self.body_bytes()
    }

    /// Bytes of a block's body (index planes and values; scale and sum are in the row's
    /// head).
    fn body_bytes(&self) -> usize {
        self.values_offset() + self.value_bytes()
    }

    /// Bytes of a row of `k` inputs; errors unless the format is valid and `k` is a multiple
    /// of [`NmFormat::block_span`].
    pub fn row_bytes(&self, k: usize) -> Result<usize> {
        self.check()?;
        let s = self.block_span();
        if !k.is_multiple_of(s) {
            return Err(invalid(format!(
                "N:M {}:{}: row length {k} is not a multiple of the block span {s}",
                self.n, self.m
            )));
        }
        (k / s)
            .checked_mul(self.block_bytes())
            .ok_or_else(|| invalid(format!("N:M row length {k} overflows")))
    }
}

// ---- block fields --------------------------------------------------------------------------

/// In-group index of kept value `j` of a block.
#[inline]
fn index_of(f: &NmFormat, blk: &[u8], j: usize) -> usize {
    let (p, d, l) = (f.index_bits(), f.digit_bytes(), f.plane_bytes());
    let mut idx = 0;
    for k in 0..p / 2 {
        let byte = blk.get(k * d + j % d).copied().unwrap_or(0);
        idx |= (((byte >> (2 * (j / d))) & 3) as usize) << (2 * k);
    }
    if p % 2 == 1 {
        let byte = blk.get(f.top_offset() + j % l).copied().unwrap_or(0);
        idx |= (((byte >> (j / l)) & 1) as usize) << (p - 1);
    }
    idx
}

fn set_index(f: &NmFormat, blk: &mut [u8], j: usize, idx: usize) {
    let (p, d, l) = (f.index_bits(), f.digit_bytes(), f.plane_bytes());
    for k in 0..p / 2 {
        blk[k * d + j % d] |= (((idx >> (2 * k)) & 3) << (2 * (j / d))) as u8;
    }
    if p % 2 == 1 {
        blk[f.top_offset() + j % l] |= (((idx >> (p - 1)) & 1) << (j / l)) as u8;
    }
}

/// Signed quantized value j of a block.
#[inline]
fn value_of(f: &NmFormat, blk: &[u8], j: usize) -> i32 {
    let off = f.values_offset();
    match f.values {
        NmValues::Q8 => blk.get(off + j).map_or(0, |&b| b as i8 as i32),
        NmValues::Q4 => {
            let h = f.block_values().div_ceil(2);
            let (byte, shift) = if j < h { (j, 0) } else { (j - h, 4) };
            blk.get(off + byte)
                .map_or(0, |&b| ((b >> shift) & 0x0F) as i32 - 8)
        }
    }
}

fn set_value(f: &NmFormat, blk: &mut [u8], j: usize, q: i32) {
    let off = f.values_offset();
    match f.values {
        NmValues::Q8 => blk[off + j] = q as i8 as u8,
        NmValues::Q4 => {
            let h = f.block_values().div_ceil(2);
            let level = (q + 8) as u8 & 0x0F;
            if j < h {
                blk[off + j] |= level;
            } else {
                blk[off + j - h] |= level << 4;
            }
        }
    }
}

/// The scales (2 bytes per block), the value sums (2 bytes per block) and the block bodies
/// of a row whose length is a whole number of blocks.
fn split_row<'a>(
    f: &NmFormat,
    row: &'a [u8],
) -> (&'a [u8], &'a [u8], std::slice::ChunksExact<'a, u8>) {
    let nb = row.len() / f.block_bytes();
    let (head, bodies) = row.split_at(4 * nb);
    let (scales, sums) = head.split_at(2 * nb);
    (scales, sums, bodies.chunks_exact(f.body_bytes()))
}

/// The f32 scales of a row's head.
fn scales_of(head: &[u8]) -> impl Iterator<Item = f32> + '_ {
    head.chunks_exact(2).map(|h| f16_to_f32([h[0], h[1]]))
}

// ---- encoder and decoder -------------------------------------------------------------------

/// Encodes one row keeping, in each group, the N weights of largest magnitude (ties go to the
/// lower position). `out` must be `row_bytes(w.len())` long.
pub fn encode_row(f: &NmFormat, w: &[f32], out: &mut [u8]) -> Result<()> {
    f.row_bytes(w.len())?;
    let mut keep = vec![false; w.len()];
    let mut order: Vec<usize> = Vec::with_capacity(f.m);
    for (g, grp) in w.chunks_exact(f.m).enumerate() {
        order.clear();
        order.extend(0..f.m);
        // Stable: equal magnitudes keep their position order.
        order.sort_by(|&a, &b| grp[b].abs().total_cmp(&grp[a].abs()));
        for &i in &order[..f.n] {
            keep[g * f.m + i] = true;
        }
    }
    encode_row_with_mask(f, w, &keep, out)
}

/// Encodes one row keeping the weights where `keep` is true (exactly N per group), for
/// pruning methods that choose the positions themselves (e.g. activation-aware).
pub fn encode_row_with_mask(f: &NmFormat, w: &[f32], keep: &[bool], out: &mut [u8]) -> Result<()> {
    let need = f.row_bytes(w.len())?;
    if keep.len() != w.len() {
        return Err(invalid(format!(
            "N:M keep-mask has {} entries for a row of {}",
            keep.len(),
            w.len()
        )));
    }
    if out.len() != need {
        return Err(invalid(format!(
            "N:M output row is {} bytes, the format needs {need}",
            out.len()
        )));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!("N:M encode: weight {i} is not finite")));
    }
    for (g, km) in keep.chunks_exact(f.m).enumerate() {
        let c = km.iter().filter(|&&k| k).count();
        if c != f.n {
            return Err(invalid(format!(
                "N:M {}:{} keep-mask: group {g} keeps {c} weights",
                f.n, f.m
            )));
        }
    }
    let (s, bv) = (f.block_span(), f.block_values());
    let mut vals = vec![0f32; bv];
    let nb = w.len() / s;
    let (head, bodies) = out.split_at_mut(4 * nb);
    let (scales, sums) = head.split_at_mut(2 * nb);
    for ((((wb, kb), blk), dh), sh) in w
        .chunks_exact(s)
        .zip(keep.chunks_exact(s))
        .zip(bodies.chunks_exact_mut(f.body_bytes()))
        .zip(scales.chunks_exact_mut(2))
        .zip(sums.chunks_exact_mut(2))
    {
        blk.fill(0);
        let mut j = 0;
        for (i, (&v, &k)) in wb.iter().zip(kb).enumerate() {
            if k {
                set_index(f, blk, j, i % f.m);
                vals[j] = v;
                j += 1;
            }
        }
        let d = quantize_block(f, &vals, blk)?;
        dh.copy_from_slice(&d);
        sh.copy_from_slice(&block_sum(f, blk).to_le_bytes());
    }
    Ok(())
}

/// The sum of a block's signed quantized values (`q_j`, or `level - 8`), as stored in the
/// row's head: |sum| <= 32 * 127 fits an i16.
fn block_sum(f: &NmFormat, blk: &[u8]) -> i16 {
    (0..f.block_values())
        .map(|j| value_of(f, blk, j))
        .sum::<i32>() as i16
}

/// Quantizes the kept values of a block into `blk`, returns the f16 scale. The levels are
/// computed with the stored (f16-rounded) scale, so that the error bound is that scale's.
fn quantize_block(f: &NmFormat, vals: &[f32], blk: &mut [u8]) -> Result<[u8; 2]> {
    let (d, qmin, qmax) = match f.values {
        NmValues::Q8 => (
            vals.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0,
            -127,
            127,
        ),
        NmValues::Q4 => {
            // Q4_0's choice: the value of largest magnitude maps to level 0 (q = -8).
            let max = vals
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            (max / -8.0, -8, 7)
        }
    };
    let dh = f32_to_f16(d);
    let dq = f16_to_f32(dh);
    if !dq.is_finite() {
        return Err(invalid("N:M encode: a block scale overflows f16"));
    }
    let id = if dq != 0.0 { 1.0 / dq } else { 0.0 };
    for (j, &v) in vals.iter().enumerate() {
        let q = ((v * id).round() as i32).clamp(qmin, qmax);
        set_value(f, blk, j, q);
    }
    Ok(dh)
}

/// Checks the row length and the indices of every block; returns the number of blocks.
fn check_row(f: &NmFormat, row: &[u8], k: usize) -> Result<usize> {
    check_len(f, row, k)?;
    let (_, sums, bodies) = split_row(f, row);
    for ((b, blk), sh) in bodies.enumerate().zip(sums.chunks_exact(2)) {
        check_block(f, b, blk, [sh[0], sh[1]])?;
    }
    Ok(k / f.block_span())
}

/// Checks that a row of `k` inputs is `row.len()` bytes.
fn check_len(f: &NmFormat, row: &[u8], k: usize) -> Result<()> {
    let need = f.row_bytes(k)?;
    if row.len() != need {
        return Err(invalid(format!(
            "N:M row is {} bytes, {k} inputs need {need}",
            row.len()
        )));
    }
    Ok(())
}

/// Checks block `b` of a row (its body and stored value sum): the sum matches the values,
/// and the indices of every group are increasing and below M.
fn check_block(f: &NmFormat, b: usize, blk: &[u8], sum: [u8; 2]) -> Result<()> {
    let (stored, sum) = (i16::from_le_bytes(sum), block_sum(f, blk));
    if stored != sum {
        return Err(invalid(format!(
            "N:M row: block {b}: stored value sum {stored}, the values sum to {sum}"
        )));
    }
    for t in 0..f.groups_per_block() {
        let mut prev: Option<usize> = None;
        for r in 0..f.n {
            let idx = index_of(f, blk, t * f.n + r);
            if idx >= f.m || prev.is_some_and(|p| idx <= p) {
                return Err(invalid(format!(
                    "N:M row: block {b} group {t}: index {idx} is out of order or >= {}",
                    f.m
                )));
            }
            prev = Some(idx);
        }
    }
    Ok(())
}

/// Decodes a row of `out.len()` inputs to f32 (pruned positions are 0).
pub fn decode_row(f: &NmFormat, row: &[u8], out: &mut [f32]) -> Result<()> {
    check_row(f, row, out.len())?;
    let (head, _, bodies) = split_row(f, row);
    for ((blk, ob), d) in bodies
        .zip(out.chunks_exact_mut(f.block_span()))
        .zip(scales_of(head))
    {
        ob.fill(0.0);
        for j in 0..f.block_values() {
            let pos = (j / f.n) * f.m + index_of(f, blk, j);
            ob[pos] = d * value_of(f, blk, j) as f32;
        }
    }
    Ok(())
}

/// Adds `delta` (one value per input of the row) to the kept values of the encoded row `row`
/// in place, block by block: a block whose span holds no nonzero delta keeps its bytes, the
/// others are decoded, summed at their kept positions and quantized again with the same
/// positions (decoding and quantizing a block gives back its bytes, so this is what
/// re-encoding the whole row would write). Nonzero deltas on pruned positions are dropped
/// and counted (the return value). With `residual`, pushes `(column, exact - stored)` for
/// every column whose stored value is not the exact sum, in column order.
///
/// On an error (a row of the wrong length, an edited block that does not decode, a sum that
/// is not finite, a scale that overflows f16) `row` is unchanged. Blocks no delta reaches are
/// neither decoded nor checked.
pub fn add_to_row(
    f: &NmFormat,
    row: &mut [u8],
    delta: &[f32],
    mut residual: Option<&mut Vec<(u32, f32)>>,
) -> Result<usize> {
    check_len(f, row, delta.len())?;
    let (s, bv, bb) = (f.block_span(), f.block_values(), f.body_bytes());
    let nb = delta.len() / s;
    // Edit a copy: an error must leave the row as it was.
    let mut out = row.to_vec();
    let (head, bodies) = out.split_at_mut(4 * nb);
    let (scales, sums) = head.split_at_mut(2 * nb);
    let (mut pos, mut vals) = (vec![0usize; bv], vec![0f32; bv]);
    let (mut exact, mut got) = (vec![0f32; s], vec![0f32; s]);
    let mut dropped = 0;
    for b in 0..nb {
        let ds = &delta[b * s..(b + 1) * s];
        if ds.iter().all(|&d| d == 0.0) {
            continue;
        }
        let blk = &mut bodies[b * bb..(b + 1) * bb];
        // Only the blocks edited are decoded, so only they are checked.
        check_block(f, b, blk, [sums[2 * b], sums[2 * b + 1]])?;
        let d = f16_to_f32([scales[2 * b], scales[2 * b + 1]]);
        exact.copy_from_slice(ds);
        for j in 0..bv {
            pos[j] = (j / f.n) * f.m + index_of(f, blk, j);
            let v = d * value_of(f, blk, j) as f32;
            exact[pos[j]] += v;
            vals[j] = v + ds[pos[j]];
        }
        // Nonzero deltas off the kept positions (the indices are distinct within a group).
        let kept_nonzero = pos.iter().filter(|&&p| ds[p] != 0.0).count();
        dropped += ds.iter().filter(|&&d| d != 0.0).count() - kept_nonzero;
        if let Some(j) = vals.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!(
                "sparse row edit: the sum at column {} is not finite",
                b * s + pos[j]
            )));
        }
        blk[f.values_offset()..].fill(0);
        let dh = quantize_block(f, &vals, blk)?;
        scales[2 * b..2 * b + 2].copy_from_slice(&dh);
        sums[2 * b..2 * b + 2].copy_from_slice(&block_sum(f, blk).to_le_bytes());
        if let Some(res) = residual.as_deref_mut() {
            let dq = f16_to_f32(dh);
            got.fill(0.0);
            for (j, &p) in pos.iter().enumerate() {
                got[p] = dq * value_of(f, blk, j) as f32;
            }
            for (c, (&want, &got)) in exact.iter().zip(&got).enumerate() {
                if want != got {
                    res.push(((b * s + c) as u32, want - got));
                }
            }
        }
    }
    row.copy_from_slice(&out);
    Ok(dropped)
}

/// The kept positions of a row of `out.len()` inputs.
pub fn kept_positions(f: &NmFormat, row: &[u8], out: &mut [bool]) -> Result<()> {
    check_row(f, row, out.len())?;
    for (blk, ob) in split_row(f, row)
        .2
        .zip(out.chunks_exact_mut(f.block_span()))
    {
        ob.fill(false);
        for j in 0..f.block_values() {
            ob[(j / f.n) * f.m + index_of(f, blk, j)] = true;
        }
    }
    Ok(())
}

/// The scale of every block of a row (for tests and tools).
pub fn block_scales(f: &NmFormat, row: &[u8]) -> Vec<f32> {
    scales_of(split_row(f, row).0).collect()
}

// ---- activations ---------------------------------------------------------------------------

/// A row of activations quantized for one format: i8 in blocks of the format's span, one
/// f32 scale per block. Reused across calls to avoid allocations.
#[derive(Clone, Debug, Default)]
pub struct NmActs {
    span: usize,
    /// Blocks in the row.
    nb: usize,
    q: Vec<i8>,
    /// The same values biased to unsigned (`q + 128`), for `vpdpbusd`.
    u: Vec<u8>,
    /// The `nb` block scales, then zeros up to a multiple of 8.
    d: Vec<f32>,
}

impl NmActs {
    pub fn new() -> NmActs {
        NmActs::default()
    }

    /// Quantizes `x` for format `f` (`x.len()` a multiple of the block span).
    pub fn quantize(&mut self, f: &NmFormat, x: &[f32]) -> Result<()> {
        f.row_bytes(x.len())?;
        let s = f.block_span();
        self.span = s;
        self.q.resize(x.len(), 0);
        self.u.resize(x.len(), 0);
        self.d.clear();
        self.nb = x.len() / s;
        for ((xb, qb), ub) in x
            .chunks_exact(s)
            .zip(self.q.chunks_exact_mut(s))
            .zip(self.u.chunks_exact_mut(s))
        {
            #[cfg(target_arch = "x86_64")]
            if s == 64 && x86::has_avx2() {
                // SAFETY: AVX2 was detected; the chunks are 64 long.
                self.d.push(unsafe { x86::quantize64(xb, qb, ub) });
                continue;
            }
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            for ((o, u), &v) in qb.iter_mut().zip(ub.iter_mut()).zip(xb) {
                // NaN becomes 0; the clamp only matters for non-finite input.
                *o = ((v * id).round_ties_even() as i32).clamp(-127, 127) as i8;
                *u = *o as u8 ^ 0x80;
            }
            self.d.push(amax / 127.0);
        }
        // Zeros up to a multiple of 8, so that the x86 kernels load the scales 8 at a time.
        self.d.resize(self.nb.div_ceil(8) * 8, 0.0);
        Ok(())
    }

    /// Inputs in the row.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// The quantized values.
    pub fn values(&self) -> &[i8] {
        &self.q
    }

    /// The block scales.
    pub fn scales(&self) -> &[f32] {
        &self.d[..self.nb]
    }

    /// The activations the kernels see, as f32 (`d * q`).
    pub fn decoded(&self) -> Vec<f32> {
        if self.span == 0 {
            return Vec::new();
        }
        self.q
            .chunks_exact(self.span)
            .zip(self.scales())
            .flat_map(|(qb, &d)| qb.iter().map(move |&q| d * q as f32))
            .collect()
    }
}

// ---- kernels -------------------------------------------------------------------------------

/// One row: the caller guarantees `row.len() == f.row_bytes(a.len())`, that `a` was quantized
/// for `f`, and that the CPU has the kernel's features.
type DotFn = unsafe fn(&NmFormat, &[u8], &NmActs) -> f32;
/// Four rows at a time sharing the activation loads, over the four quarters of a matrix of
/// `4 q` rows of `rb` bytes: `y[r + i q] = dot(row r + i q, a)` for r < q and i < 4, rows
/// r, r + q, r + 2q, r + 3q together (four sequential streams, which the hardware
/// prefetchers follow; four neighbouring rows read side by side are not a stream to them,
/// see kernels/matmul.rs). The caller guarantees `w.len() == 4 q rb`, `y.len() == 4 q` and
/// `rb == f.row_bytes(a.len())`, besides the `DotFn` contract.
type Rows4Fn = unsafe fn(&NmFormat, &[u8], usize, usize, &NmActs, &mut [f32]);

/// The loop of a [`Rows4Fn`] (`w`, `rb`, `q`, `y` its arguments) around a four-row body
/// that maps the rows' start pointers `p` to their four results.
#[allow(unused_macros)]
macro_rules! quarters {
    ($w:expr, $rb:expr, $q:expr, $y:expr, |$p:ident| $body:expr) => {{
        let (w, rb, q, y) = ($w.as_ptr(), $rb, $q, $y.as_mut_ptr());
        for r in 0..q {
            let $p = [
                w.add(r * rb),
                w.add((r + q) * rb),
                w.add((r + 2 * q) * rb),
                w.add((r + 3 * q) * rb),
            ];
            let v: [f32; 4] = $body;
            for (i, v) in v.into_iter().enumerate() {
                *y.add(r + i * q) = v;
            }
        }
    }};
}
/// One row against four tokens' activations (`[token]`), the row's blocks decoded once for
/// the four: the four `DotFn` results, bit for bit; same contract for every token.
type Tokens4Fn = unsafe fn(&NmFormat, &[u8], [&NmActs; 4]) -> [f32; 4];
/// Two rows against four tokens (`[row][token]`): the tile of a batch, sharing the weight
/// decoding across tokens and the activation loads across rows; the `DotFn` results.
type Tile2x4Fn = unsafe fn(&NmFormat, [&[u8]; 2], [&NmActs; 4]) -> [[f32; 4]; 2];

/// The portable kernel: per block, the exact integer dot of the kept values and the
/// activations at their positions, times `d_w * d_x`, summed in block order.
pub fn generic_dot(f: &NmFormat, row: &[u8], a: &NmActs) -> f32 {
    let s = f.block_span();
    let (head, _, bodies) = split_row(f, row);
    let mut sum = 0f32;
    for (((blk, xq), &dx), dw) in bodies
        .zip(a.q.chunks_exact(s))
        .zip(&a.d)
        .zip(scales_of(head))
    {
        let mut isum = 0i32;
        for j in 0..f.block_values() {
            let pos = (j / f.n) * f.m + index_of(f, blk, j);
            let x = xq.get(pos).copied().unwrap_or(0) as i32;
            isum += value_of(f, blk, j) * x;
        }
        sum += isum as f32 * (dw * dx);
    }
    sum
}

unsafe fn generic_dot_entry(f: &NmFormat, row: &[u8], a: &NmActs) -> f32 {
    generic_dot(f, row, a)
}

/// [`generic_dot`] of one row with four tokens' activations (of one length), each index and
/// value decoded once for the four: the same four sums, bit for bit.
pub fn generic_dot4(f: &NmFormat, row: &[u8], a: [&NmActs; 4]) -> [f32; 4] {
    let s = f.block_span();
    let (head, _, bodies) = split_row(f, row);
    let nb = a.iter().map(|a| a.q.len() / s.max(1)).min().unwrap_or(0);
    let mut sum = [0f32; 4];
    for (b, (blk, dw)) in bodies.zip(scales_of(head)).take(nb).enumerate() {
        let mut isum = [0i32; 4];
        for j in 0..f.block_values() {
            let pos = (j / f.n) * f.m + index_of(f, blk, j);
            let w = value_of(f, blk, j);
            // A corrupt index past the block reads 0, as in `generic_dot`.
            if pos < s {
                for (i, a) in isum.iter_mut().zip(a) {
                    *i += w * a.q[b * s + pos] as i32;
                }
            }
        }
        for ((sum, i), a) in sum.iter_mut().zip(isum).zip(a) {
            *sum += i as f32 * (dw * a.d[b]);
        }
    }
    sum
}

unsafe fn generic_dot4_entry(f: &NmFormat, row: &[u8], a: [&NmActs; 4]) -> [f32; 4] {
    generic_dot4(f, row, a)
}

/// Rows per chunk of [`NmKernel::matmat`]: their weights stay in L1 or L2 while every group
/// of four tokens goes past them (64 measured a little faster than 16 on Zen 4).
const MATMAT_ROWS: usize = 64;

/// A matrix-vector kernel for one format, chosen for a CPU level.
#[derive(Clone, Copy)]
pub struct NmKernel {
    /// Arch, op and format: `avx2_dot_nm24_q8`, `generic_dot_nm`.
    pub name: &'static str,
    pub level: Level,
    pub format: NmFormat,
    dot: DotFn,
    rows4: Option<Rows4Fn>,
    tokens4: Tokens4Fn,
    tile2x4: Option<Tile2x4Fn>,
}

impl NmKernel {
    /// The kernel for `f` at [`Level::selected`] (the best the CPU has, capped by
    /// `SPARROW_KERNELS`).
    pub fn get(f: NmFormat) -> Result<NmKernel> {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        NmKernel::for_level(f, *LEVEL.get_or_init(Level::selected))
    }

    /// The kernel for `f` at `level` or the highest level below it that has one; a level the
    /// CPU lacks gives the portable kernel.
    pub fn for_level(f: NmFormat, level: Level) -> Result<NmKernel> {
        NmKernel::for_level_with(f, level, true)
    }

    /// Every kernel for `f` that this CPU can run: [`NmKernel::for_level`] at each detected
    /// level, and the variants that a level chooses between by CPU features outside the
    /// level (x86: the AVX-512 kernels without VBMI), for tests and benchmarks.
    #[doc(hidden)]
    pub fn variants(f: NmFormat) -> Result<Vec<NmKernel>> {
        let mut v: Vec<NmKernel> = Vec::new();
        for level in Level::detected() {
            for alt in [true, false] {
                let k = NmKernel::for_level_with(f, level, alt)?;
                if !v.iter().any(|o| o.name == k.name) {
                    v.push(k);
                }
            }
        }
        Ok(v)
    }

    /// `alt`: take the variants that need features beyond the level where the CPU has them.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn for_level_with(f: NmFormat, level: Level, alt: bool) -> Result<NmKernel> {
        f.check()?;
        let generic = NmKernel {
            name: "generic_dot_nm",
            level: Level::Generic,
            format: f,
            dot: generic_dot_entry,
            rows4: None,
            tokens4: generic_dot4_entry,
            tile2x4: None,
        };
        if level == Level::Generic || !Level::detected().contains(&level) {
            return Ok(generic);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = x86::kernel(f, level, alt) {
            return Ok(k);
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(k) = arm::kernel(f, level) {
            return Ok(k);
        }
        Ok(generic)
    }

    /// Whether the kernel has a four-row variant (used by [`NmKernel::matvec`]).
    pub fn has_rows4(&self) -> bool {
        self.rows4.is_some()
    }

    fn check(&self, row_len: usize, a: &NmActs) -> Result<()> {
        let need = self.format.row_bytes(a.len())?;
        if a.span != self.format.block_span() && !a.is_empty() {
            return Err(invalid("N:M activations were quantized for another format"));
        }
        if row_len != need {
            return Err(invalid(format!(
                "N:M row is {row_len} bytes, {} inputs need {need}",
                a.len()
            )));
        }
        Ok(())
    }

    /// One row's dot product with the activations.
    pub fn dot(&self, row: &[u8], a: &NmActs) -> Result<f32> {
        self.check(row.len(), a)?;
        // SAFETY: lengths checked above; the kernel's level was detected on this CPU.
        Ok(unsafe { (self.dot)(&self.format, row, a) })
    }

    /// `y[r] = dot(row r, a)` for a matrix of `y.len()` rows stored one after the other.
    pub fn matvec(&self, w: &[u8], a: &NmActs, y: &mut [f32]) -> Result<()> {
        self.matvec_impl(w, a, y, true)
    }

    /// [`NmKernel::matvec`] one row at a time (no four-row variant), for comparisons.
    pub fn matvec_by_row(&self, w: &[u8], a: &NmActs, y: &mut [f32]) -> Result<()> {
        self.matvec_impl(w, a, y, false)
    }

    fn matvec_impl(&self, w: &[u8], a: &NmActs, y: &mut [f32], rows4: bool) -> Result<()> {
        let rb = self.format.row_bytes(a.len())?;
        self.check(rb, a)?;
        if Some(w.len()) != rb.checked_mul(y.len()) {
            return Err(invalid(format!(
                "N:M matrix is {} bytes, {} rows of {rb} need {}",
                w.len(),
                y.len(),
                rb.saturating_mul(y.len())
            )));
        }
        if rb == 0 {
            y.fill(0.0);
            return Ok(());
        }
        let f = &self.format;
        let row = |r: usize| &w[r * rb..(r + 1) * rb];
        let mut done = 0;
        if let (true, Some(r4)) = (rows4, self.rows4) {
            let q = y.len() / 4;
            // SAFETY: 4 q rows of rb bytes, checked against the activations above; the
            // kernel's level was detected on this CPU.
            unsafe { r4(f, &w[..4 * q * rb], rb, q, a, &mut y[..4 * q]) };
            done = 4 * q;
        }
        for (r, out) in y.iter_mut().enumerate().skip(done) {
            // SAFETY: as above.
            *out = unsafe { (self.dot)(f, row(r), a) };
        }
        Ok(())
    }
}

impl NmKernel {
    /// Whether the kernel has a two-row tile for batches (used by [`NmKernel::matmat`]).
    pub fn has_tile(&self) -> bool {
        self.tile2x4.is_some()
    }

    /// `y[t * rows + r] = dot(row r, acts[t])` for a matrix of `rows = y.len() / acts.len()`
    /// rows stored one after the other: each (row, token) the bits of [`NmKernel::matvec`]
    /// for that token. Tokens go four at a time through the kernel's tiles (each weight block
    /// decoded once for the four), over chunks of rows that stay in the caches; the last
    /// `acts.len() % 4` tokens through [`NmKernel::matvec`].
    pub fn matmat(&self, w: &[u8], acts: &[NmActs], y: &mut [f32]) -> Result<()> {
        self.matmat_impl(w, acts, y, true)
    }

    /// [`NmKernel::matmat`] with one-row calls only (no two-row tile), for comparisons.
    pub fn matmat_by_row(&self, w: &[u8], acts: &[NmActs], y: &mut [f32]) -> Result<()> {
        self.matmat_impl(w, acts, y, false)
    }

    fn matmat_impl(&self, w: &[u8], acts: &[NmActs], y: &mut [f32], tile: bool) -> Result<()> {
        let Some(a0) = acts.first() else {
            return if y.is_empty() {
                Ok(())
            } else {
                Err(invalid("N:M matmat: outputs for no tokens"))
            };
        };
        let rb = self.format.row_bytes(a0.len())?;
        for a in acts {
            if a.len() != a0.len() {
                return Err(invalid(format!(
                    "N:M matmat: activation rows of {} and {} inputs",
                    a0.len(),
                    a.len()
                )));
            }
            self.check(rb, a)?;
        }
        let n = acts.len();
        let rows = y.len() / n;
        if y.len() != n * rows || Some(w.len()) != rb.checked_mul(rows) {
            return Err(invalid(format!(
                "N:M matmat: {} bytes of rows of {rb}, {} outputs for {n} tokens",
                w.len(),
                y.len()
            )));
        }
        if rb == 0 {
            y.fill(0.0);
            return Ok(());
        }
        let f = &self.format;
        let row = |r: usize| &w[r * rb..(r + 1) * rb];
        let quads = n / 4;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + MATMAT_ROWS).min(rows);
            for g in 0..quads {
                let a4 = [
                    &acts[4 * g],
                    &acts[4 * g + 1],
                    &acts[4 * g + 2],
                    &acts[4 * g + 3],
                ];
                let mut r = r0;
                if let (true, Some(tile)) = (tile, self.tile2x4) {
                    while r + 2 <= r1 {
                        // SAFETY: every row is rb bytes and every activation row a0.len()
                        // long, checked against the format above; the kernel's level was
                        // detected on this CPU.
                        let v = unsafe { tile(f, [row(r), row(r + 1)], a4) };
                        for (j, v) in v.into_iter().enumerate() {
                            for (i, v) in v.into_iter().enumerate() {
                                y[(4 * g + i) * rows + r + j] = v;
                            }
                        }
                        r += 2;
                    }
                }
                for r in r..r1 {
                    // SAFETY: as above.
                    let v = unsafe { (self.tokens4)(f, row(r), a4) };
                    for (i, v) in v.into_iter().enumerate() {
                        y[(4 * g + i) * rows + r] = v;
                    }
                }
            }
            r0 = r1;
        }
        for (t, a) in acts.iter().enumerate().skip(4 * quads) {
            self.matvec(w, a, &mut y[t * rows..(t + 1) * rows])?;
        }
        Ok(())
    }
}

/// `y = W x` for `y.len()` rows of `x.len()` inputs, with the kernel of [`NmKernel::get`].
pub fn matvec(f: &NmFormat, w: &[u8], x: &[f32], y: &mut [f32]) -> Result<()> {
    let k = NmKernel::get(*f)?;
    let mut a = NmActs::new();
    a.quantize(f, x)?;
    k.matvec(w, &a, y)
}

/// [`NmFormat::block_bytes`] of a SIMD kernel's format (2:4 or 4:8, `m` 4 or 8) as a
/// constant: the general one divides, which costs more than a short row's kernel call.
#[allow(dead_code)]
#[inline(always)]
fn simd_block_bytes(f: &NmFormat, m: usize, q4: bool) -> usize {
    let bb = 4 + if m == 8 { 12 } else { 8 } + if q4 { 16 } else { 32 };
    debug_assert_eq!(bb, f.block_bytes());
    bb
}

/// The SIMD kernels' shape: 2:4 or 4:8 (32 kept values over 64 inputs per block, every
/// 16-input chunk holding 8 of them).
#[allow(dead_code)]
fn simd_shape(f: &NmFormat) -> bool {
    matches!((f.n, f.m), (2, 4) | (4, 8))
}

// ---- x86_64 --------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 (+FMA, F16C) kernels for 2:4 and 4:8, the same bodies with AVX-512 VNNI's
    //! `vpdpbusd` (on 256-bit vectors) at `Level::Avx512`, and there, where the CPU also has
    //! AVX512-VBMI (checked here, on top of the level), 512-bit kernels holding two rows per
    //! vector with a `vpermb` gather ([`body_pairs`]).
    //!
    //! Per block: the index planes are decoded to one in-group index per byte (see the module
    //! doc). AVX2 and VNNI: the 64 activations are loaded as two vectors and rearranged into
    //! `P = [x0..16 | x32..48]` and `Q = [x16..32 | x48..64]` (one `vperm2i128` each, shared by
    //! the rows of a `rows4` call); kept values 0..8 of a 128-bit lane come from P's lane and
    //! 8..16 from Q's, so two `pshufb`s whose controls are the decoded in-chunk positions
    //! (with 0x80, which gives 0, in the other half) and an OR give the 32 activations in the
    //! kept values' order. The dot is then Q8_0's: `maddubs(|w|, sign(x, w))`, `madd` with
    //! ones (or `vpdpbusd` from zero), 8 exact i32 lanes, fused-multiply-added with
    //! `d_w * d_x`, which is computed for 8 blocks at a time (AVX2: one `vcvtph2ps` of the row
    //! head's scales, one multiply by the activations' scales) or 16 (AVX-512, in 512-bit
    //! vectors with masked loads) and broadcast from the stack. The `vpdpbusd` bodies subtract
    //! the bias's `d_w * d_x * 128 sum_b` at the same time, the 16 blocks' products folded to
    //! 8 lanes: per block, a correction added to the dot (a broadcast to its accumulator, or
    //! an add) cost 15% of an in-cache product on Zen 4, whose kernel is bound by the
    //! operations per block.
    //!
    //! The VBMI kernels replaced 256-bit ones with a `vpermi2b` gather (two port-5 uops on
    //! Intel): on an Intel Xeon (Sapphire Rapids class) the 2:4 Q8 product went from 1.0-1.1x
    //! to about 1.5x of dense Q8_0 in the caches. They are not measured on Zen 4, which
    //! splits 512-bit operations in two.
    //!
    //! Safety model: every function here is `unsafe` with `#[target_feature]`; [`kernel`]
    //! returns them only for a level that `Level::detected` reported (and the VBMI ones only
    //! where `is_x86_feature_detected!("avx512vbmi")` holds), and `NmKernel` calls them only
    //! after checking the row and activation lengths.

    use super::{NmActs, NmFormat, NmKernel};
    use crate::kernels::Level;
    use std::arch::x86_64::*;

    /// AVX2: `maddubs` + `madd`, `pshufb` gather.
    const AVX2: u8 = 0;
    /// AVX-512 VNNI on 256 bits: `vpdpbusd`, `pshufb` gather.
    const VNNI: u8 = 1;
    /// VNNI with AVX512-VBMI, 512-bit, two rows per vector: `vpdpbusd`, `vpermb` gather.
    const VBMI: u8 = 2;

    /// In-chunk position offsets of the kept values of one 128-bit lane, plus 0x80 in the
    /// half that the other shuffle fills (`q_half`: the control for Q).
    const fn ctrl(n: usize, m: usize, q_half: bool) -> [u8; 32] {
        let mut out = [0u8; 32];
        let mut j = 0;
        while j < 32 {
            let goff = ((j / n) % (16 / m)) * m;
            let second = j % 16 >= 8;
            let zero = if q_half { !second } else { second };
            out[j] = (goff + if zero { 0x80 } else { 0 }) as u8;
            j += 1;
        }
        out
    }
    static CTRL24: [[u8; 32]; 2] = [ctrl(2, 4, false), ctrl(2, 4, true)];
    static CTRL48: [[u8; 32]; 2] = [ctrl(4, 8, false), ctrl(4, 8, true)];

    /// Block positions of the groups of kept values 0..32: `(j / n) * m`.
    const fn goff(n: usize, m: usize) -> [u8; 32] {
        let mut out = [0u8; 32];
        let mut j = 0;
        while j < 32 {
            out[j] = ((j / n) * m) as u8;
            j += 1;
        }
        out
    }
    static GOFF24: [u8; 32] = goff(2, 4);
    static GOFF48: [u8; 32] = goff(4, 8);

    /// One bit plane (4 bytes at `p`) as one bit per byte: byte j gets bit j / 4 of byte j % 4.
    #[inline(always)]
    unsafe fn plane(p: *const u8) -> __m256i {
        let v = _mm256_set1_epi32((p as *const i32).read_unaligned());
        let s = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_and_si256(s, _mm256_set1_epi8(1))
    }

    /// The digits of one digit plane (8 bytes at `p`), one per byte in bits 0 and 1, the
    /// bits above them unspecified.
    #[inline(always)]
    unsafe fn digits_raw(p: *const u8) -> __m256i {
        let v = _mm256_set1_epi64x((p as *const i64).read_unaligned());
        _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 2, 4, 6))
    }

    /// The two shuffle controls of a block whose index planes start at `p`.
    #[inline(always)]
    unsafe fn controls<const M: usize>(p: *const u8) -> (__m256i, __m256i) {
        let mut idx = _mm256_and_si256(digits_raw(p), _mm256_set1_epi8(3));
        let c = if M == 8 {
            idx = _mm256_add_epi8(idx, _mm256_slli_epi16::<2>(plane(p.add(8))));
            &CTRL48
        } else {
            &CTRL24
        };
        let cp = _mm256_loadu_si256(c[0].as_ptr() as *const __m256i);
        let cq = _mm256_loadu_si256(c[1].as_ptr() as *const __m256i);
        (_mm256_add_epi8(idx, cp), _mm256_add_epi8(idx, cq))
    }

    /// `vpmultishiftqb` controls that put bit j / 4 of byte j % 4 of a bit plane (the low
    /// dword of each qword) in bit 2 of byte j; the offsets wrap around the qword.
    const fn top_shifts() -> [u8; 32] {
        let mut out = [0u8; 32];
        let mut j = 0;
        while j < 32 {
            out[j] = ((8 * (j % 4) + j / 4 + 64 - 2) % 64) as u8;
            j += 1;
        }
        out
    }
    static TOP_SHIFTS: [u8; 32] = top_shifts();

    /// Whether the CPU has what [`quantize64`] needs (checked once).
    pub(super) fn has_avx2() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// One block of 64 activations quantized exactly as the portable loop of
    /// [`NmActs::quantize`] does (the same amax, `127 / amax` and product; ties to even;
    /// NaN to 0; clamped to +-127), into `q` and, biased by 128, `u`; returns the scale.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize64(x: &[f32], q: &mut [i8], u: &mut [u8]) -> f32 {
        debug_assert!(x.len() == 64 && q.len() == 64 && u.len() == 64);
        let p = x.as_ptr();
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let mut m = _mm256_setzero_ps();
        for k in 0..8 {
            // max(|v|, m) returns m when |v| is NaN, as f32::max ignores NaN.
            m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p.add(8 * k)), abs), m);
        }
        let mut m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let mut i32s = [_mm256_setzero_si256(); 8];
        for (k, o) in i32s.iter_mut().enumerate() {
            let y = _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * k)), id);
            // NaN to 0, then the clamp (before rounding: the same result for +-127).
            let y = _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
            let y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);
            *o = _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(y));
        }
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for h in 0..2 {
            let a = _mm256_packs_epi32(i32s[4 * h], i32s[4 * h + 1]);
            let b = _mm256_packs_epi32(i32s[4 * h + 2], i32s[4 * h + 3]);
            let v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
            _mm256_storeu_si256(q.as_mut_ptr().add(32 * h) as *mut __m256i, v);
            let v = _mm256_xor_si256(v, _mm256_set1_epi8(0x80u8 as i8));
            _mm256_storeu_si256(u.as_mut_ptr().add(32 * h) as *mut __m256i, v);
        }
        amax / 127.0
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let mut r = _mm256_extractf128_ps::<1>(x);
        r = _mm_add_ps(r, _mm256_castps256_ps128(x));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// Most `R * T` of a [`body`] call: its buffer of scale products.
    const DBUF: usize = 8;

    /// R rows of `nb` blocks of `bb` bytes against T rows of activations `xq[t]` (64 per
    /// block; AVX2: the i8 values, VNNI: biased to u8, `q + 128`) with their scales
    /// `xd[t]` (a multiple of 8 of them, zeros past `nb`); `out[r][t]`.
    ///
    /// Each (row, token) has its own accumulator and sees the same operations in the same
    /// order whatever R and T are, so a result does not depend on the rows and tokens it was
    /// computed with: a block's indices and weights are decoded once per row and used for
    /// the T tokens, a token's activations loaded (and for `pshufb`, rearranged) once per
    /// block and used for the R rows.
    #[inline(always)]
    unsafe fn body<
        const R: usize,
        const T: usize,
        const M: usize,
        const Q4: bool,
        const ISA: u8,
    >(
        rows: [*const u8; R],
        nb: usize,
        bb: usize,
        xq: [*const i8; T],
        xd: [*const f32; T],
    ) -> [[f32; T]; R] {
        const { assert!(R * T <= DBUF) };
        let voff = if M == 8 { 12 } else { 8 };
        let sb = bb - 4;
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        // At 16 (r T + t), row r's and token t's d_w * d_x of the pass's blocks. Every lane
        // read is written first.
        let mut dbuf = std::mem::MaybeUninit::<[[f32; 16]; DBUF]>::uninit();
        let dw = dbuf.as_mut_ptr() as *mut f32;
        // Blocks per pass: the scale products (and the bias's correction) of 8 blocks in
        // a 256-bit vector, or 16 in a 512-bit one; most rows of SmolLM2 have 9 blocks.
        let gb = if ISA == AVX2 { 8 } else { 16 };
        let mut b0 = 0;
        while b0 < nb {
            let end = if nb - b0 < gb { nb } else { b0 + gb };
            let mut r = 0;
            while r < R {
                if ISA == AVX2 {
                    // d_w * d_x of blocks b0..b0 + 8. The 16 bytes of scales past b0 are
                    // still in the row (its head is 4 nb bytes of nb * bb, and bb >= 28);
                    // the lanes past nb are never read.
                    let h = _mm256_cvtph_ps(_mm_loadu_si128(rows[r].add(2 * b0) as *const __m128i));
                    let mut t = 0;
                    while t < T {
                        let d = _mm256_mul_ps(h, _mm256_loadu_ps(xd[t].add(b0)));
                        _mm256_storeu_ps(dw.add(16 * (r * T + t)), d);
                        t += 1;
                    }
                } else {
                    // d_w * d_x of blocks b0..end (zeros past end, masked loads), and the
                    // bias's correction: the biased activations add 128 * sum_b to each
                    // block's dot, taken back here as d_w * d_x * 128 sum_b, the 16 blocks'
                    // products folded to 8 lanes and subtracted from the accumulator.
                    let live: __mmask16 = ((1u32 << (end - b0)) - 1) as __mmask16;
                    let h = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        live,
                        rows[r].add(2 * b0) as *const i16,
                    ));
                    let s =
                        _mm256_maskz_loadu_epi16(live, rows[r].add(2 * nb + 2 * b0) as *const i16);
                    let c = _mm512_cvtepi32_ps(_mm512_slli_epi32::<7>(_mm512_cvtepi16_epi32(s)));
                    let mut t = 0;
                    while t < T {
                        let d = _mm512_mul_ps(h, _mm512_maskz_loadu_ps(live, xd[t].add(b0)));
                        _mm512_storeu_ps(dw.add(16 * (r * T + t)), d);
                        let p = _mm512_mul_ps(d, c);
                        let lo = _mm512_castps512_ps256(p);
                        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(p)));
                        acc[r][t] = _mm256_sub_ps(acc[r][t], _mm256_add_ps(lo, hi));
                        t += 1;
                    }
                }
                r += 1;
            }
            // Through an opaque pointer so that the broadcasts below load from memory
            // (`vbroadcastss m32`, no shuffle uop); LLVM otherwise keeps the buffer in
            // registers and spends two shuffles per block and row.
            let dp = std::hint::black_box(dw as *const f32);
            for b in b0..end {
                // Each token's two activation tables for this block.
                let mut tp = [(_mm256_setzero_si256(), _mm256_setzero_si256()); T];
                let mut t = 0;
                while t < T {
                    let xa = _mm256_loadu_si256(xq[t].add(64 * b) as *const __m256i);
                    let xb = _mm256_loadu_si256(xq[t].add(64 * b + 32) as *const __m256i);
                    tp[t] = (
                        _mm256_permute2x128_si256::<0x20>(xa, xb),
                        _mm256_permute2x128_si256::<0x31>(xa, xb),
                    );
                    t += 1;
                }
                let mut r = 0;
                while r < R {
                    let blk = rows[r].add(4 * nb + b * sb);
                    let (cp, cq) = controls::<M>(blk);
                    let w = if Q4 {
                        // The 16 bytes in both halves (a broadcast load), the high half
                        // shifted by 4: levels 0..16 low, 16..32 high.
                        let t = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                            blk.add(voff) as *const __m128i
                        ));
                        let v = _mm256_srlv_epi64(t, _mm256_setr_epi64x(0, 0, 4, 4));
                        let v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
                        _mm256_sub_epi8(v, _mm256_set1_epi8(8))
                    } else {
                        _mm256_loadu_si256(blk.add(voff) as *const __m256i)
                    };
                    let ax = _mm256_sign_epi8(w, w);
                    let mut t = 0;
                    while t < T {
                        let (p, q) = tp[t];
                        let xg =
                            _mm256_or_si256(_mm256_shuffle_epi8(p, cp), _mm256_shuffle_epi8(q, cq));
                        let ip = if ISA == AVX2 {
                            let sy = _mm256_sign_epi8(xg, w);
                            _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(ax, sy))
                        } else {
                            // u8 (x + 128) times i8 w: exact; the bias is taken back above.
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), xg, w)
                        };
                        let d = _mm256_broadcast_ss(&*dp.add(16 * (r * T + t) + b - b0));
                        acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(ip), acc[r][t]);
                        t += 1;
                    }
                    r += 1;
                }
            }
            b0 = end;
        }
        let mut out = [[0f32; T]; R];
        let mut r = 0;
        while r < R {
            let mut t = 0;
            while t < T {
                out[r][t] = hsum(acc[r][t]);
                t += 1;
            }
            r += 1;
        }
        out
    }

    /// The sums of the four 8-lane halves of `a` and `b` ([a low, a high, b low, b high]),
    /// each added in [`hsum`]'s order: (x0 + x4) + (x2 + x6), plus (x1 + x5) + (x3 + x7).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn hsum_halves2(a: __m512, b: __m512) -> [f32; 4] {
        // [a0..4, a8..12, b0..4, b8..12] + [a4..8, a12..16, b4..8, b12..16]
        let lo = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
        let hi = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
        let r = _mm512_add_ps(hi, lo);
        let r = _mm512_add_ps(r, _mm512_permute_ps::<0b11_10_11_10>(r));
        let r = _mm512_add_ps(r, _mm512_permute_ps::<0b01_01_01_01>(r));
        let mut v = [0f32; 16];
        _mm512_storeu_ps(v.as_mut_ptr(), r);
        [v[0], v[4], v[8], v[12]]
    }

    /// The 32 bytes at `v` in both halves.
    #[inline(always)]
    unsafe fn twice(v: *const u8) -> __m512i {
        let h = _mm256_loadu_si256(v as *const __m256i);
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h), h)
    }

    /// The 16 bytes at `a + off` low, those at `b + off` high.
    #[inline(always)]
    unsafe fn two(a: *const u8, b: *const u8, off: usize) -> __m256i {
        _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(a.add(off) as *const __m128i)),
            _mm_loadu_si128(b.add(off) as *const __m128i),
        )
    }

    /// [`body`] for VBMI, in 512-bit vectors holding two rows: rows `2i` and `2i + 1` (row
    /// `R - 1` twice when R is odd) share every vector, the first in the low 256 bits, the
    /// second in the high. Per block and pair: one `vpsrlvq` and one `vpternlogd` decode
    /// both rows' positions (each row's digit plane broadcast to its half's qwords), one
    /// `vpermb` gathers both rows' activations from the block's 64 bytes (its table is one
    /// block, so no two-table permute: `vpermi2b` is two port-5 uops on Intel, `vpermb` one),
    /// and one `vpdpbusd`, conversion and multiply-add serve both rows. The scale products
    /// are computed 8 blocks at a time (both rows' 8 in one vector) and stay in registers:
    /// each block's pair is picked by one `vpermps`. Going through a buffer on the stack
    /// (as [`body`] does) measured 10% slower here on Intel: the loads wait on the stores.
    /// The bias's correction `128 d_w d_x sum_b` is taken off lane `b % 8` of the row's
    /// half, before the blocks' products are added.
    ///
    /// Each half sees the operations a single row's vector would, so a (row, token) result
    /// does not depend on the row it was paired with.
    #[inline(always)]
    unsafe fn body_pairs<const R: usize, const T: usize, const M: usize, const Q4: bool>(
        rows: [*const u8; R],
        nb: usize,
        bb: usize,
        xq: [*const i8; T],
        xd: [*const f32; T],
    ) -> [[f32; T]; R] {
        const { assert!(R * T <= DBUF && R <= 4) };
        let pairs = R.div_ceil(2);
        let pair = |p: usize| [rows[2 * p], rows[(2 * p + 1).min(R - 1)]];
        let voff = if M == 8 { 12 } else { 8 };
        let sb = bb - 4;
        let goff = twice(if M == 8 {
            GOFF48.as_ptr()
        } else {
            GOFF24.as_ptr()
        });
        let tsh = twice(TOP_SHIFTS.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut h0 = 0;
        while h0 < nb {
            let n8 = (nb - h0).min(8);
            let k8 = (((1u32 << n8) - 1) * 0x0101) as __mmask16;
            // Per pair: both rows' 8 scales in one vector (row 2p low, row 2p + 1 high),
            // d_w * d_x per token, and the bias's correction 128 d_w d_x sum_b subtracted
            // from block b's lane (b % 8) of each row's accumulator, live blocks only.
            let mut dpair = [[_mm512_setzero_ps(); T]; R];
            let mut p = 0;
            while p < pairs {
                let [ra, rb] = pair(p);
                let hw = _mm512_cvtph_ps(two(ra, rb, 2 * h0));
                let c = _mm512_cvtepi32_ps(_mm512_slli_epi32::<7>(_mm512_cvtepi16_epi32(two(
                    ra,
                    rb,
                    2 * nb + 2 * h0,
                ))));
                let mut t = 0;
                while t < T {
                    let xdt = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(
                        xd[t].add(h0) as *const f64,
                    )));
                    let d = _mm512_mul_ps(hw, xdt);
                    dpair[p][t] = d;
                    acc[p][t] = _mm512_mask3_fnmadd_ps(d, c, acc[p][t], k8);
                    t += 1;
                }
                p += 1;
            }
            let mut idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, 8, 8);
            for b in h0..h0 + n8 {
                let mut xz = [_mm512_setzero_si512(); T];
                let mut t = 0;
                while t < T {
                    xz[t] = _mm512_loadu_si512(xq[t].add(64 * b) as *const __m512i);
                    t += 1;
                }
                let mut p = 0;
                while p < pairs {
                    let [ra, rb] = pair(p).map(|r| r.add(4 * nb + b * sb));
                    // Each row's digit plane in its half's four qwords, qword k shifted
                    // right by 2k: byte j of the block's 32 then holds digit j in bits 0, 1.
                    let pl = _mm512_mask_set1_epi64(
                        _mm512_set1_epi64((ra as *const i64).read_unaligned()),
                        0xF0,
                        (rb as *const i64).read_unaligned(),
                    );
                    let d = _mm512_srlv_epi64(pl, _mm512_setr_epi64(0, 2, 4, 6, 0, 2, 4, 6));
                    // (digits & 3) | goff
                    let mut pos = _mm512_ternarylogic_epi32::<0xEA>(d, _mm512_set1_epi8(3), goff);
                    if M == 8 {
                        let tp = _mm512_mask_set1_epi64(
                            _mm512_set1_epi64((ra.add(8) as *const i64).read_unaligned()),
                            0xF0,
                            (rb.add(8) as *const i64).read_unaligned(),
                        );
                        let tb = _mm512_multishift_epi64_epi8(tsh, tp);
                        // c ? t : pos, with c = bit 2 of every byte.
                        pos = _mm512_ternarylogic_epi32::<0xD8>(pos, tb, _mm512_set1_epi8(4));
                    }
                    let w = if Q4 {
                        // Each row's 16 bytes in both quarters of its half, the high quarter
                        // shifted by 4: levels 0..16 low, 16..32 high.
                        let a = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                            ra.add(voff) as *const __m128i
                        ));
                        let t = _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(a),
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(
                                rb.add(voff) as *const __m128i
                            )),
                        );
                        let v = _mm512_srlv_epi64(t, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
                        let v = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
                        _mm512_sub_epi8(v, _mm512_set1_epi8(8))
                    } else {
                        _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(_mm256_loadu_si256(
                                ra.add(voff) as *const __m256i
                            )),
                            _mm256_loadu_si256(rb.add(voff) as *const __m256i),
                        )
                    };
                    let mut t = 0;
                    while t < T {
                        let xg = _mm512_permutexvar_epi8(pos, xz[t]);
                        // u8 (x + 128) times i8 w: exact; the bias is taken back above.
                        let ip = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xg, w);
                        let d = _mm512_permutexvar_ps(idx, dpair[p][t]);
                        acc[p][t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(ip), acc[p][t]);
                        t += 1;
                    }
                    p += 1;
                }
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(1));
            }
            h0 += 8;
        }
        let mut out = [[0f32; T]; R];
        let mut sums = [[0f32; 2]; DBUF];
        let n = pairs * T;
        let flat = acc.as_ptr() as *const __m512;
        let mut i = 0;
        while i < n {
            let a = *flat.add(i);
            let b = if i + 1 < n { *flat.add(i + 1) } else { a };
            let r = hsum_halves2(a, b);
            sums[i] = [r[0], r[1]];
            if i + 1 < n {
                sums[i + 1] = [r[2], r[3]];
            }
            i += 2;
        }
        let mut p = 0;
        while p < pairs {
            let mut t = 0;
            while t < T {
                out[2 * p][t] = sums[p * T + t][0];
                if 2 * p + 1 < R {
                    out[2 * p + 1][t] = sums[p * T + t][1];
                }
                t += 1;
            }
            p += 1;
        }
        out
    }

    /// [`body`], or [`body_pairs`] for VBMI.
    #[inline(always)]
    unsafe fn run<const R: usize, const T: usize, const M: usize, const Q4: bool, const ISA: u8>(
        rows: [*const u8; R],
        nb: usize,
        bb: usize,
        xq: [*const i8; T],
        xd: [*const f32; T],
    ) -> [[f32; T]; R] {
        if ISA == VBMI {
            body_pairs::<R, T, M, Q4>(rows, nb, bb, xq, xd)
        } else {
            body::<R, T, M, Q4, ISA>(rows, nb, bb, xq, xd)
        }
    }

    /// The activation bytes the `ISA` body takes: i8 for AVX2, biased u8 for `vpdpbusd`.
    #[inline(always)]
    fn acts<const ISA: u8>(a: &NmActs) -> *const i8 {
        if ISA == AVX2 {
            a.q.as_ptr()
        } else {
            a.u.as_ptr() as *const i8
        }
    }

    macro_rules! variant {
        ($name:ident, $m:literal, $q4:literal, $isa:ident, $feat:literal) => {
            mod $name {
                use super::*;

                #[target_feature(enable = $feat)]
                pub(super) unsafe fn dot(f: &NmFormat, row: &[u8], a: &NmActs) -> f32 {
                    let nb = a.q.len() / 64;
                    run::<1, 1, $m, $q4, $isa>(
                        [row.as_ptr()],
                        nb,
                        crate::sparse::nm::simd_block_bytes(f, $m, $q4),
                        [acts::<$isa>(a)],
                        [a.d.as_ptr()],
                    )[0][0]
                }

                #[target_feature(enable = $feat)]
                pub(super) unsafe fn rows4(
                    f: &NmFormat,
                    w: &[u8],
                    rb: usize,
                    q: usize,
                    a: &NmActs,
                    y: &mut [f32],
                ) {
                    let nb = a.q.len() / 64;
                    let bb = crate::sparse::nm::simd_block_bytes(f, $m, $q4);
                    let (x, d) = (acts::<$isa>(a), a.d.as_ptr());
                    quarters!(w, rb, q, y, |p| run::<4, 1, $m, $q4, $isa>(
                        p,
                        nb,
                        bb,
                        [x],
                        [d]
                    )
                    .map(|v| v[0]));
                }

                #[target_feature(enable = $feat)]
                pub(super) unsafe fn tokens4(
                    f: &NmFormat,
                    row: &[u8],
                    a: [&NmActs; 4],
                ) -> [f32; 4] {
                    let nb = a[0].q.len() / 64;
                    run::<1, 4, $m, $q4, $isa>(
                        [row.as_ptr()],
                        nb,
                        crate::sparse::nm::simd_block_bytes(f, $m, $q4),
                        a.map(acts::<$isa>),
                        a.map(|a| a.d.as_ptr()),
                    )[0]
                }

                #[target_feature(enable = $feat)]
                pub(super) unsafe fn tile2x4(
                    f: &NmFormat,
                    rows: [&[u8]; 2],
                    a: [&NmActs; 4],
                ) -> [[f32; 4]; 2] {
                    let nb = a[0].q.len() / 64;
                    run::<2, 4, $m, $q4, $isa>(
                        rows.map(|r| r.as_ptr()),
                        nb,
                        crate::sparse::nm::simd_block_bytes(f, $m, $q4),
                        a.map(acts::<$isa>),
                        a.map(|a| a.d.as_ptr()),
                    )
                }
            }
        };
    }

    const _: () = assert!(AVX2 != VNNI && VNNI != VBMI);

    variant!(nm24_q8, 4, false, AVX2, "avx2,fma,f16c");
    variant!(nm24_q4, 4, true, AVX2, "avx2,fma,f16c");
    variant!(nm48_q8, 8, false, AVX2, "avx2,fma,f16c");
    variant!(nm48_q4, 8, true, AVX2, "avx2,fma,f16c");
    variant!(
        nm24_q8_vnni,
        4,
        false,
        VNNI,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
    );
    variant!(
        nm24_q4_vnni,
        4,
        true,
        VNNI,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
    );
    variant!(
        nm48_q8_vnni,
        8,
        false,
        VNNI,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
    );
    variant!(
        nm48_q4_vnni,
        8,
        true,
        VNNI,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
    );
    variant!(
        nm24_q8_vbmi,
        4,
        false,
        VBMI,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi"
    );
    variant!(
        nm24_q4_vbmi,
        4,
        true,
        VBMI,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi"
    );
    variant!(
        nm48_q8_vbmi,
        8,
        false,
        VBMI,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi"
    );
    variant!(
        nm48_q4_vbmi,
        8,
        true,
        VBMI,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi"
    );

    /// Whether the VBMI kernels may run at `Level::Avx512` (which the caller checked).
    fn has_vbmi() -> bool {
        is_x86_feature_detected!("avx512vbmi")
    }

    /// The x86 kernel for `f` at `level` (which the CPU supports), if there is one; with
    /// `vbmi` false the AVX-512 level takes the `pshufb` gather even where the CPU has VBMI.
    pub(super) fn kernel(f: NmFormat, level: Level, vbmi: bool) -> Option<NmKernel> {
        use super::NmValues::*;
        if level < Level::Avx2 || !super::simd_shape(&f) {
            return None;
        }
        let isa = match level {
            Level::Avx2 => AVX2,
            _ if vbmi && has_vbmi() => VBMI,
            _ => VNNI,
        };
        let level = if isa == AVX2 {
            Level::Avx2
        } else {
            Level::Avx512
        };
        macro_rules! entry {
            ($name:literal, $m:ident) => {
                NmKernel {
                    name: $name,
                    level,
                    format: f,
                    dot: $m::dot,
                    rows4: Some($m::rows4),
                    tokens4: $m::tokens4,
                    // AVX2's 16 vector registers do not hold a two-row tile's state: it
                    // spills and measured slower than one row at a time (2:4 Q8 batch of
                    // 32 on Zen 4: 1.11x of dense Q8_0 against 1.26x).
                    tile2x4: if isa == AVX2 { None } else { Some($m::tile2x4) },
                }
            };
        }
        Some(match (f.m, f.values, isa) {
            (4, Q8, AVX2) => entry!("avx2_dot_nm24_q8", nm24_q8),
            (4, Q4, AVX2) => entry!("avx2_dot_nm24_q4", nm24_q4),
            (8, Q8, AVX2) => entry!("avx2_dot_nm48_q8", nm48_q8),
            (8, Q4, AVX2) => entry!("avx2_dot_nm48_q4", nm48_q4),
            (4, Q8, VNNI) => entry!("avx512_dot_nm24_q8_vnni", nm24_q8_vnni),
            (4, Q4, VNNI) => entry!("avx512_dot_nm24_q4_vnni", nm24_q4_vnni),
            (8, Q8, VNNI) => entry!("avx512_dot_nm48_q8_vnni", nm48_q8_vnni),
            (8, Q4, VNNI) => entry!("avx512_dot_nm48_q4_vnni", nm48_q4_vnni),
            (4, Q8, _) => entry!("avx512_dot_nm24_q8_vbmi", nm24_q8_vbmi),
            (4, Q4, _) => entry!("avx512_dot_nm24_q4_vbmi", nm24_q4_vbmi),
            (8, Q8, _) => entry!("avx512_dot_nm48_q8_vbmi", nm48_q8_vbmi),
            (8, Q4, _) => entry!("avx512_dot_nm48_q4_vbmi", nm48_q4_vbmi),
            _ => return None,
        })
    }
}

// ---- aarch64 -------------------------------------------------------------------------------

#[cfg(target_arch = "aarch64")]
mod arm {
    //! NEON kernels for 2:4 and 4:8, and the same bodies with `sdot` (FEAT_DotProd) at
    //! `Level::Dotprod` and above.
    //!
    //! Per block: the digit plane is broadcast and shifted per byte (`ushl` by `-2 (j / 8)`)
    //! so that byte j holds the digit of value j, and so is 4:8's bit plane (`ushl` by
    //! `-(j / 4)`); the in-group indices plus the group offsets
    //! index the block's 64 activations with two `tbl` over 32 bytes each (kept values 0..16
    //! come from inputs 0..32, 16..32 from 32..64). The exact i32 dot of the 32 pairs lands
    //! in 4 lanes (`smull` + pairwise adds, or `sdot`), which are fused-multiply-added with
    //! `d_w * d_x` into 4 f32 lanes.
    //!
    //! Safety model: every function here is `unsafe`; the `sdot` ones carry
    //! `#[target_feature(enable = "dotprod")]` and [`kernel`] returns them only at a level
    //! that `Level::detected` reported; `NmKernel` checks the lengths before calling.

    use super::{NmActs, NmFormat, NmKernel};
    use crate::kernels::Level;
    use std::arch::aarch64::*;
    use std::arch::asm;

    use crate::sparse::arm::{Isa, Neon, Sdot};

    /// f16 bits to f32 (`fcvt s, h`, base ARMv8).
    #[inline(always)]
    unsafe fn fp16(p: *const u8) -> f32 {
        let h = (p as *const u16).read_unaligned();
        let out: f32;
        asm!(
            "fcvt {o:s}, {i:h}",
            o = lateout(vreg) out,
            i = in(vreg) h as u32,
            options(pure, nomem, nostack, preserves_flags)
        );
        out
    }

    const SH_LO: [i8; 16] = [0, 0, 0, 0, -1, -1, -1, -1, -2, -2, -2, -2, -3, -3, -3, -3];
    const SH_HI: [i8; 16] = [
        -4, -4, -4, -4, -5, -5, -5, -5, -6, -6, -6, -6, -7, -7, -7, -7,
    ];

    /// Table positions of kept values 0..16 of a half block: `(j / n) * m`.
    const fn goff(n: usize, m: usize) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut j = 0;
        while j < 16 {
            out[j] = ((j / n) * m) as u8;
            j += 1;
        }
        out
    }
    const G24: [u8; 16] = goff(2, 4);
    const G48: [u8; 16] = goff(4, 8);

    /// One bit plane (4 bytes at `p`): bit j / 4 of byte j % 4 in byte j, for j in 0..16 and
    /// 16..32.
    #[inline(always)]
    unsafe fn plane(p: *const u8) -> (uint8x16_t, uint8x16_t) {
        let v = vreinterpretq_u8_u32(vdupq_n_u32((p as *const u32).read_unaligned()));
        let one = vdupq_n_u8(1);
        (
            vandq_u8(vshlq_u8(v, vld1q_s8(SH_LO.as_ptr())), one),
            vandq_u8(vshlq_u8(v, vld1q_s8(SH_HI.as_ptr())), one),
        )
    }

    const DSH_LO: [i8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, -2, -2, -2, -2, -2, -2, -2, -2];
    const DSH_HI: [i8; 16] = [
        -4, -4, -4, -4, -4, -4, -4, -4, -6, -6, -6, -6, -6, -6, -6, -6,
    ];

    /// One digit plane (8 bytes at `p`): the digit of value j (bits 2 (j / 8) of byte j % 8)
    /// in byte j, for j in 0..16 and 16..32.
    #[inline(always)]
    unsafe fn digits(p: *const u8) -> (uint8x16_t, uint8x16_t) {
        let v = vreinterpretq_u8_u64(vdupq_n_u64((p as *const u64).read_unaligned()));
        let three = vdupq_n_u8(3);
        (
            vandq_u8(vshlq_u8(v, vld1q_s8(DSH_LO.as_ptr())), three),
            vandq_u8(vshlq_u8(v, vld1q_s8(DSH_HI.as_ptr())), three),
        )
    }

    /// R rows against T rows of activations: `out[r][t]`. As on x86, every (row, token) has
    /// its own accumulator and sees the same operations in the same order whatever R and T
    /// are; a block's indices and weights are decoded once per row for the T tokens.
    #[inline(always)]
    unsafe fn body<I: Isa, const R: usize, const T: usize, const M: usize, const Q4: bool>(
        rows: [*const u8; R],
        nb: usize,
        bb: usize,
        xq: [*const i8; T],
        xd: [*const f32; T],
    ) -> [[f32; T]; R] {
        let voff = if M == 8 { 12 } else { 8 };
        let sb = bb - 4;
        let g = vld1q_u8(if M == 8 { G48.as_ptr() } else { G24.as_ptr() });
        let mut acc = [[vdupq_n_f32(0.0); T]; R];
        for b in 0..nb {
            // Each token's two 32-byte tables of this block, loaded once for the R rows.
            let z = vdupq_n_s8(0);
            let mut tabs = [(int8x16x2_t(z, z), int8x16x2_t(z, z)); T];
            let mut t = 0;
            while t < T {
                let x = xq[t].add(64 * b);
                tabs[t] = (
                    int8x16x2_t(vld1q_s8(x), vld1q_s8(x.add(16))),
                    int8x16x2_t(vld1q_s8(x.add(32)), vld1q_s8(x.add(48))),
                );
                t += 1;
            }
            let mut r = 0;
            while r < R {
                let blk = rows[r].add(4 * nb + b * sb);
                let (mut lo, mut hi) = digits(blk);
                if M == 8 {
                    let (c0, c1) = plane(blk.add(8));
                    lo = vaddq_u8(lo, vshlq_n_u8::<2>(c0));
                    hi = vaddq_u8(hi, vshlq_n_u8::<2>(c1));
                }
                let (ilo, ihi) = (vaddq_u8(lo, g), vaddq_u8(hi, g));
                let (wlo, whi) = if Q4 {
                    let v = vld1q_u8(blk.add(voff));
                    let eight = vdupq_n_s8(8);
                    (
                        vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))), eight),
                        vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)), eight),
                    )
                } else {
                    let w = blk.add(voff) as *const i8;
                    (vld1q_s8(w), vld1q_s8(w.add(16)))
                };
                let dw = fp16(rows[r].add(2 * b));
                let mut t = 0;
                while t < T {
                    let (t0, t1) = tabs[t];
                    let xlo = vqtbl2q_s8(t0, ilo);
                    let xhi = vqtbl2q_s8(t1, ihi);
                    let ip = I::dot4(I::dot4(vdupq_n_s32(0), wlo, xlo), whi, xhi);
                    let d = vdupq_n_f32(dw * *xd[t].add(b));
                    acc[r][t] = vfmaq_f32(acc[r][t], vcvtq_f32_s32(ip), d);
                    t += 1;
                }
                r += 1;
            }
        }
        let mut out = [[0f32; T]; R];
        let mut r = 0;
        while r < R {
            let mut t = 0;
            while t < T {
                out[r][t] = vaddvq_f32(acc[r][t]);
                t += 1;
            }
            r += 1;
        }
        out
    }

    macro_rules! variant {
        ($name:ident, $isa:ident, $m:literal, $q4:literal $(, $feat:literal)?) => {
            mod $name {
                use super::*;

                $(#[target_feature(enable = $feat)])?
                pub(super) unsafe fn dot(f: &NmFormat, row: &[u8], a: &NmActs) -> f32 {
                    let nb = a.q.len() / 64;
                    let (q, d) = (a.q.as_ptr(), a.d.as_ptr());
                    let bb = crate::sparse::nm::simd_block_bytes(f, $m, $q4);
                    body::<$isa, 1, 1, $m, $q4>([row.as_ptr()], nb, bb, [q], [d])[0][0]
                }

                $(#[target_feature(enable = $feat)])?
                pub(super) unsafe fn rows4(
                    f: &NmFormat,
                    w: &[u8],
                    rb: usize,
                    q: usize,
                    a: &NmActs,
                    y: &mut [f32],
                ) {
                    let nb = a.q.len() / 64;
                    let (x, d) = (a.q.as_ptr(), a.d.as_ptr());
                    let bb = crate::sparse::nm::simd_block_bytes(f, $m, $q4);
                    quarters!(w, rb, q, y, |p| body::<$isa, 4, 1, $m, $q4>(p, nb, bb, [x], [d])
                        .map(|v| v[0]));
                }

                $(#[target_feature(enable = $feat)])?
                pub(super) unsafe fn tokens4(
                    f: &NmFormat,
                    row: &[u8],
                    a: [&NmActs; 4],
                ) -> [f32; 4] {
                    let nb = a[0].q.len() / 64;
                    let (q, d) = (a.map(|a| a.q.as_ptr()), a.map(|a| a.d.as_ptr()));
                    let bb = crate::sparse::nm::simd_block_bytes(f, $m, $q4);
                    body::<$isa, 1, 4, $m, $q4>([row.as_ptr()], nb, bb, q, d)[0]
                }

                $(#[target_feature(enable = $feat)])?
                pub(super) unsafe fn tile2x4(
                    f: &NmFormat,
                    rows: [&[u8]; 2],
                    a: [&NmActs; 4],
                ) -> [[f32; 4]; 2] {
                    let nb = a[0].q.len() / 64;
                    let (q, d) = (a.map(|a| a.q.as_ptr()), a.map(|a| a.d.as_ptr()));
                    let p = rows.map(|r| r.as_ptr());
                    let bb = crate::sparse::nm::simd_block_bytes(f, $m, $q4);
                    body::<$isa, 2, 4, $m, $q4>(p, nb, bb, q, d)
                }
            }
        };
    }

    variant!(nm24_q8, Neon, 4, false);
    variant!(nm24_q4, Neon, 4, true);
    variant!(nm48_q8, Neon, 8, false);
    variant!(nm48_q4, Neon, 8, true);
    variant!(nm24_q8_sdot, Sdot, 4, false, "dotprod");
    variant!(nm24_q4_sdot, Sdot, 4, true, "dotprod");
    variant!(nm48_q8_sdot, Sdot, 8, false, "dotprod");
    variant!(nm48_q4_sdot, Sdot, 8, true, "dotprod");

    /// The aarch64 kernel for `f` at `level` (which the CPU supports), if there is one.
    pub(super) fn kernel(f: NmFormat, level: Level) -> Option<NmKernel> {
        use super::NmValues::*;
        if level < Level::Neon || !super::simd_shape(&f) {
            return None;
        }
        let sdot = level >= Level::Dotprod;
        let level = if sdot { Level::Dotprod } else { Level::Neon };
        macro_rules! entry {
            ($name:literal, $m:ident) => {
                NmKernel {
                    name: $name,
                    level,
                    format: f,
                    dot: $m::dot,
                    rows4: Some($m::rows4),
                    tokens4: $m::tokens4,
                    tile2x4: Some($m::tile2x4),
                }
            };
        }
        Some(match (f.m, f.values, sdot) {
            (4, Q8, false) => entry!("neon_dot_nm24_q8", nm24_q8),
            (4, Q4, false) => entry!("neon_dot_nm24_q4", nm24_q4),
            (8, Q8, false) => entry!("neon_dot_nm48_q8", nm48_q8),
            (8, Q4, false) => entry!("neon_dot_nm48_q4", nm48_q4),
            (4, Q8, true) => entry!("dotprod_dot_nm24_q8_sdot", nm24_q8_sdot),
            (4, Q4, true) => entry!("dotprod_dot_nm24_q4_sdot", nm24_q4_sdot),
            (8, Q8, true) => entry!("dotprod_dot_nm48_q8_sdot", nm48_q8_sdot),
            (8, Q4, true) => entry!("dotprod_dot_nm48_q4_sdot", nm48_q4_sdot),
            _ => return None,
        })
    }
}
