//! sparrow's block formats against references nobody here wrote (fixtures from
//! tests/gen/quant_fixtures.py: ggml's own quantizers and dots from the libggml shipped in
//! llama-cpp-python 0.3.36, the `gguf` package's numpy dequantizers).
//!
//! For the 11 weight types and the activation formats Q8_1 and Q8_K:
//! - quantize: sparrow's bytes equal ggml's `quantize_row_*_ref` bytes exactly;
//! - dequantize: sparrow's floats equal the reference floats bit for bit;
//! - vec_dot (weight row x activation row quantized to the weight's `vec_dot_type`) agrees
//!   with the f64 dot of the two dequantized rows, and with ggml's own vec_dot, within
//!   [`summation_bound`] (plus [`q8_1_sum_gap`] for the formats dotted with Q8_1).
//!
//! Missing fixtures fail the tests; they never skip.

use serde::Deserialize;
use sparrow::quant::{self, GgmlType, WEIGHT_TYPES};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Index {
    n_per_row: usize,
    weight_rows: Vec<String>,
    act_rows: Vec<String>,
    weights: String,
    acts: String,
    types: BTreeMap<String, Encoded>,
    activations: BTreeMap<String, Encoded>,
    bulk: Bulk,
}

#[derive(Deserialize)]
struct Bulk {
    rows: usize,
    n_per_row: usize,
    input_sha256: String,
    types: BTreeMap<String, BulkDigests>,
}

#[derive(Deserialize)]
struct BulkDigests {
    quant_sha256: String,
    deq_sha256: String,
}

#[derive(Deserialize)]
struct Encoded {
    id: u32,
    bytes: String,
    deq: String,
    deq_source: String,
    vec_dot_type: Option<String>,
    ggml_dot_source: Option<String>,
    ggml_dot: Option<Vec<Vec<String>>>,
}

fn dir() -> PathBuf {
    sparrow_tests::fixtures().join("quant")
}

fn read(name: &str) -> Vec<u8> {
    let p = dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; regenerate with `python3 tests/gen/quant_fixtures.py`",
            p.display()
        )
    })
}

fn index() -> Index {
    serde_json::from_slice(&read("index.json")).expect("index.json parses")
}

fn floats(name: &str) -> Vec<f32> {
    sparrow_tests::read_f32(&dir().join(name))
}

fn ty(name: &str, e: &Encoded) -> GgmlType {
    let t = GgmlType::from_name(name).unwrap_or_else(|| panic!("unknown type {name}"));
    assert_eq!(t.id(), e.id, "{name}: ggml id");
    t
}

/// The types the fixtures must cover: every weight type plus the two activation formats.
fn expected_types() -> Vec<GgmlType> {
    let mut v = WEIGHT_TYPES.to_vec();
    v.extend([GgmlType::Q8_1, GgmlType::Q8_K]);
    v
}

/// Tolerance "exact": the same f32 bit patterns (so -0.0 != 0.0 and NaN == NaN).
fn assert_bits_equal(what: &str, got: &[f32], want: &[f32], n_per_row: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: element {i} (row {}, col {}): sparrow {g:e} ({:#010x}) vs reference {w:e} ({:#010x})",
            i / n_per_row,
            i % n_per_row,
            g.to_bits(),
            w.to_bits()
        );
    }
}

/// Tolerance "summation bound", for comparing two f32 evaluations of the same dot product
/// sum_i w_i a_i of n terms that differ only in rounding and order (an integer dot scaled per
/// block vs. a float dot of the dequantized values; SIMD vs scalar; FMA vs mul+add):
/// n * eps_f32 * sum_i |w_i a_i|. That is the textbook forward error bound of recursive
/// summation (Higham, gamma_n with n eps < 1), which every order of f32 evaluation
/// satisfies, and it covers the handful of extra roundings per block (scale products, the
/// K-quant mins) since blocks hold at least 32 terms. When every term is zero it is zero, so
/// those dots must be exactly zero.
fn summation_bound(n: usize, abs_sum: f64) -> f64 {
    n as f64 * f32::EPSILON as f64 * abs_sum
}

/// Extra allowance for weights with a min dotted with Q8_1 activations (Q4_1, Q5_1). ggml's
/// Q8_1 stores s = f16(d_f32 * sum q) while the dequantized activations are f16(d_f32) * q,
/// so the min term m * s of the integer dot differs from m * sum(d * q) of the dequantized
/// dot by |m| * |s - f16(d) * sum q| per block (up to ~2^-11 relative: f16 rounding of s and
/// of d). This is a property of the format, not rounding in the dot, so it is computed from
/// the bytes and added to the bound.
fn q8_1_sum_gap(t: GgmlType, w: &[u8], a: &[u8]) -> f64 {
    if !matches!(t, GgmlType::Q4_1 | GgmlType::Q5_1) {
        return 0.0;
    }
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f64();
    w.chunks_exact(t.type_size())
        .zip(a.chunks_exact(GgmlType::Q8_1.type_size()))
        .map(|(wb, ab)| {
            let m = f16(&wb[2..4]);
            let (d, s) = (f16(&ab[0..2]), f16(&ab[2..4]));
            let sum_q: f64 = ab[4..].iter().map(|&q| q as i8 as f64).sum();
            m.abs() * (s - d * sum_q).abs()
        })
        .sum()
}

