//! In-place edits of single elements of a quantized block: the patcher's inner loop.
//!
//! Adding a delta to element `e` of a block means: read its value as the reference dequantizer
//! does, add, and store the sum back. Two ways to store it:
//!
//! - [`Requant::KeepScales`] (the default): the block keeps its scales and mins, and each
//!   touched element moves to the level of the block's grid nearest its new value. Untouched
//!   elements keep their exact bits, so an edit never adds noise outside the elements the
//!   adapter names. A block whose new values leave the grid's range (a level past the
//!   format's largest, or a zero scale) is re-encoded from scratch like `Reencode` below.
//! - [`Requant::Reencode`]: dequantize the whole block, add, quantize it again with the
//!   reference quantizer (ggml's). Every element of the block can move by a rounding step.
//!
//! Either way the caller can ask for the residual of each element, the exact sum minus what
//! the block now holds, which is what requantization dropped.
//!
//! Element positions inside a block follow the layouts documented in each format's module.

use super::kquant::get_scale_min_k4;
use super::util::{f16_to_f32, f32_to_bf16, f32_to_f16};
use super::{ops, GgmlType};

/// How a touched block is written back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Requant {
    #[default]
    KeepScales,
    Reencode,
}

/// Whether `ty` can be edited in place.
pub fn supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4_K | Q5_K | Q6_K
    )
}

/// What happened to one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Scales kept, touched elements moved on the grid.
    Kept,
    /// Re-encoded with the reference quantizer.
    Reencoded,
}

/// Reusable buffers for re-encoding (one block of f32 and the original values).
#[derive(Default)]
pub struct Scratch {
    vals: Vec<f32>,
    orig: Vec<f32>,
    levels: Vec<i32>,
}

/// Adds `deltas` (element index inside the block, value; indices strictly increasing) to
/// `block`, one whole block of `ty`. With `residual`, pushes `(element, exact - stored)` for
/// every element whose stored value differs from the exact sum (touched elements, and on a
/// re-encode also untouched ones that moved).
///
/// The caller checks `supported(ty)`, the block length and the indices; this function only
/// asserts them in debug builds.
pub fn add_to_block(
    ty: GgmlType,
    block: &mut [u8],
    deltas: &[(u32, f32)],
    how: Requant,
    scratch: &mut Scratch,
    residual: Option<&mut Vec<(u32, f32)>>,
) -> Outcome {
    use GgmlType::*;
    debug_assert_eq!(block.len(), ty.type_size());
    match ty {
        F32 => {
            let (e, d) = deltas[0];
            debug_assert_eq!(e, 0);
            let v = f32::from_le_bytes(block[..4].try_into().unwrap()) + d;
            block.copy_from_slice(&v.to_le_bytes());
            Outcome::Kept
        }
        F16 => float16(block, deltas[0].1, residual, f32_to_f16, f16_to_f32),
        BF16 => float16(block, deltas[0].1, residual, f32_to_bf16, |b| {
            super::util::bf16_to_f32(b)
        }),
        Q8_0 => edit::<Q8_0G>(ty, block, deltas, how, scratch, residual),
        Q4_0 => edit::<Q4_0G>(ty, block, deltas, how, scratch, residual),
        Q4_1 => edit::<Q4_1G>(ty, block, deltas, how, scratch, residual),
        Q5_0 => edit::<Q5_0G>(ty, block, deltas, how, scratch, residual),
        Q5_1 => edit::<Q5_1G>(ty, block, deltas, how, scratch, residual),
        Q4_K => edit::<Q4KG>(ty, block, deltas, how, scratch, residual),
        Q5_K => edit::<Q5KG>(ty, block, deltas, how, scratch, residual),
        Q6_K => edit::<Q6KG>(ty, block, deltas, how, scratch, residual),
        _ => unreachable!("add_to_block called for unsupported type {ty}"),
    }
}

fn float16(
    block: &mut [u8],
    d: f32,
    residual: Option<&mut Vec<(u32, f32)>>,
    enc: impl Fn(f32) -> [u8; 2],
    dec: impl Fn([u8; 2]) -> f32,
) -> Outcome {
    let v = dec([block[0], block[1]]) + d;
    let b = enc(v);
    block.copy_from_slice(&b);
    if let Some(r) = residual {
        let stored = dec(b);
        if stored != v {
            r.push((0, v - stored));
        }
    }
    Outcome::Kept
}

/// One element's place on a block's grid: value = `step` * (level - `zero`) + `add`.
#[derive(Clone, Copy)]
struct Cell {
    step: f32,
    zero: i32,
    add: f32,
}

