//! Attention inner loops over the KV cache: the scores `q . k_j` and the weighted sum
//! `sum_j p_j v_j`, in the summation orders of llama.cpp's f16 attention products (flash
//! attention off), so that sparrow's attention output is the same to the last bit.
//!
//! Two orders, both over 16-lane accumulators as ggml's AVX-512 code has them:
//! - [`SumOrder::TinyBlas`] (a batch of 2+ queries, tinyBLAS): element i into lane i % 16 in
//!   order, then `_mm512_reduce_add_ps`;
//! - [`SumOrder::GgmlVecDot`] (one query, `ggml_vec_dot_f16`): 4 accumulators of 16 lanes over
//!   steps of 64 elements (element i into accumulator (i % 64) / 16, lane i % 16), folded
//!   0+2, 1+3, then 0+1, then reduced. Lengths that are not whole steps behave as if padded
//!   with zeros, which add nothing.
//!
//! The weighted sum runs the same orders over the positions j for each output dimension, so
//! it keeps one slot per lane (16 or 64 slots of `head_dim` values) and folds them at the end.
//! The x86 plug has AVX2 versions of both loops; the level of the kernel table decides.

use super::math::{fma32, reduce_add16};
use half::f16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumOrder {
    TinyBlas,
    GgmlVecDot,
}

impl SumOrder {
    /// Accumulator slots of the order: each element (or position) goes to slot i % slots.
    pub fn slots(self) -> usize {
        match self {
            SumOrder::TinyBlas => 16,
            SumOrder::GgmlVecDot => 64,
        }
    }
}

/// Rows of a KV cache in its element type.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvRows<'_> {
    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            KvRows::F16(b) => b[i].to_f32(),
            KvRows::F32(b) => b[i],
        }
    }
}

/// Folds the slots of one dimension into the result, in the order's reduction.
/// `slot(i)` is slot i's value (0 for slots no position reached).
#[inline]
fn fold(order: SumOrder, slot: impl Fn(usize) -> f32) -> f32 {
    match order {
        SumOrder::TinyBlas => reduce_add16(&std::array::from_fn(&slot)),
        SumOrder::GgmlVecDot => {
            let t: [f32; 16] =
                std::array::from_fn(|l| (slot(l) + slot(32 + l)) + (slot(16 + l) + slot(48 + l)));
            reduce_add16(&t)
        }
    }
}

/// `out[j] = scale * (q . k_j)` for the rows `k_j = k[at + j stride ..][..q.len()]`.
pub fn scores(
    order: SumOrder,
    k: KvRows,
    at: usize,
    stride: usize,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::attn::scores(order, k, at, stride, q, scale, out) {
        return;
    }
    scores_portable(order, k, at, stride, q, scale, out);
}

/// [`scores`] without the arch plug.
fn scores_portable(
    order: SumOrder,
    k: KvRows,
    at: usize,
    stride: usize,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    let slots = order.slots();
    for (j, o) in out.iter_mut().enumerate() {
        let base = at + j * stride;
        let mut acc = [0.0f32; 64];
        for (i, &qi) in q.iter().enumerate() {
            let s = &mut acc[i % slots];
            *s = fma32(k.get(base + i), qi, *s);
        }
        let _ = hd;
        *o = fold(order, |i| acc[i]) * scale;
    }
}

/// `out = sum_j p[j] v_j` for the rows `v_j = v[at + j stride ..][..out.len()]`, using
/// `acc` as scratch (resized to slots x out.len()).
pub fn weighted_sum(
    order: SumOrder,
    v: KvRows,
    at: usize,
    stride: usize,
    p: &[f32],
    acc: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = out.len();
    let slots = order.slots();
    let used = slots.min(p.len());
    if acc.len() < used * hd {
        acc.resize(used * hd, 0.0);
    }
    let acc = &mut acc[..used * hd];
    // The plug writes every used slot (it sums a slot in registers, then stores it).
    #[cfg(target_arch = "x86_64")]
    if super::x86::attn::weighted_sum(order, v, at, stride, p, acc, out) {
        return;
    }
    acc.fill(0.0);
    weighted_sum_portable(order, v, at, stride, p, acc, out);
}

/// [`weighted_sum`] without the arch plug (`acc` holds the zeroed slots).
fn weighted_sum_portable(
    order: SumOrder,
    v: KvRows,
    at: usize,
    stride: usize,
    p: &[f32],
    acc: &mut [f32],
    out: &mut [f32],
) {
    let hd = out.len();
    let slots = order.slots();
    let used = slots.min(p.len());
    for (j, &pj) in p.iter().enumerate() {
        let base = at + j * stride;
        let s = &mut acc[(j % slots) * hd..(j % slots + 1) * hd];
        for (d, a) in s.iter_mut().enumerate() {
            *a = fma32(pj, v.get(base + d), *a);
        }
    }
    for (d, o) in out.iter_mut().enumerate() {
        *o = fold(order, |i| if i < used { acc[i * hd + d] } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plugged loops (x86 AVX2 where the table has it) give the portable loops' bits, for
    /// both orders, both cache types, head sizes of one and several 64-element steps, and
    /// position counts around the slot counts; the scratch is reused between calls.
    #[test]
    fn plugged_loops_match_the_portable_ones() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        };
        let mut acc = Vec::new();
        for hd in [64usize, 128, 48] {
            let (heads, n_max) = (3, 131);
            let stride = heads * hd;
            let k32: Vec<f32> = (0..n_max * stride).map(|_| next()).collect();
            let k16: Vec<f16> = k32.iter().map(|&x| f16::from_f32(x)).collect();
            let q: Vec<f32> = (0..hd).map(|_| next()).collect();
            for order in [SumOrder::TinyBlas, SumOrder::GgmlVecDot] {
                for n in [1usize, 15, 16, 17, 63, 64, 65, 131] {
                    for rows in [KvRows::F16(&k16), KvRows::F32(&k32)] {
                        let at = hd;
                        let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
                        scores(order, rows, at, stride, &q, 0.125, &mut a);
                        scores_portable(order, rows, at, stride, &q, 0.125, &mut b);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&a), bits(&b), "scores {order:?} hd {hd} n {n}");
                        let p: Vec<f32> = (0..n).map(|_| next().abs()).collect();
                        let (mut oa, mut ob) = (vec![0.0; hd], vec![0.0; hd]);
                        // Scratch left from other calls, poisoned: every slot must be written.
                        acc.iter_mut().for_each(|x| *x = f32::NAN);
                        weighted_sum(order, rows, at, stride, &p, &mut acc, &mut oa);
                        let mut acc_b = vec![0.0; order.slots().min(n) * hd];
                        weighted_sum_portable(order, rows, at, stride, &p, &mut acc_b, &mut ob);
                        assert_eq!(bits(&oa), bits(&ob), "weighted_sum {order:?} hd {hd} n {n}");
                    }
                }
            }
        }
    }
}
