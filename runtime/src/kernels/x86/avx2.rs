//! AVX2 kernels for the 32-element block formats and their activation quantizers.
//!
//! The same shapes as ggml's AVX2 kernels (arch/x86/quants.c): one block per iteration, its
//! 32 products summed into 8 i32 lanes of 4 neighbours (`maddubs` then `madd` with ones), the
//! lanes converted to f32 and fused-multiply-added with the block's scale into 8 f32
//! accumulators, which `hsum_float_8` folds at the end. The portable twins in
//! `kernels/dot.rs` document each order; both give the same bits.

use crate::quant::q4_0::BlockQ4_0;
use crate::quant::q4_1::BlockQ4_1;
use crate::quant::q5_0::BlockQ5_0;
use crate::quant::q5_1::BlockQ5_1;
use crate::quant::q8_0::BlockQ8_0;
use crate::quant::q8_1::BlockQ8_1;
use crate::quant::util::{blocks, blocks_mut};
use std::arch::x86_64::*;

/// f16 bits to f32 with F16C. Inline asm for the same reason as [`fp16x2`]: `vmovd` from a
/// general register writes the whole vector register, where LLVM would pick `vpinsrw` into a
/// busy one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn fp16(b: [u8; 2]) -> f32 {
    let r: __m128;
    // SAFETY: register-only instructions of the enabled features.
    unsafe {
        std::arch::asm!(
            "vmovd {r}, {g:e}",
            "vcvtph2ps {r}, {r}",
            g = in(reg) u16::from_le_bytes(b) as u32,
            r = out(xmm_reg) r,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    _mm_cvtss_f32(r)
}

/// The four block integers of four lane vectors (exact): lane k is the sum of `v[k]`'s lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum4x8(v: [__m256i; 4]) -> __m128i {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
}

/// f32 to f16 bits, round to nearest even (as `_mm_cvtps_ph(x, 0)` in ggml).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn to_fp16(x: f32) -> [u8; 2] {
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x));
    (_mm_extract_epi16::<0>(h) as u16).to_le_bytes()
}

/// 32 nibbles from 16 bytes: element j < 16 is the low nibble of byte j, 16 + j its high one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bytes_from_nibbles_32(p: *const u8) -> __m256i {
    let tmp = _mm_loadu_si128(p as *const __m128i);
    let bytes = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16::<4>(tmp));
    _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
}

/// 0xFF in byte j where bit j of the little-endian `qh` is set, 0 elsewhere.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bytes_from_bits_32(qh: [u8; 4]) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(i32::from_le_bytes(qh)), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// `hsum_float_8`: (x[i] + x[4+i]), then (0+2) and (1+3), then the two.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_float_8(x: __m256) -> f32 {
    let mut r = _mm256_extractf128_ps::<1>(x);
    r = _mm_add_ps(r, _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Sum of 8 i32 lanes (exact).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_i32_8(a: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

// ---- dots ----------------------------------------------------------------------------------
//
// Each kernel is one `#[inline(always)]` body generic over `VNNI`, compiled twice: for AVX2
// (`maddubs` + `madd`) and for AVX-512 VNNI (`vpdpbusd` on 256-bit vectors), which computes
// the same exact i32 lanes in one instruction.
//
// The activations carry their block scales as f32 after the row (`act_extra`, see
// `quantize_row_q8_0_ext`): d for Q8_0, the pair (d, s) for Q8_1, so the weight row's loop
// converts only its own f16 scales. A Q4_1/Q5_1 block starts with (d, m), which one 32-bit
// load and one conversion turn into [d_x, m_x]; one multiply by [d_y, s_y] gives both the
// block scale and the min term, and the min terms are summed in lane 1 of a vector, the same
// sequence of f32 additions as the portable scalar `summs`.

/// Unsigned x signed bytes into 8 exact i32 lanes of 4 neighbours.
#[inline(always)]
unsafe fn dot_us8<const VNNI: bool>(ax: __m256i, sy: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
    } else {
        _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(ax, sy))
    }
}

/// Four f16 at `p` (little-endian) as f32; lanes 0 and 1 are what the callers use (a
/// block's d, and m where it has one). Inline asm because LLVM, seeing that only lane 0 is
/// used, turns a plain load into `vpinsrw` into whatever register is free, which ties every
/// block to an unrelated accumulator chain. Reads 8 bytes: every block is longer.
#[inline(always)]
unsafe fn fp16x2(p: *const u8) -> __m128 {
    let r: __m128;
    std::arch::asm!(
        "vcvtph2ps {r}, qword ptr [{p}]",
        p = in(reg) p,
        r = out(xmm_reg) r,
        options(pure, readonly, nostack, preserves_flags)
    );
    r
}

/// Two f32 at `p` as [p[0], p[1], 0, 0].
#[inline(always)]
unsafe fn f32x2(p: *const u8) -> __m128 {
    _mm_castsi128_ps(_mm_loadl_epi64(p as *const __m128i))
}

/// The f32 scales that `quantize_row_q8_*_ext` appended after `nb` blocks of `block` bytes.
#[inline(always)]
fn act_scales(a: &[u8], nb: usize, block: usize, per_block: usize) -> &[u8] {
    &a[nb * block..nb * block + nb * per_block]
}

