//! Pieces shared by the K-quant super-block formats (Q4_K, Q5_K, Q6_K, Q8_K): the super-block
//! size, the 6-bit scale/min packing of Q4_K and Q5_K, and ggml's scale searches
//! `make_qkx2_quants` and `make_qx_quants`.
//!
//! Ported from llama.cpp `ggml/src/ggml-quants.c` (as vendored in llama-cpp-python 0.3.36).
//! The float operations are written in ggml's order, one rounding per C operator, because the
//! quantizers must reproduce ggml's bytes exactly: a different summation order moves a scale by
//! an ulp, and that can flip a rounding decision.

use super::util::nearest_int;

/// Elements per K-quant super-block (`QK_K`).
pub const QK_K: usize = 256;

/// Bytes of packed 6-bit scales and mins in Q4_K and Q5_K (`K_SCALE_SIZE`).
pub const K_SCALE_SIZE: usize = 12;

/// ggml `GROUP_MAX_EPS`: below this absolute maximum a group counts as all zero.
pub const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8).
///
/// ```text
/// byte  0..4   sc[0..4] (bits 0-5) | sc[4..8] bits 4-5 (bits 6-7)
/// byte  4..8   m[0..4]  (bits 0-5) | m[4..8]  bits 4-5 (bits 6-7)
/// byte  8..12  sc[4..8] bits 0-3 (low nibble) | m[4..8] bits 0-3 (high nibble)
/// ```
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let j = j & 7;
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Inverse of [`get_scale_min_k4`] for all eight sub-blocks, as `quantize_row_q4_K_ref` packs
/// them (each value is already at most 63).
pub fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut s = [0u8; K_SCALE_SIZE];
    for j in 0..8 {
        let (l, m) = (ls[j], lm[j]);
        if j < 4 {
            s[j] = l;
            s[j + 4] = m;
        } else {
            s[j + 4] = (l & 0xF) | ((m & 0xF) << 4);
            s[j - 4] |= (l >> 4) << 6;
            s[j] |= (m >> 4) << 6;
        }
    }
    s
}

/// The scale and min search shared by `quantize_row_q4_K_ref` and `quantize_row_q5_K_ref`:
/// per sub-block of 32, weights `av_x + |x|` with `av_x` the RMS of the sub-block, then
/// [`make_qkx2_quants`]. Returns the scale and the (positive) min; `l` receives the levels.
pub fn sub_block_scale_min(
    x: &[f32; 32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    l: &mut [u8; 32],
) -> (f32, f32) {
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    let av_x = (sum_x2 / 32.0).sqrt();
    let mut weights = [0f32; 32];
    for (w, &v) in weights.iter_mut().zip(x) {
        *w = av_x + v.abs();
    }
    make_qkx2_quants(x, &weights, nmax, l, rmin, 0.1, nstep, false)
}

/// ggml `make_qkx2_quants`: finds a scale and min so that `x ~ scale * l - min` with
/// `l` in `0..=nmax`, minimising the weighted squared (or absolute, `use_mad`) error over
/// `nstep + 1` candidate scales. Returns `(scale, min)` with `min >= 0` meaning `-min` offset,
/// as ggml's `the_min` output.
#[allow(clippy::too_many_arguments)]
pub fn make_qkx2_quants(
    x: &[f32; 32],
    weights: &[f32; 32],
    nmax: i32,
    l: &mut [u8; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min));
        l[i] = li.min(nmax).max(0) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).min(nmax).max(0);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                *l = laux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml `make_qx_quants` with `rmse_type = 1` and no importance weights (the only form the
/// reference quantizers use, from `quantize_row_q6_K_ref`): symmetric levels
/// `l + nmax` in `0..2 * nmax`, weights `x^2`, 18 candidate scales around `-nmax / max`.
/// Returns the scale; `l` receives the offset levels.
pub fn make_qx_quants(x: &[f32; 16], nmax: i32, l: &mut [i8; 16]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).min(nmax - 1).max(-nmax);
    let mut iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (li, &v) in l.iter_mut().zip(x) {
        let q = level(iscale, v);
        *li = (q + nmax) as i8;
        let w = v * v;
        let qf = q as f32;
        sumlx += w * v * qf;
        suml2 += w * qf * qf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let qf = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * qf;
            suml2 += w * qf * qf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (li, &v) in l.iter_mut().zip(x) {
                *li = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_packing_round_trips() {
        let ls = [0, 1, 17, 63, 32, 5, 48, 63];
        let lm = [63, 0, 31, 2, 16, 47, 1, 60];
        let packed = pack_scale_min_k4(&ls, &lm);
        for j in 0..8 {
            assert_eq!(
                get_scale_min_k4(j, &packed),
                (ls[j], lm[j]),
                "sub-block {j}"
            );
        }
    }
}
