//! Group-sparse weights (SparseByteNN / GQSA style): each row of `cols` inputs is cut into
//! groups of `g` consecutive weights (g = 4, 8, 16 or 32); only the groups that are not all
//! zero are stored, quantized 4-bit (Q4: x = d * (q - 8), as Q4_0) or 8-bit (Q8: x = d * q,
//! as Q8_0), with one f16 scale per group or per `scale_groups` consecutive stored groups.
//! GQSA's W4 with 50 % group sparsity is `GroupFormat::new(16, Values::Q4)` on a matrix pruned
//! by [`prune`] at 0.5.
//!
//! # Byte layout (version 2, magic `SPG2`)
//!
//! All integers little-endian; nothing is aligned (every read is unaligned), so a matrix can
//! be used in place at any offset of a memory map.
//!
//! ```text
//! header (16 bytes)
//!   0..4    magic  b"SPG2"
//!   4..8    rows   u32
//!   8..12   cols   u32, a multiple of g (> 0), at most 65535 groups
//!   12      g      4, 8, 16 or 32
//!   13      values 0 = Q4, 1 = Q8
//!   14      scale_groups  1, 2, 4 or 8 stored groups per scale, with g * scale_groups <= 32
//!                          (1 for g = 32)
//!   15      tile   0 (rows of their own), or 8, 16 or 32: row tiles (below)
//! row offsets (4 * (rows + 1) bytes)
//!   u32 from the start of the buffer; offset[0] is the end of this table, offset[rows] the
//!   buffer's length, row r is bytes offset[r]..offset[r + 1].
//! row r, with G = cols / g groups of which n are stored:
//!   n       u16
//!   index   n group numbers, strictly increasing, each < G: u8 where G <= 256, else u16
//!   scales  ceil(n / scale_groups) f16: scale s covers stored groups s*sg .. s*sg + sg - 1
//!   values  ceil(n * g / 32) chunks; the stored groups' weights are concatenated in index
//!           order into one stream, cut into chunks of 32 weights (the last padded with
//!           zeros, level 8 for Q4):
//!             Q4 chunk, 16 bytes: byte j = weight j (low nibble) | weight 16 + j (high),
//!                                 the Q4_0 nibble order; x = d * (q - 8)
//!             Q8 chunk, 32 bytes: weight j = i8 byte j; x = d * q
//! ```
//!
//! Version 1 (`SPG1`) kept a bitmap of the stored groups instead of the count and index:
//! smaller (one bit per group), but every kernel had to decode it row by row (a `tzcnt` per
//! stored group, or a compress per bitmap byte) and to walk all G bits whatever the sparsity.
//! The index list is read 16 groups at a time with one widening load. Bytes per dense weight
//! at g = 16, W4, per-group scales, 576 columns: 0.347 at 50 % and 0.189 at 75 % (count,
//! index, scales and values with the last chunk padded; plus 4 bytes of row offset), against
//! Q4_0's 0.5625; `scale_groups = 2` (32 weights per scale, as Q4_0) brings 50 % to 0.316.
//!
//! # Row tiles
//!
//! With `tile` = T > 0, rows `T t .. T t + T` (the last tile may be shorter) store the same
//! groups: every row of a tile has its first row's count and index (the encoder stores the
//! groups that are not all zero in some row of the tile, [`prune_tiles`] drops the groups of
//! smallest norm over the tile; [`GroupMatrix::new`] refuses a tile whose rows differ). Each
//! row's bytes are laid out as above, so decoding, the row edits of fused adapters and the
//! byte counts are those of any matrix; but the rows lie plane by plane: row i of every
//! tile (rows i, T + i, 2T + i, ...), then row i + 1 of every tile, and so on (the offset
//! table says where each row starts; [`GroupMatrix::new`] checks that the rows lie back to
//! back in that order). What tiles buy is speed: eight rows that share their groups share
//! the activations each group reads, so the kernels take eight rows per vector, as the dense
//! Q4_0 kernels do, instead of gathering activations row by row; and the placement makes
//! those eight rows eight sequential streams through memory, as the dense kernel's eight
//! rows are (eight neighbouring rows read side by side, as they lay at first, ran at 0.7-1.0x
//! of dense Q4_0 where the matrix comes from the last-level cache, plane by plane
//! 1.0-1.3x). The price is a coarser pattern.
//!
//! Tiled matrices sum in an order of their own (an exact integer per group, then one fused
//! multiply-add per group), which suits eight rows per vector:
//!
//! ```text
//! per row:   for stored group k: d_k = exact integer sum of its g levels times activations
//!            s_k = dx[block of group k] * dw[k / scale_groups]
//!            a = 2 * (chunk of k mod 2) + (k mod (32 / g)) mod 2   (chunk of k = k g / 32)
//!            A[a] = fma(d_k, s_k, A[a])
//! end:       (A[0] + A[1]) + (A[2] + A[3])
//! ```
//!
//! # Kernels
//!
//! y[r] = dot(row r, x) (rows of their own; tiles as above). x is quantized once per call
//! ([`GroupActs`]): int8 with an f32 scale per 32 columns (rounding as `kernels/act.rs`),
//! padded with zeros to whole blocks of 32; a
//! stored group (g <= 32, aligned to g) lies inside one activation block. Every kernel walks
//! a row chunk by chunk, in one order, so all levels give the same bits:
//!
//! ```text
//! per row:    s[k] = dx[block of group k] * dw[k / scale_groups]   (f32; 0 for padding)
//! per chunk c: lane l (0..8) = exact integer sum of weights 4l..4l+3 times their activations
//!             A[l] = fma(lane l, s[group of lane l], A[l]), A = E for even c, O for odd c
//! end:        t[l] = E[l] + O[l];  ((t[0]+t[4]) + (t[2]+t[6])) + ((t[1]+t[5]) + (t[3]+t[7]))
//! ```
//!
//! (padding lanes of the last chunk take the activations of columns 0.. and the scale 0.)
//! Two accumulator sets give each row two independent chains of fused multiply-adds.
//! [`GroupKernel::for_level`] gives the kernel of a [`Level`]: portable Rust, AVX2 (+FMA,
//! F16C), AVX-512 VNNI (`vpdpbusd` on 256-bit vectors, rows prepared 16 groups at a time in
//! 512-bit registers), NEON, and NEON with `sdot`; [`GroupKernel::get`] the one of
//! [`Level::selected`] (the CPU's best, capped by `SPARROW_KERNELS`). Tiled Q4 matrices have
//! rows-per-lane kernels at every level (x86: eight rows per 256-bit vector, AVX2 and
//! AVX-512 VNNI; aarch64: four rows per NEON vector, with `sdot` or `smull`), and so have
//! tiled Q8 matrices (x86: |w| against x with w's sign); batches over tiled matrices go four
//! tokens per pass on x86 (each chunk transposed once for the four), token by token on
//! aarch64.
//!
//! Batches go through [`GroupKernel::matmat_rows`]: four tokens per pass over a row, the
//! row's offsets and weight scales prepared and each chunk's weights decoded once for the
//! four (on x86 the activations enter biased, `x + 128`, so that a lane is one `vpdpbusd`
//! from `-128 * sum w`, computed once per chunk); each (row, token) sums in the order above,
//! so the bits are the matrix-vector kernel's. That order (one fused multiply-add per lane
//! of 4 weights) is also what bounds a batch's speed: the dense Q4_0 batch kernels, whose
//! rows share the activations and sum a whole block in integers, do fewer conversions and
//! multiply-adds per weight.

use crate::error::{Error, Result};
use crate::kernels::math::fma32;
use crate::kernels::Level;
use crate::quant::util::{f16_to_f32, f32_to_f16};
use std::sync::OnceLock;

const MAGIC: &[u8; 4] = b"SPG2";
/// The byte layout's version (the `N` of its magic `SPGN`).
pub const LAYOUT_VERSION: u32 = 2;
/// Bytes of the header before the row offsets.
pub const HEADER_BYTES: usize = 16;
/// Weights per value chunk (and columns per activation block).
pub const CHUNK: usize = 32;
/// Most groups per row (the stored count is a u16).
pub const MAX_GROUPS: usize = u16::MAX as usize;

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
    /// Rows per tile whose rows store the same groups (0: every row its own; 8, 16 or 32):
    /// see "Row tiles" in the module doc.
    pub tile: usize,
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
            tile: 0,
        }
        .checked()
    }

    /// The same format with tiles of `tile` rows that store the same groups (0: none).
    pub fn with_tile(self, tile: usize) -> Result<GroupFormat> {
        GroupFormat { tile, ..self }.checked()
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
        if !matches!(self.tile, 0 | 8 | 16 | 32) {
            return Err(invalid(format!(
                "tiles of {} rows: want 0 (no tiles), 8, 16 or 32",
                self.tile
            )));
        }
        Ok(self)
    }

    /// Bytes of a row of `cols` columns with `n` stored groups.
    pub fn row_bytes(&self, cols: usize, n: usize) -> usize {
        2 + index_bytes(cols / self.g) * n
            + 2 * n.div_ceil(self.scale_groups)
            + (n * self.g).div_ceil(CHUNK) * self.values.chunk_bytes()
    }
}

/// Bytes of one group number in a row's index: 1 for up to 256 groups per row, else 2.
fn index_bytes(groups: usize) -> usize {
    if groups <= 256 {
        1
    } else {
        2
    }
}

/// Checks that `cols` columns form at most [`MAX_GROUPS`] groups of `g`.
fn check_groups(cols: usize, g: usize) -> Result<()> {
    if cols / g > MAX_GROUPS {
        return Err(invalid(format!(
            "{cols} columns make {} groups of {g}, more than {MAX_GROUPS}",
            cols / g
        )));
    }
    Ok(())
}

/// Magnitude pruning: in each row of `cols` weights, zeroes the `round(sparsity * groups)`
/// groups of `g` with the smallest L2 norm (the earlier group on ties).
pub fn prune(w: &mut [f32], cols: usize, g: usize, sparsity: f64) -> Result<()> {
    prune_tiles(w, cols, g, sparsity, 1)
}

/// [`prune`] for tiles of `tile` consecutive rows (the last tile may be shorter) that drop
/// the same groups: those with the smallest L2 norm over the tile's rows (a tile of 1 is
/// [`prune`]).
pub fn prune_tiles(w: &mut [f32], cols: usize, g: usize, sparsity: f64, tile: usize) -> Result<()> {
    GroupFormat::new(g, Values::Q4)?;
    if tile == 0 {
        return Err(invalid("tiles of 0 rows"));
    }
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
    for rows in w.chunks_mut(cols * tile) {
        order.clear();
        order.extend((0..groups).map(|i| {
            let sq = rows
                .chunks_exact(cols)
                .flat_map(|row| &row[i * g..(i + 1) * g])
                .map(|&x| x as f64 * x as f64)
                .sum::<f64>();
            (sq, i)
        }));
        order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for row in rows.chunks_exact_mut(cols) {
            for &(_, i) in &order[..drop] {
                row[i * g..(i + 1) * g].fill(0.0);
            }
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
    check_groups(cols, g)?;
    if let Some(v) = w.iter().find(|v| !v.is_finite()) {
        return Err(invalid(format!("weight {v} is not finite")));
    }
    let table = HEADER_BYTES + 4 * (rows + 1);
    let mut out = Vec::with_capacity(table);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(rows as u32).to_le_bytes());
    out.extend_from_slice(&(cols as u32).to_le_bytes());
    out.extend_from_slice(&[
        g as u8,
        fmt.values.code(),
        fmt.scale_groups as u8,
        fmt.tile as u8,
    ]);
    out.resize(table, 0);
    let wide = index_bytes(cols / g) == 2;
    let mut index: Vec<u16> = Vec::with_capacity(cols / g);
    let mut stream: Vec<f32> = Vec::with_capacity(cols);
    let mut levels: Vec<u8> = Vec::with_capacity(cols + CHUNK);
    // The rows in row order (`body`, row r from `starts[r]`), placed afterwards.
    let mut body: Vec<u8> = Vec::new();
    let mut starts: Vec<usize> = Vec::with_capacity(rows + 1);
    for (r, row) in w.chunks_exact(cols).enumerate() {
        starts.push(body.len());
        let out = &mut body;
        // Count, index and the stream of stored weights: the groups of the row that are not
        // all zero, or of its tile (those not all zero in some row of the tile).
        if fmt.tile == 0 || r % fmt.tile == 0 {
            let span = if fmt.tile == 0 {
                row
            } else {
                &w[r * cols..(r + fmt.tile).min(rows) * cols]
            };
            index.clear();
            index.extend((0..cols / g).filter_map(|i| {
                let nonzero = span
                    .chunks_exact(cols)
                    .any(|row| row[i * g..(i + 1) * g].iter().any(|&v| v != 0.0));
                nonzero.then_some(i as u16)
            }));
        }
        stream.clear();
        for &i in &index {
            stream.extend_from_slice(&row[i as usize * g..(i as usize + 1) * g]);
        }
        out.extend_from_slice(&(index.len() as u16).to_le_bytes());
        for &i in &index {
            if wide {
                out.extend_from_slice(&i.to_le_bytes());
            } else {
                out.push(i as u8);
            }
        }
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
    starts.push(body.len());
    if u32::try_from(table + body.len()).is_err() {
        return Err(invalid("encoded matrix over 4 GiB"));
    }
    out.reserve(body.len());
    for r in placement(rows, fmt.tile) {
        let at = out.len() as u32;
        out[HEADER_BYTES + 4 * r..HEADER_BYTES + 4 * r + 4].copy_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&body[starts[r]..starts[r + 1]]);
    }
    let end = out.len() as u32;
    out[HEADER_BYTES + 4 * rows..table].copy_from_slice(&end.to_le_bytes());
    Ok(out)
}

/// The order in which the rows lie in the buffer: row order, or with row tiles plane by
/// plane (module doc, "Row tiles").
fn placement(rows: usize, tile: usize) -> impl Iterator<Item = usize> {
    let (planes, tiles) = if tile == 0 {
        (1, rows)
    } else {
        (tile, rows.div_ceil(tile))
    };
    (0..planes)
        .flat_map(move |i| (0..tiles).map(move |t| t * planes + i))
        .filter(move |&r| r < rows)
}

/// A checked view of an encoded matrix (see the module doc): every offset, count, group
/// number and scale was validated by [`GroupMatrix::new`], so the kernels read it without
/// further checks.
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
    n: usize,
    /// `n` group numbers of `wide` (2) or 1 byte.
    index: &'a [u8],
    wide: bool,
    scales: &'a [u8],
    values: &'a [u8],
}