/// The blocks of R weight rows and of N activation rows, and the activations' f32 scales
/// (`per` bytes per block after the row). Every row is cut to the first weight row's blocks.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn rows<'a, W: bytemuck::Pod, A: bytemuck::Pod, const R: usize, const N: usize>(
    w: [&'a [u8]; R],
    a: [&'a [u8]; N],
    per: usize,
) -> ([&'a [W]; R], [&'a [A]; N], [&'a [u8]; N], usize) {
    let nb = blocks::<W>(w[0]).len();
    let bs = std::mem::size_of::<A>();
    (
        build!(R, &[][..], |r| &blocks::<W>(w[r])[..nb]),
        build!(N, &[][..], |t| &blocks::<A>(a[t])[..nb]),
        build!(N, &[][..], |t| act_scales(a[t], nb, bs, per)),
        nb,
    )
}

#[inline(always)]
unsafe fn loady(qs: &[i8; 32]) -> __m256i {
    _mm256_loadu_si256(qs.as_ptr() as *const __m256i)
}

// Every body below takes R weight rows and N activation rows: (1, 1) for one dot, (4, 1) for
// a decode step (four independent accumulator chains in flight instead of one), (1, 4) for
// batches (each weight block unpacked once for four tokens). Each (row, token) pair sums in
// exactly the one-dot order.

/// Signed weight bytes (Q8_0, Q5_0) times Q8_0 activations, for one (row, token) pair and
/// block: `qx` holds the weights x as i8 (AVX2), or biased as u8 x + 128 (VNNI). AVX2: `sign`
/// moves the signs onto the activations for `maddubs`. VNNI: `vpdpbusd` starts from the activation block's lane
/// correction -128 * (sum of its 4 quants per lane), kept after the row, so that no per-pair
/// sign work is left; the scale d_x * d_y is one 8-lane multiply of two broadcasts. Both give
/// the exact lanes and the same f32 scale as the portable kernel.
#[inline(always)]
unsafe fn signed_step<const VNNI: bool>(
    qx: __m256i,
    dx: __m128,
    y: &[i8; 32],
    ext: *const u8,
    acc: __m256,
) -> __m256 {
    if VNNI {
        let corr = _mm256_loadu_si256(ext.add(4) as *const __m256i);
        let p = _mm256_dpbusd_epi32(corr, qx, loady(y));
        let d = _mm256_mul_ps(
            _mm256_broadcastss_ps(dx),
            _mm256_set1_ps((ext as *const f32).read_unaligned()),
        );
        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc)
    } else {
        let d = _mm_mul_ss(dx, _mm_load_ss(ext as *const f32));
        let sy = _mm256_sign_epi8(loady(y), qx);
        let p = _mm256_cvtepi32_ps(dot_us8::<VNNI>(_mm256_sign_epi8(qx, qx), sy));
        _mm256_fmadd_ps(_mm256_broadcastss_ps(d), p, acc)
    }
}

/// A weight block whose 32 values are signed bytes for [`signed_step`]: Q8_0 and Q5_0.
trait SignedBlock: bytemuck::Pod {
    /// The 32 weights x as i8 (AVX2), or biased as u8 x + 128 (VNNI).
    unsafe fn qx<const VNNI: bool>(&self) -> __m256i;
    /// The block's f16 scale.
    fn d(&self) -> [u8; 2];
}

impl SignedBlock for BlockQ8_0 {
    #[inline(always)]
    unsafe fn qx<const VNNI: bool>(&self) -> __m256i {
        let q = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
        if VNNI {
            _mm256_xor_si256(q, _mm256_set1_epi8(0x80u8 as i8))
        } else {
            q
        }
    }

    fn d(&self) -> [u8; 2] {
        self.d
    }
}

impl SignedBlock for BlockQ5_0 {
    #[inline(always)]
    unsafe fn qx<const VNNI: bool>(&self) -> __m256i {
        if VNNI {
            // x + 128 = nibble + 16 bit + 112: nibble | 0x80 where the fifth bit is set,
            // nibble | 0x70 where it is clear (one mask blend from the 32 bits of qh).
            let k: __mmask32 = u32::from_le_bytes(self.qh);
            let base =
                _mm256_mask_blend_epi8(k, _mm256_set1_epi8(0x70), _mm256_set1_epi8(0x80u8 as i8));
            _mm256_or_si256(bytes_from_nibbles_32(self.qs.as_ptr()), base)
        } else {
            // nibble | 0xF0 is nibble - 16 as i8: where the fifth bit is clear, subtract 16.
            let hi =
                _mm256_andnot_si256(bytes_from_bits_32(self.qh), _mm256_set1_epi8(0xF0u8 as i8));
            _mm256_or_si256(bytes_from_nibbles_32(self.qs.as_ptr()), hi)
        }
    }

    fn d(&self) -> [u8; 2] {
        self.d
    }
}

/// The f16 scales of block `b` of four rows, converted together (lanes 0..4).
#[inline(always)]
unsafe fn scales4<W: SignedBlock>(x: [&[W]; 4], b: usize) -> __m128 {
    let h = |r: usize| u16::from_le_bytes(x[r][b].d()) as u64;
    _mm_cvtph_ps(_mm_cvtsi64_si128(
        (h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48) as i64,
    ))
}

/// Signed-weight blocks (Q8_0, Q5_0) for four rows by four tokens, each pair in
/// [`signed_step`]'s operations and order (so the bits of `vec_dot`): the four rows' scales
/// converted together and multiplied by a token's scale in one 4-lane product, each pair's
/// scale picked from it with one permute; a token's activation loads shared by the four rows
/// and a row's unpacked weights by the four tokens (twice the rows of `tile2x4`).
#[inline(always)]
unsafe fn signed_t4x4<const VNNI: bool, W: SignedBlock>(
    w: [&[u8]; 4],
    a: [&[u8]; 4],
) -> [[f32; 4]; 4] {
    let per = q8_0_ext::<VNNI>();
    let (x, y, ext, nb) = rows::<W, BlockQ8_0, 4, 4>(w, a, per);
    let mut acc = [[_mm256_setzero_ps(); 4]; 4];
    let lane: [__m256i; 4] = build!(4, _mm256_setzero_si256(), |r| _mm256_set1_epi32(r as i32));
    for b in 0..nb {
        let qx: [__m256i; 4] = build!(4, _mm256_setzero_si256(), |r| x[r][b].qx::<VNNI>());
        let dx = scales4(x, b);
        for t in 0..4 {
            let e = ext[t].as_ptr().add(per * b);
            let yv = loady(&y[t][b].qs);
            let d4 = _mm256_castps128_ps256(_mm_mul_ps(
                dx,
                _mm_set1_ps((e as *const f32).read_unaligned()),
            ));
            let corr = if VNNI {
                _mm256_loadu_si256(e.add(4) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            for r in 0..4 {
                let p = if VNNI {
                    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(corr, qx[r], yv))
                } else {
                    let sy = _mm256_sign_epi8(yv, qx[r]);
                    _mm256_cvtepi32_ps(dot_us8::<false>(_mm256_sign_epi8(qx[r], qx[r]), sy))
                };
                let d = _mm256_permutevar8x32_ps(d4, lane[r]);
                acc[r][t] = _mm256_fmadd_ps(d, p, acc[r][t]);
            }
        }
    }
    build!(4, [0.0; 4], |r| build!(4, 0.0, |t| hsum_float_8(acc[r][t])))
}

/// `lo` in the low half of a 512-bit vector, `hi` in the high half.
#[inline(always)]
unsafe fn both(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// [`signed_t4x4`] with VNNI in 512-bit vectors: the tokens in pairs, a vector's low half
/// the 8 lanes of (row, token 2p) and its high half those of (row, token 2p + 1), so that
/// each of a pair's operations (`vpdpbusd`, the conversion, the scale's permute, the fused
/// multiply-add) is one instruction for two (row, token) pairs. Every lane sees the
/// operations of [`signed_step`] in its order, on the same values: the bits of `vec_dot`.
/// On the Intel Xeon development VM (AVX-512 with two 512-bit multiply-add units) the Q8_0
/// and Q4_K_M prompts ran 7-9% faster than with [`signed_t4x4`]; not measured on Zen 4,
/// which splits 512-bit operations in two.
#[inline(always)]
unsafe fn signed_t4x4_zmm<W: SignedBlock>(w: [&[u8]; 4], a: [&[u8]; 4]) -> [[f32; 4]; 4] {
    let per = q8_0_ext::<true>();
    let (x, y, ext, nb) = rows::<W, BlockQ8_0, 4, 4>(w, a, per);
    // acc[r][p]: row r, tokens 2p (low half) and 2p + 1 (high half).
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    // Row r's lane of the two tokens' scale products (lanes 0..4 and 4..8 of `d8` below).
    let lane: [__m512i; 4] = build!(4, _mm512_setzero_si512(), |r| {
        _mm512_inserti64x4::<1>(_mm512_set1_epi32(r as i32), _mm256_set1_epi32(4 + r as i32))
    });
    for b in 0..nb {
        let qx: [__m512i; 4] = build!(4, _mm512_setzero_si512(), |r| {
            let q = x[r][b].qx::<true>();
            both(q, q)
        });
        let dx = scales4(x, b);
        for p in 0..2 {
            let e: [*const u8; 2] = build!(2, std::ptr::null(), |i| ext[2 * p + i]
                .as_ptr()
                .add(per * b));
            let yv = both(loady(&y[2 * p][b].qs), loady(&y[2 * p + 1][b].qs));
            let corr = both(
                _mm256_loadu_si256(e[0].add(4) as *const __m256i),
                _mm256_loadu_si256(e[1].add(4) as *const __m256i),
            );
            let d: [__m128; 2] = build!(2, _mm_setzero_ps(), |i| _mm_mul_ps(
                dx,
                _mm_set1_ps((e[i] as *const f32).read_unaligned())
            ));
            let d8 = _mm512_castps256_ps512(_mm256_insertf128_ps::<1>(
                _mm256_castps128_ps256(d[0]),
                d[1],
            ));
            for r in 0..4 {
                let pr = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, qx[r], yv));
                let dr = _mm512_permutexvar_ps(lane[r], d8);
                acc[r][p] = _mm512_fmadd_ps(dr, pr, acc[r][p]);
            }
        }
    }
    build!(4, [0.0; 4], |r| build!(4, 0.0, |t| {
        let v = acc[r][t / 2];
        hsum_float_8(if t % 2 == 0 {
            _mm512_castps512_ps256(v)
        } else {
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
        })
    }))
}

/// [`signed_t4x4`] (with VNNI [`signed_t4x4_zmm`]) over eight rows (two groups of four): the
/// `tile8x4` of Q8_0 and Q5_0.
#[inline(always)]
unsafe fn signed_t8x4<const VNNI: bool, W: SignedBlock>(
    w: [&[u8]; 8],
    a: [&[u8]; 4],
) -> [[f32; 4]; 8] {
    let (w0, w1) = ([w[0], w[1], w[2], w[3]], [w[4], w[5], w[6], w[7]]);
    let (lo, hi) = if VNNI {
        (signed_t4x4_zmm::<W>(w0, a), signed_t4x4_zmm::<W>(w1, a))
    } else {
        (signed_t4x4::<VNNI, W>(w0, a), signed_t4x4::<VNNI, W>(w1, a))
    };
    build!(8, [0.0; 4], |r| if r < 4 { lo[r] } else { hi[r - 4] })
}

macro_rules! tile8x4 {
    ($name:ident, $block:ty, $vnni:expr, $features:literal) => {
        pub(super) fn $name(w: [&[u8]; 8], a: [&[u8]; 4]) -> [[f32; 4]; 8] {
            #[target_feature(enable = $features)]
            unsafe fn imp(w: [&[u8]; 8], a: [&[u8]; 4]) -> [[f32; 4]; 8] {
                signed_t8x4::<{ $vnni }, $block>(w, a)
            }
            // SAFETY: only registered by `x86::plug` after the CPU features were detected.
            unsafe { imp(w, a) }
        }
    };
}

tile8x4!(q8_0_q8_0_tile8x4, BlockQ8_0, false, "avx2,fma,f16c");
tile8x4!(
    q8_0_q8_0_tile8x4_vnni,
    BlockQ8_0,
    true,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);
tile8x4!(q5_0_q8_0_tile8x4, BlockQ5_0, false, "avx2,fma,f16c");
tile8x4!(
    q5_0_q8_0_tile8x4_vnni,
    BlockQ5_0,
    true,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);

/// Bytes of extra activation data per Q8_0 block: d, and with VNNI the lane corrections.
const fn q8_0_ext<const VNNI: bool>() -> usize {
    if VNNI {
        36
    } else {
        4
    }
}

#[inline(always)]
unsafe fn q8_0_body<const VNNI: bool, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let per = q8_0_ext::<VNNI>();
    let (x, y, ext, nb) = rows::<BlockQ8_0, BlockQ8_0, R, N>(w, a, per);
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    for b in 0..nb {
        for r in 0..R {
            let xb = &x[r][b];
            let dx = fp16x2(xb.d.as_ptr());
            let qx = xb.qx::<VNNI>();
            for t in 0..N {
                let e = ext[t].as_ptr().add(per * b);
                acc[r][t] = signed_step::<VNNI>(qx, dx, &y[t][b].qs, e, acc[r][t]);
            }
        }
    }
    build!(R, [0.0; N], |r| build!(N, 0.0, |t| hsum_float_8(acc[r][t])))
}