impl Cell {
    #[inline]
    fn value(self, level: i32) -> f32 {
        self.step * (level - self.zero) as f32 + self.add
    }
}

/// The element accessors of one block format.
trait Grid {
    /// Elements and bytes per block.
    const BLOCK: usize;
    const BYTES: usize;
    const MAX_LEVEL: i32;
    const MIN_LEVEL: i32 = 0;
    fn cell(b: &[u8], e: usize) -> Cell;
    fn level(b: &[u8], e: usize) -> i32;
    fn set_level(b: &mut [u8], e: usize, level: i32);
    /// The bytes of the block `set_level(_, e, _)` writes (the same one twice when one).
    fn bytes(e: usize) -> [usize; 2];
    /// Whether two elements can share a byte (nibbles, high bits): then a byte is logged
    /// once, with its oldest value.
    const SHARED_BYTES: bool = true;
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    let h = u16::from_le_bytes([b[at], b[at + 1]]) as u32;
    let exp = h & 0x7c00;
    if exp != 0 && exp != 0x7c00 {
        // A normal half: rebias the exponent, widen the mantissa (exact).
        f32::from_bits(((h & 0x8000) << 16) | ((exp + 0x1_c000) << 13) | ((h & 0x03ff) << 13))
    } else {
        // Zero, subnormal, infinite or NaN: the general conversion.
        f16_to_f32([b[at], b[at + 1]])
    }
}

#[inline]
fn nibble(b: &[u8], byte: usize, high: bool) -> i32 {
    (if high { b[byte] >> 4 } else { b[byte] & 0xF }) as i32
}

#[inline]
fn set_nibble(b: &mut [u8], byte: usize, high: bool, v: i32) {
    let v = v as u8 & 0xF;
    b[byte] = if high {
        (b[byte] & 0x0F) | (v << 4)
    } else {
        (b[byte] & 0xF0) | v
    };
}

#[inline]
fn bit(b: &[u8], byte: usize, bit: usize) -> i32 {
    ((b[byte] >> bit) & 1) as i32
}

#[inline]
fn set_bit(b: &mut [u8], byte: usize, bit: usize, v: i32) {
    b[byte] = (b[byte] & !(1 << bit)) | (((v & 1) as u8) << bit);
}

/// Q8_0: `[d f16][qs i8 x 32]`, x = d * q.
struct Q8_0G;
impl Grid for Q8_0G {
    const SHARED_BYTES: bool = false;
    const BLOCK: usize = 32;
    const BYTES: usize = 34;
    const MAX_LEVEL: i32 = 127;
    const MIN_LEVEL: i32 = -127;
    fn cell(b: &[u8], _: usize) -> Cell {
        Cell {
            step: half(b, 0),
            zero: 0,
            add: 0.0,
        }
    }
    fn level(b: &[u8], e: usize) -> i32 {
        b[2 + e] as i8 as i32
    }
    fn bytes(e: usize) -> [usize; 2] {
        [2 + e, 2 + e]
    }
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        b[2 + e] = level as i8 as u8;
    }
}

/// Q4_0: `[d f16][qs 16]`, weight j < 16 in the low nibble of qs[j], j + 16 in the high one;
/// x = d * (q - 8).
struct Q4_0G;
impl Grid for Q4_0G {
    const BLOCK: usize = 32;
    const BYTES: usize = 18;
    const MAX_LEVEL: i32 = 15;
    fn cell(b: &[u8], _: usize) -> Cell {
        Cell {
            step: half(b, 0),
            zero: 8,
            add: 0.0,
        }
    }
    fn level(b: &[u8], e: usize) -> i32 {
        nibble(b, 2 + e % 16, e >= 16)
    }
    fn bytes(e: usize) -> [usize; 2] {
        [2 + e % 16; 2]
    }
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 2 + e % 16, e >= 16, level)
    }
}

/// Q4_1: `[d f16][m f16][qs 16]`, x = d * q + m.
struct Q4_1G;
impl Grid for Q4_1G {
    const BLOCK: usize = 32;
    const BYTES: usize = 20;
    const MAX_LEVEL: i32 = 15;
    fn cell(b: &[u8], _: usize) -> Cell {
        Cell {
            step: half(b, 0),
            zero: 0,
            add: half(b, 2),
        }
    }
    fn level(b: &[u8], e: usize) -> i32 {
        nibble(b, 4 + e % 16, e >= 16)
    }
    fn bytes(e: usize) -> [usize; 2] {
        [4 + e % 16; 2]
    }
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 4 + e % 16, e >= 16, level)
    }
}