impl RowParts<'_> {
    /// Group number of stored group `k` (< n).
    #[inline(always)]
    fn group(&self, k: usize) -> usize {
        if self.wide {
            u16::from_le_bytes([self.index[2 * k], self.index[2 * k + 1]]) as usize
        } else {
            self.index[k] as usize
        }
    }

    /// Weight scale of stored group `k`, for `sg` groups per scale.
    #[inline(always)]
    fn scale(&self, k: usize, sg: usize) -> f32 {
        let j = k / sg;
        f16_to_f32([self.scales[2 * j], self.scales[2 * j + 1]])
    }
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
            if &bytes[0..3] == b"SPG" && bytes[3].is_ascii_digit() {
                return Err(invalid(format!(
                    "layout version {} (magic {}) is not read by this build, which reads \
                     version {LAYOUT_VERSION} (SPG2): prune the model again",
                    bytes[3] as char,
                    String::from_utf8_lossy(&bytes[0..4])
                )));
            }
            return Err(invalid("bad magic (want SPG2)"));
        }
        let rows = u32_at(bytes, 4).ok_or_else(|| invalid("truncated header"))?;
        let cols = u32_at(bytes, 8).ok_or_else(|| invalid("truncated header"))?;
        let values = match bytes[13] {
            0 => Values::Q4,
            1 => Values::Q8,
            v => return Err(invalid(format!("value type {v} is not 0 (Q4) or 1 (Q8)"))),
        };
        let fmt = GroupFormat {
            g: bytes[12] as usize,
            values,
            scale_groups: bytes[14] as usize,
            tile: bytes[15] as usize,
        }
        .checked()?;
        if cols == 0 || !cols.is_multiple_of(fmt.g) {
            return Err(invalid(format!(
                "{cols} columns is not a positive multiple of {}",
                fmt.g
            )));
        }
        check_groups(cols, fmt.g)?;
        Ok((rows, cols, fmt))
    }

    /// Validates `bytes` (header, offsets, every row's count, group numbers and length,
    /// scales finite) and returns a view of them.
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
        let ib = index_bytes(groups);
        // The rows lie back to back from the end of the table, in `placement` order.
        let mut prev = table;
        // The row before in the buffer: number, stored groups, bytes.
        let mut before: Option<(usize, usize, usize)> = None;
        for r in placement(rows, fmt.tile) {
            let start = u32_at(bytes, HEADER_BYTES + 4 * r).unwrap_or(0);
            if start != prev {
                let order = if fmt.tile > 0 {
                    " (rows in tiles lie plane by plane: row i of every tile, then row i + 1; \
                     files tiled before that placement must be pruned again)"
                } else {
                    ""
                };
                return Err(invalid(match before {
                    None => format!(
                        "row {r} starts at {start}, not at the end of the offset table \
                         ({table}){order}"
                    ),
                    Some((b, n, len)) => format!(
                        "row {r} starts at {start}, not at {prev} where row {b} before it \
                         ends (its {n} stored groups take {len} bytes){order}"
                    ),
                }));
            }
            let n = match bytes.get(start..start + 2) {
                Some(c) => u16::from_le_bytes([c[0], c[1]]) as usize,
                None => {
                    return Err(invalid(format!(
                        "row {r}: its 2-byte group count at {start} lies outside 0..{}",
                        bytes.len()
                    )))
                }
            };
            if n > groups {
                return Err(invalid(format!(
                    "row {r}: {n} stored groups, the row has {groups}"
                )));
            }
            let want = fmt.row_bytes(cols, n);
            let end = start + want;
            if end > bytes.len() {
                return Err(invalid(format!(
                    "row {r}: its {n} stored groups take bytes {start}..{end}, outside 0..{}",
                    bytes.len()
                )));
            }
            let row = &bytes[start..end];
            before = Some((r, n, want));
            if fmt.tile > 0 && r % fmt.tile != 0 {
                // The tile's rows store the tile's first row's groups: same count and index.
                let head = u32_at(bytes, HEADER_BYTES + 4 * (r - r % fmt.tile)).unwrap_or(0);
                let len = 2 + ib * n;
                if bytes.get(head..head + len) != Some(&row[..len.min(row.len())]) {
                    return Err(invalid(format!(
                        "row {r}: stores other groups than row {} of its tile of {}",
                        r - r % fmt.tile,
                        fmt.tile
                    )));
                }
            }
            let p = Self::parts(row, n, ib == 2, fmt.scale_groups);
            let mut next = 0;
            for k in 0..n {
                let i = p.group(k);
                if i < next || i >= groups {
                    return Err(invalid(format!(
                        "row {r}: stored group {k} is group {i}, not in {next}..{groups} \
                         (group numbers increase and are below the row's group count)"
                    )));
                }
                next = i + 1;
            }
            for s in p.scales.chunks_exact(2) {
                let d = f16_to_f32([s[0], s[1]]);
                if !d.is_finite() {
                    return Err(invalid(format!("row {r}: scale {d} is not finite")));
                }
            }
            prev = end;
        }
        let last = u32_at(bytes, HEADER_BYTES + 4 * rows).unwrap_or(0);
        if prev != bytes.len() || last != prev {
            return Err(invalid(format!(
                "rows end at {prev}, the offset table says {last}, the buffer at {}",
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
        (0..self.rows).map(|r| self.row(r).n).sum()
    }

    fn offset(&self, i: usize) -> usize {
        let b = &self.bytes[HEADER_BYTES + 4 * i..HEADER_BYTES + 4 * i + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// Splits a row of `n` stored groups whose length was checked against `row_bytes`.
    fn parts(row: &[u8], n: usize, wide: bool, sg: usize) -> RowParts<'_> {
        let (index, rest) = row[2..].split_at(if wide { 2 * n } else { n });
        let (scales, values) = rest.split_at(2 * n.div_ceil(sg));
        RowParts {
            n,
            index,
            wide,
            scales,
            values,
        }
    }

    /// The bytes of row `r` in the buffer (rows need not follow each other: "Row tiles").
    pub fn row_range(&self, r: usize) -> std::ops::Range<usize> {
        let start = self.offset(r);
        let n = u16::from_le_bytes([self.bytes[start], self.bytes[start + 1]]) as usize;
        start..start + self.fmt.row_bytes(self.cols, n)
    }

    fn row(&self, r: usize) -> RowParts<'a> {
        let row = &self.bytes[self.row_range(r)];
        let n = u16::from_le_bytes([row[0], row[1]]) as usize;
        let wide = index_bytes(self.cols / self.fmt.g) == 2;
        Self::parts(row, n, wide, self.fmt.scale_groups)
    }

    /// The weights as f32, row-major (dropped groups are zeros).
    pub fn decode(&self) -> Vec<f32> {
        let (g, sg) = (self.fmt.g, self.fmt.scale_groups);
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols).enumerate() {
            let p = self.row(r);
            for k in 0..p.n {
                let i = p.group(k);
                let d = p.scale(k, sg);
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
            }
        }
        out
    }
}

/// `v.round_ties_even()` for |v| < 2^22 (and NaN for NaN) without a libm call (`rintf`
/// where the baseline target lacks SSE4.1): adding and removing 1.5 * 2^23 rounds to an
/// integer, to nearest with ties to even.
#[inline(always)]
fn round_ties_even(v: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (v + SHIFT) - SHIFT
}

/// Quantizes `x` into `q` (its length rounded up to whole blocks of 32, zero-padded) and one
/// scale per block into `d`: inverse scale 127 / amax, ties to even.
fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), db) in x.chunks(CHUNK).zip(q.chunks_exact_mut(CHUNK)).zip(d) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *db = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (o, &v) in qb.iter_mut().zip(xb) {
            *o = round_ties_even(v * id) as i8;
        }
    }
}

/// Activations quantized once per call: int8 with an f32 scale per 32 columns, zero-padded to
/// whole blocks (rounding as `kernels/act.rs`: inverse scale 127 / amax, ties to even).
#[derive(Clone, Debug)]
pub struct GroupActs {
    cols: usize,
    q: Vec<i8>,
    /// The same values biased to unsigned (`q + 128`), for the x86 four-token kernels.
    u: Vec<u8>,
    d: Vec<f32>,
    /// `offsets[l]`: -8 times the sum of each run of `4 << l` values (l = 0..4, groups of
    /// 4, 8, 16, 32), the Q4 level offset of a group in the x86 tiled kernels, computed once
    /// per quantization rather than once per matrix and row task.
    #[cfg(target_arch = "x86_64")]
    offsets: [Vec<i32>; 4],
}

impl Default for GroupActs {
    fn default() -> GroupActs {
        GroupActs::new(&[])
    }
}

impl GroupActs {
    pub fn new(x: &[f32]) -> GroupActs {
        let mut a = GroupActs {
            cols: 0,
            q: Vec::new(),
            u: Vec::new(),
            d: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            offsets: Default::default(),
        };
        a.quantize(x);
        a
    }

