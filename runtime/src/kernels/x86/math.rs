//! AVX2 forms of `kernels/math.rs`'s ggml expf, eight lanes at a time: the same fused
//! operations in the same order, so each lane gives the bits of the scalar [`math::expf`].
//! Lanes whose exponent leaves [-126, 127] (results near underflow or overflow, NaN) go
//! through the scalar function.

use crate::kernels::math;
use crate::kernels::{KernelTable, Level};
use std::arch::x86_64::*;

fn enabled() -> bool {
    KernelTable::get().level() >= Level::Avx2
}

#[inline(always)]
unsafe fn c(bits: u32) -> __m256 {
    _mm256_set1_ps(f32::from_bits(bits))
}

/// expf of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn expf8(x: __m256) -> __m256 {
    unsafe {
        let r = c(0x4B40_0000);
        let z = _mm256_fmadd_ps(x, c(0x3FB8_AA3B), r);
        let n = _mm256_sub_ps(z, r);
        let neg_n = _mm256_sub_ps(_mm256_setzero_ps(), n);
        let b = _mm256_fmadd_ps(
            neg_n,
            c(0x35BF_BE8E),
            _mm256_fmadd_ps(neg_n, c(0x3F31_7200), x),
        );
        let u = _mm256_mul_ps(b, b);
        let p_hi = _mm256_fmadd_ps(c(0x3C07_2010), b, c(0x3D2B_9F17));
        let p_lo = _mm256_fmadd_ps(c(0x3E2A_AF33), b, c(0x3EFF_FEDB));
        let lin = _mm256_fmadd_ps(c(0x3F7F_FFF6), b, _mm256_set1_ps(1.0));
        let j = _mm256_fmadd_ps(_mm256_fmadd_ps(p_hi, u, p_lo), u, lin);
        let in_range = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GE_OQ>(n, _mm256_set1_ps(-126.0)),
            _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_set1_ps(127.0)),
        );
        if _mm256_movemask_ps(in_range) == 0xFF {
            let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            _mm256_mul_ps(j, _mm256_castsi256_ps(e))
        } else {
            let mut v = [0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), x);
            _mm256_loadu_ps(v.map(math::expf).as_ptr())
        }
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`; false when the table is below AVX2.
pub fn swiglu(gate: &mut [f32], up: &[f32]) -> bool {
    if !enabled() {
        return false;
    }
    // SAFETY: the features were detected (the table's level).
    unsafe { swiglu_imp(gate, up) };
    true
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn swiglu_imp(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let body = n / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    for i in (0..body).step_by(8) {
        let g = _mm256_loadu_ps(&gate[i]);
        let e = expf8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(&mut gate[i], _mm256_mul_ps(s, _mm256_loadu_ps(&up[i])));
    }
    for i in body..n {
        gate[i] = math::silu(gate[i]) * up[i];
    }
}

/// `s[i] = exp(s[i] - max)` and the f64 sum of the 16-lane chunks (see the portable
/// `softmax_unnormalized`); None when the table is below AVX2.
pub fn softmax_exp(s: &mut [f32], max: f32) -> Option<f64> {
    if !enabled() {
        return None;
    }
    // SAFETY: as above.
    Some(unsafe { softmax_exp_imp(s, max) })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_exp_imp(s: &mut [f32], max: f32) -> f64 {
    let m = _mm256_set1_ps(max);
    let mut sum = 0.0f64;
    let mut chunks = s.chunks_exact_mut(16);
    for ch in &mut chunks {
        let lo = expf8(_mm256_sub_ps(_mm256_loadu_ps(&ch[0]), m));
        let hi = expf8(_mm256_sub_ps(_mm256_loadu_ps(&ch[8]), m));
        _mm256_storeu_ps(&mut ch[0], lo);
        _mm256_storeu_ps(&mut ch[8], hi);
        sum += super::attn::reduce16(lo, hi) as f64;
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut v = [0.0f32; 16];
        for (x, l) in rest.iter_mut().zip(v.iter_mut()) {
            *x = math::expf(*x - max);
            *l = *x;
        }
        sum += math::reduce_add16(&v) as f64;
    }
    sum
}

/// `x[i] = f32(f16(x[i] * k))` (round to nearest even, as `half::f16::from_f32`); false when
/// the table is below AVX2.
pub fn scale_round_f16(x: &mut [f32], k: f32) -> bool {
    if !enabled() {
        return false;
    }
    // SAFETY: as above.
    unsafe { scale_round_f16_imp(x, k) };
    true
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_round_f16_imp(x: &mut [f32], k: f32) {
    let kv = _mm256_set1_ps(k);
    let mut chunks = x.chunks_exact_mut(8);
    for ch in &mut chunks {
        let v = _mm256_mul_ps(_mm256_loadu_ps(ch.as_ptr()), kv);
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        _mm256_storeu_ps(ch.as_mut_ptr(), _mm256_cvtph_ps(h));
    }
    for v in chunks.into_remainder() {
        *v = half::f16::from_f32(*v * k).to_f32();
    }
}
