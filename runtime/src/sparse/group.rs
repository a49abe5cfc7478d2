//! Group-sparse weights (SparseByteNN / GQSA style): each row of `cols` inputs is cut into
//! groups of `g` consecutive weights (g = 4, 8, 16 or 32); only the groups that are not all
//! zero are stored, quantized 4-bit (Q4: x = d * (q - 8), as Q4_0) or 8-bit (Q8: x = d * q,
//! as Q8_0), with one f16 scale per group or per `scale_groups` consecutive stored groups.
//! GQSA's W4 with 50 % group sparsity is `GroupFormat::new(16, Values::Q4)` on a matrix pruned
//! by [`prune`] at 0.5.
//!
//! # Byte layout
//!
//! All integers little-endian; nothing is aligned (every read is unaligned), so a matrix can
//! be used in place at any offset of a memory map.
//!
//! ```text
//! header (16 bytes)
//!   0..4    magic  b"SPG1"
//!   4..8    rows   u32
//!   8..12   cols   u32, a multiple of g (> 0)
//!   12      g      4, 8, 16 or 32
//!   13      values 0 = Q4, 1 = Q8
//!   14      scale_groups  1, 2, 4 or 8 stored groups per scale, with g * scale_groups <= 32
//!                          (1 for g = 32)
//!   15      0
//! row offsets (4 * (rows + 1) bytes)
//!   u32 from the start of the buffer; offset[0] is the end of this table, offset[rows] the
//!   buffer's length, row r is bytes offset[r]..offset[r + 1].
//! row r, with G = cols / g groups of which n are stored:
//!   bitmap  ceil(G / 8) bytes: bit i % 8 of byte i / 8 set <=> group i stored (unused high
//!           bits of the last byte are 0)
//!   scales  ceil(n / scale_groups) f16: scale s covers stored groups s*sg .. s*sg + sg - 1
//!   values  ceil(n * g / 32) chunks; the stored groups' weights are concatenated in column
//!           order into one stream, cut into chunks of 32 weights (the last padded with
//!           zeros, level 8 for Q4):
//!             Q4 chunk, 16 bytes: byte j = weight j (low nibble) | weight 16 + j (high),
//!                                 the Q4_0 nibble order; x = d * (q - 8)
//!             Q8 chunk, 32 bytes: weight j = i8 byte j; x = d * q
//! ```
//!
//! A bitmap costs one bit per group where u16 group indices cost 16 bits per stored group: at
//! g = 16 on a 576-wide row that is 5 bytes against 36 (50 %) or 18 (75 %), and decoding it is
//! one `tzcnt` per stored group. Bytes per dense weight at g = 16, W4, per-group scales:
//! 0.3125 at 50 % and 0.156 at 75 % (plus 5 + 4 bytes per row of bitmap and offset), against
//! Q4_0's 0.5625; `scale_groups = 2` (32 weights per scale, as Q4_0) brings 50 % to 0.281.
//!
//! # Kernels
//!
//! y[r] = dot(row r, x). x is quantized once per call ([`GroupActs`]): int8 with an f32 scale
//! per 32 columns (rounding as `kernels/act.rs`), padded with zeros to whole blocks of 32; a
//! stored group (g <= 32, aligned to g) lies inside one activation block. Every kernel walks
//! a row chunk by chunk, in one order, so all levels give the same bits:
//!
//! ```text
//! per row:    s[k] = dx[block of group k] * dw[k / scale_groups]   (f32; 0 for padding)
//! per chunk:  lane l (0..8) = exact integer sum of weights 4l..4l+3 times their activations
//!             acc[l] = fma(lane l, s[group of lane l], acc[l])
//! end:        ((acc[0]+acc[4]) + (acc[2]+acc[6])) + ((acc[1]+acc[5]) + (acc[3]+acc[7]))
//! ```
//!
//! (padding lanes of the last chunk take the activations of columns 0.. and the scale 0.)
//! [`GroupKernel::for_level`] gives the kernel of a [`Level`]: portable Rust, AVX2 (+FMA,
//! F16C), AVX-512 VNNI (`vpdpbusd` on 256-bit vectors), NEON, and NEON with `sdot`;
//! [`GroupKernel::get`] the one of [`Level::selected`] (the CPU's best, capped by
//! `SPARROW_KERNELS`).

use crate::error::{Error, Result};
use crate::kernels::math::fma32;
use crate::kernels::Level;
use crate::quant::util::{f16_to_f32, f32_to_f16};
use std::sync::OnceLock;

const MAGIC: &[u8; 4] = b"SPG1";
/// Bytes of the header before the row offsets.
pub const HEADER_BYTES: usize = 16;
/// Weights per value chunk (and columns per activation block).
pub const CHUNK: usize = 32;

/// How the stored weights are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Values {
    /// 4-bit levels q in 0..16, x = d * (q - 8) (Q4_0's levels and quantizer).
    Q4,
    /// 8-bit levels q in -127..=127, x = d * q (Q8_0's quantizer).
    Q8,
}

impl Values {
    fn code(self) -> u8 {
        match self {
            Values::Q4 => 0,
            Values::Q8 => 1,
        }
    }

    /// Bytes of one 32-weight chunk.
    pub fn chunk_bytes(self) -> usize {
        match self {
            Values::Q4 => CHUNK / 2,
            Values::Q8 => CHUNK,
        }
    }
}

/// The encoding of a matrix: group size, value quantization, stored groups per scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupFormat {
    pub g: usize,
    pub values: Values,
    /// Consecutive stored groups that share one f16 scale (1: a scale per group).
    pub scale_groups: usize,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("group-sparse: {msg}"))
}

impl GroupFormat {
    /// Groups of `g` weights, one scale per stored group.
    pub fn new(g: usize, values: Values) -> Result<GroupFormat> {
        GroupFormat {
            g,
            values,
            scale_groups: 1,
        }
        .checked()
    }

    /// The same format with one scale per `scale_groups` stored groups.
    pub fn with_scale_groups(self, scale_groups: usize) -> Result<GroupFormat> {
        GroupFormat {
            scale_groups,
            ..self
        }
        .checked()
    }