/// Q5_0: `[d f16][qh u32][qs 16]`, nibbles as Q4_0, bit e of qh the fifth bit; x = d (q - 16).
struct Q5_0G;
impl Grid for Q5_0G {
    const BLOCK: usize = 32;
    const BYTES: usize = 22;
    const MAX_LEVEL: i32 = 31;
    fn cell(b: &[u8], _: usize) -> Cell {
        Cell {
            step: half(b, 0),
            zero: 16,
            add: 0.0,
        }
    }
    fn level(b: &[u8], e: usize) -> i32 {
        nibble(b, 6 + e % 16, e >= 16) | bit(b, 2 + e / 8, e % 8) << 4
    }
    fn bytes(e: usize) -> [usize; 2] {
        [6 + e % 16, 2 + e / 8]
    }
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 6 + e % 16, e >= 16, level);
        set_bit(b, 2 + e / 8, e % 8, level >> 4);
    }
}

/// Q5_1: `[d f16][m f16][qh u32][qs 16]`, x = d * q + m.
struct Q5_1G;
impl Grid for Q5_1G {
    const BLOCK: usize = 32;
    const BYTES: usize = 24;
    const MAX_LEVEL: i32 = 31;
    fn cell(b: &[u8], _: usize) -> Cell {
        Cell {
            step: half(b, 0),
            zero: 0,
            add: half(b, 2),
        }
    }
    fn level(b: &[u8], e: usize) -> i32 {
        nibble(b, 8 + e % 16, e >= 16) | bit(b, 4 + e / 8, e % 8) << 4
    }
    fn bytes(e: usize) -> [usize; 2] {
        [8 + e % 16, 4 + e / 8]
    }
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 8 + e % 16, e >= 16, level);
        set_bit(b, 4 + e / 8, e % 8, level >> 4);
    }
}

/// The sub-block cell of Q4_K / Q5_K: `[d f16][dmin f16][scales 12]...`,
/// x = d * sc[j] * q - dmin * m[j] for sub-block j = e / 32.
#[inline]
fn k4_cell(b: &[u8], e: usize) -> Cell {
    let scales: &[u8; 12] = b[4..16].try_into().unwrap();
    let (sc, m) = get_scale_min_k4(e / 32, scales);
    Cell {
        step: half(b, 0) * sc as f32,
        zero: 0,
        add: -(half(b, 2) * m as f32),
    }
}

/// Q4_K: qs at byte 16; each 64 weights share 32 bytes, low nibble = first 32, high = next 32.
struct Q4KG;
impl Grid for Q4KG {
    const BLOCK: usize = 256;
    const BYTES: usize = 144;
    const MAX_LEVEL: i32 = 15;
    fn cell(b: &[u8], e: usize) -> Cell {
        k4_cell(b, e)
    }
    fn level(b: &[u8], e: usize) -> i32 {
        nibble(b, 16 + 32 * (e / 64) + e % 32, e % 64 >= 32)
    }
    fn bytes(e: usize) -> [usize; 2] {
        [16 + 32 * (e / 64) + e % 32; 2]
    }
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 16 + 32 * (e / 64) + e % 32, e % 64 >= 32, level)
    }
}

/// Q5_K: qh (32 bytes) at byte 16, qs at 48 laid out as Q4_K's; bit j of qh[i] is the fifth
/// bit of weight 32 j + i.
struct Q5KG;
impl Grid for Q5KG {
    const BLOCK: usize = 256;
    const BYTES: usize = 176;
    const MAX_LEVEL: i32 = 31;
    fn cell(b: &[u8], e: usize) -> Cell {
        k4_cell(b, e)
    }
    fn level(b: &[u8], e: usize) -> i32 {
        nibble(b, 48 + 32 * (e / 64) + e % 32, e % 64 >= 32) | bit(b, 16 + e % 32, e / 32) << 4
    }
    fn bytes(e: usize) -> [usize; 2] {
        [48 + 32 * (e / 64) + e % 32, 16 + e % 32]
    }
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 48 + 32 * (e / 64) + e % 32, e % 64 >= 32, level);
        set_bit(b, 16 + e % 32, e / 32, level >> 4);
    }
}