fn rows<T: Clone>(v: &[T], per_row: usize) -> Vec<&[T]> {
    v.chunks_exact(per_row).collect()
}

#[test]
fn fixtures_cover_every_type() {
    let idx = index();
    let have: Vec<GgmlType> = idx.types.iter().map(|(n, e)| ty(n, e)).collect();
    for t in expected_types() {
        assert!(have.contains(&t), "fixtures lack {t}");
        assert!(
            quant::ops(t).is_some(),
            "sparrow has no reference ops for {t}"
        );
    }
    for t in ["F32", "F16", "BF16", "Q8_0", "Q8_1", "Q8_K"] {
        assert!(
            idx.activations.contains_key(t),
            "fixtures lack activations in {t}"
        );
    }
    let n = idx.n_per_row;
    assert_eq!(floats(&idx.weights).len(), idx.weight_rows.len() * n);
    assert_eq!(floats(&idx.acts).len(), idx.act_rows.len() * n);
}

#[test]
fn quantize_matches_ggml_bytes() {
    let idx = index();
    let n = idx.n_per_row;
    let sets = [
        (&idx.types, &idx.weights, &idx.weight_rows),
        (&idx.activations, &idx.acts, &idx.act_rows),
    ];
    for (encoded, input, row_names) in sets {
        let x = floats(input);
        for (name, e) in encoded {
            let t = ty(name, e);
            let want = read(&e.bytes);
            let row_bytes = t.row_bytes(n as u64).expect("whole blocks") as usize;
            assert_eq!(
                want.len(),
                row_bytes * row_names.len(),
                "{name}: fixture size"
            );
            let mut got = vec![0u8; want.len()];
            quant::quantize(t, &x, &mut got).expect("quantize");
            let (bs, ts) = t.block_layout();
            for (r, (g, w)) in got
                .chunks_exact(row_bytes)
                .zip(want.chunks_exact(row_bytes))
                .enumerate()
            {
                for (b, (gb, wb)) in g.chunks_exact(ts).zip(w.chunks_exact(ts)).enumerate() {
                    assert!(
                        gb == wb,
                        "{name} ({input}): row {r} `{}`, block {b} (elements {}..{}) differs from ggml:\n sparrow {gb:02x?}\n ggml    {wb:02x?}",
                        row_names[r],
                        b * bs,
                        (b + 1) * bs
                    );
                }
            }
        }
    }
}

#[test]
fn dequantize_matches_reference_bits() {
    let idx = index();
    let n = idx.n_per_row;
    for encoded in [&idx.types, &idx.activations] {
        for (name, e) in encoded {
            let t = ty(name, e);
            let q = read(&e.bytes);
            let want = floats(&e.deq);
            let mut got = vec![0f32; want.len()];
            quant::dequantize(t, &q, &mut got).expect("dequantize");
            assert_bits_equal(&format!("{name} vs {}", e.deq_source), &got, &want, n);
        }
    }
}