/// Q4_0 block against activations: 8 i32 lanes summing to `sum(n * y)` over the unsigned
/// nibbles n (the -8 offset comes back as `8 * sum(y)`, from the activation row's extra data).
/// With VNNI the nibbles need no shuffle: the 16 bytes go to both halves, the high half
/// keeps the high nibbles times 16, and an arithmetic shift divides those lanes back (exact:
/// they are multiples of 16).
#[inline(always)]
unsafe fn q4_0_lanes<const VNNI: bool>(qs: *const u8, y: __m256i) -> __m256i {
    if VNNI {
        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(qs as *const __m128i));
        let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(v, nib_mask()), y);
        _mm256_srav_epi32(p, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4))
    } else {
        dot_us8::<false>(bytes_from_nibbles_32(qs), y)
    }
}

/// Low nibbles in the low 16 bytes, high nibbles (times 16) in the high 16.
#[inline(always)]
unsafe fn nib_mask() -> __m256i {
    _mm256_setr_epi64x(
        0x0F0F_0F0F_0F0F_0F0F,
        0x0F0F_0F0F_0F0F_0F0F,
        0xF0F0_F0F0_F0F0_F0F0u64 as i64,
        0xF0F0_F0F0_F0F0_F0F0u64 as i64,
    )
}

/// Q4_0 in the repacked order (see `dot::q4_0_q8_0`): one integer per block, fma'd into a
/// scalar accumulator. The activations carry (d, sum of quants) per block as f32, i32.
#[inline(always)]
unsafe fn q4_0_body<const VNNI: bool, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    if R * N == 4 {
        return q4_0_quad::<VNNI, R, N>(w, a);
    }
    if R == 2 && N == 4 {
        let v = q4_0_oct::<VNNI>([w[0], w[1]], [a[0], a[1], a[2], a[3]]);
        return std::array::from_fn(|r| std::array::from_fn(|t| v[r][t]));
    }
    let (x, y, ext, nb) = rows::<BlockQ4_0, BlockQ8_0, R, N>(w, a, 8);
    let mut acc = [[_mm_setzero_ps(); N]; R];
    for b in 0..nb {
        for r in 0..R {
            let xb = &x[r][b];
            let dx = fp16x2(xb.d.as_ptr());
            for t in 0..N {
                let e = ext[t].as_ptr().add(8 * b);
                let d = _mm_mul_ss(dx, _mm_load_ss(e as *const f32));
                let sumy = (e.add(4) as *const i32).read_unaligned();
                let lanes = q4_0_lanes::<VNNI>(xb.qs.as_ptr(), loady(&y[t][b].qs));
                let isum = _mm_cvtepi32_ps(_mm_cvtsi32_si128(hsum_i32_8(lanes) - 8 * sumy));
                acc[r][t] = _mm_fmadd_ss(isum, d, acc[r][t]);
            }
        }
    }
    build!(R, [0.0; N], |r| build!(N, 0.0, |t| _mm_cvtss_f32(
        acc[r][t]
    )))
}