    /// Quantizes `x` into these buffers (what [`GroupActs::new`] gives, without allocating
    /// once the buffers are large enough).
    pub fn quantize(&mut self, x: &[f32]) {
        let nb = x.len().div_ceil(CHUNK);
        self.q.clear();
        self.q.resize(nb * CHUNK, 0);
        self.d.clear();
        self.d.resize(nb, 0.0);
        // The AVX2 quantizer gives the portable one's values for finite x, so it is taken
        // wherever the CPU has it, whatever level `SPARROW_KERNELS` picks for the kernels.
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has the features `x86::quantize` is compiled for.
            unsafe { x86::quantize(x, &mut self.q, &mut self.d) };
        } else {
            quantize_blocks(x, &mut self.q, &mut self.d);
        }
        #[cfg(not(target_arch = "x86_64"))]
        quantize_blocks(x, &mut self.q, &mut self.d);
        #[cfg(target_arch = "x86_64")]
        {
            let o = &mut self.offsets;
            o[0].clear();
            o[0].extend(
                self.q
                    .chunks_exact(4)
                    .map(|c| -8 * c.iter().map(|&v| v as i32).sum::<i32>()),
            );
            for l in 1..4 {
                let (lo, hi) = o.split_at_mut(l);
                hi[0].clear();
                hi[0].extend(lo[l - 1].chunks_exact(2).map(|p| p[0] + p[1]));
            }
        }
        self.u.clear();
        self.u.extend(self.q.iter().map(|&q| q as u8 ^ 0x80));
        self.cols = x.len();
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
/// Computes rows `first..first + count` for `n` tokens (a multiple of 4; `count` =
/// `y.len() / n`), `y[t * count + i]` for row `first + i` and token t: four tokens at a
/// time, each row's groups and weights decoded once for the four, every (row, token) the
/// bits of [`RowsFn`]; arguments checked by [`GroupKernel::matmat_rows`].
type TokensFn = fn(&GroupMatrix, &[GroupActs], usize, &mut [f32]);

/// The accumulator of stored group `k` (groups of `g`) in the tiled order (module doc):
/// twice the parity of its chunk, plus the parity of its place in the chunk.
#[inline(always)]
fn tiled_acc(k: usize, g: usize) -> usize {
    2 * ((k * g / CHUNK) % 2) + (k % (CHUNK / g)) % 2
}

/// A [`TokensFn`] from a [`RowsFn`]: each token on its own.
fn per_token(m: &GroupMatrix, x: &[GroupActs], first: usize, y: &mut [f32], rows: RowsFn) {
    let count = y.len() / x.len().max(1);
    for (a, out) in x.iter().zip(y.chunks_exact_mut(count.max(1))) {
        rows(m, a, first, out);
    }
}

/// Rows per chunk of [`GroupKernel::matmat_rows`]: their weights stay in the caches while
/// every group of four tokens goes past them.
const MATMAT_ROWS: usize = 64;

/// A group-sparse matrix-vector kernel of one level.
#[derive(Clone, Copy)]
pub struct GroupKernel {
    /// Arch, op and variant: `generic_matvec_group`, `avx2_matvec_group`, ...
    pub name: &'static str,
    pub level: Level,
    rows: RowsFn,
    tokens: TokensFn,
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
            tokens: portable::tokens,
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
                    tokens: x86::tokens_vnni,
                };
            }
            if level == Level::Avx2 {
                return GroupKernel {
                    name: "avx2_matvec_group",
                    level,
                    rows: x86::rows_avx2,
                    tokens: x86::tokens_avx2,
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
                    tokens: arm::tokens_sdot,
                };
            }
            if level == Level::Neon {
                return GroupKernel {
                    name: "neon_matvec_group",
                    level,
                    rows: arm::rows_neon,
                    tokens: arm::tokens_neon,
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

    /// Y = W X for every row and every token of `x`: `y[t * rows + r]`.
    pub fn matmat(&self, m: &GroupMatrix, x: &[GroupActs], y: &mut [f32]) -> Result<()> {
        if y.len() != m.rows * x.len() {
            return Err(invalid(format!(
                "{} outputs for {} rows and {} tokens",
                y.len(),
                m.rows,
                x.len()
            )));
        }
        self.matmat_rows(m, x, 0, y)
    }

    /// Rows `first..first + count` of Y = W X for every token of `x`, where
    /// `count = y.len() / x.len()`: `y[t * count + i]` for row `first + i` and token t, the
    /// bits of [`GroupKernel::matvec_rows`] for that token. Tokens go four at a time through
    /// the kernel's four-token rows (each row's groups and weights decoded once for the
    /// four), over chunks of rows that stay in the caches; the last `x.len() % 4` tokens
    /// through [`GroupKernel::matvec_rows`].
    pub fn matmat_rows(
        &self,
        m: &GroupMatrix,
        x: &[GroupActs],
        first: usize,
        y: &mut [f32],
    ) -> Result<()> {
        let n = x.len();
        if n == 0 {
            return if y.is_empty() {
                Ok(())
            } else {
                Err(invalid("outputs for no tokens"))
            };
        }
        let count = y.len() / n;
        if y.len() != n * count {
            return Err(invalid(format!("{} outputs for {n} tokens", y.len())));
        }
        if let Some(a) = x.iter().find(|a| a.cols != m.cols) {
            return Err(invalid(format!(
                "{} activations for {} columns",
                a.cols, m.cols
            )));
        }
        if first.checked_add(count).is_none_or(|e| e > m.rows) {
            return Err(invalid(format!(
                "rows {first}..+{count} outside 0..{}",
                m.rows
            )));
        }
        let quads = n / 4;
        if quads > 0 {
            (self.tokens)(m, &x[..4 * quads], first, &mut y[..4 * quads * count]);
        }
        for (t, a) in x.iter().enumerate().skip(4 * quads) {
            (self.rows)(m, a, first, &mut y[t * count..(t + 1) * count]);
        }
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
        // Groups rounded up to 16 (the x86 kernels prepare 16 at a time), then 16 of padding.
        let n = (m.cols / m.fmt.g).div_ceil(16) * 16 + 16;
        Scratch {
            off: vec![0; n],
            s: vec![0.0; n],
        }
    }
}

/// Fills `sc` for row `p`: for each stored group k its activation offset (column of its
/// first weight) and combined scale s[k] = dx * dw, then offset 0 and scale 0 for the 8
/// groups after (the padding up to a whole chunk is at most 7).
#[inline(always)]
fn prepare_row(p: &RowParts, g: usize, sg: usize, x: &GroupActs, sc: &mut Scratch) {
    for k in 0..p.n {
        let o = p.group(k) * g;
        sc.off[k] = o as u32;
        sc.s[k] = x.d[o / CHUNK] * p.scale(k, sg);
    }
    sc.off[p.n..p.n + 8].copy_from_slice(&[0; 8]);
    sc.s[p.n..p.n + 8].copy_from_slice(&[0.0; 8]);
}

/// The end of the module doc's order: the two accumulator sets added lane by lane, then
/// `hsum_float_8`'s order.
#[inline(always)]
fn fold(e: &[f32; 8], o: &[f32; 8]) -> f32 {
    let t: [f32; 8] = std::array::from_fn(|l| e[l] + o[l]);
    let r: [f32; 4] = [t[0] + t[4], t[1] + t[5], t[2] + t[6], t[3] + t[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// Calls `f::<G, Q8>(args)` (or `f::<T, G, Q8>(args)` for `f[T]`) with the group size and
/// value kind of the group-sparse matrix `m`: one monomorphized kernel body per format,
/// chosen at run time.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! by_group_format {
    ($m:expr, $($f:ident)::+ $([$t:ty])?; $($arg:expr),*) => {
        match ($m.fmt.g, $m.fmt.values == Values::Q8) {
            (4, false) => $($f)::+::<$($t,)? 4, false>($($arg),*),
            (8, false) => $($f)::+::<$($t,)? 8, false>($($arg),*),
            (16, false) => $($f)::+::<$($t,)? 16, false>($($arg),*),
            (32, false) => $($f)::+::<$($t,)? 32, false>($($arg),*),
            (4, true) => $($f)::+::<$($t,)? 4, true>($($arg),*),
            (8, true) => $($f)::+::<$($t,)? 8, true>($($arg),*),
            (16, true) => $($f)::+::<$($t,)? 16, true>($($arg),*),
            _ => $($f)::+::<$($t,)? 32, true>($($arg),*),
        }
    };
}

mod portable {
    use super::*;

    pub(super) fn rows(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        if m.fmt.tile > 0 {
            return rows_tiled(m, x, first, y);
        }
        let mut sc = Scratch::new(m);
        let (g, sg) = (m.fmt.g, m.fmt.scale_groups);
        let per = CHUNK / g;
        for (i, out) in y.iter_mut().enumerate() {
            let p = m.row(first + i);
            prepare_row(&p, g, sg, x, &mut sc);
            let mut acc = [[0.0f32; 8]; 2];
            for c in 0..(p.n * g).div_ceil(CHUNK) {
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
                for (l, a) in acc[c % 2].iter_mut().enumerate() {
                    let k = c * per + 4 * l / g;
                    let o = sc.off[k] as usize + (4 * l) % g;
                    let lane: i32 = (0..4).map(|t| w[4 * l + t] * x.q[o + t] as i32).sum();
                    *a = fma32(lane as f32, sc.s[k], *a);
                }
            }
            *out = fold(&acc[0], &acc[1]);
        }
    }

    /// [`rows`] for a tiled matrix, in the tiled order (module doc).
    fn rows_tiled(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        let (g, sg) = (m.fmt.g, m.fmt.scale_groups);
        for (i, out) in y.iter_mut().enumerate() {
            let p = m.row(first + i);
            let mut acc = [0.0f32; 4];
            let mut w = [0i32; CHUNK];
            for k in 0..p.n {
                let col = p.group(k) * g;
                let mut dot = 0i32;
                for t in 0..g {
                    let e = k * g + t;
                    if e % CHUNK == 0 || t == 0 {
                        w = chunk_weights(m.fmt.values, p.values, e / CHUNK);
                    }
                    dot += w[e % CHUNK] * x.q[col + t] as i32;
                }
                let s = x.d[col / CHUNK] * p.scale(k, sg);
                let a = tiled_acc(k, g);
                acc[a] = fma32(dot as f32, s, acc[a]);
            }
            *out = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
    }

    /// The weights of chunk `c` of a row.
    #[inline(always)]
    fn chunk_weights(values: Values, v: &[u8], c: usize) -> [i32; CHUNK] {
        match values {
            Values::Q4 => {
                let b = &v[16 * c..16 * c + 16];
                std::array::from_fn(|j| {
                    (if j < 16 { b[j] & 0xF } else { b[j - 16] >> 4 }) as i32 - 8
                })
            }
            Values::Q8 => {
                let b = &v[CHUNK * c..CHUNK * c + CHUNK];
                std::array::from_fn(|j| b[j] as i8 as i32)
            }
        }
    }

    /// [`rows`] for tokens four at a time, each chunk's weights decoded once for the four,
    /// over chunks of [`MATMAT_ROWS`] rows.
    pub(super) fn tokens(m: &GroupMatrix, x: &[GroupActs], first: usize, y: &mut [f32]) {
        if m.fmt.tile > 0 {
            return per_token(m, x, first, y, rows);
        }
        let n = x.len();
        let count = y.len() / n.max(1);
        let mut sc: [Scratch; 4] = std::array::from_fn(|_| Scratch::new(m));
        let (g, sg) = (m.fmt.g, m.fmt.scale_groups);
        let per = CHUNK / g;
        for i0 in (0..count).step_by(MATMAT_ROWS) {
            for (q, x) in x.chunks_exact(4).enumerate() {
                for i in i0..(i0 + MATMAT_ROWS).min(count) {
                    let p = m.row(first + i);
                    for (sc, x) in sc.iter_mut().zip(x) {
                        prepare_row(&p, g, sg, x, sc);
                    }
                    let mut acc = [[[0.0f32; 8]; 2]; 4];
                    for c in 0..(p.n * g).div_ceil(CHUNK) {
                        let w = chunk_weights(m.fmt.values, p.values, c);
                        for ((acc, sc), x) in acc.iter_mut().zip(&sc).zip(x) {
                            for (l, a) in acc[c % 2].iter_mut().enumerate() {
                                let k = c * per + 4 * l / g;
                                let o = sc.off[k] as usize + (4 * l) % g;
                                let lane: i32 =
                                    (0..4).map(|t| w[4 * l + t] * x.q[o + t] as i32).sum();
                                *a = fma32(lane as f32, sc.s[k], *a);
                            }
                        }
                    }
                    for (t, acc) in acc.iter().enumerate() {
                        y[(4 * q + t) * count + i] = fold(&acc[0], &acc[1]);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 and AVX-512 VNNI kernels. A row is first prepared into scratch: its stored
    //! groups' activation offsets and combined scales dx * dw (AVX-512: 16 groups at a time
    //! from one widening masked load of the index, dx picked from registers by `vpermt2ps`;
    //! AVX2: one group at a time). Then its chunks are stepped, even and odd chunks into two
    //! accumulators: the 32 products of a chunk summed into 8 exact i32 lanes, converted and
    //! fused-multiply-added with the lanes' scales. Q4 levels enter unsigned (`vpdpbusd`, or
    //! `maddubs` + `madd`, against the signed activations) and 8 * sum of x is subtracted
    //! (the same instruction with 8 for the levels); Q8 uses |w| and x signed like w. Rows go
    //! two at a time, their chains interleaved, and the next two are prepared (into two other
    //! buffers) before these are stepped. Each row sums in the module doc's order, so the
    //! bits are the portable kernel's.
    //!
    //! Safety model: the bodies are `unsafe` `#[inline(always)]` generics, instantiated inside
    //! `#[target_feature]` functions whose safe wrappers are only handed out by
    //! `GroupKernel::for_level` for a level that `Level::detected` reported (no closures in
    //! them: a closure does not inherit the target features). Every pointer read stays inside
    //! the row (lengths, counts and group numbers validated by `GroupMatrix::new`; reads of
    //! the index and scales are masked to the row's count) or the activations (offsets are
    //! groups of the row, below `cols`, or 0 for padding; the padded length is a multiple of
    //! 32). The tiled kernels read each row of an eight-row block through the offset table
    //! (validated: the rows of a tile have one count and index, so one length, and the same
    //! distances from a row's start to its scales and values), each row's scales 16 or 8
    //! bytes at a time from a scale that exists (at least one 16-byte chunk of values follows
    //! the scales), and Q8 chunks 32 bytes at a time.
    use super::*;
    use crate::kernels::x86::avx2::quantize_block;
    use crate::kernels::x86::build;
    use std::arch::x86_64::*;

    /// [`quantize_blocks`] with AVX2: whole blocks by the dense activation quantizer's
    /// block (the same amax, scale and rounding, so the same values for finite `x`), a last
    /// partial block by the portable code.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32]) {
        let whole = x.len() / CHUNK;
        for ((xb, qb), db) in x
            .chunks_exact(CHUNK)
            .zip(q.chunks_exact_mut(CHUNK))
            .zip(&mut d[..whole])
        {
            let qb: &mut [i8; CHUNK] = qb.try_into().expect("chunks of 32");
            *db = quantize_block(xb, qb).0;
        }
        let at = whole * CHUNK;
        quantize_blocks(&x[at..], &mut q[at..], &mut d[whole..]);
    }

    /// A row's parts as pointers.
    #[derive(Clone, Copy)]
    struct Row {
        n: usize,
        index: *const u8,
        scales: *const u8,
        values: *const u8,
    }

    /// Where row `r` of `m` starts (validated offsets).
    #[inline(always)]
    unsafe fn row_start(m: &GroupMatrix, r: usize) -> *const u8 {
        let b = m.bytes.as_ptr();
        let start = u32::from_le((b.add(HEADER_BYTES + 4 * r) as *const u32).read_unaligned());
        b.add(start as usize)
    }

    /// Row `r` of `m` (validated: the offsets and the count agree with the row's length).
    #[inline(always)]
    unsafe fn row_at(m: &GroupMatrix, r: usize, wide: bool, lg: u32) -> Row {
        let p = row_start(m, r);
        let n = u16::from_le((p as *const u16).read_unaligned()) as usize;
        let index = p.add(2);
        let scales = index.add(if wide { 2 * n } else { n });
        let values = scales.add(2 * ((n + (1 << lg) - 1) >> lg));
        Row {
            n,
            index,
            scales,
            values,
        }
    }

    /// Writes a row's activation offsets and combined scales to scratch (`prepare_row`'s
    /// values), then offset 0 and scale 0 for at least the 8 groups after.
    trait Prepare: Sized {
        /// The preparer for activations `x`, for rows with `wide` group numbers and
        /// `1 << lg` groups per scale.
        unsafe fn of(x: &GroupActs, wide: bool, lg: u32) -> Self;

        unsafe fn prepare<const G: usize>(&self, row: &Row, off: *mut u32, s: *mut f32);

        /// `prepare` for four tokens' activations (`p[t]`): the offsets once into `off`,
        /// token t's combined scales (the same products) into `s[t]`.
        unsafe fn prepare4<const G: usize>(
            p: &[Self; 4],
            row: &Row,
            off: *mut u32,
            s: [*mut f32; 4],
        );
    }

    /// One group at a time (AVX2 with F16C).
    struct Scalar {
        d: *const f32,
        wide: bool,
        lg: u32,
    }

    impl Prepare for Scalar {
        #[inline(always)]
        unsafe fn of(x: &GroupActs, wide: bool, lg: u32) -> Scalar {
            Scalar {
                d: x.d.as_ptr(),
                wide,
                lg,
            }
        }

        #[inline(always)]
        unsafe fn prepare<const G: usize>(&self, row: &Row, off: *mut u32, s: *mut f32) {
            for k in 0..row.n {
                let i = if self.wide {
                    u16::from_le((row.index.add(2 * k) as *const u16).read_unaligned()) as usize
                } else {
                    *row.index.add(k) as usize
                };
                let o = i * G;
                *off.add(k) = o as u32;
                let h = (row.scales.add(2 * (k >> self.lg)) as *const u16).read_unaligned();
                let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le(h) as i32)));
                *s.add(k) = *self.d.add(o / CHUNK) * dw;
            }
            _mm256_storeu_si256(off.add(row.n) as *mut __m256i, _mm256_setzero_si256());
            _mm256_storeu_ps(s.add(row.n), _mm256_setzero_ps());
        }

        #[inline(always)]
        unsafe fn prepare4<const G: usize>(
            p: &[Scalar; 4],
            row: &Row,
            off: *mut u32,
            s: [*mut f32; 4],
        ) {
            let (wide, lg) = (p[0].wide, p[0].lg);
            for k in 0..row.n {
                let i = if wide {
                    u16::from_le((row.index.add(2 * k) as *const u16).read_unaligned()) as usize
                } else {
                    *row.index.add(k) as usize
                };
                let o = i * G;
                *off.add(k) = o as u32;
                let h = (row.scales.add(2 * (k >> lg)) as *const u16).read_unaligned();
                let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le(h) as i32)));
                let mut t = 0;
                while t < 4 {
                    *s[t].add(k) = *p[t].d.add(o / CHUNK) * dw;
                    t += 1;
                }
            }
            _mm256_storeu_si256(off.add(row.n) as *mut __m256i, _mm256_setzero_si256());
            let mut t = 0;
            while t < 4 {
                _mm256_storeu_ps(s[t].add(row.n), _mm256_setzero_ps());
                t += 1;
            }
        }
    }

    /// Sixteen groups at a time (AVX-512): the index widened to 16 lanes by one masked load,
    /// the activation scales picked by block from up to 64 held in registers (a gather past
    /// that), the f16 weight scales converted 16 at a time.
    struct Wide {
        dx: [__m512; 4],
        blocks: usize,
        d: *const f32,
        wide: bool,
        lg: u32,
    }

    impl Wide {
        #[inline(always)]
        unsafe fn new(x: &GroupActs, wide: bool, lg: u32) -> Wide {
            let mut t = [0.0f32; 64];
            let blocks = x.d.len();
            if blocks <= 64 {
                t[..blocks].copy_from_slice(&x.d);
            }
            Wide {
                dx: [
                    _mm512_loadu_ps(t.as_ptr()),
                    _mm512_loadu_ps(t.as_ptr().add(16)),
                    _mm512_loadu_ps(t.as_ptr().add(32)),
                    _mm512_loadu_ps(t.as_ptr().add(48)),
                ],
                blocks,
                d: x.d.as_ptr(),
                wide,
                lg,
            }
        }

        /// dx of each lane's block (< `blocks` in the lanes of `m`).
        #[inline(always)]
        unsafe fn dx(&self, blk: __m512i, m: __mmask16) -> __m512 {
            if self.blocks <= 16 {
                _mm512_permutexvar_ps(blk, self.dx[0])
            } else if self.blocks <= 32 {
                _mm512_permutex2var_ps(self.dx[0], blk, self.dx[1])
            } else if self.blocks <= 64 {
                let lo = _mm512_permutex2var_ps(self.dx[0], blk, self.dx[1]);
                let hi = _mm512_permutex2var_ps(self.dx[2], blk, self.dx[3]);
                let upper = _mm512_test_epi32_mask(blk, _mm512_set1_epi32(32));
                _mm512_mask_blend_ps(upper, lo, hi)
            } else {
                _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, blk, self.d)
            }
        }
    }

    /// The mask of the first `n` (at most 16) lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            (1u16 << n) - 1
        }
    }

    impl Prepare for Wide {
        #[inline(always)]
        unsafe fn of(x: &GroupActs, wide: bool, lg: u32) -> Wide {
            Wide::new(x, wide, lg)
        }

        #[inline(always)]
        unsafe fn prepare<const G: usize>(&self, row: &Row, off: *mut u32, s: *mut f32) {
            let to_col = _mm_cvtsi32_si128(G.trailing_zeros() as i32);
            let to_blk = _mm_cvtsi32_si128(5 - G.trailing_zeros() as i32);
            let lg = _mm_cvtsi32_si128(self.lg as i32);
            let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let nsc = (row.n + (1 << self.lg) - 1) >> self.lg;
            let mut j = 0;
            while j < row.n {
                let m = lanes(row.n - j);
                let idx = if self.wide {
                    let p = row.index.add(2 * j) as *const i16;
                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p))
                } else {
                    let p = row.index.add(j) as *const i8;
                    _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p))
                };
                _mm512_storeu_si512(off.add(j) as *mut __m512i, _mm512_sll_epi32(idx, to_col));
                let dx = self.dx(_mm512_srl_epi32(idx, to_blk), m);
                let dw = if self.lg == 0 {
                    let p = row.scales.add(2 * j) as *const i16;
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p))
                } else {
                    let f = j >> self.lg;
                    let p = row.scales.add(2 * f) as *const i16;
                    let h = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(nsc - f), p));
                    _mm512_permutexvar_ps(_mm512_srl_epi32(iota, lg), h)
                };
                _mm512_storeu_ps(s.add(j), _mm512_maskz_mul_ps(m, dx, dw));
                j += 16;
            }
            _mm512_storeu_si512(off.add(j) as *mut __m512i, _mm512_setzero_si512());
            _mm512_storeu_ps(s.add(j), _mm512_setzero_ps());
        }

        #[inline(always)]
        unsafe fn prepare4<const G: usize>(
            p: &[Wide; 4],
            row: &Row,
            off: *mut u32,
            s: [*mut f32; 4],
        ) {
            let (wide, lgv) = (p[0].wide, p[0].lg);
            let to_col = _mm_cvtsi32_si128(G.trailing_zeros() as i32);
            let to_blk = _mm_cvtsi32_si128(5 - G.trailing_zeros() as i32);
            let lg = _mm_cvtsi32_si128(lgv as i32);
            let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let nsc = (row.n + (1 << lgv) - 1) >> lgv;
            let mut j = 0;
            while j < row.n {
                let m = lanes(row.n - j);
                let idx = if wide {
                    let p = row.index.add(2 * j) as *const i16;
                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p))
                } else {
                    let p = row.index.add(j) as *const i8;
                    _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p))
                };
                _mm512_storeu_si512(off.add(j) as *mut __m512i, _mm512_sll_epi32(idx, to_col));
                let blk = _mm512_srl_epi32(idx, to_blk);
                let dw = if lgv == 0 {
                    let p = row.scales.add(2 * j) as *const i16;
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p))
                } else {
                    let f = j >> lgv;
                    let p = row.scales.add(2 * f) as *const i16;
                    let h = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(nsc - f), p));
                    _mm512_permutexvar_ps(_mm512_srl_epi32(iota, lg), h)
                };
                let mut t = 0;
                while t < 4 {
                    let dx = p[t].dx(blk, m);
                    _mm512_storeu_ps(s[t].add(j), _mm512_maskz_mul_ps(m, dx, dw));
                    t += 1;
                }
                j += 16;
            }
            _mm512_storeu_si512(off.add(j) as *mut __m512i, _mm512_setzero_si512());
            let mut t = 0;
            while t < 4 {
                _mm512_storeu_ps(s[t].add(j), _mm512_setzero_ps());
                t += 1;
            }
        }
    }

    /// `v[idx[l]]` for the 8 lanes.
    #[inline(always)]
    unsafe fn spread(v: __m256, idx: [i32; 8]) -> __m256 {
        _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(idx.as_ptr() as *const __m256i))
    }

    /// Scratch memory in cache lines (the AVX-512 preparation stores whole 64-byte vectors).
    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct Line([u32; 16]);

    /// Rows' scratch, one allocation: for each row its stored groups' activation offsets and
    /// combined scales, with room for 16 groups of padding after the groups rounded up to 16.
    struct Buf {
        mem: Vec<Line>,
        lines: usize,
    }

    impl Buf {
        fn new(groups: usize, rows: usize) -> Buf {
            let lines = groups.div_ceil(16) + 1;
            Buf {
                mem: vec![Line([0; 16]); 2 * lines * rows],
                lines,
            }
        }

        /// Offsets and scales of row `i` (< the `rows` of `new`).
        fn ptrs(&mut self, i: usize) -> (*mut u32, *mut f32) {
            let p = self.mem.as_mut_ptr() as *mut u32;
            let n = 16 * self.lines;
            // SAFETY: `mem` holds 2 * lines lines of 16 u32 per row.
            unsafe { (p.add(2 * i * n), p.add((2 * i + 1) * n) as *mut f32) }
        }
    }

    /// The module doc's end for one row: e + o lane by lane, then `hsum_float_8`'s order.
    #[inline(always)]
    unsafe fn fold(e: __m256, o: __m256) -> f32 {
        let acc = _mm256_add_ps(e, o);
        let mut r = _mm256_extractf128_ps::<1>(acc);
        r = _mm_add_ps(r, _mm256_castps256_ps128(acc));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// One chunk per 256-bit step (8 lanes), for AVX2 and for AVX-512 VNNI (`vpdpbusd` on
    /// 256-bit vectors: on Zen 4, which splits 512-bit operations in two halves, a 512-bit
    /// step over two chunks measured no faster, its lane inserts and permutes taking the
    /// shuffle ports).
    mod ymm {
        use super::*;

        /// The activations of one chunk's groups: `CHUNK / G` runs of G bytes.
        #[inline(always)]
        unsafe fn gather<const G: usize>(q: *const i8, off: *const u32) -> __m256i {
            let at = |k: usize| q.add(*off.add(k) as usize);
            match G {
                32 => _mm256_loadu_si256(at(0) as *const __m256i),
                16 => _mm256_blend_epi32::<0xF0>(
                    _mm256_castsi128_si256(_mm_loadu_si128(at(0) as *const __m128i)),
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(at(1) as *const __m128i)),
                ),
                8 => {
                    let b = |k: usize| _mm256_set1_epi64x((at(k) as *const i64).read_unaligned());
                    let v = _mm256_blend_epi32::<0b0000_1100>(b(0), b(1));
                    let v = _mm256_blend_epi32::<0b0011_0000>(v, b(2));
                    _mm256_blend_epi32::<0b1100_0000>(v, b(3))
                }
                _ => _mm256_i32gather_epi32::<1>(
                    q as *const i32,
                    _mm256_loadu_si256(off as *const __m256i),
                ),
            }
        }

        /// The 8 lane scales of a chunk, lane l taking the scale of group 4l / G.
        #[inline(always)]
        unsafe fn lane_scales<const G: usize>(s: *const f32) -> __m256 {
            match G {
                32 => _mm256_broadcast_ss(&*s),
                // [s0, s1] in every 64 bits (one load), then s0 to the low lane's four
                // floats and s1 to the high lane's (an in-lane shuffle).
                16 => _mm256_permutevar_ps(
                    _mm256_castpd_ps(_mm256_broadcast_sd(&*(s as *const f64))),
                    _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                ),
                8 => spread(
                    _mm256_castps128_ps256(_mm_loadu_ps(s)),
                    [0, 0, 1, 1, 2, 2, 3, 3],
                ),
                _ => _mm256_loadu_ps(s),
            }
        }

        /// The 8 exact lane sums of `w` (unsigned) times `x` (signed); without VNNI through
        /// i16 pairs, which do not saturate for the callers' ranges (w <= 15, or |w| <= 128
        /// with |x| <= 127: |pair| <= 2 * 128 * 127 < 2^15).
        #[inline(always)]
        unsafe fn dot<const VNNI: bool>(w: __m256i, x: __m256i) -> __m256i {
            if VNNI {
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
            } else {
                _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(w, x))
            }
        }

        /// Chunk `c` (values `v`, scratch `off`, `s`): acc + its 8 lanes times their scales.
        #[inline(always)]
        unsafe fn step<const G: usize, const Q8: bool, const VNNI: bool>(
            v: *const u8,
            off: *const u32,
            s: *const f32,
            c: usize,
            q: *const i8,
            acc: __m256,
        ) -> __m256 {
            let per = CHUNK / G;
            let xv = gather::<G>(q, off.add(c * per));
            let lanes = if Q8 {
                // |w| against x signed like w (|w| <= 128, |x| <= 127: pairs fit i16).
                let w = _mm256_loadu_si256(v.add(c * CHUNK) as *const __m256i);
                dot::<VNNI>(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w))
            } else {
                // Unsigned levels (low nibbles in the low half), then - 8 * sum of x.
                let b =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(v.add(c * 16) as *const __m128i));
                let w = _mm256_and_si256(
                    _mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                    _mm256_set1_epi8(0x0F),
                );
                let eight = dot::<VNNI>(_mm256_set1_epi8(8), xv);
                _mm256_sub_epi32(dot::<VNNI>(w, xv), eight)
            };
            _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(lanes),
                lane_scales::<G>(s.add(c * per)),
                acc,
            )
        }

        /// Prepares rows r and r + 1 into two scratch buffers.
        #[inline(always)]
        unsafe fn prep2<P: Prepare, const G: usize>(
            p: &P,
            m: &GroupMatrix,
            r: usize,
            wide: bool,
            lg: u32,
            (oa, sa): (*mut u32, *mut f32),
            (ob, sb): (*mut u32, *mut f32),
        ) -> (Row, Row) {
            let ra = row_at(m, r, wide, lg);
            let rb = row_at(m, r + 1, wide, lg);
            p.prepare::<G>(&ra, oa, sa);
            p.prepare::<G>(&rb, ob, sb);
            (ra, rb)
        }

        #[inline(always)]
        pub(super) unsafe fn rows<P: Prepare, const G: usize, const Q8: bool, const VNNI: bool>(
            m: &GroupMatrix,
            x: &GroupActs,
            first: usize,
            y: &mut [f32],
            p: &P,
            wide: bool,
            lg: u32,
        ) {
            // Two rows at a time, their chains of fused multiply-adds interleaved; the next
            // pair is prepared (into the other two buffers) before this pair is stepped.
            let mut buf = Buf::new(m.cols / G, 4);
            let ptrs = [buf.ptrs(0), buf.ptrs(1), buf.ptrs(2), buf.ptrs(3)];
            let q = x.q.as_ptr();
            let pairs_n = y.len() / 2;
            let mut pairs = y.chunks_exact_mut(2);
            let mut r = first;
            let mut next = if pairs_n > 0 {
                Some(prep2::<P, G>(p, m, r, wide, lg, ptrs[0], ptrs[1]))
            } else {
                None
            };
            for (j, out) in (&mut pairs).enumerate() {
                let Some((ra, rb)) = next else {
                    break;
                };
                let h = 2 * (j % 2);
                next = if j + 1 < pairs_n {
                    Some(prep2::<P, G>(
                        p,
                        m,
                        r + 2,
                        wide,
                        lg,
                        ptrs[2 - h],
                        ptrs[3 - h],
                    ))
                } else {
                    None
                };
                let (oa, sa) = ptrs[h];
                let (ob, sb) = ptrs[h + 1];
                let ca = (ra.n * G).div_ceil(CHUNK);
                let cb = (rb.n * G).div_ceil(CHUNK);
                let (va, vb) = (ra.values, rb.values);
                let z = _mm256_setzero_ps();
                let (mut ea, mut oa_, mut eb, mut ob_) = (z, z, z, z);
                let common = ca.min(cb);
                let mut c = 0;
                while c + 2 <= common {
                    ea = step::<G, Q8, VNNI>(va, oa, sa, c, q, ea);
                    eb = step::<G, Q8, VNNI>(vb, ob, sb, c, q, eb);
                    oa_ = step::<G, Q8, VNNI>(va, oa, sa, c + 1, q, oa_);
                    ob_ = step::<G, Q8, VNNI>(vb, ob, sb, c + 1, q, ob_);
                    c += 2;
                }
                let mut d = c;
                while d + 2 <= ca {
                    ea = step::<G, Q8, VNNI>(va, oa, sa, d, q, ea);
                    oa_ = step::<G, Q8, VNNI>(va, oa, sa, d + 1, q, oa_);
                    d += 2;
                }
                if d < ca {
                    ea = step::<G, Q8, VNNI>(va, oa, sa, d, q, ea);
                }
                let mut d = c;
                while d + 2 <= cb {
                    eb = step::<G, Q8, VNNI>(vb, ob, sb, d, q, eb);
                    ob_ = step::<G, Q8, VNNI>(vb, ob, sb, d + 1, q, ob_);
                    d += 2;
                }
                if d < cb {
                    eb = step::<G, Q8, VNNI>(vb, ob, sb, d, q, eb);
                }
                out[0] = fold(ea, oa_);
                out[1] = fold(eb, ob_);
                r += 2;
            }
            let (off, s) = ptrs[0];
            for out in pairs.into_remainder() {
                let row = row_at(m, r, wide, lg);
                p.prepare::<G>(&row, off, s);
                let chunks = (row.n * G).div_ceil(CHUNK);
                let v = row.values;
                let (mut e, mut o) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut c = 0;
                while c + 2 <= chunks {
                    e = step::<G, Q8, VNNI>(v, off, s, c, q, e);
                    o = step::<G, Q8, VNNI>(v, off, s, c + 1, q, o);
                    c += 2;
                }
                if c < chunks {
                    e = step::<G, Q8, VNNI>(v, off, s, c, q, e);
                }
                *out = fold(e, o);
            }
            drop(buf);
        }

        /// Chunk `c` of the values `v` for four tokens (activations `q[t]`, offsets `off`,
        /// scales `s[t]`): `acc[t]` + token t's 8 lanes times their scales. Each lane sum is
        /// [`step`]'s integer, so the bits are its; the weights are decoded, and what the
        /// biased activations add taken back, once for the four. `q[t]`: the activations
        /// biased to unsigned (`x + 128`) except for Q8 without VNNI, which keeps [`step`]'s
        /// |w| against x signed like w. Biased, every lane starts at `-128 * sum w` (of its
        /// four weights, signed: Q4 levels minus 8), and `vpdpbusd` (or `maddubs` + `madd`,
        /// which do not saturate: |pair| <= 2 * 255 * 8) adds `sum (x + 128) w`: exact.
        #[inline(always)]
        unsafe fn step4<const G: usize, const Q8: bool, const VNNI: bool>(
            v: *const u8,
            off: *const u32,
            s: [*const f32; 4],
            c: usize,
            q: [*const i8; 4],
            acc: [__m256; 4],
        ) -> [__m256; 4] {
            let per = CHUNK / G;
            let w = if Q8 {
                _mm256_loadu_si256(v.add(c * CHUNK) as *const __m256i)
            } else {
                let b =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(v.add(c * 16) as *const __m128i));
                let w = _mm256_and_si256(
                    _mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                    _mm256_set1_epi8(0x0F),
                );
                _mm256_sub_epi8(w, _mm256_set1_epi8(8))
            };
            let biased = VNNI || !Q8;
            let ax = _mm256_sign_epi8(w, w);
            // -128 * sum w per lane (biased).
            let corr = if VNNI {
                let b = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), w);
                _mm256_sub_epi32(_mm256_setzero_si256(), b)
            } else {
                _mm256_madd_epi16(
                    _mm256_set1_epi16(-1),
                    _mm256_maddubs_epi16(_mm256_set1_epi8(-128), w),
                )
            };
            let mut out = acc;
            let mut t = 0;
            while t < 4 {
                let xv = gather::<G>(q[t], off.add(c * per));
                let lanes = if VNNI {
                    _mm256_dpbusd_epi32(corr, xv, w)
                } else if biased {
                    let p = _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(xv, w));
                    _mm256_add_epi32(p, corr)
                } else {
                    dot::<false>(ax, _mm256_sign_epi8(xv, w))
                };
                out[t] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(lanes),
                    lane_scales::<G>(s[t].add(c * per)),
                    out[t],
                );
                t += 1;
            }
            out
        }

        /// Rows `first..first + count` for `x.len()` tokens (a multiple of 4; `count` =
        /// `y.len() / x.len()`), `y[t * count + i]`: over chunks of [`MATMAT_ROWS`] rows,
        /// four tokens at a time, one row at a time: prepared for the four (`P::prepare4`),
        /// then its chunks stepped for the four, even and odd chunks into two accumulators
        /// per token as [`rows`] does.
        #[inline(always)]
        pub(super) unsafe fn tokens<
            P: Prepare,
            const G: usize,
            const Q8: bool,
            const VNNI: bool,
        >(
            m: &GroupMatrix,
            x: &[GroupActs],
            first: usize,
            y: &mut [f32],
        ) {
            let wide = index_bytes(m.cols / G) == 2;
            let lg = m.fmt.scale_groups.trailing_zeros();
            let n = x.len();
            let count = y.len() / n;
            let mut buf = Buf::new(m.cols / G, 4);
            let ptrs = [buf.ptrs(0), buf.ptrs(1), buf.ptrs(2), buf.ptrs(3)];
            let biased = VNNI || !Q8;
            let sw = [ptrs[0].1, ptrs[1].1, ptrs[2].1, ptrs[3].1];
            let s = [
                sw[0] as *const f32,
                sw[1] as *const f32,
                sw[2] as *const f32,
                sw[3] as *const f32,
            ];
            let off = ptrs[0].0;
            let mut i0 = 0;
            while i0 < count {
                let i1 = if count - i0 < MATMAT_ROWS {
                    count
                } else {
                    i0 + MATMAT_ROWS
                };
                let mut g = 0;
                while g < n / 4 {
                    let x4 = [&x[4 * g], &x[4 * g + 1], &x[4 * g + 2], &x[4 * g + 3]];
                    let p = [
                        P::of(x4[0], wide, lg),
                        P::of(x4[1], wide, lg),
                        P::of(x4[2], wide, lg),
                        P::of(x4[3], wide, lg),
                    ];
                    let mut q = [std::ptr::null::<i8>(); 4];
                    let mut t = 0;
                    while t < 4 {
                        q[t] = if biased {
                            x4[t].u.as_ptr() as *const i8
                        } else {
                            x4[t].q.as_ptr()
                        };
                        t += 1;
                    }
                    for i in i0..i1 {
                        let row = row_at(m, first + i, wide, lg);
                        P::prepare4::<G>(&p, &row, off, sw);
                        let chunks = (row.n * G).div_ceil(CHUNK);
                        let v = row.values;
                        let z = [_mm256_setzero_ps(); 4];
                        let (mut e, mut o) = (z, z);
                        let mut c = 0;
                        while c + 2 <= chunks {
                            e = step4::<G, Q8, VNNI>(v, off, s, c, q, e);
                            o = step4::<G, Q8, VNNI>(v, off, s, c + 1, q, o);
                            c += 2;
                        }
                        if c < chunks {
                            e = step4::<G, Q8, VNNI>(v, off, s, c, q, e);
                        }
                        let mut t = 0;
                        while t < 4 {
                            y[(4 * g + t) * count + i] = fold(e[t], o[t]);
                            t += 1;
                        }
                    }
                    g += 1;
                }
                i0 = i1;
            }
            drop(buf);
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn tokens_avx2<const G: usize, const Q8: bool>(
            m: &GroupMatrix,
            x: &[GroupActs],
            first: usize,
            y: &mut [f32],
        ) {
            tokens::<Scalar, G, Q8, false>(m, x, first, y)
        }

        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub(super) unsafe fn tokens_vnni<const G: usize, const Q8: bool>(
            m: &GroupMatrix,
            x: &[GroupActs],
            first: usize,
            y: &mut [f32],
        ) {
            tokens::<Wide, G, Q8, true>(m, x, first, y)
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn avx2<const G: usize, const Q8: bool>(
            m: &GroupMatrix,
            x: &GroupActs,
            first: usize,
            y: &mut [f32],
        ) {
            let wide = index_bytes(m.cols / G) == 2;
            let lg = m.fmt.scale_groups.trailing_zeros();
            let p = Scalar {
                d: x.d.as_ptr(),
                wide,
                lg,
            };
            rows::<Scalar, G, Q8, false>(m, x, first, y, &p, wide, lg)
        }

        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub(super) unsafe fn vnni<const G: usize, const Q8: bool>(
            m: &GroupMatrix,
            x: &GroupActs,
            first: usize,
            y: &mut [f32],
        ) {
            let wide = index_bytes(m.cols / G) == 2;
            let lg = m.fmt.scale_groups.trailing_zeros();
            let p = Wide::new(x, wide, lg);
            rows::<Wide, G, Q8, true>(m, x, first, y, &p, wide, lg)
        }
    }

    /// Row tiles of Q4 values (see "Row tiles" in the module doc), eight rows at a time in
    /// the eight lanes of 256-bit vectors, as the dense Q4_0 decode kernel
    /// (`kernels::x86::avx2`'s `q4_0_t8`): each chunk's 16 bytes of the eight rows
    /// transposed into eight vectors of 4-weight words (lane r = row r), so that one
    /// `vpdpbusd` (or `maddubs`) against an activation word broadcast adds four products
    /// of all eight rows; a group's `g / 4` words leave its exact integer in each lane,
    /// starting from `-8 * sum x` of its activations (computed once per call for every
    /// group column). The rows share the group numbers, so a group's activation words,
    /// offset and dx are read once for the eight; the eight rows' weight scales come eight
    /// at a time from one 8x8 transpose of their f16 scale lists.
    mod t8 {
        use super::*;
        use crate::kernels::x86::avx2::{q4_0_transposed, words_transposed};

        /// `-8 * sum` of the activations of every group of G: Q4's level offset.
        fn offsets<const G: usize>(x: &GroupActs) -> &[i32] {
            &x.offsets[G.trailing_zeros() as usize - 2]
        }

        /// `UNITS` (8 or 4) f16 values at `q`, in the low bytes of a vector.
        #[inline(always)]
        unsafe fn load_units<const UNITS: usize>(q: *const u8) -> __m128i {
            if UNITS == 8 {
                _mm_loadu_si128(q as *const __m128i)
            } else {
                _mm_loadl_epi64(q as *const __m128i)
            }
        }

        /// The `UNITS` (8 or 4) f16 values at `p[r] + off` of eight rows, transposed and
        /// converted into `out[0..UNITS]`: lane r of `out[j]` = value j of row r. Rows r and
        /// r + 4 share a vector (one per 128-bit half), so each unpack serves both halves.
        /// (Converting two values per 512-bit `vcvtph2ps` made the whole kernel slower, 0.94x
        /// of dense Q4_0 instead of 1.19x on ffn_up at 50 % in groups of 16: 512-bit
        /// operations take a vector port from the 256-bit ones around them.)
        #[inline(always)]
        unsafe fn scales_t<const UNITS: usize>(p: [*const u8; 8], off: usize, out: *mut __m256) {
            let r: [__m256i; 4] = build!(4, _mm256_setzero_si256(), |j| {
                let (lo, hi) = (
                    load_units::<UNITS>(p[j].add(off)),
                    load_units::<UNITS>(p[j + 4].add(off)),
                );
                _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi)
            });
            // a[0], a[1]: rows 0, 1 (4, 5 in the upper half), values 0..4 and 4..8 paired;
            // a[2], a[3]: rows 2, 3 (6, 7) likewise.
            let a = [
                _mm256_unpacklo_epi16(r[0], r[1]),
                _mm256_unpackhi_epi16(r[0], r[1]),
                _mm256_unpacklo_epi16(r[2], r[3]),
                _mm256_unpackhi_epi16(r[2], r[3]),
            ];
            // b[i]: values 2i and 2i + 1, rows 0..4 of each in the lower half, 4..8 in the
            // upper; the 64-bit permute makes it value 2i of rows 0..8, then value 2i + 1.
            let b = [
                _mm256_unpacklo_epi32(a[0], a[2]),
                _mm256_unpackhi_epi32(a[0], a[2]),
                _mm256_unpacklo_epi32(a[1], a[3]),
                _mm256_unpackhi_epi32(a[1], a[3]),
            ];
            for (i, v) in b.iter().enumerate().take(UNITS / 2) {
                let v = _mm256_permute4x64_epi64::<0b11_01_10_00>(*v);
                let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
                let hi = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(v));
                _mm256_storeu_ps(out.add(2 * i) as *mut f32, lo);
                _mm256_storeu_ps(out.add(2 * i + 1) as *mut f32, hi);
            }
        }

        /// The exact integer of group `j` (< `CHUNK / G`) of a chunk (`w`: its words) for the
        /// eight rows, starting from `off`: the group's `G / 4` words against its activation
        /// words `xw`.
        #[inline(always)]
        unsafe fn group_dot<const G: usize, const VNNI: bool>(
            w: &[__m256i; 8],
            j: usize,
            xw: *const i32,
            off: __m256i,
        ) -> __m256i {
            let first = j * (G / 4);
            if VNNI {
                let mut v = off;
                for t in 0..G / 4 {
                    let a = _mm256_set1_epi32(xw.add(t).read_unaligned());
                    v = _mm256_dpbusd_epi32(v, w[first + t], a);
                }
                v
            } else {
                // i16 sums of at most 8 pair products of 2 * 15 * 127: exact.
                let mut s = _mm256_setzero_si256();
                for t in 0..G / 4 {
                    let a = _mm256_set1_epi32(xw.add(t).read_unaligned());
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[first + t], a));
                }
                _mm256_add_epi32(_mm256_madd_epi16(s, _mm256_set1_epi16(1)), off)
            }
        }

        /// Eight Q8 chunks (rows r = 0..8, 32 signed bytes at `xp[r] + off`) as eight vectors
        /// `W_k` whose lane r holds row r's weights 4k..4k+3: per 16-byte half, rows r and
        /// r + 4 share a vector and a 4x4 transpose of 32-bit words ([`words_transposed`]).
        #[inline(always)]
        unsafe fn q8_transposed(xp: [*const u8; 8], off: usize) -> [__m256i; 8] {
            let (a, b) = (words_transposed(xp, off), words_transposed(xp, off + 16));
            [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
        }

        /// The exact integer of group `j` (< `CHUNK / G`) of a Q8 chunk (`w`: its words,
        /// `wa`: their magnitudes) for the eight rows: |w| times x with w's sign, as the
        /// untiled Q8 kernels (`vpdpbusd`, or `maddubs` + `madd` per word: two words'
        /// products could exceed i16).
        #[inline(always)]
        unsafe fn group_dot_q8<const G: usize, const VNNI: bool>(
            w: &[__m256i; 8],
            wa: &[__m256i; 8],
            j: usize,
            xw: *const i32,
        ) -> __m256i {
            let first = j * (G / 4);
            let mut v = _mm256_setzero_si256();
            for t in 0..G / 4 {
                let a = _mm256_set1_epi32(xw.add(t).read_unaligned());
                let sx = _mm256_sign_epi8(a, w[first + t]);
                v = if VNNI {
                    _mm256_dpbusd_epi32(v, wa[first + t], sx)
                } else {
                    let p = _mm256_maddubs_epi16(wa[first + t], sx);
                    _mm256_add_epi32(v, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
                };
            }
            v
        }

        /// The weight scales of eight rows (`sp[r]`: row r's scales), transposed and
        /// converted into `sv`: lane r of `sv[u]` = scale u of row r, for the `units` scales
        /// rounded up to 8, or to 4 where that covers them (`sv` holds them; the reads past
        /// the last scale stay in the row, module doc).
        #[inline(always)]
        unsafe fn transposed_scales(sp: [*const u8; 8], units: usize, sv: &mut [__m256]) {
            let blocks = units.div_ceil(8);
            assert!(sv.len() >= 8 * blocks, "scale scratch too short");
            for ub in 0..units / 8 {
                scales_t::<8>(sp, 16 * ub, sv.as_mut_ptr().add(8 * ub));
            }
            let (ub, rest) = (units / 8, units % 8);
            if rest > 4 {
                scales_t::<8>(sp, 16 * ub, sv.as_mut_ptr().add(8 * ub));
            } else if rest > 0 {
                scales_t::<4>(sp, 16 * ub, sv.as_mut_ptr().add(8 * ub));
            }
        }

        /// Eight rows of one tile (absent rows given as copies of a present one) times `N`
        /// tokens (activations `x[t]`, Q4 offsets `offsets[t]`): their sums, in the tiled
        /// order, each chunk's weights (Q4 levels, or Q8 values and their magnitudes)
        /// transposed once for the N. The chunks go two at a time, even
        /// then odd, and a chunk's groups one by one, all unrolled, so that every group's
        /// words and accumulator (A[2 * (chunk mod 2) + group mod 2]) are known at compile
        /// time and the accumulators stay in registers; the groups past the row's count (in
        /// its last chunk or pair) are skipped. `sv` is scratch for the transposed scales
        /// (`cols / G` rounded up to 8 vectors).
        #[inline(always)]
        unsafe fn block<const G: usize, const VNNI: bool, const Q8: bool, const N: usize>(
            r: &[Row; 8],
            wide: bool,
            lg: u32,
            x: [&GroupActs; N],
            offsets: [&[i32]; N],
            sv: &mut [__m256],
        ) -> [__m256; N] {
            let n = r[0].n;
            let vp: [*const u8; 8] = build!(8, std::ptr::null(), |i| r[i].values);
            let sp: [*const u8; 8] = build!(8, std::ptr::null(), |i| r[i].scales);
            let q: [*const i8; N] = build!(N, std::ptr::null(), |t| x[t].q.as_ptr());
            let d: [*const f32; N] = build!(N, std::ptr::null(), |t| x[t].d.as_ptr());
            transposed_scales(sp, (n + (1 << lg) - 1) >> lg, sv);
            let per = CHUNK / G; // groups per chunk
            let chunks = (n * G).div_ceil(CHUNK);
            let mut acc = [[_mm256_setzero_ps(); 4]; N];
            // Group `$j` of chunk `c + $cc` (literals: LLVM does not unroll these loops for four
            // tokens, and a loop index would put the accumulators in memory).
            macro_rules! group {
                ($c:ident, $w:ident, $wa:ident, $cc:literal, $j:literal) => {
                    let k = ($c + $cc) * per + $j;
                    if $j < per && k < n {
                        let i = if wide {
                            u16::from_le((r[0].index.add(2 * k) as *const u16).read_unaligned())
                                as usize
                        } else {
                            *r[0].index.add(k) as usize
                        };
                        let sw = *sv.get_unchecked(k >> lg);
                        for t in 0..N {
                            let xw = q[t].add(i * G) as *const i32;
                            let dot = if Q8 {
                                group_dot_q8::<G, VNNI>(&$w, &$wa, $j, xw)
                            } else {
                                let off = _mm256_set1_epi32(*offsets[t].get_unchecked(i));
                                group_dot::<G, VNNI>(&$w, $j, xw, off)
                            };
                            let dx = _mm256_set1_ps(*d[t].add(i * G / CHUNK));
                            let a = &mut acc[t][2 * $cc + $j % 2];
                            *a =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dx, sw), *a);
                        }
                    }
                };
            }
            macro_rules! chunk {
                ($c:ident, $cc:literal) => {
                    if $c + $cc < chunks {
                        let (w, wa) = if Q8 {
                            let w = q8_transposed(vp, CHUNK * ($c + $cc));
                            (
                                w,
                                build!(8, _mm256_setzero_si256(), |k| _mm256_abs_epi8(w[k])),
                            )
                        } else {
                            let w = q4_0_transposed(vp, 16 * ($c + $cc));
                            (w, w)
                        };
                        group!($c, w, wa, $cc, 0);
                        group!($c, w, wa, $cc, 1);
                        group!($c, w, wa, $cc, 2);
                        group!($c, w, wa, $cc, 3);
                        group!($c, w, wa, $cc, 4);
                        group!($c, w, wa, $cc, 5);
                        group!($c, w, wa, $cc, 6);
                        group!($c, w, wa, $cc, 7);
                    }
                };
            }
            let mut c = 0;
            while c < chunks {
                chunk!(c, 0);
                chunk!(c, 1);
                c += 2;
            }
            build!(N, _mm256_setzero_ps(), |t| _mm256_add_ps(
                _mm256_add_ps(acc[t][0], acc[t][1]),
                _mm256_add_ps(acc[t][2], acc[t][3])
            ))
        }

        /// The first `y.len()` (at most 8) lanes of `v` into `y`: one store for a whole block
        /// (a copy of a variable length is a call to `memmove`).
        #[inline(always)]
        unsafe fn store_lanes(y: &mut [f32], v: __m256) {
            if y.len() == 8 {
                _mm256_storeu_ps(y.as_mut_ptr(), v);
            } else {
                let mut out = [0.0f32; 8];
                _mm256_storeu_ps(out.as_mut_ptr(), v);
                y.copy_from_slice(&out[..y.len()]);
            }
        }

        /// The rows of eight-row block `r..r + count` (within one tile) as [`block`] wants
        /// them. The rows of a tile have one count, so their parts lie at the same distances
        /// from their starts: only the first row is parsed, the others found from the offset
        /// table.
        #[inline(always)]
        unsafe fn block_rows(
            m: &GroupMatrix,
            r: usize,
            count: usize,
            wide: bool,
            lg: u32,
        ) -> [Row; 8] {
            let head = row_at(m, r, wide, lg);
            let h = row_start(m, r);
            let (ds, dv) = (
                head.scales.offset_from(h) as usize,
                head.values.offset_from(h) as usize,
            );
            build!(8, head, |i| if i == 0 {
                head
            } else {
                let p = row_start(m, r + i.min(count - 1));
                Row {
                    scales: p.add(ds),
                    values: p.add(dv),
                    ..head
                }
            })
        }

        /// `y[t * count + i]` for rows `first + i` (`count = y.len() / x.len()`) and tokens
        /// t of a tiled matrix, four tokens at a time (`x.len()` a multiple of 4).
        #[inline(always)]
        pub(super) unsafe fn tokens<const G: usize, const VNNI: bool, const Q8: bool>(
            m: &GroupMatrix,
            x: &[GroupActs],
            first: usize,
            y: &mut [f32],
        ) {
            let wide = index_bytes(m.cols / G) == 2;
            let lg = m.fmt.scale_groups.trailing_zeros();
            let count = y.len() / x.len();
            let offsets: Vec<&[i32]> = x.iter().map(offsets::<G>).collect();
            let mut sv = vec![_mm256_setzero_ps(); (m.cols / G).div_ceil(8) * 8];
            let (tile, end) = (m.fmt.tile, first + count);
            for (q, xq) in x.chunks_exact(4).enumerate() {
                let xs = [&xq[0], &xq[1], &xq[2], &xq[3]];
                let os = build!(4, offsets[0], |t| offsets[4 * q + t]);
                let mut r = first;
                while r < end {
                    let rows_n = 8.min(end - r).min(tile - r % tile);
                    let rows = block_rows(m, r, rows_n, wide, lg);
                    let v = block::<G, VNNI, Q8, 4>(&rows, wide, lg, xs, os, &mut sv);
                    for (t, v) in v.iter().enumerate() {
                        let at = (4 * q + t) * count + r - first;
                        store_lanes(&mut y[at..at + rows_n], *v);
                    }
                    r += rows_n;
                }
            }
        }

        /// Rows `first..first + y.len()` of a tiled matrix.
        #[inline(always)]
        pub(super) unsafe fn rows<const G: usize, const VNNI: bool, const Q8: bool>(
            m: &GroupMatrix,
            x: &GroupActs,
            first: usize,
            y: &mut [f32],
        ) {
            let wide = index_bytes(m.cols / G) == 2;
            let lg = m.fmt.scale_groups.trailing_zeros();
            let offsets = offsets::<G>(x);
            let mut sv = vec![_mm256_setzero_ps(); (m.cols / G).div_ceil(8) * 8];
            let (tile, end) = (m.fmt.tile, first + y.len());
            let mut r = first;
            while r < end {
                let count = 8.min(end - r).min(tile - r % tile);
                let rows = block_rows(m, r, count, wide, lg);
                let [v] = block::<G, VNNI, Q8, 1>(&rows, wide, lg, [x], [offsets], &mut sv);
                store_lanes(&mut y[r - first..r - first + count], v);
                r += count;
            }
        }
    }

    /// The target-feature entry points of the tiled kernels at one level: matrix-vector
    /// (`$rows`) and four-token (`$tokens`), Q4 and Q8.
    macro_rules! tiled_entries {
        ($rows:ident, $tokens:ident, $vnni:literal, $features:literal) => {
            #[target_feature(enable = $features)]
            unsafe fn $rows<const G: usize, const Q8: bool>(
                m: &GroupMatrix,
                x: &GroupActs,
                first: usize,
                y: &mut [f32],
            ) {
                t8::rows::<G, $vnni, Q8>(m, x, first, y)
            }

            #[target_feature(enable = $features)]
            unsafe fn $tokens<const G: usize, const Q8: bool>(
                m: &GroupMatrix,
                x: &[GroupActs],
                first: usize,
                y: &mut [f32],
            ) {
                t8::tokens::<G, $vnni, Q8>(m, x, first, y)
            }
        };
    }

    tiled_entries!(tiled_avx2, tiled_tokens_avx2, false, "avx2,fma,f16c");
    tiled_entries!(
        tiled_vnni,
        tiled_tokens_vnni,
        true,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
    );

    pub(super) fn rows_avx2(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        // SAFETY: handed out by `GroupKernel::for_level` only at `Level::Avx2` or above, which
        // `Level::detected` reports only when the CPU has AVX2, FMA and F16C; the reads are
        // in bounds (module doc).
        unsafe {
            if m.fmt.tile > 0 {
                by_group_format!(m, tiled_avx2; m, x, first, y)
            } else {
                by_group_format!(m, ymm::avx2; m, x, first, y)
            }
        }
    }

    pub(super) fn tokens_avx2(m: &GroupMatrix, x: &[GroupActs], first: usize, y: &mut [f32]) {
        if m.fmt.tile > 0 {
            // SAFETY: as `rows_avx2`.
            return unsafe { by_group_format!(m, tiled_tokens_avx2; m, x, first, y) };
        }
        // SAFETY: as `rows_avx2`.
        unsafe { by_group_format!(m, ymm::tokens_avx2; m, x, first, y) }
    }

    pub(super) fn tokens_vnni(m: &GroupMatrix, x: &[GroupActs], first: usize, y: &mut [f32]) {
        if m.fmt.tile > 0 {
            // SAFETY: as `rows_vnni`.
            return unsafe { by_group_format!(m, tiled_tokens_vnni; m, x, first, y) };
        }
        // SAFETY: as `rows_vnni`.
        unsafe { by_group_format!(m, ymm::tokens_vnni; m, x, first, y) }
    }

    pub(super) fn rows_vnni(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        // SAFETY: handed out by `GroupKernel::for_level` only at `Level::Avx512`, which
        // `Level::detected` reports only with AVX-512 F, BW, VL and VNNI; reads as above.
        unsafe {
            if m.fmt.tile > 0 {
                by_group_format!(m, tiled_vnni; m, x, first, y)
            } else {
                by_group_format!(m, ymm::vnni; m, x, first, y)
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    //! NEON kernels, and `sdot` ones where the CPU has the dot product extension: the same
    //! chunk steps as the x86 kernels (rows prepared by `prepare_row`), the 8 lanes as two
    //! `int32x4_t` (bytes 0..16, 16..32), even and odd chunks into two pairs of
    //! `float32x4_t` accumulators, folded in the module doc's order.
    //!
    //! Safety model: as the x86 module; the `sdot` bodies are only instantiated inside a
    //! `#[target_feature(enable = "dotprod")]` function, handed out only at `Level::Dotprod`.
    use super::*;
    use std::arch::aarch64::*;

    use crate::kernels::aarch64::neon::transpose4;
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

    /// The signed weights of chunk `c` of values `v`, bytes 0..16 and 16..32.
    #[inline(always)]
    unsafe fn weights<const Q8: bool>(v: *const u8, c: usize) -> (int8x16_t, int8x16_t) {
        if Q8 {
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
        }
    }

    /// One chunk `c` of values `v`: (a0, a1) + its lanes times their scales.
    #[inline(always)]
    unsafe fn step<I: Isa, const G: usize, const Q8: bool>(
        v: *const u8,
        q: *const i8,
        sc: &Scratch,
        c: usize,
        acc: (float32x4_t, float32x4_t),
    ) -> (float32x4_t, float32x4_t) {
        step_with::<I, G>(weights::<Q8>(v, c), q, sc, c, acc)
    }

    /// [`step`] with the chunk's weights decoded.
    #[inline(always)]
    unsafe fn step_with<I: Isa, const G: usize>(
        (w0, w1): (int8x16_t, int8x16_t),
        q: *const i8,
        sc: &Scratch,
        c: usize,
        (a0, a1): (float32x4_t, float32x4_t),
    ) -> (float32x4_t, float32x4_t) {
        let per = CHUNK / G;
        let (x0, x1) = gather::<G>(q, sc.off.as_ptr().add(c * per));
        let l0 = I::dot4(vdupq_n_s32(0), w0, x0);
        let l1 = I::dot4(vdupq_n_s32(0), w1, x1);
        let (s0, s1) = lane_scales::<G>(sc.s.as_ptr().add(c * per));
        (
            vfmaq_f32(a0, vcvtq_f32_s32(l0), s0),
            vfmaq_f32(a1, vcvtq_f32_s32(l1), s1),
        )
    }

    #[inline(always)]
    unsafe fn body<I: Isa, const G: usize, const Q8: bool>(
        m: &GroupMatrix,
        x: &GroupActs,
        first: usize,
        y: &mut [f32],
    ) {
        let mut sc = Scratch::new(m);
        let sg = m.fmt.scale_groups;
        let q = x.q.as_ptr();
        for (i, out) in y.iter_mut().enumerate() {
            let p = m.row(first + i);
            prepare_row(&p, G, sg, x, &mut sc);
            let zero = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            let (mut e, mut o) = (zero, zero);
            let v = p.values.as_ptr();
            let chunks = (p.n * G).div_ceil(CHUNK);
            let mut c = 0;
            while c + 2 <= chunks {
                e = step::<I, G, Q8>(v, q, &sc, c, e);
                o = step::<I, G, Q8>(v, q, &sc, c + 1, o);
                c += 2;
            }
            if c < chunks {
                e = step::<I, G, Q8>(v, q, &sc, c, e);
            }
            let r = vaddq_f32(vaddq_f32(e.0, o.0), vaddq_f32(e.1, o.1));
            let a: [f32; 4] = std::mem::transmute(r);
            *out = (a[0] + a[2]) + (a[1] + a[3]);
        }
    }

    /// [`body`] for tokens four at a time (`x.len()` a multiple of 4, `y[t * count + i]`),
    /// over chunks of [`MATMAT_ROWS`] rows: each row prepared for every token of the four,
    /// each chunk's weights decoded once for the four.
    #[inline(always)]
    unsafe fn body4<I: Isa, const G: usize, const Q8: bool>(
        m: &GroupMatrix,
        x: &[GroupActs],
        first: usize,
        y: &mut [f32],
    ) {
        let n = x.len();
        let count = y.len() / n;
        let mut sc = [
            Scratch::new(m),
            Scratch::new(m),
            Scratch::new(m),
            Scratch::new(m),
        ];
        let sg = m.fmt.scale_groups;
        let mut i0 = 0;
        while i0 < count {
            let i1 = if count - i0 < MATMAT_ROWS {
                count
            } else {
                i0 + MATMAT_ROWS
            };
            let mut g = 0;
            while g < n / 4 {
                let x4 = [&x[4 * g], &x[4 * g + 1], &x[4 * g + 2], &x[4 * g + 3]];
                for i in i0..i1 {
                    let p = m.row(first + i);
                    let mut t = 0;
                    while t < 4 {
                        prepare_row(&p, G, sg, x4[t], &mut sc[t]);
                        t += 1;
                    }
                    let z = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                    let (mut e, mut o) = ([z; 4], [z; 4]);
                    let v = p.values.as_ptr();
                    let chunks = (p.n * G).div_ceil(CHUNK);
                    let mut c = 0;
                    while c < chunks {
                        let w = weights::<Q8>(v, c);
                        let mut t = 0;
                        while t < 4 {
                            e[t] = step_with::<I, G>(w, x4[t].q.as_ptr(), &sc[t], c, e[t]);
                            t += 1;
                        }
                        if c + 1 < chunks {
                            let w = weights::<Q8>(v, c + 1);
                            let mut t = 0;
                            while t < 4 {
                                o[t] = step_with::<I, G>(w, x4[t].q.as_ptr(), &sc[t], c + 1, o[t]);
                                t += 1;
                            }
                        }
                        c += 2;
                    }
                    let mut t = 0;
                    while t < 4 {
                        let r = vaddq_f32(vaddq_f32(e[t].0, o[t].0), vaddq_f32(e[t].1, o[t].1));
                        let a: [f32; 4] = std::mem::transmute(r);
                        y[(4 * g + t) * count + i] = (a[0] + a[2]) + (a[1] + a[3]);
                        t += 1;
                    }
                }
                g += 1;
            }
            i0 = i1;
        }
    }

    #[target_feature(enable = "dotprod")]
    unsafe fn sdot4<const G: usize, const Q8: bool>(
        m: &GroupMatrix,
        x: &[GroupActs],
        first: usize,
        y: &mut [f32],
    ) {
        body4::<Sdot, G, Q8>(m, x, first, y)
    }

    pub(super) fn tokens_neon(m: &GroupMatrix, x: &[GroupActs], first: usize, y: &mut [f32]) {
        if m.fmt.tile > 0 {
            return per_token(m, x, first, y, rows_neon);
        }
        // SAFETY: NEON is part of the aarch64 baseline; reads in bounds (module doc).
        unsafe { by_group_format!(m, body4[Neon]; m, x, first, y) }
    }

    pub(super) fn tokens_sdot(m: &GroupMatrix, x: &[GroupActs], first: usize, y: &mut [f32]) {
        if m.fmt.tile > 0 {
            return per_token(m, x, first, y, rows_sdot);
        }
        // SAFETY: as `rows_sdot`.
        unsafe { by_group_format!(m, sdot4; m, x, first, y) }
    }

    /// Row tiles: four rows of a tile per step, lane r of every vector = row r, as the dense
    /// Q4_0 eight-row kernel of `kernels::aarch64`: each chunk's 16 bytes of the four rows
    /// made signed levels (`q - 8`; Q8: its two 16-byte halves as they are) and transposed
    /// into vectors of 4-weight words, so that one `dot4` against an activation word in
    /// every lane adds four products of the four rows; a group's `g / 4` words leave its
    /// exact integer in each lane, then one fused multiply-add per group in the tiled order
    /// (module doc).
    #[inline(always)]
    unsafe fn tiled_block4<I: Isa, const G: usize, const Q8: bool>(
        rows: [&RowParts; 4],
        sg: usize,
        x: &GroupActs,
    ) -> float32x4_t {
        let n = rows[0].n;
        let vp: [*const u8; 4] = std::array::from_fn(|i| rows[i].values.as_ptr());
        let (m, eight) = (vdupq_n_u8(0x0F), vdupq_n_s8(8));
        let per = CHUNK / G;
        let mut acc = [vdupq_n_f32(0.0); 4];
        for c in 0..(n * G).div_ceil(CHUNK) {
            let (lo, hi) = if Q8 {
                // Weights 0..16 and 16..32: the two 16-byte halves of the chunk.
                let half = |h: usize| -> [int8x16_t; 4] {
                    std::array::from_fn(|i| vld1q_s8(vp[i].add(CHUNK * c + 16 * h) as *const i8))
                };
                (transpose4(half(0)), transpose4(half(1)))
            } else {
                let q: [uint8x16_t; 4] = std::array::from_fn(|i| vld1q_u8(vp[i].add(16 * c)));
                (
                    transpose4(q.map(|v| vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, m)), eight))),
                    transpose4(q.map(|v| vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)), eight))),
                )
            };
            let words = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
            for gi in 0..per {
                let k = c * per + gi;
                if k >= n {
                    break;
                }
                let col = rows[0].group(k) * G;
                let xw = x.q.as_ptr().add(col) as *const i32;
                let mut v = vdupq_n_s32(0);
                for t in 0..G / 4 {
                    let a = vreinterpretq_s8_s32(vdupq_n_s32(xw.add(t).read_unaligned()));
                    v = I::dot4(v, words[gi * (G / 4) + t], a);
                }
                let dw: [f32; 4] = std::array::from_fn(|i| rows[i].scale(k, sg));
                let s = vmulq_n_f32(vld1q_f32(dw.as_ptr()), x.d[col / CHUNK]);
                let a = tiled_acc(k, G);
                acc[a] = vfmaq_f32(acc[a], vcvtq_f32_s32(v), s);
            }
        }
        vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]))
    }

    /// Rows `first..first + y.len()` of a tiled matrix, four rows at a time (absent rows of a
    /// last step given as copies of a present one).
    #[inline(always)]
    unsafe fn tiled<I: Isa, const G: usize, const Q8: bool>(
        m: &GroupMatrix,
        x: &GroupActs,
        first: usize,
        y: &mut [f32],
    ) {
        let (tile, end, sg) = (m.fmt.tile, first + y.len(), m.fmt.scale_groups);
        let mut r = first;
        while r < end {
            let count = 4.min(end - r).min(tile - r % tile);
            let parts: [RowParts; 4] = std::array::from_fn(|i| m.row(r + i.min(count - 1)));
            let v = tiled_block4::<I, G, Q8>([&parts[0], &parts[1], &parts[2], &parts[3]], sg, x);
            let mut out = [0f32; 4];
            vst1q_f32(out.as_mut_ptr(), v);
            y[r - first..r - first + count].copy_from_slice(&out[..count]);
            r += count;
        }
    }

    #[target_feature(enable = "dotprod")]
    unsafe fn tiled_sdot<const G: usize, const Q8: bool>(
        m: &GroupMatrix,
        x: &GroupActs,
        first: usize,
        y: &mut [f32],
    ) {
        tiled::<Sdot, G, Q8>(m, x, first, y)
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
        if m.fmt.tile > 0 {
            // SAFETY: NEON is part of the aarch64 baseline; reads in bounds (module doc).
            return unsafe { by_group_format!(m, tiled[Neon]; m, x, first, y) };
        }
        // SAFETY: NEON is part of the aarch64 baseline; reads in bounds (module doc).
        unsafe { by_group_format!(m, body[Neon]; m, x, first, y) }
    }

    pub(super) fn rows_sdot(m: &GroupMatrix, x: &GroupActs, first: usize, y: &mut [f32]) {
        if m.fmt.tile > 0 {
            // SAFETY: as below.
            return unsafe { by_group_format!(m, tiled_sdot; m, x, first, y) };
        }
        // SAFETY: handed out by `GroupKernel::for_level` only at `Level::Dotprod` and above,
        // which `Level::detected` reports only with the dot product extension.
        unsafe { by_group_format!(m, sdot; m, x, first, y) }
    }
}

