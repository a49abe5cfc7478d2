//! Elementwise math as ggml's CPU backend computes it, so that activations agree with
//! llama.cpp's to the last bit where they can (a one-ulp difference in a SiLU output can flip
//! the rounding of a quantized activation, and over 30 layers such flips move logits by
//! tenths).
//!
//! [`expf`] is ggml's vectorised `ggml_v_expf` (ggml-cpu/vec.h, AVX-512 form, adapted there
//! from Arm's optimized-routines: max error 1.45 + 0.5 ulp), written for one lane with fused
//! multiply-adds; ggml uses it in SiLU / SwiGLU and in softmax.

/// `fma(a, b, c)` for f32 without needing an FMA unit, correctly rounded like the hardware
/// instruction. The product of two f32 is exact in f64; the f64 sum can round, and rounding
/// that again to f32 goes wrong only when the f64 sum lands exactly halfway between two f32
/// values: then the exact error of the f64 addition (two-sum) says which way to go.
/// (`f32::mul_add` is exact too but becomes a libm call on CPUs built without FMA, far too
/// slow for an inner loop.)
#[inline(always)]
pub fn fma32(a: f32, b: f32, c: f32) -> f32 {
    let p = a as f64 * b as f64;
    let c = c as f64;
    let s = p + c;
    let bits = s.to_bits();
    // Halfway between two f32 (normal range): the 29 mantissa bits below f32 precision are
    // exactly 1000...0.
    if bits & 0x1FFF_FFFF == 0x1000_0000 {
        let v = s - p;
        let e = (p - (s - v)) + (c - v);
        if e != 0.0 {
            // Move s one f64 step towards the exact value, off the halfway point.
            let up = (e > 0.0) == (s > 0.0);
            return f64::from_bits(if up { bits + 1 } else { bits - 1 }) as f32;
        }
    }
    s as f32
}

/// `_mm512_reduce_add_ps` as GCC expands it: halves, quarters, then pairs.
#[inline]
pub fn reduce_add16(v: &[f32; 16]) -> f32 {
    let t3: [f32; 8] = std::array::from_fn(|i| v[8 + i] + v[i]);
    let t6: [f32; 4] = std::array::from_fn(|i| t3[4 + i] + t3[i]);
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// ggml_v_expf for one lane.
#[inline]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4B40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3FB8_AA3B), r); // 0x1.715476p+0 = log2(e)
    let n = z - r;
    // b = x - n*ln2_hi - n*ln2_lo
    let b = (-n).mul_add(
        f32::from_bits(0x35BF_BE8E),
        (-n).mul_add(f32::from_bits(0x3F31_7200), x),
    );
    let u = b * b;
    let p_hi = f32::from_bits(0x3C07_2010).mul_add(b, f32::from_bits(0x3D2B_9F17)); // 0x1.0e4020p-7, 0x1.573e2ep-5
    let p_lo = f32::from_bits(0x3E2A_AF33).mul_add(b, f32::from_bits(0x3EFF_FEDB)); // 0x1.555e66p-3, 0x1.fffdb6p-2
    let lin = f32::from_bits(0x3F7F_FFF6).mul_add(b, 1.0); // 0x1.ffffecp-1
    let j = p_hi.mul_add(u, p_lo).mul_add(u, lin);
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scalef(j, n)
}

/// `_mm512_scalef_ps`: j * 2^n for integral n in [-192, 192], without overflow in 2^n.
#[inline]
fn scalef(j: f32, n: f32) -> f32 {
    let mut e = n as i32;
    let mut v = j;
    while e > 127 {
        v *= f32::from_bits(0x7F00_0000); // 2^127
        e -= 127;
    }
    while e < -126 {
        v *= f32::from_bits(0x0080_0000); // 2^-126
        e += 126;
    }
    v * f32::from_bits(((e + 127) as u32) << 23)
}

/// ggml_v_silu: x / (1 + exp(-x)).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

/// `x[i] = f32(f16(x[i] * k))`: the product rounded to f16 (nearest, ties to even) and back,
/// where ggml converts an f32 operand to an f16 one. `k = 1` only rounds (the product is
/// exact).
pub fn scale_round_f16(x: &mut [f32], k: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::math::scale_round_f16(x, k) {
        return;
    }
    for v in x {
        *v = half::f16::from_f32(*v * k).to_f32();
    }
}

