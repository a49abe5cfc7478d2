//! Small helpers shared by the format modules.

use bytemuck::Pod;
use half::{bf16, f16};

/// A little-endian IEEE half stored as bytes, so that blocks have alignment 1.
#[inline]
pub fn f16_to_f32(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

/// Rounds to nearest even, as ggml's `GGML_FP32_TO_FP16` does.
#[inline]
pub fn f32_to_f16(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[inline]
pub fn bf16_to_f32(b: [u8; 2]) -> f32 {
    bf16::from_le_bytes(b).to_f32()
}

/// ggml `ggml_compute_fp32_to_bf16` (ggml-impl.h): NaNs are made quiet by setting bit 6 of
/// the upper half, everything else rounds to nearest even on the 16 dropped bits.
/// Infinities stay infinite; finite values close to `f32::MAX` round up to infinity.
#[inline]
pub fn f32_to_bf16(x: f32) -> [u8; 2] {
    let u = x.to_bits();
    let h = if u & 0x7fff_ffff > 0x7f80_0000 {
        (u >> 16) | 64
    } else {
        u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16
    };
    (h as u16).to_le_bytes()
}

/// C's `roundf`: halfway cases away from zero (ggml's reference quantizers use it).
#[inline]
pub fn roundf(x: f32) -> f32 {
    x.round()
}

/// ggml `nearest_int` (ggml-quants.c): adds 1.5 * 2^23 so that the FPU rounds to an integer
/// (ties to even, unlike [`roundf`]) and reads it back from the mantissa. Only meaningful for
/// |x| <= 4194303, as in ggml; outside that range it returns the same garbage ggml does, which
/// keeps the K-quant quantizers bit-identical.
#[inline]
pub fn nearest_int(x: f32) -> i32 {
    let val = x + 12_582_912.0;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// The whole blocks at the start of `bytes` (a trailing partial block is ignored, so that a
/// wrong length can never panic in a cast).
#[inline]
pub fn blocks<T: Pod>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    bytemuck::cast_slice(&bytes[..bytes.len() / size * size])
}

/// Mutable counterpart of [`blocks`].
#[inline]
pub fn blocks_mut<T: Pod>(bytes: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    let whole = bytes.len() / size * size;
    bytemuck::cast_slice_mut(&mut bytes[..whole])
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Round-trip error ceilings in the manner of ggml's `tests/test-quantize-fns.cpp`:
    //! quantize synthetic data, dequantize, and bound the RMS error relative to the data.

    use super::super::{ops, GgmlType};

    /// ggml's test data: `0.1 + 2 * cos(i + offset)`.
    pub fn synthetic(n: usize, offset: f32) -> Vec<f32> {
        (0..n)
            .map(|i| 0.1 + 2.0 * (i as f32 + offset).cos())
            .collect()
    }

    /// A deterministic pseudo-gaussian row (sum of 4 uniforms from an LCG, centred).
    pub fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut uniform = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32) / (1u64 << 24) as f32
        };
        (0..n)
            .map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0)
            .collect()
    }

    /// RMS of (dequantize(quantize(x)) - x), divided by the RMS of x.
    pub fn relative_rms_error(ty: GgmlType, x: &[f32]) -> f32 {
        let y = round_trip(ty, x);
        let err: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        (err / norm).sqrt() as f32
    }

    /// Checks the round-trip error of `ty`: relative RMS at most `ceiling` on ggml's synthetic
    /// data and on noise, and ggml's own `test-quantize-fns` bound (`sqrt(sum diff^2) / n`
    /// at most `MAX_QUANTIZATION_TOTAL_ERROR` = 0.002 for every format of 4 bits and up).
    pub fn assert_round_trip(ty: GgmlType, ceiling: f32) {
        for (name, x) in [
            ("synthetic", synthetic(4096, 0.0)),
            ("noise", noise(4096, 7)),
        ] {
            let e = relative_rms_error(ty, &x);
            assert!(
                e <= ceiling,
                "{ty} {name}: relative RMS error {e} above ceiling {ceiling}"
            );
        }
        let x = synthetic(4096, 0.0);
        let y = round_trip(ty, &x);
        let sum: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let total = sum.sqrt() as f32 / x.len() as f32;
        assert!(
            total <= 0.002,
            "{ty}: ggml total quantization error {total} above 0.002"
        );
    }

    fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
        let o = ops(ty).expect("type has reference ops");
        let (bs, ts) = ty.block_layout();
        let mut q = vec![0u8; x.len() / bs * ts];
        let mut y = vec![0f32; x.len()];
        (o.quantize)(x, &mut q);
        (o.dequantize)(&q, &mut y);
        y
    }

    /// `vec_dot` against activations quantized to `vec_dot_type` agrees with the f64 dot of
    /// the dequantized rows within the recursive-summation bound n * eps * sum |w_i a_i|, and
    /// with the exact dot of the unquantized rows within ggml's `MAX_DOT_PRODUCT_ERROR`.
    pub fn assert_dot_consistent(ty: GgmlType) {
        let o = ops(ty).expect("type has reference ops");
        let n = 1024;
        let w = noise(n, 1);
        let a = noise(n, 2);
        let quant = |t: GgmlType, x: &[f32]| {
            let (bs, ts) = t.block_layout();
            let mut q = vec![0u8; x.len() / bs * ts];
            (ops(t).expect("ops").quantize)(x, &mut q);
            let mut y = vec![0f32; x.len()];
            (ops(t).expect("ops").dequantize)(&q, &mut y);
            (q, y)
        };
        let (wq, wd) = quant(ty, &w);
        let (aq, ad) = quant(o.vec_dot_type, &a);
        let got = (o.vec_dot)(&wq, &aq) as f64;
        let want: f64 = wd.iter().zip(&ad).map(|(x, y)| *x as f64 * *y as f64).sum();
        let abs: f64 = wd
            .iter()
            .zip(&ad)
            .map(|(x, y)| (*x as f64 * *y as f64).abs())
            .sum();
        let tol = n as f64 * f32::EPSILON as f64 * abs;
        assert!(
            (got - want).abs() <= tol,
            "{ty}: dot {got} vs {want} (tolerance {tol})"
        );

        // ggml test-quantize-fns: |vec_dot(q(x), q_act(y)) - x.y| / n <= MAX_DOT_PRODUCT_ERROR.
        let (x, y) = (synthetic(4096, 0.0), synthetic(4096, 1.0));
        let (xq, _) = quant(ty, &x);
        let (yq, _) = quant(o.vec_dot_type, &y);
        let got = (o.vec_dot)(&xq, &yq) as f64;
        let exact: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
        let err = (got - exact).abs() / x.len() as f64;
        assert!(err <= 0.02, "{ty}: ggml dot product error {err} above 0.02");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-126.7), -127);
        assert_eq!(nearest_int(4194303.0), 4194303);
    }

    #[test]
    fn bf16_rounding_matches_ggml() {
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: round to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80u16.to_le_bytes());
        // 1 + 3 * 2^-8 is a tie between 1 + 2^-7 (odd) and 1 + 2^-6: round to even (up).
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82u16.to_le_bytes());
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80u16.to_le_bytes());
        // A signalling NaN is made quiet.
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x7f80_0001)),
            0x7fc0u16.to_le_bytes()
        );
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80u16.to_le_bytes());
    }

    #[test]
    fn partial_blocks_are_ignored() {
        let bytes = [0u8; 35];
        assert_eq!(blocks::<[u8; 17]>(&bytes).len(), 2);
        let mut bytes = [0u8; 3];
        assert_eq!(blocks_mut::<[u8; 4]>(&mut bytes).len(), 0);
    }
}