/// Q6_K: `[ql 128][qh 64][scales i8 x 16][d f16]`, x = d * sc[e / 16] * (q - 32); see
/// `q6_k.rs` for where the 4 + 2 bits of a weight live.
struct Q6KG;
impl Q6KG {
    /// (ql byte, high nibble?, qh byte, qh shift) of weight e.
    #[inline]
    fn place(e: usize) -> (usize, bool, usize, usize) {
        let (half, p) = (e / 128, e % 128);
        let (g, l) = (p / 32, p % 32);
        (
            64 * half + 32 * (g % 2) + l,
            g >= 2,
            128 + 32 * half + l,
            2 * g,
        )
    }
}
impl Grid for Q6KG {
    const BLOCK: usize = 256;
    const BYTES: usize = 210;
    const MAX_LEVEL: i32 = 63;
    fn cell(b: &[u8], e: usize) -> Cell {
        Cell {
            step: half(b, 208) * (b[192 + e / 16] as i8) as f32,
            zero: 32,
            add: 0.0,
        }
    }
    fn level(b: &[u8], e: usize) -> i32 {
        let (ql, high, qh, shift) = Self::place(e);
        nibble(b, ql, high) | (((b[qh] >> shift) & 3) as i32) << 4
    }
    fn bytes(e: usize) -> [usize; 2] {
        let (ql, _, qh, _) = Self::place(e);
        [ql, qh]
    }
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        let (ql, high, qh, shift) = Self::place(e);
        set_nibble(b, ql, high, level);
        b[qh] = (b[qh] & !(3 << shift)) | ((((level >> 4) & 3) as u8) << shift);
    }
}

/// The nearest integer to `t` (ties to even), or `None` when `t` is not a finite number of
/// plausible size. Adding and subtracting 1.5 * 2^23 rounds in the FPU's default mode
/// without a call to `roundf`.
#[inline]
fn nearest(t: f32) -> Option<i32> {
    if t.abs() < 4_194_304.0 {
        // SAFETY: the rounded value is an integer of magnitude below 2^22.
        Some(unsafe { ((t + 12_582_912.0) - 12_582_912.0).to_int_unchecked::<i32>() })
    } else {
        None
    }
}

fn edit<G: Grid>(
    ty: GgmlType,
    block: &mut [u8],
    deltas: &[(u32, f32)],
    how: Requant,
    scratch: &mut Scratch,
    residual: Option<&mut Vec<(u32, f32)>>,
) -> Outcome {
    if how == Requant::KeepScales {
        // First pass: the new levels, without writing anything.
        scratch.levels.clear();
        let mut fits = true;
        for &(e, d) in deltas {
            let c = G::cell(block, e as usize);
            let v = c.value(G::level(block, e as usize)) + d;
            match nearest((v - c.add) / c.step).map(|q| q + c.zero) {
                Some(q) if (G::MIN_LEVEL..=G::MAX_LEVEL).contains(&q) && c.step != 0.0 => {
                    scratch.levels.push(q)
                }
                _ => {
                    fits = false;
                    break;
                }
            }
        }
        if fits {
            let mut res = residual;
            for (&(e, d), &q) in deltas.iter().zip(&scratch.levels) {
                let e = e as usize;
                if let Some(r) = res.as_deref_mut() {
                    let c = G::cell(block, e);
                    let v = c.value(G::level(block, e)) + d;
                    let stored = c.value(q);
                    if stored != v {
                        r.push((e as u32, v - stored));
                    }
                }
                G::set_level(block, e, q);
            }
            return Outcome::Kept;
        }
    }
    reencode(ty, block, deltas, scratch, residual);
    Outcome::Reencoded
}

/// What an edit of a tensor overwrote, in increasing order: whole blocks (runs of
/// consecutive blocks and their bytes), and single bytes of blocks that an in-place edit
/// changed only in a few bytes (a sparse edit on a kept grid changes one or two bytes per
/// element, so logging those instead of the block keeps the log about seven times smaller).
/// A block is logged one way or the other, never both.
#[derive(Default)]
pub struct BlockLog {
    /// (first block, number of blocks), increasing and disjoint.
    pub runs: Vec<(u32, u32)>,
    pub saved: Vec<u8>,
    /// Offsets in the tensor of single changed bytes (increasing), and their old values.
    pub byte_at: Vec<u32>,
    pub byte_old: Vec<u8>,
}

impl BlockLog {
    /// Appends the bytes of `block` (which must come after every block saved so far).
    #[inline]
    pub fn save(&mut self, block: usize, bytes: &[u8]) {
        match self.runs.last_mut() {
            Some((first, n)) if (*first + *n) as usize == block => *n += 1,
            _ => self.runs.push((block as u32, 1)),
        }
        self.saved.extend_from_slice(bytes);
    }

