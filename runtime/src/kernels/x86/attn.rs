//! AVX2 forms of the attention loops in `kernels/attn.rs`: the same slots and folds, eight
//! lanes at a time, with F16C converting the f16 cache. Each returns false (and does
//! nothing) when the table is below AVX2 or the head size is not a multiple of 16, and the
//! portable loop runs instead.

use crate::kernels::attn::{KvRows, SumOrder};
use crate::kernels::{KernelTable, Level};
use std::arch::x86_64::*;

fn enabled(hd: usize) -> bool {
    hd.is_multiple_of(16) && KernelTable::get().level() >= Level::Avx2
}

/// Eight values of the cache at `i` as f32.
#[inline(always)]
unsafe fn load8(k: &KvRows, i: usize) -> __m256 {
    match k {
        KvRows::F16(b) => {
            let s = &b[i..i + 8];
            _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr() as *const __m128i))
        }
        KvRows::F32(b) => _mm256_loadu_ps(b[i..i + 8].as_ptr()),
    }
}

/// `_mm512_reduce_add_ps` of the 16 lanes (lo, hi): halves, quarters, pairs.
#[inline(always)]
pub(super) unsafe fn reduce16(lo: __m256, hi: __m256) -> f32 {
    let t3 = _mm256_add_ps(hi, lo);
    let t6 = _mm_add_ps(_mm256_extractf128_ps::<1>(t3), _mm256_castps256_ps128(t3));
    let r = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
    _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
}

pub fn scores(
    order: SumOrder,
    k: KvRows,
    at: usize,
    stride: usize,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) -> bool {
    if !enabled(q.len()) {
        return false;
    }
    // SAFETY: AVX2, FMA and F16C were detected (the table's level); indices are checked by
    // the slice accesses in load8.
    unsafe { scores_imp(order, k, at, stride, q, scale, out) };
    true
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_imp(
    order: SumOrder,
    k: KvRows,
    at: usize,
    stride: usize,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        let base = at + j * stride;
        let s = match order {
            SumOrder::TinyBlas => {
                let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for c in (0..hd).step_by(16) {
                    lo = _mm256_fmadd_ps(load8(&k, base + c), _mm256_loadu_ps(&q[c]), lo);
                    hi = _mm256_fmadd_ps(load8(&k, base + c + 8), _mm256_loadu_ps(&q[c + 8]), hi);
                }
                reduce16(lo, hi)
            }
            SumOrder::GgmlVecDot => {
                // Steps of 64 with the eight accumulators at fixed indices (a computed index
                // kept them in memory, a store and a load per step).
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..hd).step_by(64) {
                    for (a, acc) in acc.iter_mut().enumerate() {
                        let i = c + 8 * a;
                        if i < hd {
                            *acc =
                                _mm256_fmadd_ps(load8(&k, base + i), _mm256_loadu_ps(&q[i]), *acc);
                        }
                    }
                }
                // (acc0 + acc2) + (acc1 + acc3), per 16-lane accumulator = two registers.
                let lo =
                    _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
                let hi =
                    _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
                reduce16(lo, hi)
            }
        };
        *o = s * scale;
    }
}

/// Eight dimensions from `d` of accumulator slot `i` (rows of `hd` in `acc`), or zeros for a
/// slot past the `used` ones.
#[inline(always)]
unsafe fn slot(acc: &[f32], used: usize, hd: usize, i: usize, d: usize) -> __m256 {
    if i < used {
        _mm256_loadu_ps(&acc[i * hd + d])
    } else {
        _mm256_setzero_ps()
    }
}

/// The portable `weighted_sum`'s sums and fold; `acc` is scratch for min(slots, p.len())
/// slots of out.len() values, every one of them overwritten (no need to zero it).
pub fn weighted_sum(
    order: SumOrder,
    v: KvRows,
    at: usize,
    stride: usize,
    p: &[f32],
    acc: &mut [f32],
    out: &mut [f32],
) -> bool {
    if !enabled(out.len()) {
        return false;
    }
    // SAFETY: as in `scores`.
    unsafe { weighted_sum_imp(order, v, at, stride, p, acc, out) };
    true
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_imp(
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
    let used = acc.len() / hd;
    match order {
        // A batch's order has 16 slots, each of many positions: slot by slot, 64 dimensions
        // at a time in eight registers, slot i's positions i, i + 16, .. fused-multiply-added
        // in increasing order as the portable loop does, then stored once.
        SumOrder::TinyBlas => {
            for i in 0..used {
                let s = &mut acc[i * hd..(i + 1) * hd];
                for d0 in (0..hd).step_by(64) {
                    let mut a = [_mm256_setzero_ps(); 8];
                    for j in (i..p.len()).step_by(slots) {
                        let pv = _mm256_set1_ps(p[j]);
                        let base = at + j * stride + d0;
                        for (c, a) in a.iter_mut().enumerate() {
                            if d0 + 8 * c < hd {
                                *a = _mm256_fmadd_ps(pv, load8(&v, base + 8 * c), *a);
                            }
                        }
                    }
                    for (c, a) in a.iter().enumerate() {
                        if d0 + 8 * c < hd {
                            _mm256_storeu_ps(&mut s[d0 + 8 * c], *a);
                        }
                    }
                }
            }
        }
        // One query's order has 64 slots of a few positions each: position by position, so
        // that the cache rows are read in sequence (they mostly come from memory in a decode
        // step, and slot order defeated the prefetchers); a slot's first position writes it.
        SumOrder::GgmlVecDot => {
            for (j, &pj) in p.iter().enumerate() {
                let base = at + j * stride;
                let s = &mut acc[(j % slots) * hd..(j % slots + 1) * hd];
                let pv = _mm256_set1_ps(pj);
                for d in (0..hd).step_by(8) {
                    let a = if j < slots {
                        _mm256_setzero_ps()
                    } else {
                        _mm256_loadu_ps(&s[d])
                    };
                    _mm256_storeu_ps(&mut s[d], _mm256_fmadd_ps(pv, load8(&v, base + d), a));
                }
            }
        }
    }
    let zero = _mm256_setzero_ps();
    for d in (0..hd).step_by(8) {
        // Reduce over the slots, eight dimensions at a time, in the order's fold.
        let t: [__m256; 16] = match order {
            SumOrder::TinyBlas => build!(16, zero, |l| slot(acc, used, hd, l, d)),
            SumOrder::GgmlVecDot => build!(16, zero, |l| {
                _mm256_add_ps(
                    _mm256_add_ps(slot(acc, used, hd, l, d), slot(acc, used, hd, 32 + l, d)),
                    _mm256_add_ps(
                        slot(acc, used, hd, 16 + l, d),
                        slot(acc, used, hd, 48 + l, d),
                    ),
                )
            }),
        };
        let t3: [__m256; 8] = build!(8, zero, |i| _mm256_add_ps(t[8 + i], t[i]));
        let t6: [__m256; 4] = build!(4, zero, |i| _mm256_add_ps(t3[4 + i], t3[i]));
        let r = _mm256_add_ps(_mm256_add_ps(t6[0], t6[2]), _mm256_add_ps(t6[1], t6[3]));
        _mm256_storeu_ps(&mut out[d], r);
    }
}