/// SwiGLU in place: `gate[i] = silu(gate[i]) * up[i]`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::math::swiglu(gate, up) {
        return;
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// ggml_vec_soft_max_f32: `s[i] = exp(s[i] - max)` with ggml's exp, summed per 16 lanes
/// (in `_mm512_reduce_add_ps` order) into an f64; returns 1/sum as f32, the scale ggml
/// applies afterwards.
pub fn softmax_unnormalized(s: &mut [f32]) -> f32 {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    #[cfg(target_arch = "x86_64")]
    if let Some(sum) = super::x86::math::softmax_exp(s, max) {
        return (1.0 / sum) as f32;
    }
    let mut sum = 0.0f64;
    for chunk in s.chunks_mut(16) {
        let mut v = [0.0f32; 16];
        for (x, l) in chunk.iter_mut().zip(v.iter_mut()) {
            *x = expf(*x - max);
            *l = *x;
        }
        sum += reduce_add16(&v) as f64;
    }
    (1.0 / sum) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_libm_everywhere() {
        let mut x = -103.0f32;
        while x < 88.0 {
            let (a, b) = (expf(x), x.exp());
            let ulp = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(
                ulp <= 2 || (b < 1e-37 && (a - b).abs() < 1e-38),
                "expf({x}) = {a}, libm {b} ({ulp} ulp)"
            );
            x += 0.0137;
        }
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(0.0), 1.0);
    }

    /// The plugged rounding (eight lanes, then the tail) against `half`'s conversion, on
    /// ties, subnormals, overflow to infinity, signed zeros and NaN, for two scales.
    #[test]
    fn scale_round_f16_matches_half() {
        let mut x: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0 + 2f32.powi(-11), // a tie: rounds to even (1.0)
            1.0 + 3.0 * 2f32.powi(-11),
            2f32.powi(-24),
            3.0 * 2f32.powi(-26), // subnormal in f16
            2f32.powi(-30),       // below the smallest f16
            65504.0,
            65520.0, // rounds to infinity
            1e9,
            -1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let mut r = 0x1234_5678u32;
        for _ in 0..1000 {
            r ^= r << 13;
            r ^= r >> 17;
            r ^= r << 5;
            x.push(f32::from_bits(r) % 1e5);
        }
        for k in [1.0f32, 0.3] {
            let want: Vec<u32> = x
                .iter()
                .map(|&v| half::f16::from_f32(v * k).to_f32().to_bits())
                .collect();
            // Every length from 0 to 17 from several offsets: all tails and lane positions.
            for len in 0..18 {
                for at in [0, 3, 9] {
                    let mut got = x[at..at + len].to_vec();
                    scale_round_f16(&mut got, k);
                    for (i, g) in got.iter().enumerate() {
                        let w = f32::from_bits(want[at + i]);
                        assert!(
                            g.to_bits() == want[at + i] || (g.is_nan() && w.is_nan()),
                            "x = {} k = {k}: {g} want {w}",
                            x[at + i]
                        );
                    }
                }
            }
            let mut all = x.clone();
            scale_round_f16(&mut all, k);
            for (i, g) in all.iter().enumerate() {
                let w = f32::from_bits(want[i]);
                assert!(
                    g.to_bits() == want[i] || (g.is_nan() && w.is_nan()),
                    "x = {}",
                    x[i]
                );
            }
        }
    }

    /// Against the hardware-exact `mul_add`, including sums that land halfway between two f32
    /// in f64 (where a plain f64 evaluation double-rounds).
    #[test]
    fn fma32_is_correctly_rounded() {
        // a*b = 1 + 2^-24 + 2^-48 exactly; c = 2^-70 makes the f64 sum land on the f32
        // halfway point 1 + 2^-24 after rounding, with the true value just above it.
        let a = 1.0 + f32::EPSILON / 2.0; // 1 + 2^-24
        let cases = [
            (a, a, 2f32.powi(-70)),
            (a, a, -(2f32.powi(-70))),
            (-a, a, 2f32.powi(-70)),
            (3.0, 1.0 / 3.0, -1.0),
            (1.5, 2.5, 0.125),
        ];
        for (x, y, z) in cases {
            assert_eq!(
                fma32(x, y, z).to_bits(),
                x.mul_add(y, z).to_bits(),
                "{x} {y} {z}"
            );
        }
        let mut s = 0x1234_5678u32;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            f32::from_bits((s & 0x807F_FFFF) | ((s % 40 + 107) << 23))
        };
        for _ in 0..200_000 {
            let (x, y, z) = (next(), next(), next());
            assert_eq!(
                fma32(x, y, z).to_bits(),
                x.mul_add(y, z).to_bits(),
                "{x} {y} {z}"
            );
        }
    }

    /// The dispatching forms (SIMD where the table has a plug) give the scalar bits,
    /// including lanes that leave the fast exponent range.
    #[test]
    fn swiglu_and_softmax_match_the_scalar_forms() {
        let mut g: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919 % 2001) as f32 - 1000.0) * 0.013)
            .collect();
        g.extend([0.0, -0.0, 150.0, -150.0, 95.0, -95.0, 88.5, -87.9, 1e-30]);
        let u: Vec<f32> = (0..g.len()).map(|i| (i % 13) as f32 * 0.37 - 2.0).collect();
        let mut a = g.clone();
        swiglu(&mut a, &u);
        for i in 0..g.len() {
            let want = silu(g[i]) * u[i];
            assert_eq!(a[i].to_bits(), want.to_bits(), "swiglu({}, {})", g[i], u[i]);
        }

        for scale in [1.0f32, 40.0, 400.0] {
            let x: Vec<f32> = g.iter().map(|v| v * scale).collect();
            let mut a = x.clone();
            let inv = softmax_unnormalized(&mut a);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f64;
            let mut b = x.clone();
            for chunk in b.chunks_mut(16) {
                let mut v = [0.0f32; 16];
                for (e, l) in chunk.iter_mut().zip(v.iter_mut()) {
                    *e = expf(*e - max);
                    *l = *e;
                }
                sum += reduce_add16(&v) as f64;
            }
            assert_eq!(
                inv.to_bits(),
                ((1.0 / sum) as f32).to_bits(),
                "scale {scale}"
            );
            for (p, q) in a.iter().zip(&b) {
                assert_eq!(p.to_bits(), q.to_bits(), "scale {scale}");
            }
        }
    }

    #[test]
    fn silu_shape() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(10.0) - 10.0 * (1.0 / (1.0 + (-10.0f32).exp()))).abs() < 1e-5);
        assert!(silu(-100.0).abs() < 1e-30);
    }
}