    fn checked(self) -> Result<GroupFormat> {
        if !matches!(self.g, 4 | 8 | 16 | 32) {
            return Err(invalid(format!(
                "group size {} is not 4, 8, 16 or 32",
                self.g
            )));
        }
        if !matches!(self.scale_groups, 1 | 2 | 4 | 8) || self.g * self.scale_groups > CHUNK {
            return Err(invalid(format!(
                "{} groups of {} per scale: want 1, 2, 4 or 8 groups and at most 32 weights",
                self.scale_groups, self.g
            )));
        }
        Ok(self)
    }

    /// Bytes of a row of `cols` columns with `n` stored groups.
    pub fn row_bytes(&self, cols: usize, n: usize) -> usize {
        bitmap_bytes(cols / self.g)
            + 2 * n.div_ceil(self.scale_groups)
            + (n * self.g).div_ceil(CHUNK) * self.values.chunk_bytes()
    }
}

fn bitmap_bytes(groups: usize) -> usize {
    groups.div_ceil(8)
}

/// Magnitude pruning: in each row of `cols` weights, zeroes the `round(sparsity * groups)`
/// groups of `g` with the smallest L2 norm (the earlier group on ties).
pub fn prune(w: &mut [f32], cols: usize, g: usize, sparsity: f64) -> Result<()> {
    GroupFormat::new(g, Values::Q4)?;
    if cols == 0 || !cols.is_multiple_of(g) || !w.len().is_multiple_of(cols) {
        return Err(invalid(format!(
            "{} weights are not rows of {cols} columns in groups of {g}",
            w.len()
        )));
    }
    if !(0.0..=1.0).contains(&sparsity) {
        return Err(invalid(format!("sparsity {sparsity} is not in 0..=1")));
    }
    let groups = cols / g;
    let drop = ((sparsity * groups as f64).round() as usize).min(groups);
    let mut order: Vec<(f64, usize)> = Vec::with_capacity(groups);
    for row in w.chunks_exact_mut(cols) {
        order.clear();
        order.extend(
            row.chunks_exact(g)
                .enumerate()
                .map(|(i, v)| (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>(), i)),
        );
        order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(_, i) in &order[..drop] {
            row[i * g..(i + 1) * g].fill(0.0);
        }
    }
    Ok(())
}

/// Encodes `rows` x `cols` f32 weights (row-major); groups that are all zero are dropped.
pub fn encode(w: &[f32], rows: usize, cols: usize, fmt: GroupFormat) -> Result<Vec<u8>> {
    let fmt = fmt.checked()?;
    let g = fmt.g;
    if cols == 0 || !cols.is_multiple_of(g) || rows.checked_mul(cols) != Some(w.len()) {
        return Err(invalid(format!(
            "{} weights for {rows} x {cols} in groups of {g}",
            w.len()
        )));
    }
    if u32::try_from(rows).is_err() || u32::try_from(cols).is_err() {
        return Err(invalid("more than 2^32 - 1 rows or columns"));
    }
    if let Some(v) = w.iter().find(|v| !v.is_finite()) {
        return Err(invalid(format!("weight {v} is not finite")));
    }
    let table = HEADER_BYTES + 4 * (rows + 1);
    let mut out = Vec::with_capacity(table);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(rows as u32).to_le_bytes());
    out.extend_from_slice(&(cols as u32).to_le_bytes());
    out.extend_from_slice(&[g as u8, fmt.values.code(), fmt.scale_groups as u8, 0]);
    out.resize(table, 0);
    let groups = cols / g;
    let mut stream: Vec<f32> = Vec::with_capacity(cols);
    let mut levels: Vec<u8> = Vec::with_capacity(cols + CHUNK);
    for (r, row) in w.chunks_exact(cols).enumerate() {
        let start = out.len();
        if u32::try_from(start).is_err() {
            return Err(invalid("encoded matrix over 4 GiB"));
        }
        out[HEADER_BYTES + 4 * r..HEADER_BYTES + 4 * r + 4]
            .copy_from_slice(&(start as u32).to_le_bytes());
        // Bitmap and the stream of stored weights.
        let mut bitmap = vec![0u8; bitmap_bytes(groups)];
        stream.clear();
        for (i, grp) in row.chunks_exact(g).enumerate() {
            if grp.iter().any(|&v| v != 0.0) {
                bitmap[i / 8] |= 1 << (i % 8);
                stream.extend_from_slice(grp);
            }
        }
        out.extend_from_slice(&bitmap);
        // Scales and levels, one scale block (scale_groups groups) at a time.
        levels.clear();
        for blk in stream.chunks(g * fmt.scale_groups) {
            let (d, id) = match fmt.values {
                Values::Q4 => {
                    // Q4_0: d = max / -8, max the value of largest magnitude (first on ties).
                    let mut amax = 0.0f32;
                    let mut max = 0.0f32;
                    for &v in blk {
                        if amax < v.abs() {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    let d = max / -8.0;
                    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
                }
                Values::Q8 => {
                    let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
                }
            };
            out.extend_from_slice(&f32_to_f16(d));
            for &v in blk {
                levels.push(match fmt.values {
                    Values::Q4 => ((v * id + 8.5) as i8).min(15) as u8,
                    Values::Q8 => crate::quant::util::roundf(v * id) as i8 as u8,
                });
            }
        }
        let pad = match fmt.values {
            Values::Q4 => 8,
            Values::Q8 => 0,
        };
        levels.resize(levels.len().div_ceil(CHUNK) * CHUNK, pad);
        for chunk in levels.chunks_exact(CHUNK) {
            match fmt.values {
                Values::Q4 => {
                    out.extend((0..CHUNK / 2).map(|j| chunk[j] | (chunk[j + CHUNK / 2] << 4)))
                }
                Values::Q8 => out.extend_from_slice(chunk),
            }
        }
    }
    let end = out.len();
    if u32::try_from(end).is_err() {
        return Err(invalid("encoded matrix over 4 GiB"));
    }
    out[HEADER_BYTES + 4 * rows..table].copy_from_slice(&(end as u32).to_le_bytes());
    Ok(out)
}

/// A checked view of an encoded matrix (see the module doc): every offset, count and scale
/// was validated by [`GroupMatrix::new`], so the kernels read it without further checks.
#[derive(Clone, Copy, Debug)]
pub struct GroupMatrix<'a> {
    bytes: &'a [u8],
    rows: usize,
    cols: usize,
    fmt: GroupFormat,
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// The parts of one row.
struct RowParts<'a> {
    bitmap: &'a [u8],
    scales: &'a [u8],
    values: &'a [u8],
}