    /// Empties the log, keeping its buffers.
    pub fn clear(&mut self) {
        self.runs.clear();
        self.saved.clear();
        self.byte_at.clear();
        self.byte_old.clear();
    }

    /// Heap bytes of the entries.
    pub fn len_bytes(&self) -> usize {
        self.saved.len() + 8 * self.runs.len() + 5 * self.byte_at.len()
    }

    /// End (exclusive) of the last byte the log covers, in blocks of `bb` bytes.
    pub fn end_block(&self, bb: usize) -> usize {
        let runs = self.runs.last().map_or(0, |&(f, n)| (f + n) as usize);
        let bytes = self.byte_at.last().map_or(0, |&o| o as usize / bb + 1);
        runs.max(bytes)
    }

    /// Logs byte `at` of the tensor with its value `old`, unless the block's entries (from
    /// index `from` of the byte log) already hold it: restoring must write the oldest value.
    #[inline(always)]
    fn save_byte(&mut self, from: usize, at: u32, old: u8) {
        if !self.byte_at[from..].contains(&at) {
            self.byte_at.push(at);
            self.byte_old.push(old);
        }
    }

    /// Writes the saved bytes back into `tensor` (blocks of `block_bytes`).
    pub fn restore(&self, tensor: &mut [u8], block_bytes: usize) {
        self.write(tensor, block_bytes, &self.byte_old, &self.saved);
    }

    /// What the logged bytes of `tensor` hold now. Taken right after the patch that made
    /// the log, it is what [`BlockLog::redo`] writes to make that patch again.
    pub fn capture(&self, tensor: &[u8], block_bytes: usize) -> Redo {
        let mut saved = Vec::with_capacity(self.saved.len());
        for &(first, n) in &self.runs {
            let s = first as usize * block_bytes;
            saved.extend_from_slice(&tensor[s..s + n as usize * block_bytes]);
        }
        Redo {
            byte_new: self.byte_at.iter().map(|&o| tensor[o as usize]).collect(),
            saved_new: saved,
        }
    }

    /// Writes the values of `redo` (see [`BlockLog::capture`]) at the logged places.
    pub fn redo(&self, tensor: &mut [u8], block_bytes: usize, redo: &Redo) {
        self.write(tensor, block_bytes, &redo.byte_new, &redo.saved_new);
    }

    /// Writes `bytes` (one per single-byte entry) and `saved` (the blocks of the runs, in
    /// order) at the places the log names.
    fn write(&self, tensor: &mut [u8], block_bytes: usize, bytes: &[u8], saved: &[u8]) {
        for (k, (&o, &v)) in self.byte_at.iter().zip(bytes).enumerate() {
            // Scattered single bytes: ask for the line of an entry some entries ahead.
            if let Some(&next) = self.byte_at.get(k + 16) {
                prefetch_write(&tensor[next as usize..next as usize + 1]);
            }
            tensor[o as usize] = v;
        }
        // Fixed sizes let the compiler inline the copies of the common case, one block.
        macro_rules! by_size {
            ($($n:literal)*) => {
                match block_bytes {
                    $($n => self.write_runs::<$n>(tensor, $n, saved),)*
                    _ => self.write_runs::<0>(tensor, block_bytes, saved),
                }
            };
        }
        by_size!(2 4 18 20 22 24 34 144 176 210)
    }

    /// Copies `saved` to the runs; `N` is `bb` when it is one of the common sizes (0
    /// otherwise), so that a single block is copied with a few moves.
    fn write_runs<const N: usize>(&self, tensor: &mut [u8], bb: usize, saved: &[u8]) {
        let mut at = 0;
        for &(first, n) in &self.runs {
            let (s, len) = (first as usize * bb, n as usize * bb);
            if N != 0 && n == 1 {
                let src: &[u8; N] = saved[at..at + N].try_into().unwrap();
                let dst: &mut [u8; N] = (&mut tensor[s..s + N]).try_into().unwrap();
                *dst = *src;
            } else {
                tensor[s..s + len].copy_from_slice(&saved[at..at + len]);
            }
            at += len;
        }
    }
}

/// The bytes a patch wrote at the places of its [`BlockLog`]: with the log, enough to make
/// the patch again by copying.
#[derive(Debug, Default)]
pub struct Redo {
    /// New value of each single-byte entry.
    pub byte_new: Vec<u8>,
    /// New bytes of the saved runs, in order.
    pub saved_new: Vec<u8>,
}

impl Redo {
    pub fn len_bytes(&self) -> usize {
        self.byte_new.len() + self.saved_new.len()
    }
}

/// Counts of one tensor's edit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub elements: usize,
    pub blocks: usize,
    pub reencoded: usize,
}