/// Q4_0 for four (row, token) pairs (four rows and one token, or one row and four tokens):
/// the four per-block integers come out of one `hadd` tree and meet their scales in one
/// vector fma, lane k being pair k's scalar accumulator (the same operations as
/// `q4_0_body`'s one pair at a time, without four horizontal sums).
#[inline(always)]
unsafe fn q4_0_quad<const VNNI: bool, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let (x, y, ext, nb) = rows::<BlockQ4_0, BlockQ8_0, R, N>(w, a, 8);
    let mut acc = _mm_setzero_ps();
    // [lane k] from four single-lane values.
    let gather =
        |p: [__m128; 4]| _mm_movelh_ps(_mm_unpacklo_ps(p[0], p[1]), _mm_unpacklo_ps(p[2], p[3]));
    for b in 0..nb {
        let mut v = [_mm256_setzero_si256(); 4];
        let mut dx = [_mm_setzero_ps(); 4];
        let mut dyv = [_mm_setzero_ps(); 4];
        let mut sy = [_mm_setzero_ps(); 4];
        for (k, vk) in v.iter_mut().enumerate() {
            let (r, t) = if R == 4 { (k, 0) } else { (0, k) };
            let xb = &x[r][b];
            *vk = q4_0_lanes::<VNNI>(xb.qs.as_ptr(), loady(&y[t][b].qs));
            if k == 0 || R == 4 {
                dx[k] = fp16x2(xb.d.as_ptr());
            }
            if k == 0 || N == 4 {
                let e = ext[t].as_ptr().add(8 * b);
                dyv[k] = _mm_load_ss(e as *const f32);
                sy[k] = _mm_load_ss(e.add(4) as *const f32); // the i32 sum, as bits
            }
        }
        let dxs = if R == 4 {
            gather(dx)
        } else {
            _mm_broadcastss_ps(dx[0])
        };
        let (dys, sys) = if N == 4 {
            (gather(dyv), gather(sy))
        } else {
            (_mm_broadcastss_ps(dyv[0]), _mm_broadcastss_ps(sy[0]))
        };
        let d = _mm_mul_ps(dxs, dys);
        let h01 = _mm256_hadd_epi32(v[0], v[1]);
        let h23 = _mm256_hadd_epi32(v[2], v[3]);
        let h = _mm256_hadd_epi32(h01, h23);
        let isum = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        let isum = _mm_sub_epi32(isum, _mm_slli_epi32::<3>(_mm_castps_si128(sys)));
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), d, acc);
    }
    let mut lanes = [0f32; 4];
    _mm_storeu_ps(lanes.as_mut_ptr(), acc);
    std::array::from_fn(|r| std::array::from_fn(|t| lanes[if R == 4 { r } else { t }]))
}

/// Lane 0 of each of four vectors, gathered into one.
#[inline(always)]
unsafe fn gather4(p: [__m128; 4]) -> __m128 {
    _mm_movelh_ps(_mm_unpacklo_ps(p[0], p[1]), _mm_unpacklo_ps(p[2], p[3]))
}