/// The x86 activation preparation (offsets, AVX2 quantizer) against plain code.
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Activations with whole and partial blocks, an all-zero block, large and tiny values
    /// and exact ties (0.5 * an odd number after scaling).
    fn activations(len: usize) -> Vec<f32> {
        let mut s = 0x1234_5678u32;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                match i % 64 {
                    32..=63 if len > 64 && i / 64 == 1 => 0.0,
                    0 => 127.0,
                    1 => 2.5,
                    2 => -0.5,
                    _ => (s as f32 / u32::MAX as f32 - 0.5) * if i % 7 == 0 { 1e3 } else { 1.0 },
                }
            })
            .collect()
    }

    #[test]
    fn group_offsets_are_the_sums_of_every_group() {
        for len in [0, 5, 32, 70, 576] {
            let a = GroupActs::new(&activations(len));
            for (l, o) in a.offsets.iter().enumerate() {
                let g = 4 << l;
                let want: Vec<i32> =
                    a.q.chunks_exact(g)
                        .map(|c| -8 * c.iter().map(|&v| v as i32).sum::<i32>())
                        .collect();
                assert_eq!(o, &want, "groups of {g}, {len} columns");
            }
        }
    }

    #[test]
    fn avx2_quantizer_agrees_with_the_portable_one() {
        assert!(
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"),
            "this test needs AVX2, FMA and F16C"
        );
        for len in [1, 31, 32, 33, 200, 576, 1536] {
            let x = activations(len);
            let nb = len.div_ceil(CHUNK);
            let (mut q0, mut d0) = (vec![0i8; nb * CHUNK], vec![0f32; nb]);
            let (mut q1, mut d1) = (vec![0i8; nb * CHUNK], vec![0f32; nb]);
            quantize_blocks(&x, &mut q0, &mut d0);
            // SAFETY: the features were checked above.
            unsafe { x86::quantize(&x, &mut q1, &mut d1) };
            assert_eq!(q0, q1, "{len} columns");
            assert_eq!(
                d0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{len} columns"
            );
        }
    }
}