/// Adds `scale * val[k]` at flat index `idx[k]` (strictly increasing, inside the tensor) of
/// `tensor`, whole blocks of `ty`: each touched block's bytes go to `log` first, then the
/// block is edited as [`add_to_block`] does. Residuals (flat index, value) are pushed in
/// index order when asked for.
#[allow(clippy::too_many_arguments)]
pub fn add_sparse(
    ty: GgmlType,
    tensor: &mut [u8],
    idx: &[u32],
    val: &[f32],
    scale: f32,
    how: Requant,
    log: &mut BlockLog,
    residual: Option<&mut Vec<(u32, f32)>>,
) -> Counts {
    use GgmlType::*;
    match ty {
        Q8_0 => sparse::<Q8_0G, 34>(ty, tensor, idx, val, scale, how, log, residual),
        Q4_0 => sparse::<Q4_0G, 18>(ty, tensor, idx, val, scale, how, log, residual),
        Q4_1 => sparse::<Q4_1G, 20>(ty, tensor, idx, val, scale, how, log, residual),
        Q5_0 => sparse::<Q5_0G, 22>(ty, tensor, idx, val, scale, how, log, residual),
        Q5_1 => sparse::<Q5_1G, 24>(ty, tensor, idx, val, scale, how, log, residual),
        Q4_K => sparse::<Q4KG, 144>(ty, tensor, idx, val, scale, how, log, residual),
        Q5_K => sparse::<Q5KG, 176>(ty, tensor, idx, val, scale, how, log, residual),
        Q6_K => sparse::<Q6KG, 210>(ty, tensor, idx, val, scale, how, log, residual),
        _ => {
            // Floats: one element per block.
            let bb = ty.type_size();
            let mut scratch = Scratch::default();
            let mut res = residual;
            let mut one = Vec::new();
            for (&i, &v) in idx.iter().zip(val) {
                let b = &mut tensor[i as usize * bb..(i as usize + 1) * bb];
                log.save(i as usize, b);
                one.clear();
                add_to_block(ty, b, &[(0, v * scale)], how, &mut scratch, Some(&mut one));
                if let Some(r) = res.as_deref_mut() {
                    r.extend(one.iter().map(|&(_, x)| (i, x)));
                }
            }
            Counts {
                elements: idx.len(),
                blocks: idx.len(),
                reencoded: 0,
            }
        }
    }
}

/// `N` is `G::BYTES`, as a const parameter so that block copies compile to a few moves.
#[allow(clippy::too_many_arguments)]
fn sparse<G: Grid, const N: usize>(
    ty: GgmlType,
    tensor: &mut [u8],
    idx: &[u32],
    val: &[f32],
    scale: f32,
    how: Requant,
    log: &mut BlockLog,
    residual: Option<&mut Vec<(u32, f32)>>,
) -> Counts {
    debug_assert_eq!(N, G::BYTES);
    let mut scratch = Scratch::default();
    let mut deltas: Vec<(u32, f32)> = Vec::with_capacity(G::BLOCK);
    let mut res = residual;
    let mut local: Vec<(u32, f32)> = Vec::new();
    let mut c = Counts {
        elements: idx.len(),
        ..Counts::default()
    };
    // Touched blocks are far apart and the work per block is long, so the CPU would have few
    // of them in flight: ask for the block some elements ahead.
    const AHEAD: usize = 16;
    let mut i = 0;
    while i < idx.len() {
        if let Some(&next) = idx.get(i + AHEAD) {
            let at = next as usize / G::BLOCK * N;
            prefetch_write(&tensor[at..at + N]);
        }
        let block = idx[i] as usize / G::BLOCK;
        let mut j = i + 1;
        while j < idx.len() && idx[j] as usize / G::BLOCK == block {
            j += 1;
        }
        let (bi, bv) = (&idx[i..j], &val[i..j]);
        i = j;
        c.blocks += 1;
        let first = (block * G::BLOCK) as u32;
        let b = &mut tensor[block * N..block * N + N];
        // The common case, in one pass and without buffers: each new level fits the kept
        // scales, and only the bytes it changes are logged. If one does not fit, those bytes
        // are put back and the block takes the general path below, logged whole.
        if how == Requant::KeepScales && res.is_none() {
            let mut fits = true;
            let from = log.byte_at.len();
            let base = (block * N) as u32;
            for (&e, &d) in bi.iter().zip(bv) {
                let e = (e - first) as usize;
                let cell = G::cell(b, e);
                let v = cell.value(G::level(b, e)) + d * scale;
                match nearest((v - cell.add) / cell.step).map(|q| q + cell.zero) {
                    Some(q) if (G::MIN_LEVEL..=G::MAX_LEVEL).contains(&q) && cell.step != 0.0 => {
                        let [p0, p1] = G::bytes(e);
                        if G::SHARED_BYTES {
                            log.save_byte(from, base + p0 as u32, b[p0]);
                            if p1 != p0 {
                                log.save_byte(from, base + p1 as u32, b[p1]);
                            }
                        } else {
                            log.byte_at.push(base + p0 as u32);
                            log.byte_old.push(b[p0]);
                        }
                        G::set_level(b, e, q)
                    }
                    _ => {
                        fits = false;
                        break;
                    }
                }
            }
            if fits {
                continue;
            }
            for k in (from..log.byte_at.len()).rev() {
                b[(log.byte_at[k] - base) as usize] = log.byte_old[k];
            }
            log.byte_at.truncate(from);
            log.byte_old.truncate(from);
        }
        log.save(block, b);
        deltas.clear();
        deltas.extend(bi.iter().zip(bv).map(|(&e, &d)| (e - first, d * scale)));
        local.clear();
        let keep = res.is_some().then_some(&mut local);
        if edit::<G>(ty, b, &deltas, how, &mut scratch, keep) == Outcome::Reencoded {
            c.reencoded += 1;
        }
        if let Some(r) = res.as_deref_mut() {
            r.extend(local.iter().map(|&(e, v)| (first + e, v)));
        }
    }
    c
}