impl<'a> GroupMatrix<'a> {
    /// A view of `bytes` that [`GroupMatrix::new`] accepted before, without validating the
    /// rows again: a model validates each matrix once at load and then multiplies by it on
    /// every token. The header is still checked.
    ///
    /// # Safety
    /// `GroupMatrix::new(bytes)` must have succeeded on these same bytes, and they must not
    /// have changed since (the kernels read rows through the offset table unchecked).
    pub unsafe fn new_validated(bytes: &'a [u8]) -> Result<GroupMatrix<'a>> {
        let h = Self::header(bytes)?;
        Ok(GroupMatrix {
            bytes,
            rows: h.0,
            cols: h.1,
            fmt: h.2,
        })
    }

    /// The header's rows, columns and format, checked.
    fn header(bytes: &[u8]) -> Result<(usize, usize, GroupFormat)> {
        if bytes.len() < HEADER_BYTES {
            return Err(invalid(format!(
                "{} bytes, shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        if &bytes[0..4] != MAGIC {
            return Err(invalid("bad magic (want SPG1)"));
        }
        let rows = u32_at(bytes, 4).ok_or_else(|| invalid("truncated header"))?;
        let cols = u32_at(bytes, 8).ok_or_else(|| invalid("truncated header"))?;
        let values = match bytes[13] {
            0 => Values::Q4,
            1 => Values::Q8,
            v => return Err(invalid(format!("value type {v} is not 0 (Q4) or 1 (Q8)"))),
        };
        if bytes[15] != 0 {
            return Err(invalid("reserved header byte is not 0"));
        }
        let fmt = GroupFormat {
            g: bytes[12] as usize,
            values,
            scale_groups: bytes[14] as usize,
        }
        .checked()?;
        if cols == 0 || !cols.is_multiple_of(fmt.g) {
            return Err(invalid(format!(
                "{cols} columns is not a positive multiple of {}",
                fmt.g
            )));
        }
        Ok((rows, cols, fmt))
    }

    /// Validates `bytes` (header, offsets, every row's length against its bitmap, scales
    /// finite) and returns a view of them.
    pub fn new(bytes: &'a [u8]) -> Result<GroupMatrix<'a>> {
        let (rows, cols, fmt) = Self::header(bytes)?;
        let table = rows
            .checked_add(1)
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(HEADER_BYTES))
            .filter(|&t| t <= bytes.len())
            .ok_or_else(|| {
                invalid(format!(
                    "{rows} rows: the offset table does not fit in {} bytes",
                    bytes.len()
                ))
            })?;
        let groups = cols / fmt.g;
        let nb = bitmap_bytes(groups);
        let mut prev = table;
        let first = u32_at(bytes, HEADER_BYTES).unwrap_or(0);
        if first != table {
            return Err(invalid(format!(
                "row 0 starts at {first}, not at the end of the offset table ({table})"
            )));
        }
        for r in 0..rows {
            let end = u32_at(bytes, HEADER_BYTES + 4 * (r + 1)).unwrap_or(0);
            if end < prev || end > bytes.len() {
                return Err(invalid(format!(
                    "row {r}: bytes {prev}..{end} outside 0..{}",
                    bytes.len()
                )));
            }
            let row = &bytes[prev..end];
            if row.len() < nb {
                return Err(invalid(format!(
                    "row {r}: {} bytes, shorter than its {nb}-byte bitmap",
                    row.len()
                )));
            }
            let bitmap = &row[..nb];
            if groups % 8 != 0 && bitmap[nb - 1] >> (groups % 8) != 0 {
                return Err(invalid(format!("row {r}: bitmap bits past group {groups}")));
            }
            let n: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
            let want = fmt.row_bytes(cols, n);
            if row.len() != want {
                return Err(invalid(format!(
                    "row {r}: {} bytes, its {n} stored groups take {want}",
                    row.len()
                )));
            }
            let nsc = n.div_ceil(fmt.scale_groups);
            for s in row[nb..nb + 2 * nsc].chunks_exact(2) {
                let d = f16_to_f32([s[0], s[1]]);
                if !d.is_finite() {
                    return Err(invalid(format!("row {r}: scale {d} is not finite")));
                }
            }
            prev = end;
        }
        if prev != bytes.len() {
            return Err(invalid(format!(
                "rows end at {prev}, the buffer at {}",
                bytes.len()
            )));
        }
        Ok(GroupMatrix {
            bytes,
            rows,
            cols,
            fmt,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> GroupFormat {
        self.fmt
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Stored groups over all rows.
    pub fn stored_groups(&self) -> usize {
        (0..self.rows)
            .map(|r| {
                self.row(r)
                    .bitmap
                    .iter()
                    .map(|b| b.count_ones() as usize)
                    .sum::<usize>()
            })
            .sum()
    }

    fn offset(&self, i: usize) -> usize {
        let b = &self.bytes[HEADER_BYTES + 4 * i..HEADER_BYTES + 4 * i + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    fn row(&self, r: usize) -> RowParts<'a> {
        let row = &self.bytes[self.offset(r)..self.offset(r + 1)];
        let nb = bitmap_bytes(self.cols / self.fmt.g);
        let (bitmap, rest) = row.split_at(nb);
        let n: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
        let (scales, values) = rest.split_at(2 * n.div_ceil(self.fmt.scale_groups));
        RowParts {
            bitmap,
            scales,
            values,
        }
    }

    /// The weights as f32, row-major (dropped groups are zeros).
    pub fn decode(&self) -> Vec<f32> {
        let (g, sg) = (self.fmt.g, self.fmt.scale_groups);
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols).enumerate() {
            let p = self.row(r);
            let mut k = 0;
            for i in 0..self.cols / g {
                if p.bitmap[i / 8] >> (i % 8) & 1 == 0 {
                    continue;
                }
                let d = f16_to_f32([p.scales[2 * (k / sg)], p.scales[2 * (k / sg) + 1]]);
                for t in 0..g {
                    let e = k * g + t;
                    let (c, j) = (e / CHUNK, e % CHUNK);
                    let q = match self.fmt.values {
                        Values::Q4 => {
                            let b = p.values[c * 16 + j % 16];
                            (if j < 16 { b & 0xF } else { b >> 4 }) as i32 - 8
                        }
                        Values::Q8 => p.values[c * CHUNK + j] as i8 as i32,
                    };
                    dst[i * g + t] = q as f32 * d;
                }
                k += 1;
            }
        }
        out
    }
}

/// Activations quantized once per call: int8 with an f32 scale per 32 columns, zero-padded to
/// whole blocks (rounding as `kernels/act.rs`: inverse scale 127 / amax, ties to even).
#[derive(Clone, Debug)]
pub struct GroupActs {
    cols: usize,
    q: Vec<i8>,
    d: Vec<f32>,
}

impl GroupActs {
    pub fn new(x: &[f32]) -> GroupActs {
        let nb = x.len().div_ceil(CHUNK);
        let mut q = vec![0i8; nb * CHUNK];
        let mut d = vec![0.0f32; nb];
        for ((xb, qb), db) in x.chunks(CHUNK).zip(q.chunks_exact_mut(CHUNK)).zip(&mut d) {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            *db = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            for (o, &v) in qb.iter_mut().zip(xb) {
                *o = (v * id).round_ties_even() as i8;
            }
        }
        GroupActs {
            cols: x.len(),
            q,
            d,
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The activations the kernels see, as f32.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.cols)
            .map(|i| self.q[i] as f32 * self.d[i / CHUNK])
            .collect()
    }
}

/// Computes rows `first..first + y.len()` of a product; arguments checked by
/// [`GroupKernel::matvec_rows`].
type RowsFn = fn(&GroupMatrix, &GroupActs, usize, &mut [f32]);

/// A group-sparse matrix-vector kernel of one level.
#[derive(Clone, Copy)]
pub struct GroupKernel {
    /// Arch, op and variant: `generic_matvec_group`, `avx2_matvec_group`, ...
    pub name: &'static str,
    pub level: Level,
    rows: RowsFn,
}

impl std::fmt::Debug for GroupKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupKernel")
            .field("name", &self.name)
            .field("level", &self.level)
            .finish()
    }
}

impl GroupKernel {
    /// The portable kernel (the reference).
    pub fn generic() -> GroupKernel {
        GroupKernel {
            name: "generic_matvec_group",
            level: Level::Generic,
            rows: portable::rows,
        }
    }

    /// The kernel for `level` (the portable one for a level the CPU lacks).
    pub fn for_level(level: Level) -> GroupKernel {
        if level == Level::Generic || !Level::detected().contains(&level) {
            return GroupKernel::generic();
        }
        #[cfg(target_arch = "x86_64")]
        {
            if level == Level::Avx512 {
                return GroupKernel {
                    name: "avx512_matvec_group_vnni",
                    level,
                    rows: x86::rows_vnni,
                };
            }
            if level == Level::Avx2 {
                return GroupKernel {
                    name: "avx2_matvec_group",
                    level,
                    rows: x86::rows_avx2,
                };
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if level >= Level::Dotprod {
                return GroupKernel {
                    name: "dotprod_matvec_group_sdot",
                    level: Level::Dotprod,
                    rows: arm::rows_sdot,
                };
            }
            if level == Level::Neon {
                return GroupKernel {
                    name: "neon_matvec_group",
                    level,
                    rows: arm::rows_neon,
                };
            }
        }
        GroupKernel::generic()
    }

    /// The process-wide kernel, at [`Level::selected`].
    pub fn get() -> GroupKernel {
        static K: OnceLock<GroupKernel> = OnceLock::new();
        *K.get_or_init(|| GroupKernel::for_level(Level::selected()))
    }

    /// y = W x for every row.
    pub fn matvec(&self, m: &GroupMatrix, x: &GroupActs, y: &mut [f32]) -> Result<()> {
        if y.len() != m.rows {
            return Err(invalid(format!("{} outputs for {} rows", y.len(), m.rows)));
        }
        self.matvec_rows(m, x, 0, y)
    }

    /// Rows `first..first + y.len()` of y = W x (a thread's share).
    pub fn matvec_rows(
        &self,
        m: &GroupMatrix,
        x: &GroupActs,
        first: usize,
        y: &mut [f32],
    ) -> Result<()> {
        if x.cols != m.cols {
            return Err(invalid(format!(
                "{} activations for {} columns",
                x.cols, m.cols
            )));
        }
        if first.checked_add(y.len()).is_none_or(|e| e > m.rows) {
            return Err(invalid(format!(
                "rows {first}..+{} outside 0..{}",
                y.len(),
                m.rows
            )));
        }
        (self.rows)(m, x, first, y);
        Ok(())
    }
}

/// Per-call scratch: for each stored group of the row, its activations' offset and its
/// combined scale, padded to whole chunks (offset 0, scale 0).
struct Scratch {
    off: Vec<u32>,
    s: Vec<f32>,
}

impl Scratch {
    fn new(m: &GroupMatrix) -> Scratch {
        let n = m.cols / m.fmt.g + CHUNK / 4;
        Scratch {
            off: vec![0; n],
            s: vec![0.0; n],
        }
    }
}

/// Writes the activation offsets (column of the first weight) of a row's stored groups to
/// `off`, then offset 0 up to the next whole chunk; returns the number of stored groups.
#[inline(always)]
fn decode_bitmap(bitmap: &[u8], g: usize, off: &mut [u32]) -> usize {
    let mut n = 0;
    let mut base = 0u32;
    let mut words = bitmap.chunks_exact(8);
    for w in &mut words {
        let mut bits = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        while bits != 0 {
            off[n] = (base + bits.trailing_zeros()) * g as u32;
            n += 1;
            bits &= bits - 1;
        }
        base += 64;
    }
    // (A fold, not a copy into a buffer: a variable-length copy becomes a memcpy call.)
    let mut bits = words
        .remainder()
        .iter()
        .rev()
        .fold(0u64, |a, &b| (a << 8) | b as u64);
    while bits != 0 {
        off[n] = (base + bits.trailing_zeros()) * g as u32;
        n += 1;
        bits &= bits - 1;
    }
    // Padding up to a whole chunk (at most 7 groups; `Scratch` has room for 8).
    off[n..n + 8].copy_from_slice(&[0; 8]);
    n
}

/// The combined scale of every stored group of a row and of the padding up to the next whole
/// chunk: s[k] = dx * dw, with dx = 0 for padding groups and dw = 0 for a padding group past
/// the last scale block (the x86 kernels compute the same products in registers).
#[inline(always)]
fn group_scales(p: &RowParts, sg: usize, g: usize, n: usize, x: &GroupActs, sc: &mut Scratch) {
    let per = CHUNK / g;
    let nsc = p.scales.len() / 2;
    for k in 0..n.div_ceil(per) * per {
        let dx = if k < n {
            x.d[sc.off[k] as usize / CHUNK]
        } else {
            0.0
        };
        let j = k / sg;
        let dw = if j < nsc {
            f16_to_f32([p.scales[2 * j], p.scales[2 * j + 1]])
        } else {
            0.0
        };
        sc.s[k] = dx * dw;
    }
}

/// `hsum_float_8`'s order.
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    let r: [f32; 4] = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

mod portable {
    use super::*;

    pub(super) fn rows(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        let mut sc = Scratch::new(m);
        let (g, sg) = (m.fmt.g, m.fmt.scale_groups);
        let per = CHUNK / g;
        for (i, out) in y.iter_mut().enumerate() {
            let p = m.row(first + i);
            let n = decode_bitmap(p.bitmap, g, &mut sc.off);
            group_scales(&p, sg, g, n, x, &mut sc);
            let mut acc = [0.0f32; 8];
            for c in 0..n.div_ceil(per) {
                let w: [i32; CHUNK] = match m.fmt.values {
                    Values::Q4 => {
                        let b = &p.values[16 * c..16 * c + 16];
                        std::array::from_fn(|j| {
                            (if j < 16 { b[j] & 0xF } else { b[j - 16] >> 4 }) as i32 - 8
                        })
                    }
                    Values::Q8 => {
                        let b = &p.values[CHUNK * c..CHUNK * c + CHUNK];
                        std::array::from_fn(|j| b[j] as i8 as i32)
                    }
                };
                for (l, a) in acc.iter_mut().enumerate() {
                    let k = c * per + 4 * l / g;
                    let o = sc.off[k] as usize + (4 * l) % g;
                    let lane: i32 = (0..4).map(|t| w[4 * l + t] * x.q[o + t] as i32).sum();
                    *a = fma32(lane as f32, sc.s[k], *a);
                }
            }
            *out = hsum8(&acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 and AVX-512 VNNI kernels. Four rows at a time are first decoded into scratch
    //! (`prepare`: each bitmap byte compresses 8 groups' activation offsets and scales with
    //! one `vpermd` from a 256-entry table, no branch on the bits; the scales dx * dw are
    //! multiplied in registers and stored once), then their chunks are stepped interleaved,
    //! four independent accumulator chains: one chunk per step, its 32 products summed into 8
    //! exact i32 lanes (`maddubs` + `madd`, or `vpdpbusd`, on |w| and x signed like w),
    //! converted and fused-multiply-added with the lanes' scales into 8 f32 accumulators.
    //! Each row still sums in the module doc's order, so the bits are the portable kernel's.
    //!
    //! Safety model: the bodies are `unsafe` `#[inline(always)]` generics, instantiated inside
    //! `#[target_feature]` functions whose safe wrappers are only handed out by
    //! `GroupKernel::for_level` for a level that `Level::detected` reported. Every pointer
    //! read stays inside the row (lengths validated by `GroupMatrix::new`) or the activations
    //! (offsets are groups of the row, below `cols`; the padded length is a multiple of 32).
    use super::*;
    use std::arch::x86_64::*;

    /// The activations of one chunk's groups: `CHUNK / G` runs of G bytes.
    #[inline(always)]
    unsafe fn gather<const G: usize>(q: *const i8, off: *const u32) -> __m256i {
        let at = |k: usize| q.add(*off.add(k) as usize);
        match G {
            32 => _mm256_loadu_si256(at(0) as *const __m256i),
            16 => _mm256_loadu2_m128i(at(1) as *const __m128i, at(0) as *const __m128i),
            8 => _mm256_setr_epi64x(
                (at(0) as *const i64).read_unaligned(),
                (at(1) as *const i64).read_unaligned(),
                (at(2) as *const i64).read_unaligned(),
                (at(3) as *const i64).read_unaligned(),
            ),
            _ => _mm256_setr_epi32(
                (at(0) as *const i32).read_unaligned(),
                (at(1) as *const i32).read_unaligned(),
                (at(2) as *const i32).read_unaligned(),
                (at(3) as *const i32).read_unaligned(),
                (at(4) as *const i32).read_unaligned(),
                (at(5) as *const i32).read_unaligned(),
                (at(6) as *const i32).read_unaligned(),
                (at(7) as *const i32).read_unaligned(),
            ),
        }
    }

    /// For each byte value, the positions of its set bits in increasing order (unused slots
    /// 0), one per byte: the `vpermd` index that compresses 8 lanes by a bitmap byte.
    static COMPRESS: [u64; 256] = compress_table();

    const fn compress_table() -> [u64; 256] {
        let mut t = [0u64; 256];
        let mut v = 0;
        while v < 256 {
            let (mut n, mut b, mut e) = (0, 0, 0u64);
            while b < 8 {
                if (v >> b) & 1 == 1 {
                    e |= (b as u64) << (8 * n);
                    n += 1;
                }
                b += 1;
            }
            t[v] = e;
            v += 1;
        }
        t
    }

    /// Set bits of each byte value (no `popcnt`: it is not among the detected features).
    static ONES: [u8; 256] = ones_table();

    const fn ones_table() -> [u8; 256] {
        let mut t = [0u8; 256];
        let mut v = 0;
        while v < 256 {
            t[v] = (v as u32).count_ones() as u8;
            v += 1;
        }
        t
    }

    /// Rows decoded into scratch at once, their chunk steps interleaved (independent
    /// accumulator chains; each row still sums in the one order of the module doc).
    const R: usize = 4;

    /// One row's scratch: the activation offset and the combined scale of every stored group,
    /// then padding up to the next whole chunk (offset 0, scale 0 * dw as `group_scales`).
    struct Lane {
        off: Vec<u32>,
        s: Vec<f32>,
    }

    /// A decoded row: its value chunks, scratch and chunk count.
    #[derive(Clone, Copy)]
    struct Prep {
        v: *const u8,
        off: *const u32,
        s: *const f32,
        chunks: usize,
    }

    /// Decodes row `r` into `lane`, one bitmap byte (8 groups) at a time with no branch on
    /// the bits: the byte's `vpermd` index compresses the 8 groups' offsets and activation
    /// scales (`dxg[k]`: group k's, 0 past the last group) to the stored ones, whose weight
    /// scales are the next 8 f16 of the row; the products are stored without being read
    /// back (a load spanning the overlapping stores would stall).
    #[inline(always)]
    unsafe fn prepare<const G: usize>(
        m: &GroupMatrix,
        r: usize,
        dxg: *const f32,
        lane: &mut Lane,
    ) -> Prep {
        let per = CHUNK / G;
        let sg = m.fmt.scale_groups;
        let lg = sg.trailing_zeros();
        let b = m.bytes.as_ptr();
        let offsets = b.add(HEADER_BYTES + 4 * r) as *const u32;
        let (start, end) = (
            offsets.read_unaligned() as usize,
            offsets.add(1).read_unaligned() as usize,
        );
        let bm = b.add(start);
        let nb = bitmap_bytes(m.cols / G);
        let sp = bm.add(nb);
        // The 16 bytes of f16 scales from scale j on: they start inside the scales or at
        // their end, and end inside the row when it stores a group (its values take at least
        // 16 bytes). Only a row without groups needs the clamp (the buffer holds its 16-byte
        // header before any row); what it reads then is never used.
        let last = b.add(end - 16);
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let off = lane.off.as_mut_ptr();
        let s = lane.s.as_mut_ptr();
        let g = G as i32;
        let mut o = _mm256_setr_epi32(0, g, 2 * g, 3 * g, 4 * g, 5 * g, 6 * g, 7 * g);
        let step = _mm256_set1_epi32(8 * g);
        let mut n = 0usize;
        for i in 0..nb {
            let byte = *bm.add(i) as usize;
            let perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                COMPRESS.as_ptr().add(byte) as *const __m128i
            ));
            _mm256_storeu_si256(
                off.add(n) as *mut __m256i,
                _mm256_permutevar8x32_epi32(o, perm),
            );
            let dx = _mm256_permutevar8x32_ps(_mm256_loadu_ps(dxg.add(8 * i)), perm);
            // Lanes past the byte's groups are overwritten by the next store.
            _mm256_storeu_ps(s.add(n), _mm256_mul_ps(dx, weight_scales(sp, last, n, lg)));
            n += ONES[byte] as usize;
            o = _mm256_add_epi32(o, step);
        }
        // Padding up to the next whole chunk: offset 0, scale 0 * dw with dw the last scale
        // block's while it lasts, then 0 (as `group_scales`).
        let nsc = (n + sg - 1) >> lg;
        let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(((nsc << lg) - n) as i32), iota);
        let pad = _mm256_and_ps(weight_scales(sp, last, n, lg), _mm256_castsi256_ps(keep));
        _mm256_storeu_si256(off.add(n) as *mut __m256i, _mm256_setzero_si256());
        _mm256_storeu_ps(s.add(n), _mm256_mul_ps(_mm256_setzero_ps(), pad));
        Prep {
            v: sp.add(2 * nsc),
            off,
            s,
            chunks: n.div_ceil(per),
        }
    }

    /// The weight scales of stored groups n..n + 8 (scale (n + j) >> lg for lane j, lg the
    /// log2 of the scale groups), read as 16 bytes of f16 from `sp`'s scale n >> lg, or from
    /// `last` where that is after it (see `prepare`).
    #[inline(always)]
    unsafe fn weight_scales(sp: *const u8, last: *const u8, n: usize, lg: u32) -> __m256 {
        let p = sp.add(2 * (n >> lg));
        let p = if p < last { p } else { last };
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        if lg == 0 {
            dw
        } else {
            let j = _mm256_add_epi32(
                _mm256_set1_epi32((n & ((1 << lg) - 1)) as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            _mm256_permutevar8x32_ps(dw, _mm256_srl_epi32(j, _mm_cvtsi32_si128(lg as i32)))
        }
    }

    /// `v[idx[l]]` for the 8 lanes.
    #[inline(always)]
    unsafe fn spread(v: __m256, idx: [i32; 8]) -> __m256 {
        _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(idx.as_ptr() as *const __m256i))
    }

    /// The 8 lane scales of chunk c, lane l taking the scale of group 4l / G.
    #[inline(always)]
    unsafe fn lane_scales<const G: usize>(s: *const f32) -> __m256 {
        match G {
            32 => _mm256_broadcast_ss(&*s),
            16 => _mm256_set_m128(_mm_broadcast_ss(&*s.add(1)), _mm_broadcast_ss(&*s)),
            8 => spread(
                _mm256_castps128_ps256(_mm_loadu_ps(s)),
                [0, 0, 1, 1, 2, 2, 3, 3],
            ),
            _ => _mm256_loadu_ps(s),
        }
    }

    /// One chunk: acc + its 8 lanes times their scales.
    #[inline(always)]
    unsafe fn step<const G: usize, const Q8: bool, const VNNI: bool>(
        p: &Prep,
        q: *const i8,
        c: usize,
        acc: __m256,
    ) -> __m256 {
        let per = CHUNK / G;
        let v = p.v.add(c * if Q8 { CHUNK } else { CHUNK / 2 });
        let w = if Q8 {
            _mm256_loadu_si256(v as *const __m256i)
        } else {
            let b = _mm_loadu_si128(v as *const __m128i);
            let nib = _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16::<4>(b), b),
                _mm256_set1_epi8(0x0F),
            );
            _mm256_sub_epi8(nib, _mm256_set1_epi8(8))
        };
        let xv = gather::<G>(q, p.off.add(c * per));
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(xv, w);
        let lanes = if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx)
        } else {
            _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(aw, sx))
        };
        let s = lane_scales::<G>(p.s.add(c * per));
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), s, acc)
    }

    /// `hsum_float_8`'s order.
    #[inline(always)]
    unsafe fn fold(acc: __m256) -> f32 {
        let mut r = _mm256_extractf128_ps::<1>(acc);
        r = _mm_add_ps(r, _mm256_castps256_ps128(acc));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    #[inline(always)]
    unsafe fn body<const G: usize, const Q8: bool, const VNNI: bool>(
        m: &GroupMatrix,
        x: &GroupActs,
        first: usize,
        y: &mut [f32],
    ) {
        let nb = bitmap_bytes(m.cols / G);
        let size = 8 * nb + 16;
        // Group k's activation scale; 0 for the bitmap's unused bits (never selected).
        let dxg: Vec<f32> = (0..8 * nb)
            .map(|k| {
                if k < m.cols / G {
                    x.d[k * G / CHUNK]
                } else {
                    0.0
                }
            })
            .collect();
        let mut lanes: Vec<Lane> = (0..R)
            .map(|_| Lane {
                off: vec![0; size],
                s: vec![0.0; size],
            })
            .collect();
        let q = x.q.as_ptr();
        let d = dxg.as_ptr();
        let mut blocks = y.chunks_exact_mut(R);
        let mut r = first;
        for out in &mut blocks {
            let [l0, l1, l2, l3] = &mut lanes[..] else {
                return;
            };
            let p = [
                prepare::<G>(m, r, d, l0),
                prepare::<G>(m, r + 1, d, l1),
                prepare::<G>(m, r + 2, d, l2),
                prepare::<G>(m, r + 3, d, l3),
            ];
            let common = p[0]
                .chunks
                .min(p[1].chunks)
                .min(p[2].chunks)
                .min(p[3].chunks);
            let mut a = [_mm256_setzero_ps(); R];
            for c in 0..common {
                a[0] = step::<G, Q8, VNNI>(&p[0], q, c, a[0]);
                a[1] = step::<G, Q8, VNNI>(&p[1], q, c, a[1]);
                a[2] = step::<G, Q8, VNNI>(&p[2], q, c, a[2]);
                a[3] = step::<G, Q8, VNNI>(&p[3], q, c, a[3]);
            }
            for t in 0..R {
                for c in common..p[t].chunks {
                    a[t] = step::<G, Q8, VNNI>(&p[t], q, c, a[t]);
                }
                out[t] = fold(a[t]);
            }
            r += R;
        }
        for out in blocks.into_remainder() {
            let p = prepare::<G>(m, r, d, &mut lanes[0]);
            let mut a = _mm256_setzero_ps();
            for c in 0..p.chunks {
                a = step::<G, Q8, VNNI>(&p, q, c, a);
            }
            *out = fold(a);
            r += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2<const G: usize, const Q8: bool>(
        m: &GroupMatrix,
        x: &GroupActs,
        first: usize,
        y: &mut [f32],
    ) {
        body::<G, Q8, false>(m, x, first, y)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn vnni<const G: usize, const Q8: bool>(
        m: &GroupMatrix,
        x: &GroupActs,
        first: usize,
        y: &mut [f32],
    ) {
        body::<G, Q8, true>(m, x, first, y)
    }

    pub(super) fn rows_avx2(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        let q8 = m.fmt.values == Values::Q8;
        // SAFETY: handed out by `GroupKernel::for_level` only at `Level::Avx2` or above, which
        // `Level::detected` reports only when the CPU has AVX2, FMA and F16C; the reads are
        // in bounds (module doc).
        unsafe {
            match (m.fmt.g, q8) {
                (4, false) => avx2::<4, false>(m, x, first, y),
                (8, false) => avx2::<8, false>(m, x, first, y),
                (16, false) => avx2::<16, false>(m, x, first, y),
                (32, false) => avx2::<32, false>(m, x, first, y),
                (4, true) => avx2::<4, true>(m, x, first, y),
                (8, true) => avx2::<8, true>(m, x, first, y),
                (16, true) => avx2::<16, true>(m, x, first, y),
                _ => avx2::<32, true>(m, x, first, y),
            }
        }
    }

    pub(super) fn rows_vnni(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        let q8 = m.fmt.values == Values::Q8;
        // SAFETY: handed out by `GroupKernel::for_level` only at `Level::Avx512`, which
        // `Level::detected` reports only with AVX-512 F, BW, VL and VNNI; reads as above.
        unsafe {
            match (m.fmt.g, q8) {
                (4, false) => vnni::<4, false>(m, x, first, y),
                (8, false) => vnni::<8, false>(m, x, first, y),
                (16, false) => vnni::<16, false>(m, x, first, y),
                (32, false) => vnni::<32, false>(m, x, first, y),
                (4, true) => vnni::<4, true>(m, x, first, y),
                (8, true) => vnni::<8, true>(m, x, first, y),
                (16, true) => vnni::<16, true>(m, x, first, y),
                _ => vnni::<32, true>(m, x, first, y),
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    //! NEON kernels, and `sdot` ones where the CPU has the dot product extension: the same
    //! chunk steps as the x86 kernels, the 8 lanes as two `int32x4_t` (bytes 0..16, 16..32)
    //! and two `float32x4_t` accumulators, folded in `hsum_float_8`'s order.
    //!
    //! Safety model: as the x86 module; the `sdot` bodies are only instantiated inside a
    //! `#[target_feature(enable = "dotprod")]` function, handed out only at `Level::Dotprod`.
    use super::*;
    use std::arch::aarch64::*;

    use crate::sparse::arm::{Isa, Neon, Sdot};

    /// The activations of one chunk's groups, as two 16-byte halves.
    #[inline(always)]
    unsafe fn gather<const G: usize>(q: *const i8, off: *const u32) -> (int8x16_t, int8x16_t) {
        let at = |k: usize| q.add(*off.add(k) as usize);
        match G {
            32 => (vld1q_s8(at(0)), vld1q_s8(at(0).add(16))),
            16 => (vld1q_s8(at(0)), vld1q_s8(at(1))),
            8 => (
                vcombine_s8(vld1_s8(at(0)), vld1_s8(at(1))),
                vcombine_s8(vld1_s8(at(2)), vld1_s8(at(3))),
            ),
            _ => {
                let w = |k: usize| (at(k) as *const u32).read_unaligned();
                let lo = [w(0), w(1), w(2), w(3)];
                let hi = [w(4), w(5), w(6), w(7)];
                (
                    vreinterpretq_s8_u32(vld1q_u32(lo.as_ptr())),
                    vreinterpretq_s8_u32(vld1q_u32(hi.as_ptr())),
                )
            }
        }
    }

    /// Lane scales of one chunk: lanes 0..4 and 4..8.
    #[inline(always)]
    unsafe fn lane_scales<const G: usize>(s: *const f32) -> (float32x4_t, float32x4_t) {
        match G {
            32 => (vld1q_dup_f32(s), vld1q_dup_f32(s)),
            16 => (vld1q_dup_f32(s), vld1q_dup_f32(s.add(1))),
            8 => {
                let v = vld1q_f32(s);
                (vzip1q_f32(v, v), vzip2q_f32(v, v))
            }
            _ => (vld1q_f32(s), vld1q_f32(s.add(4))),
        }
    }

    #[inline(always)]
    unsafe fn body<I: Isa, const G: usize, const Q8: bool>(
        m: &GroupMatrix,
        x: &GroupActs,
        first: usize,
        y: &mut [f32],
    ) {
        let mut sc = Scratch::new(m);
        let per = CHUNK / G;
        let sg = m.fmt.scale_groups;
        let q = x.q.as_ptr();
        for (i, out) in y.iter_mut().enumerate() {
            let p = m.row(first + i);
            let n = decode_bitmap(p.bitmap, G, &mut sc.off);
            group_scales(&p, sg, G, n, x, &mut sc);
            let mut acc0 = vdupq_n_f32(0.0);
            let mut acc1 = vdupq_n_f32(0.0);
            let v = p.values.as_ptr();
            for c in 0..n.div_ceil(per) {
                let (w0, w1) = if Q8 {
                    (
                        vld1q_s8(v.add(CHUNK * c) as *const i8),
                        vld1q_s8(v.add(CHUNK * c + 16) as *const i8),
                    )
                } else {
                    let b = vld1q_u8(v.add(16 * c));
                    let eight = vdupq_n_s8(8);
                    (
                        vsubq_s8(vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x0F))), eight),
                        vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(b)), eight),
                    )
                };
                let (x0, x1) = gather::<G>(q, sc.off.as_ptr().add(c * per));
                let l0 = I::dot4(vdupq_n_s32(0), w0, x0);
                let l1 = I::dot4(vdupq_n_s32(0), w1, x1);
                let (s0, s1) = lane_scales::<G>(sc.s.as_ptr().add(c * per));
                acc0 = vfmaq_f32(acc0, vcvtq_f32_s32(l0), s0);
                acc1 = vfmaq_f32(acc1, vcvtq_f32_s32(l1), s1);
            }
            let r = vaddq_f32(acc0, acc1);
            let a: [f32; 4] = std::mem::transmute(r);
            *out = (a[0] + a[2]) + (a[1] + a[3]);
        }
    }

    #[target_feature(enable = "dotprod")]
    unsafe fn sdot<const G: usize, const Q8: bool>(
        m: &GroupMatrix,
        x: &GroupActs,
        first: usize,
        y: &mut [f32],
    ) {
        body::<Sdot, G, Q8>(m, x, first, y)
    }

    pub(super) fn rows_neon(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        let q8 = m.fmt.values == Values::Q8;
        // SAFETY: NEON is part of the aarch64 baseline; reads in bounds (module doc).
        unsafe {
            match (m.fmt.g, q8) {
                (4, false) => body::<Neon, 4, false>(m, x, first, y),
                (8, false) => body::<Neon, 8, false>(m, x, first, y),
                (16, false) => body::<Neon, 16, false>(m, x, first, y),
                (32, false) => body::<Neon, 32, false>(m, x, first, y),
                (4, true) => body::<Neon, 4, true>(m, x, first, y),
                (8, true) => body::<Neon, 8, true>(m, x, first, y),
                (16, true) => body::<Neon, 16, true>(m, x, first, y),
                _ => body::<Neon, 32, true>(m, x, first, y),
            }
        }
    }

    pub(super) fn rows_sdot(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        let q8 = m.fmt.values == Values::Q8;
        // SAFETY: handed out by `GroupKernel::for_level` only at `Level::Dotprod` and above,
        // which `Level::detected` reports only with the dot product extension.
        unsafe {
            match (m.fmt.g, q8) {
                (4, false) => sdot::<4, false>(m, x, first, y),
                (8, false) => sdot::<8, false>(m, x, first, y),
                (16, false) => sdot::<16, false>(m, x, first, y),
                (32, false) => sdot::<32, false>(m, x, first, y),
                (4, true) => sdot::<4, true>(m, x, first, y),
                (8, true) => sdot::<8, true>(m, x, first, y),
                (16, true) => sdot::<16, true>(m, x, first, y),
                _ => sdot::<32, true>(m, x, first, y),
            }
        }
    }
}