/// Q4_0 for two rows by four tokens: as [`q4_0_quad`] with eight pairs, one `hadd` tree for
/// the eight block integers, the tokens' scales and sums gathered once for both rows, and
/// lane `4 r + t` of one 8-lane accumulator holding pair (r, t).
#[inline(always)]
unsafe fn q4_0_oct<const VNNI: bool>(w: [&[u8]; 2], a: [&[u8]; 4]) -> [[f32; 4]; 2] {
    let (x, y, ext, nb) = rows::<BlockQ4_0, BlockQ8_0, 2, 4>(w, a, 8);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let e: [*const u8; 4] = std::array::from_fn(|t| ext[t].as_ptr().add(8 * b));
        let z = _mm_setzero_ps();
        let dys = gather4(build!(4, z, |t| _mm_load_ss(e[t] as *const f32)));
        // The i32 sums, as bits.
        let sys = gather4(build!(4, z, |t| _mm_load_ss(e[t].add(4) as *const f32)));
        let yv: [__m256i; 4] = build!(4, _mm256_setzero_si256(), |t| loady(&y[t][b].qs));
        let v: [__m256i; 8] = build!(8, _mm256_setzero_si256(), |k| {
            q4_0_lanes::<VNNI>(x[k / 4][b].qs.as_ptr(), yv[k % 4])
        });
        let h01 = _mm256_hadd_epi32(v[0], v[1]);
        let h23 = _mm256_hadd_epi32(v[2], v[3]);
        let h45 = _mm256_hadd_epi32(v[4], v[5]);
        let h67 = _mm256_hadd_epi32(v[6], v[7]);
        let r0 = _mm256_hadd_epi32(h01, h23);
        let r1 = _mm256_hadd_epi32(h45, h67);
        let isum = _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(r0, r1),
            _mm256_permute2x128_si256::<0x31>(r0, r1),
        );
        let sys8 = _mm256_castps_si256(_mm256_set_m128(sys, sys));
        let isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<3>(sys8));
        let dx0 = _mm_broadcastss_ps(fp16x2(x[0][b].d.as_ptr()));
        let dx1 = _mm_broadcastss_ps(fp16x2(x[1][b].d.as_ptr()));
        let d = _mm256_mul_ps(_mm256_set_m128(dx1, dx0), _mm256_set_m128(dys, dys));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    std::array::from_fn(|r| std::array::from_fn(|t| lanes[4 * r + t]))
}

/// The eight f16 scales at `p[r] + off` (r = 0..8) as f32, lane r from `p[r]`: the 16-bit
/// loads are combined in general registers (ports the vector loop leaves idle), so that one
/// `vcvtph2ps` converts all eight instead of a conversion and a shuffle per row.
#[inline(always)]
unsafe fn fp16x8(p: [*const u8; 8], off: usize) -> __m256 {
    let h = |r: usize| (p[r].add(off) as *const u16).read_unaligned() as u64;
    let lo = h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48;
    let hi = h(4) | h(5) << 16 | h(6) << 32 | h(7) << 48;
    _mm256_cvtph_ps(_mm_set_epi64x(hi as i64, lo as i64))
}

/// Eight Q4_0 weight blocks (rows r = 0..8, at `xp[r] + off`) turned into eight vectors
/// `W_k` (k = 0..8) whose lane r holds row r's levels of elements 4k..4k+3 (the unsigned
/// nibbles, the -8 offset left to the activation sums): a 4x4 transpose of 32-bit words in
/// each 128-bit half, rows 0..4 in the low half and rows 4..8 in the high one.
///
/// ```text
/// block (16 bytes qs):  element e < 16 = qs[e] & 15, element 16 + e = qs[e] >> 4
/// R_j = [qs of row j | qs of row j+4]
/// T_k = [R_0.k, R_1.k, R_2.k, R_3.k | R_0.k', ..]  (word k of each half)
/// W_k (k < 4) = T_k & 15,  W_4+k = (T_k >> 4) & 15
/// ```
///
/// (The bytes are transposed before the nibbles are split: one transpose instead of two.)
///
/// With these, one `dpbusd` (or `maddubs`) of `W_k` against word k of an activation block,
/// broadcast, adds four products of all eight rows at once, and eight of them leave the eight
/// block integers in the eight lanes, with no horizontal sum.
#[inline(always)]
pub(crate) unsafe fn q4_0_transposed(xp: [*const u8; 8], off: usize) -> [__m256i; 8] {
    let m = _mm256_set1_epi8(0x0F);
    let t = words_transposed(xp, off);
    build!(8, _mm256_setzero_si256(), |k| if k < 4 {
        _mm256_and_si256(t[k], m)
    } else {
        _mm256_and_si256(_mm256_srli_epi16::<4>(t[k - 4]), m)
    })
}

/// The 16 bytes at `xp[r] + off` of eight rows as four vectors of 32-bit words: lane r of
/// `out[k]` = word k of row r (rows r and r + 4 share a vector, one per 128-bit half, for
/// one 4x4 transpose).
#[inline(always)]
pub(crate) unsafe fn words_transposed(xp: [*const u8; 8], off: usize) -> [__m256i; 4] {
    let r: [__m256i; 4] = build!(4, _mm256_setzero_si256(), |j| {
        let lo = _mm_loadu_si128(xp[j].add(off) as *const __m128i);
        let hi = _mm_loadu_si128(xp[j + 4].add(off) as *const __m128i);
        _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi)
    });
    transpose4x4_epi32(r)
}

/// Word k of each 128-bit half of `x[j]` to word j of that half of the result's k.
#[inline(always)]
unsafe fn transpose4x4_epi32(x: [__m256i; 4]) -> [__m256i; 4] {
    let t0 = _mm256_unpacklo_epi32(x[0], x[1]);
    let t1 = _mm256_unpackhi_epi32(x[0], x[1]);
    let t2 = _mm256_unpacklo_epi32(x[2], x[3]);
    let t3 = _mm256_unpackhi_epi32(x[2], x[3]);
    [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ]
}

