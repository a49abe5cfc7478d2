//! Adapters fused into a tiny random llama, against PEFT and llama.cpp.
//!
//! Fixtures: tests/fixtures/adapters/, made by tests/gen/adapter_fixtures.py: PEFT LoRA
//! (plain, rank_pattern + alpha_pattern, rslora, DoRA, q/v only) and SHiRA adapters with
//! random weights on the tiny llama of tests/fixtures/tiny; transformers' logits of PEFT's
//! `merge_and_unload()`; GGUF LoRAs made by llama.cpp's convert_lora_to_gguf.py and
//! llama.cpp's logits with them; fine-tuned (merged) models converted to GGUF.
//!
//! Every adapter changes the logits by 0.9-2.9 (index.json `max_abs_diff_merged_vs_base`),
//! so a wrong scale, a missed module or an unpermuted q/k row is far outside the tolerances.

use sparrow::adapter::{lowrank, sdelta, Adapter};
use sparrow::model::{KvType, Logits, Model, ModelOptions};
use sparrow_tests::{fixtures, read_f32};
use std::path::{Path, PathBuf};

/// F32 weights, F32 cache: PEFT's merge is W + s (B A) in f32 and so is ours; only the
/// summation order of B A and of the forward pass differ. llama.cpp itself is within 1.2e-5
/// of transformers on these fixtures; 1e-4 is noise, a bug is >= 1e-2.
const F32_EXACT: f32 = 1e-4;

fn dir() -> PathBuf {
    fixtures().join("adapters")
}

fn tiny(ty: &str) -> PathBuf {
    fixtures()
        .join("tiny")
        .join(format!("tiny-llama.{ty}.gguf"))
}

fn open(ty: &str, kv: KvType) -> Model {
    Model::open(
        tiny(ty),
        &ModelOptions {
            threads: 2,
            kv_type: kv,
        },
    )
    .unwrap()
}

#[derive(serde::Deserialize)]
struct Index {
    sequences: Vec<Sequence>,
}

#[derive(serde::Deserialize)]
struct Sequence {
    tokens: Vec<u32>,
}

fn sequences() -> Vec<Vec<u32>> {
    let idx: Index =
        serde_json::from_slice(&std::fs::read(dir().join("index.json")).unwrap()).unwrap();
    idx.sequences.into_iter().map(|s| s.tokens).collect()
}