#[test]
fn vec_dot_matches_dequantized_dot_and_ggml() {
    let idx = index();
    let n = idx.n_per_row;
    let mut exact_vs_ggml = 0;
    let mut total_vs_ggml = 0;
    for (name, e) in &idx.types {
        let t = ty(name, e);
        let o = quant::ops(t).expect("ops");
        let vdt = e
            .vec_dot_type
            .as_deref()
            .expect("weight entry names its vec_dot_type");
        assert_eq!(
            o.vec_dot_type.name(),
            vdt,
            "{name}: vec_dot_type differs from ggml's"
        );
        let a = &idx.activations[vdt];
        let (wq, aq) = (read(&e.bytes), read(&a.bytes));
        let (wd, ad) = (floats(&e.deq), floats(&a.deq));
        let wq = rows(&wq, t.row_bytes(n as u64).expect("row") as usize);
        let aq = rows(
            &aq,
            o.vec_dot_type.row_bytes(n as u64).expect("row") as usize,
        );
        let (wd, ad) = (rows(&wd, n), rows(&ad, n));
        for (i, (wq, wd)) in wq.iter().zip(&wd).enumerate() {
            for (k, (aq, ad)) in aq.iter().zip(&ad).enumerate() {
                let got = (o.vec_dot)(wq, aq);
                let want: f64 = wd
                    .iter()
                    .zip(ad.iter())
                    .map(|(x, y)| *x as f64 * *y as f64)
                    .sum();
                let abs: f64 = wd
                    .iter()
                    .zip(ad.iter())
                    .map(|(x, y)| (*x as f64 * *y as f64).abs())
                    .sum();
                let tol_ggml = summation_bound(n, abs);
                let tol = tol_ggml + q8_1_sum_gap(t, wq, aq);
                let case = format!(
                    "{name} row `{}` x {vdt} row `{}`",
                    idx.weight_rows[i], idx.act_rows[k]
                );
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{case}: vec_dot {got:e} vs dequantized dot {want:e}, |diff| {:e} > {tol:e}",
                    (got as f64 - want).abs()
                );
                if let Some(g) = &e.ggml_dot {
                    let bits =
                        u32::from_str_radix(g[i][k].trim_start_matches("0x"), 16).expect("hex");
                    let ggml = f32::from_bits(bits);
                    total_vs_ggml += 1;
                    exact_vs_ggml += (ggml.to_bits() == got.to_bits()) as usize;
                    // Same formula as ggml (Q8_1's s included), so only rounding and order differ.
                    assert!(
                        (got as f64 - ggml as f64).abs() <= tol_ggml,
                        "{case}: vec_dot {got:e} vs ggml {} {ggml:e}, |diff| {:e} > {tol_ggml:e}",
                        e.ggml_dot_source.as_deref().unwrap_or("?"),
                        (got as f64 - ggml as f64).abs()
                    );
                }
            }
        }
    }
    eprintln!("vec_dot: {exact_vs_ggml} of {total_vs_ggml} results bit-identical to ggml's");
}

/// The generator's `bulk_input`, bit for bit: splitmix64 uniforms, exact f32 operations.
fn bulk_input(rows: usize, n: usize) -> Vec<f32> {
    let splitmix = |k: u64| {
        let mut z = (k + 1).wrapping_mul(0x9E3779B97F4A7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    };
    let u = |k: u64| (splitmix(k) >> 40) as f32 / (1u32 << 24) as f32;
    let mut x = Vec::with_capacity(rows * n);
    for r in 0..rows {
        for c in 0..n {
            let k = 4 * (r * n + c) as u64;
            let mut v = ((u(k) + u(k + 1)) + u(k + 2)) + u(k + 3) - 2.0;
            if r % 5 == 0 {
                v += 2.0;
            }
            if r % 7 == 3 && c % 37 == 0 {
                v *= 16.0;
            }
            x.push(v * 2f32.powi(-((r % 6) as i32)));
        }
    }
    x
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Many rows, compared by digest: a float operation done in another order than ggml's (in
/// the K-quant scale searches above all) flips a rounding decision only now and then, which
/// the few committed rows can miss.
#[test]
fn bulk_quantize_and_dequantize_match_digests() {
    let idx = index();
    let b = &idx.bulk;
    let x = bulk_input(b.rows, b.n_per_row);
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(
        sha256(&bytes),
        b.input_sha256,
        "bulk input differs from the generator's"
    );
    for t in expected_types() {
        let d = b
            .types
            .get(t.name())
            .unwrap_or_else(|| panic!("bulk digests lack {t}"));
        let mut q = vec![0u8; t.row_bytes(x.len() as u64).expect("whole blocks") as usize];
        quant::quantize(t, &x, &mut q).expect("quantize");
        assert_eq!(
            sha256(&q),
            d.quant_sha256,
            "{t}: bulk quantization differs from ggml's"
        );
        let mut y = vec![0f32; x.len()];
        quant::dequantize(t, &q, &mut y).expect("dequantize");
        let y: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            sha256(&y),
            d.deq_sha256,
            "{t}: bulk dequantization differs from the reference"
        );
    }
}

/// A wrong length is an error from the checked entry points, and the raw table routines
/// ignore a trailing partial block instead of panicking.
#[test]
fn bad_lengths_never_panic() {
    for t in expected_types() {
        let (bs, ts) = t.block_layout();
        let x = vec![0.5f32; bs * 2];
        let mut q = vec![0u8; ts * 2 - 1];
        assert!(quant::quantize(t, &x, &mut q).is_err(), "{t}");
        let mut y = vec![0f32; bs * 2 + 1];
        assert!(
            quant::dequantize(t, &vec![0u8; ts * 2], &mut y).is_err(),
            "{t}"
        );
        let o = quant::ops(t).expect("ops");
        (o.quantize)(&x, &mut q);
        (o.dequantize)(&q, &mut y);
        let a = vec![0u8; o.vec_dot_type.type_size() * 2 + 3];
        let _ = (o.vec_dot)(&q, &a);
    }
}