/// Q4_0 for eight rows by N tokens (N = 1: a decode step; N = 4: the batch tile): lane r of
/// accumulator t holds pair (r, t), an fma chain in the order of `dot::q4_0_q8_0`. The
/// weights are transposed once per block ([`q4_0_transposed`]) for all N tokens; each
/// token's block integers then come from eight `dpbusd`s against its broadcast activation
/// words (two chains of four, the first starting at -8 * sum(y)), or with AVX2 from eight
/// `maddubs` summed in i16 (exact: each is at most 2 * 15 * 127 in magnitude, eight of them
/// 30480 < 2^15) and one `madd`. The loop reads the blocks through raw pointers (`rows`
/// cut every row to `nb` blocks first).
#[inline(always)]
unsafe fn q4_0_t8<const VNNI: bool, const N: usize>(w: [&[u8]; 8], a: [&[u8]; N]) -> [[f32; N]; 8] {
    let (x, y, ext, nb) = rows::<BlockQ4_0, BlockQ8_0, 8, N>(w, a, 8);
    const XB: usize = std::mem::size_of::<BlockQ4_0>();
    const YB: usize = std::mem::size_of::<BlockQ8_0>();
    let xp: [*const u8; 8] = build!(8, std::ptr::null(), |r| x[r].as_ptr() as *const u8);
    let yp: [*const u8; N] = build!(N, std::ptr::null(), |t| y[t].as_ptr() as *const u8);
    let ep: [*const u8; N] = build!(N, std::ptr::null(), |t| ext[t].as_ptr());
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let wk = q4_0_transposed(xp, XB * b + 2);
        let dxs = fp16x8(xp, XB * b);
        for t in 0..N {
            let e = ep[t].add(8 * b);
            // Word k of the activation block, in every lane.
            let yq = yp[t].add(YB * b + 2) as *const i32;
            let yw: [__m256i; 8] = build!(8, _mm256_setzero_si256(), |k| _mm256_set1_epi32(
                yq.add(k).read_unaligned()
            ));
            let neg8sy = _mm256_set1_epi32(-8 * (e.add(4) as *const i32).read_unaligned());
            let isum = if VNNI {
                let mut c0 = neg8sy;
                let mut c1 = _mm256_setzero_si256();
                for k in 0..4 {
                    c0 = _mm256_dpbusd_epi32(c0, wk[2 * k], yw[2 * k]);
                    c1 = _mm256_dpbusd_epi32(c1, wk[2 * k + 1], yw[2 * k + 1]);
                }
                _mm256_add_epi32(c0, c1)
            } else {
                let p: [__m256i; 8] = build!(8, _mm256_setzero_si256(), |k| {
                    _mm256_maddubs_epi16(wk[k], yw[k])
                });
                let s = _mm256_add_epi16(
                    _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                    _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7])),
                );
                _mm256_add_epi32(_mm256_madd_epi16(s, _mm256_set1_epi16(1)), neg8sy)
            };
            let dy = _mm256_set1_ps((e as *const f32).read_unaligned());
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dxs, dy), acc[t]);
        }
    }
    let mut lanes = [[0f32; 8]; N];
    for t in 0..N {
        _mm256_storeu_ps(lanes[t].as_mut_ptr(), acc[t]);
    }
    build!(8, [0.0; N], |r| build!(N, 0.0, |t| lanes[t][r]))
}

/// Q4_0 for one token (decode), eight rows at a time: [`q4_0_t8`] with N = 1 (a
/// [`super::super::RowsFn`]).
#[inline(always)]
unsafe fn q4_0_rows8<const VNNI: bool>(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
    row_parts!(8, w, rb, y, |rows| {
        let v = q4_0_t8::<VNNI, 1>(rows, [a]);
        build!(8, 0.0, |r| v[r][0])
    })
}

pub(super) fn q4_0_q8_0_tile8x4(w: [&[u8]; 8], a: [&[u8]; 4]) -> [[f32; 4]; 8] {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn imp(w: [&[u8]; 8], a: [&[u8]; 4]) -> [[f32; 4]; 8] {
        q4_0_t8::<false, 4>(w, a)
    }
    // SAFETY: only registered by `x86::plug` after the CPU features were detected.
    unsafe { imp(w, a) }
}

pub(super) fn q4_0_q8_0_tile8x4_vnni(w: [&[u8]; 8], a: [&[u8]; 4]) -> [[f32; 4]; 8] {
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn imp(w: [&[u8]; 8], a: [&[u8]; 4]) -> [[f32; 4]; 8] {
        q4_0_t8::<true, 4>(w, a)
    }
    // SAFETY: as above, at the AVX-512 level.
    unsafe { imp(w, a) }
}

pub(super) fn q4_0_q8_0_rows8(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn imp(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
        q4_0_rows8::<false>(w, rb, a, y)
    }
    // SAFETY: only registered by `x86::plug` after the CPU features were detected.
    unsafe { imp(w, rb, a, y) }
}

pub(super) fn q4_0_q8_0_rows8_vnni(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn imp(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
        q4_0_rows8::<true>(w, rb, a, y)
    }
    // SAFETY: as above, at the AVX-512 level.
    unsafe { imp(w, rb, a, y) }
}

/// Q4_1 / Q5_1 per token and block: the weight's [d, m] times the activation's [d, s] gives
/// the block scale (lane 0, returned broadcast) and the min term (lane 1, summed).
#[inline(always)]
unsafe fn scale_and_min(dm: __m128, ds: *const u8, summs: &mut __m128) -> __m256 {
    let p = _mm_mul_ps(dm, f32x2(ds));
    *summs = _mm_add_ps(*summs, p);
    _mm256_broadcastss_ps(p)
}

/// The end of a Q4_1 / Q5_1 dot: the lanes folded, plus the min terms.
#[inline(always)]
unsafe fn with_mins(acc: __m256, summs: __m128) -> f32 {
    hsum_float_8(acc) + _mm_cvtss_f32(_mm_movehdup_ps(summs))
}