/// Logits of every position of every fixture sequence, each sequence in a fresh session.
fn logits(m: &mut Model) -> Vec<Vec<f32>> {
    sequences()
        .iter()
        .map(|toks| {
            let mut s = m.new_session(toks.len()).unwrap();
            m.eval(&mut s, toks, Logits::All).unwrap()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Max |got - reference files| over the sequences.
fn diff_to(got: &[Vec<f32>], files: &[String]) -> f32 {
    got.iter()
        .zip(files)
        .map(|(g, f)| max_diff(g, &read_f32(&dir().join(f))))
        .fold(0.0, f32::max)
}

fn hf_merged(name: &str) -> Vec<String> {
    (0..2)
        .map(|j| format!("hf.{name}.merged.s{j}.logits.f32"))
        .collect()
}

fn llama_cpp(name: &str) -> Vec<String> {
    (0..2)
        .map(|j| format!("llamacpp.{name}.f32.kvf32.s{j}.logits.f32"))
        .collect()
}

fn snapshot(m: &Model) -> Vec<u8> {
    m.file().bytes().to_vec()
}

/// Applies `path` at scale 1, compares with `reference`, unapplies and checks the weights
/// are the base's again, byte for byte.
fn fused_vs(ty: &str, kv: KvType, path: &Path, reference: &[String], tol: f32) -> f32 {
    let mut m = open(ty, kv);
    let before = snapshot(&m);
    let a = Adapter::load(path).unwrap();
    let id = m.apply_adapter(&a, 1.0).unwrap();
    let d = diff_to(&logits(&mut m), reference);
    eprintln!("{ty} + {}: max |fused - reference| = {d}", path.display());
    assert!(d <= tol, "{}: {d} > {tol}", path.display());
    m.unapply_adapter(id).unwrap();
    assert!(
        m.file().bytes() == before,
        "unapply did not restore the base"
    );
    d
}

#[test]
fn peft_lora_fused_matches_peft_merge() {
    for name in ["lora_plain", "lora_patterns", "lora_rslora", "lora_qv"] {
        fused_vs(
            "f32",
            KvType::F32,
            &dir().join(name),
            &hf_merged(name),
            F32_EXACT,
        );
    }
}

#[test]
fn peft_shira_fused_matches_peft_merge() {
    fused_vs(
        "f32",
        KvType::F32,
        &dir().join("shira"),
        &hf_merged("shira"),
        F32_EXACT,
    );
}

/// llama.cpp's converter keeps only the global alpha, so its files for the rank/alpha
/// pattern and rslora adapters are different adapters (index.json says so): those are
/// checked against llama.cpp running them, the equivalent ones against PEFT too.
#[test]
fn gguf_lora_matches_llama_cpp_and_peft() {
    for name in ["lora_plain", "lora_qv", "lora_patterns", "lora_rslora"] {
        let path = dir().join(format!("{name}.lora.f32.gguf"));
        fused_vs("f32", KvType::F32, &path, &llama_cpp(name), F32_EXACT);
        if matches!(name, "lora_plain" | "lora_qv") {
            fused_vs("f32", KvType::F32, &path, &hf_merged(name), F32_EXACT);
        }
    }
}

/// F16 and Q8_0 bases: the base alone is 0.016 (f16) and 0.46 (q8_0) from transformers
/// (tests/tiny_models.rs), because its weights are rounded. Fusing rounds the merged weights
/// the same way, so the fused model should be as close to PEFT's merge as the base is to the
/// unadapted model. Tolerances: those of tiny_models.rs.
#[test]
fn quantized_bases_stay_as_close_to_peft_as_the_base() {
    for (ty, tol) in [("f16", 0.05), ("q8_0", 0.6)] {
        for name in ["lora_plain", "shira"] {
            fused_vs(ty, KvType::F16, &dir().join(name), &hf_merged(name), tol);
        }
    }
}

#[test]
fn dora_is_refused_and_changes_nothing() {
    let e = Adapter::load(dir().join("lora_dora"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("DoRA"), "{e}");
}

/// `adapter convert --base`: a fine-tuned model minus its base, kept whole (density 1),
/// written as a sparse delta and read back, fuses to the fine-tuned model.
#[test]
fn fine_tuned_minus_base_round_trips_through_a_sparse_delta() {
    let tuned = sparrow::gguf::GgufFile::open(dir().join("merged-shira.f32.gguf")).unwrap();
    let base = sparrow::gguf::GgufFile::open(tiny("f32")).unwrap();
    let (a, kept) = lowrank::diff_models(&tuned, &base, 1.0, &dir()).unwrap();
    assert_eq!(lowrank::total(&kept).relative_error(), 0.0);
    let tmp = std::env::temp_dir().join(format!(
        "sparrow-test-{}.sdelta.safetensors",
        std::process::id()
    ));
    sdelta::write(&tmp, &a, &sdelta::WriteOptions::default()).unwrap();
    let back = Adapter::load(&tmp).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    // The file lists tensors by name; compare in that order.
    let mut want = a.targets().to_vec();
    want.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(back.targets(), want);
    fused_vs_adapter("f32", &back, &hf_merged("shira"), F32_EXACT);
}

fn fused_vs_adapter(ty: &str, a: &Adapter, reference: &[String], tol: f32) -> f32 {
    let mut m = open(ty, KvType::F32);
    let before = snapshot(&m);
    let id = m.apply_adapter(a, 1.0).unwrap();
    let d = diff_to(&logits(&mut m), reference);
    eprintln!(
        "{ty} + {}: max |fused - reference| = {d}",
        a.source.display()
    );
    assert!(d <= tol, "{d} > {tol}");
    m.unapply_adapter(id).unwrap();
    assert!(m.file().bytes() == before);
    d
}

/// A LoRA converted to a sparse delta at density 1 holds every entry of s B A: fusing it
/// writes the same bytes as fusing the LoRA. At lower density the reported error grows.
#[test]
fn lora_to_sparse_keeps_what_it_reports() {
    let mut m = open("f32", KvType::F32);
    let lora = m
        .bind_adapter(&Adapter::load(dir().join("lora_plain")).unwrap())
        .unwrap();
    let (full, kept) = lowrank::lora_to_sparse(&lora, 1.0).unwrap();
    assert_eq!(lowrank::total(&kept).relative_error(), 0.0);
    let id = m.apply_adapter(&lora, 1.0).unwrap();
    let fused_lora = snapshot(&m);
    m.unapply_adapter(id).unwrap();
    let id = m.apply_adapter(&full, 1.0).unwrap();
    assert!(snapshot(&m) == fused_lora);
    m.unapply_adapter(id).unwrap();
    let (_, k10) = lowrank::lora_to_sparse(&lora, 0.1).unwrap();
    let (_, k50) = lowrank::lora_to_sparse(&lora, 0.5).unwrap();
    let (e10, e50) = (
        lowrank::total(&k10).relative_error(),
        lowrank::total(&k50).relative_error(),
    );
    eprintln!("lora_plain as sparse: relative Frobenius error {e50} at 50%, {e10} at 10%");
    assert!(0.0 < e50 && e50 < e10 && e10 < 1.0);
}

/// Scales: an adapter at scale 0.5 applied twice (stacked) lands where scale 1 lands on an
/// f32 base up to rounding, and composing two adapters patches the sum.
#[test]
fn stacking_and_composing() {
    let mut m = open("f32", KvType::F32);
    let base = snapshot(&m);
    let plain = Adapter::load(dir().join("lora_plain")).unwrap();
    let shira = Adapter::load(dir().join("shira")).unwrap();
    let a = m.apply_adapter(&plain, 1.0).unwrap();
    let b = m.apply_adapter(&shira, 1.0).unwrap();
    let stacked = logits(&mut m);
    // LIFO: the lower one cannot go first.
    let e = m.unapply_adapter(a).unwrap_err().to_string();
    assert!(e.contains("reverse order"), "{e}");
    m.unapply_adapter(b).unwrap();
    m.unapply_adapter(a).unwrap();
    assert!(snapshot(&m) == base);
    let c = m
        .apply_adapters(&[(&plain, 1.0), (&shira, 1.0)], Default::default())
        .unwrap();
    let composed = logits(&mut m);
    m.unapply_adapter(c).unwrap();
    assert!(snapshot(&m) == base);
    let d = stacked
        .iter()
        .zip(&composed)
        .map(|(x, y)| max_diff(x, y))
        .fold(0.0, f32::max);
    assert!(d <= F32_EXACT, "stacked vs composed: {d}");
    // Half scale twice vs once at full scale.
    let h1 = m.apply_adapter(&shira, 0.5).unwrap();
    let h2 = m.apply_adapter(&shira, 0.5).unwrap();
    let twice = logits(&mut m);
    m.unapply_adapter(h2).unwrap();
    m.unapply_adapter(h1).unwrap();
    let diff = diff_to(&twice, &hf_merged("shira"));
    assert!(diff <= F32_EXACT, "0.5 + 0.5 vs PEFT merge at 1: {diff}");
    assert!(snapshot(&m) == base);
}

#[test]
fn switch_replaces_the_top_adapter() {
    let mut m = open("q8_0", KvType::F16);
    let base = snapshot(&m);
    let plain = Adapter::load(dir().join("lora_plain")).unwrap();
    let shira = Adapter::load(dir().join("shira")).unwrap();
    let a = m.apply_adapter(&plain, 1.0).unwrap();
    let b = m.switch_adapter(a, &shira, 1.0).unwrap();
    let switched = snapshot(&m);
    m.unapply_adapter(b).unwrap();
    assert!(snapshot(&m) == base);
    let c = m.apply_adapter(&shira, 1.0).unwrap();
    assert!(
        snapshot(&m) == switched,
        "switch differs from a fresh apply"
    );
    m.unapply_all();
    assert!(snapshot(&m) == base);
    let _ = c;
}

fn hf_unmerged(name: &str) -> Vec<String> {
    (0..2)
        .map(|j| format!("hf.{name}.unmerged.s{j}.logits.f32"))
        .collect()
}

/// Unfused LoRA (y = W x + s B (A x)) against PEFT's unmerged forward, on the f32 base, and
/// its weights untouched.
#[test]
fn unfused_lora_matches_peft_unmerged() {
    let mut m = open("f32", KvType::F32);
    let base = snapshot(&m);
    for name in ["lora_plain", "lora_patterns", "lora_rslora", "lora_qv"] {
        let a = Adapter::load(dir().join(name)).unwrap();
        m.set_unfused_adapters(&[(&a, 1.0)]).unwrap();
        let d = diff_to(&logits(&mut m), &hf_unmerged(name));
        eprintln!("unfused {name}: max |sparrow - PEFT unmerged| = {d}");
        assert!(d <= F32_EXACT, "{name}: {d}");
        assert!(snapshot(&m) == base, "unfused mode wrote the weights");
    }
    // Off again: the base model's logits.
    m.set_unfused_adapters(&[]).unwrap();
    let base_files: Vec<String> = (0..2)
        .map(|j| format!("../tiny/hf.tiny-llama.s{j}.logits.f32"))
        .collect();
    assert!(diff_to(&logits(&mut m), &base_files) <= F32_EXACT);
    // Sparse adapters are fused only.
    let e = m
        .set_unfused_adapters(&[(&Adapter::load(dir().join("shira")).unwrap(), 1.0)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("only LoRA runs unfused"), "{e}");
}

/// On a quantized base, fusing rounds the merged weights. With residuals kept beside the
/// weights, stored + residual is the exact sum base + delta for every element (up to one
/// f32 rounding of the subtraction), and unapply removes them again. LoRAs are refused
/// (their residual would be dense; they run unfused instead).
#[test]
fn residuals_complete_the_merge_on_quantized_bases() {
    use sparrow::adapter::Delta;
    use sparrow::quant;
    let exact = sparrow::adapter::patch::Options {
        residual: true,
        ..Default::default()
    };
    for ty in ["q8_0", "f16"] {
        let mut m = open(ty, KvType::F32);
        let base = snapshot(&m);
        let base_logits = logits(&mut m);
        let lora = Adapter::load(dir().join("lora_plain")).unwrap();
        let e = m
            .apply_adapters(&[(&lora, 1.0)], exact)
            .unwrap_err()
            .to_string();
        assert!(e.contains("run a LoRA unfused"), "{e}");
        let a = m
            .bind_adapter(&Adapter::load(dir().join("shira")).unwrap())
            .unwrap();
        let id = m.apply_adapters(&[(&a, 1.0)], exact).unwrap();
        let entry = &m.applied_adapters()[0];
        let res: std::collections::HashMap<&str, &[(u32, f32)]> =
            entry.residuals().map(|(n, _, _, r)| (n, r)).collect();
        let mut worst = 0f32;
        let mut n_res = 0;
        for t in a.targets() {
            let Delta::Sparse(d) = &t.delta else {
                unreachable!()
            };
            let info = m.file().tensor(&t.name).unwrap().clone();
            let range = m.file().range(&info).unwrap();
            let deq = |bytes: &[u8]| {
                let mut v = vec![0f32; t.rows * t.cols];
                quant::dequantize(info.ty, &bytes[range.clone()], &mut v).unwrap();
                v
            };
            let (before, after) = (deq(&base), deq(m.file().bytes()));
            let mut got = after.clone();
            for &(i, r) in res.get(t.name.as_str()).copied().unwrap_or(&[]) {
                got[i as usize] += r;
                n_res += 1;
            }
            let mut want = before.clone();
            for (&i, &v) in d.idx.iter().zip(&d.val) {
                want[i as usize] += v;
            }
            for i in 0..got.len() {
                let err = (got[i] - want[i]).abs();
                assert!(
                    err <= 1e-6 * want[i].abs().max(1e-3),
                    "{ty} {} [{i}]: {} vs {}",
                    t.name,
                    got[i],
                    want[i]
                );
                worst = worst.max(err);
            }
        }
        eprintln!("{ty}: {n_res} residuals, worst |stored + residual - exact| = {worst}");
        assert!(n_res > 0);
        m.unapply_adapter(id).unwrap();
        assert!(snapshot(&m) == base);
        // No side term is left behind.
        assert!(logits(&mut m) == base_logits);
    }
}
