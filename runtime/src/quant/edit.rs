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
        F16 => float16(block, deltas[0].1, residual, |v| f32_to_f16(v), f16_to_f32),
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
    const MAX_LEVEL: i32;
    const MIN_LEVEL: i32 = 0;
    fn cell(b: &[u8], e: usize) -> Cell;
    fn level(b: &[u8], e: usize) -> i32;
    fn set_level(b: &mut [u8], e: usize, level: i32);
}

#[inline]
fn half(b: &[u8], at: usize) -> f32 {
    f16_to_f32([b[at], b[at + 1]])
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
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        b[2 + e] = level as i8 as u8;
    }
}

/// Q4_0: `[d f16][qs 16]`, weight j < 16 in the low nibble of qs[j], j + 16 in the high one;
/// x = d * (q - 8).
struct Q4_0G;
impl Grid for Q4_0G {
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
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 2 + e % 16, e >= 16, level)
    }
}

/// Q4_1: `[d f16][m f16][qs 16]`, x = d * q + m.
struct Q4_1G;
impl Grid for Q4_1G {
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
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 4 + e % 16, e >= 16, level)
    }
}

/// Q5_0: `[d f16][qh u32][qs 16]`, nibbles as Q4_0, bit e of qh the fifth bit; x = d (q - 16).
struct Q5_0G;
impl Grid for Q5_0G {
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
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 6 + e % 16, e >= 16, level);
        set_bit(b, 2 + e / 8, e % 8, level >> 4);
    }
}

/// Q5_1: `[d f16][m f16][qh u32][qs 16]`, x = d * q + m.
struct Q5_1G;
impl Grid for Q5_1G {
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
    const MAX_LEVEL: i32 = 15;
    fn cell(b: &[u8], e: usize) -> Cell {
        k4_cell(b, e)
    }
    fn level(b: &[u8], e: usize) -> i32 {
        nibble(b, 16 + 32 * (e / 64) + e % 32, e % 64 >= 32)
    }
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        set_nibble(b, 16 + 32 * (e / 64) + e % 32, e % 64 >= 32, level)
    }
}

/// Q5_K: qh (32 bytes) at byte 16, qs at 48 laid out as Q4_K's; bit j of qh[i] is the fifth
/// bit of weight 32 j + i.
struct Q5KG;
impl Grid for Q5KG {
    const MAX_LEVEL: i32 = 31;
    fn cell(b: &[u8], e: usize) -> Cell {
        k4_cell(b, e)
    }
    fn level(b: &[u8], e: usize) -> i32 {
        nibble(b, 48 + 32 * (e / 64) + e % 32, e % 64 >= 32) | bit(b, 16 + e % 32, e / 32) << 4
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
        (64 * half + 32 * (g % 2) + l, g >= 2, 128 + 32 * half + l, 2 * g)
    }
}
impl Grid for Q6KG {
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
    fn set_level(b: &mut [u8], e: usize, level: i32) {
        let (ql, high, qh, shift) = Self::place(e);
        set_nibble(b, ql, high, level);
        b[qh] = (b[qh] & !(3 << shift)) | ((((level >> 4) & 3) as u8) << shift);
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
        // First pass: check that every new level fits, without writing anything.
        let fits = deltas.iter().all(|&(e, d)| {
            let c = G::cell(block, e as usize);
            let v = c.value(G::level(block, e as usize)) + d;
            let q = ((v - c.add) / c.step).round();
            c.step != 0.0
                && q.is_finite()
                && (G::MIN_LEVEL as f32..=G::MAX_LEVEL as f32).contains(&(q + c.zero as f32))
        });
        if fits {
            let mut res = residual;
            for &(e, d) in deltas {
                let e = e as usize;
                let c = G::cell(block, e);
                let v = c.value(G::level(block, e)) + d;
                let q = ((v - c.add) / c.step).round() as i32 + c.zero;
                G::set_level(block, e, q);
                if let Some(r) = res.as_deref_mut() {
                    let stored = c.value(q);
                    if stored != v {
                        r.push((e as u32, v - stored));
                    }
                }
            }
            return Outcome::Kept;
        }
    }
    reencode(ty, block, deltas, scratch, residual);
    Outcome::Reencoded
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
                        let r = res.iter().find(|(i, _)| *i as usize == e).map_or(0.0, |r| r.1);
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