/// Hints that the cache lines of `b` (its first and last byte) will be written soon.
#[inline(always)]
fn prefetch_write(b: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, and both pointers are inside `b`.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(b.as_ptr() as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().add(b.len() - 1) as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = b;
}

fn reencode(
    ty: GgmlType,
    block: &mut [u8],
    deltas: &[(u32, f32)],
    scratch: &mut Scratch,
    residual: Option<&mut Vec<(u32, f32)>>,
) {
    let o = ops(ty).expect("editable types have reference ops");
    let n = ty.block_size();
    scratch.vals.resize(n, 0.0);
    (o.dequantize)(block, &mut scratch.vals);
    for &(e, d) in deltas {
        scratch.vals[e as usize] += d;
    }
    (o.quantize)(&scratch.vals, block);
    if let Some(r) = residual {
        scratch.orig.resize(n, 0.0);
        (o.dequantize)(block, &mut scratch.orig);
        for (e, (&want, &got)) in scratch.vals.iter().zip(&scratch.orig).enumerate() {
            if want != got {
                r.push((e as u32, want - got));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize, WEIGHT_TYPES};

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        crate::quant::util::test_util::noise(n, seed)
    }

    /// Each format's accessors agree with its reference dequantizer on every element, and
    /// setting a level changes exactly that element.
    #[test]
    fn levels_and_cells_match_dequantize() {
        for ty in WEIGHT_TYPES.into_iter().filter(|t| t.block_size() > 1) {
            let n = ty.block_size();
            let mut block = vec![0u8; ty.type_size()];
            quantize(ty, &noise(n, 7), &mut block).unwrap();
            let mut vals = vec![0f32; n];
            dequantize(ty, &block, &mut vals).unwrap();
            let (min, max) = grid_range(ty);
            for e in 0..n {
                let (c, q) = cell_level(ty, &block, e);
                assert_eq!(c.value(q), vals[e], "{ty} element {e}");
                // Move the element to another level and check nothing else moved.
                let q2 = if q < max { q + 1 } else { min };
                let mut b2 = block.clone();
                set_level(ty, &mut b2, e, q2);
                let mut v2 = vec![0f32; n];
                dequantize(ty, &b2, &mut v2).unwrap();
                for i in 0..n {
                    if i == e {
                        assert_eq!(v2[i], c.value(q2), "{ty} element {e}");
                    } else {
                        assert_eq!(v2[i].to_bits(), vals[i].to_bits(), "{ty} {e} moved {i}");
                    }
                }
            }
        }
    }

    fn grid_range(ty: GgmlType) -> (i32, i32) {
        use GgmlType::*;
        match ty {
            Q8_0 => (Q8_0G::MIN_LEVEL, Q8_0G::MAX_LEVEL),
            Q4_0 | Q4_1 | Q4_K => (0, 15),
            Q5_0 | Q5_1 | Q5_K => (0, 31),
            Q6_K => (0, 63),
            _ => unreachable!(),
        }
    }

    fn cell_level(ty: GgmlType, b: &[u8], e: usize) -> (Cell, i32) {
        fn f<G: Grid>(b: &[u8], e: usize) -> (Cell, i32) {
            (G::cell(b, e), G::level(b, e))
        }
        use GgmlType::*;
        match ty {
            Q8_0 => f::<Q8_0G>(b, e),
            Q4_0 => f::<Q4_0G>(b, e),
            Q4_1 => f::<Q4_1G>(b, e),
            Q5_0 => f::<Q5_0G>(b, e),
            Q5_1 => f::<Q5_1G>(b, e),
            Q4_K => f::<Q4KG>(b, e),
            Q5_K => f::<Q5KG>(b, e),
            Q6_K => f::<Q6KG>(b, e),
            _ => unreachable!(),
        }
    }

    fn set_level(ty: GgmlType, b: &mut [u8], e: usize, q: i32) {
        use GgmlType::*;
        match ty {
            Q8_0 => Q8_0G::set_level(b, e, q),
            Q4_0 => Q4_0G::set_level(b, e, q),
            Q4_1 => Q4_1G::set_level(b, e, q),
            Q5_0 => Q5_0G::set_level(b, e, q),
            Q5_1 => Q5_1G::set_level(b, e, q),
            Q4_K => Q4KG::set_level(b, e, q),
            Q5_K => Q5KG::set_level(b, e, q),
            Q6_K => Q6KG::set_level(b, e, q),
            _ => unreachable!(),
        }
    }

    /// A kept-scale edit leaves untouched elements bit-identical and moves each touched one
    /// to the grid level nearest its new value; residuals are exactly what was dropped.
    #[test]
    fn keep_scales_edit_is_local_and_nearest() {
        for ty in WEIGHT_TYPES {
            let n = ty.block_size();
            let mut block = vec![0u8; ty.type_size()];
            quantize(ty, &noise(n, 3), &mut block).unwrap();
            let mut before = vec![0f32; n];
            dequantize(ty, &block, &mut before).unwrap();
            // Small deltas on every third element (they stay inside the grid).
            let deltas: Vec<(u32, f32)> = (0..n as u32)
                .step_by(3)
                .map(|e| (e, 0.01 * ((e % 5) as f32 - 2.0)))
                .collect();
            let mut b = block.clone();
            let mut res = Vec::new();
            let out = add_to_block(
                ty,
                &mut b,
                &deltas,
                Requant::KeepScales,
                &mut Scratch::default(),
                Some(&mut res),
            );
            assert_eq!(out, Outcome::Kept, "{ty}");
            let mut after = vec![0f32; n];
            dequantize(ty, &b, &mut after).unwrap();
            let mut di = deltas.iter().peekable();
            for e in 0..n {
                match di.next_if(|(i, _)| *i as usize == e) {
                    None => assert_eq!(after[e].to_bits(), before[e].to_bits(), "{ty} {e}"),
                    Some(&(_, d)) => {
                        let want = before[e] + d;
                        let r = res
                            .iter()
                            .find(|(i, _)| *i as usize == e)
                            .map_or(0.0, |r| r.1);
                        assert_eq!(after[e] + r, want, "{ty} {e}: residual");
                        if n > 1 {
                            let (c, q) = cell_level(ty, &b, e);
                            for other in [q - 1, q + 1] {
                                assert!(
                                    (c.value(other) - want).abs() >= (after[e] - want).abs(),
                                    "{ty} {e}: level {q} is not the nearest"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// A delta that leaves the grid re-encodes the block with the reference quantizer, which
    /// gives the same bytes as quantizing the dequantized sum directly.
    #[test]
    fn out_of_range_reencodes_like_the_reference() {
        for ty in WEIGHT_TYPES.into_iter().filter(|t| t.block_size() > 1) {
            let n = ty.block_size();
            let mut block = vec![0u8; ty.type_size()];
            quantize(ty, &noise(n, 11), &mut block).unwrap();
            let mut vals = vec![0f32; n];
            dequantize(ty, &block, &mut vals).unwrap();
            let deltas = [(5u32, 100.0f32)];
            vals[5] += 100.0;
            let mut want = vec![0u8; ty.type_size()];
            quantize(ty, &vals, &mut want).unwrap();
            let mut b = block.clone();
            let out = add_to_block(
                ty,
                &mut b,
                &deltas,
                Requant::KeepScales,
                &mut Scratch::default(),
                None,
            );
            assert_eq!(out, Outcome::Reencoded, "{ty}");
            assert_eq!(b, want, "{ty}");
        }
    }
}