#[inline(always)]
unsafe fn q4_1_body<const VNNI: bool, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let (x, y, ds, nb) = rows::<BlockQ4_1, BlockQ8_1, R, N>(w, a, 8);
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let mut summs = [[_mm_setzero_ps(); N]; R];
    // With VNNI (exact i32 sums) the nibbles need no shuffle: the 16 bytes go to both halves,
    // the low half keeps the low nibbles and the high half the high nibbles times 16, and the
    // high lanes' scale is d / 16 instead: (d / 16) * (16 p) is d * p exactly (a power of two
    // and integers far below 2^24), so every fma sees the same real product.
    let nib_mask = nib_mask();
    let sixteenth = _mm256_setr_ps(1.0, 1.0, 1.0, 1.0, 0.0625, 0.0625, 0.0625, 0.0625);
    for b in 0..nb {
        for r in 0..R {
            let xb = &x[r][b];
            let dm = fp16x2(xb.d.as_ptr());
            let qx = if VNNI {
                let v =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(xb.qs.as_ptr() as *const __m128i));
                _mm256_and_si256(v, nib_mask)
            } else {
                bytes_from_nibbles_32(xb.qs.as_ptr())
            };
            for t in 0..N {
                let mut d = scale_and_min(dm, ds[t].as_ptr().add(8 * b), &mut summs[r][t]);
                if VNNI {
                    d = _mm256_mul_ps(d, sixteenth);
                }
                let p = _mm256_cvtepi32_ps(dot_us8::<VNNI>(qx, loady(&y[t][b].qs)));
                acc[r][t] = _mm256_fmadd_ps(d, p, acc[r][t]);
            }
        }
    }
    build!(R, [0.0; N], |r| build!(N, 0.0, |t| with_mins(
        acc[r][t],
        summs[r][t]
    )))
}

#[inline(always)]
unsafe fn q5_0_body<const VNNI: bool, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let per = q8_0_ext::<VNNI>();
    let (x, y, ext, nb) = rows::<BlockQ5_0, BlockQ8_0, R, N>(w, a, per);
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    for b in 0..nb {
        for r in 0..R {
            let xb = &x[r][b];
            let dx = fp16x2(xb.d.as_ptr());
            let qx = xb.qx::<VNNI>();
            for t in 0..N {
                let e = ext[t].as_ptr().add(per * b);
                acc[r][t] = signed_step::<VNNI>(qx, dx, &y[t][b].qs, e, acc[r][t]);
            }
        }
    }
    build!(R, [0.0; N], |r| build!(N, 0.0, |t| hsum_float_8(acc[r][t])))
}

#[inline(always)]
unsafe fn q5_1_body<const VNNI: bool, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let (x, y, ds, nb) = rows::<BlockQ5_1, BlockQ8_1, R, N>(w, a, 8);
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let mut summs = [[_mm_setzero_ps(); N]; R];
    for b in 0..nb {
        for r in 0..R {
            let xb = &x[r][b];
            let dm = fp16x2(xb.d.as_ptr());
            let hi = if VNNI {
                // 0x10 where the fifth bit is set, from the 32 bits of qh as a byte mask.
                _mm256_maskz_mov_epi8(u32::from_le_bytes(xb.qh), _mm256_set1_epi8(0x10))
            } else {
                _mm256_and_si256(bytes_from_bits_32(xb.qh), _mm256_set1_epi8(0x10))
            };
            let qx = _mm256_or_si256(bytes_from_nibbles_32(xb.qs.as_ptr()), hi);
            for t in 0..N {
                let d = scale_and_min(dm, ds[t].as_ptr().add(8 * b), &mut summs[r][t]);
                let p = _mm256_cvtepi32_ps(dot_us8::<VNNI>(qx, loady(&y[t][b].qs)));
                acc[r][t] = _mm256_fmadd_ps(d, p, acc[r][t]);
            }
        }
    }
    build!(R, [0.0; N], |r| build!(N, 0.0, |t| with_mins(
        acc[r][t],
        summs[r][t]
    )))
}

/// F16 x F16 in `dot::f16_f16`'s order: the 64 lanes as eight registers of eight.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_f16_imp(w: &[u8], a: &[u8]) -> f32 {
    let n = w.len().min(a.len()) / 2;
    let np = n / 64 * 64;
    let mut acc = [_mm256_setzero_ps(); 8];
    let load = |b: &[u8], i: usize| {
        _mm256_cvtph_ps(_mm_loadu_si128(
            b[2 * i..2 * i + 16].as_ptr() as *const __m128i
        ))
    };
    for i in (0..np).step_by(64) {
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(load(w, i + 8 * k), load(a, i + 8 * k), *acc);
        }
    }
    // (acc0 + acc2) + (acc1 + acc3) per 16-lane accumulator (two registers each), then the
    // 16-lane reduction: halves, quarters, pairs.
    let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
    let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
    let mut sum = super::attn::reduce16(lo, hi) as f64;
    for i in np..n {
        sum += (fp16([w[2 * i], w[2 * i + 1]]) * fp16([a[2 * i], a[2 * i + 1]])) as f64;
    }
    sum as f32
}

pub(super) fn f16_f16(w: &[u8], a: &[u8]) -> f32 {
    // SAFETY: only registered by `x86::plug` after the CPU features were detected.
    unsafe { f16_f16_imp(w, a) }
}

// ---- activation quantizers (ggml's AVX2 quantize_row_q8_0 / _q8_1) ------------------------

/// One block of 32: returns d and writes the quants; `sum` gets the exact sum of the quants.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_block(x: &[f32], q: &mut [i8; 32]) -> (f32, i32) {
    let p = x.as_ptr();
    let v: [__m256; 4] = build!(4, _mm256_setzero_ps(), |k| _mm256_loadu_ps(p.add(8 * k)));
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vk in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vk));
    }
    let mut m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mul = _mm256_set1_ps(id);
    let i: [__m256i; 4] = build!(4, _mm256_setzero_si256(), |k| {
        _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm256_mul_ps(v[k], mul)))
    });
    let sum = hsum_i32_8(_mm256_add_epi32(
        _mm256_add_epi32(i[0], i[1]),
        _mm256_add_epi32(i[2], i[3]),
    ));
    // Pack to bytes; packs interleave 128-bit halves, the permute puts them back in order.
    let i01 = _mm256_packs_epi32(i[0], i[1]);
    let i23 = _mm256_packs_epi32(i[2], i[3]);
    let b = _mm256_packs_epi16(i01, i23);
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
    (d, sum)
}

/// Q8_0 blocks, then each block's d as f32 (`act_extra` = 4).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_q8_0_imp(x: &[f32], dst: &mut [u8]) {
    let nb = x.len() / 32;
    let (row, ext) = dst.split_at_mut(nb * 34);
    let out: &mut [BlockQ8_0] = blocks_mut(row);
    for ((xb, b), e) in x
        .chunks_exact(32)
        .zip(out.iter_mut())
        .zip(ext.chunks_exact_mut(4))
    {
        let (d, _) = quantize_block(xb, &mut b.qs);
        b.d = to_fp16(d);
        e.copy_from_slice(&fp16(b.d).to_le_bytes());
    }
}

/// Q8_0 blocks, then per block d as f32 and the 8 lane corrections -128 * (sum of quants
/// 4l..4l+3) as i32 (`act_extra` = 36; for the VNNI form of `signed_step`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_q8_0_corr_imp(x: &[f32], dst: &mut [u8]) {
    let nb = x.len() / 32;
    let (row, ext) = dst.split_at_mut(nb * 34);
    let out: &mut [BlockQ8_0] = blocks_mut(row);
    for ((xb, b), e) in x
        .chunks_exact(32)
        .zip(out.iter_mut())
        .zip(ext.chunks_exact_mut(36))
    {
        let (d, _) = quantize_block(xb, &mut b.qs);
        b.d = to_fp16(d);
        e[..4].copy_from_slice(&fp16(b.d).to_le_bytes());
        let sums = _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_set1_epi8(1), loady(&b.qs)),
            _mm256_set1_epi16(1),
        );
        let corr = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<7>(sums));
        _mm256_storeu_si256(e[4..].as_mut_ptr() as *mut __m256i, corr);
    }
}

/// Q8_0 blocks, then each block's d as f32 and the sum of its quants as i32
/// (`act_extra` = 8; for Q4_0, whose -8 offset is applied through the sum).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_q8_0_sum_imp(x: &[f32], dst: &mut [u8]) {
    let nb = x.len() / 32;
    let (row, ext) = dst.split_at_mut(nb * 34);
    let out: &mut [BlockQ8_0] = blocks_mut(row);
    for ((xb, b), e) in x
        .chunks_exact(32)
        .zip(out.iter_mut())
        .zip(ext.chunks_exact_mut(8))
    {
        let (d, sum) = quantize_block(xb, &mut b.qs);
        b.d = to_fp16(d);
        e[..4].copy_from_slice(&fp16(b.d).to_le_bytes());
        e[4..].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Q8_1 blocks, then each block's (d, s) as two f32 (`act_extra` = 8).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_q8_1_imp(x: &[f32], dst: &mut [u8]) {
    let nb = x.len() / 32;
    let (row, ext) = dst.split_at_mut(nb * 36);
    let out: &mut [BlockQ8_1] = blocks_mut(row);
    for ((xb, b), e) in x
        .chunks_exact(32)
        .zip(out.iter_mut())
        .zip(ext.chunks_exact_mut(8))
    {
        let (d, sum) = quantize_block(xb, &mut b.qs);
        b.d = to_fp16(d);
        b.s = to_fp16(d * sum as f32);
        e[..4].copy_from_slice(&fp16(b.d).to_le_bytes());
        e[4..].copy_from_slice(&fp16(b.s).to_le_bytes());
    }
}

/// The AVX2 and the AVX-512 VNNI instances of a dot body: one row and one token
/// (`vec_dot`), one row and four tokens (`vec_dot4`), four rows and one token (`rows4`), two
/// rows and four tokens (`tile2x4`).
macro_rules! dots {
    ($avx2:ident, $vnni:ident, $body:ident) => {
        dots!(@one $avx2, $body, false, "avx2,fma,f16c");
        dots!(@one $vnni, $body, true, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni");
    };
    (@one $m:ident, $body:ident, $vnni:expr, $features:literal) => {
        pub(super) mod $m {
            use super::*;
            #[target_feature(enable = $features)]
            unsafe fn one(w: &[u8], a: &[u8]) -> f32 {
                $body::<{ $vnni }, 1, 1>([w], [a])[0][0]
            }
            #[target_feature(enable = $features)]
            unsafe fn four(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
                $body::<{ $vnni }, 1, 4>([w], a)[0]
            }
            #[target_feature(enable = $features)]
            unsafe fn four_rows(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
                row_parts!(4, w, rb, y, |rows| {
                    let r = $body::<{ $vnni }, 4, 1>(rows, [a]);
                    [r[0][0], r[1][0], r[2][0], r[3][0]]
                })
            }
            #[target_feature(enable = $features)]
            unsafe fn two_by_four(w: [&[u8]; 2], a: [&[u8]; 4]) -> [[f32; 4]; 2] {
                $body::<{ $vnni }, 2, 4>(w, a)
            }
            // SAFETY (all three): only registered by `x86::plug` after the CPU features
            // were detected.
            pub fn vec_dot(w: &[u8], a: &[u8]) -> f32 {
                unsafe { one(w, a) }
            }
            pub fn vec_dot4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
                unsafe { four(w, a) }
            }
            pub fn rows4(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
                unsafe { four_rows(w, rb, a, y) }
            }
            pub fn tile2x4(w: [&[u8]; 2], a: [&[u8]; 4]) -> [[f32; 4]; 2] {
                unsafe { two_by_four(w, a) }
            }
        }
    };
}

dots!(q8_0_q8_0, q8_0_q8_0_vnni, q8_0_body);
dots!(q4_0_q8_0, q4_0_q8_0_vnni, q4_0_body);
dots!(q4_1_q8_1, q4_1_q8_1_vnni, q4_1_body);
dots!(q5_0_q8_0, q5_0_q8_0_vnni, q5_0_body);
dots!(q5_1_q8_1, q5_1_q8_1_vnni, q5_1_body);

pub(super) fn quantize_row_q8_0(x: &[f32], dst: &mut [u8]) {
    // SAFETY: only registered by `x86::plug` after the CPU features were detected.
    unsafe { quantize_row_q8_0_imp(x, dst) }
}

pub(super) fn quantize_row_q8_0_corr(x: &[f32], dst: &mut [u8]) {
    // SAFETY: only registered by `x86::plug` after the CPU features were detected.
    unsafe { quantize_row_q8_0_corr_imp(x, dst) }
}

pub(super) fn quantize_row_q8_0_sum(x: &[f32], dst: &mut [u8]) {
    // SAFETY: only registered by `x86::plug` after the CPU features were detected.
    unsafe { quantize_row_q8_0_sum_imp(x, dst) }
}

pub(super) fn quantize_row_q8_1(x: &[f32], dst: &mut [u8]) {
    // SAFETY: as above.
    unsafe { quantize_row_q8_1_imp(x, dst) }
}
