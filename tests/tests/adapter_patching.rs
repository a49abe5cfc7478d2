//! The patcher on every block format, and every way an adapter can be wrong.
//!
//! - A property test: after any random sequence of apply, stack, compose, switch and
//!   unapply, every tensor's bytes hash to what they were before (and every intermediate
//!   state is restored exactly when the entries above it are removed). Run on a file holding
//!   one tensor of each patchable type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
//!   Q5_K, Q6_K).
//! - Mismatched adapters (wrong shapes, unknown modules, another base, truncated files, bad
//!   indices) fail with an error naming the problem and leave the model byte-identical.

use proptest::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use sparrow::adapter::synth::{self, Spec};
use sparrow::adapter::{
    sdelta, stack::Stack, Adapter, Delta, Format, NameScheme, SparseDelta, Target,
};
use sparrow::gguf::{GgufFile, GgufWriter, Value};
use sparrow::model::{KvType, Model, ModelOptions};
use sparrow::quant::{self, WEIGHT_TYPES};
use sparrow_tests::fixtures;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparrow-patching-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// A GGUF file with tensor `blk.I.attn_q.weight` of 8 rows x 256 columns for each
/// patchable type I, holding quantized noise.
fn all_types_file() -> PathBuf {
    let path = tmp("all-types.gguf");
    if path.exists() {
        return path;
    }
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("test".into()));
    let mut data = Vec::new();
    for (i, ty) in WEIGHT_TYPES.iter().enumerate() {
        w.add_tensor(format!("blk.{i}.attn_q.weight"), &[256, 8], *ty)
            .unwrap();
        let x: Vec<f32> = (0..256 * 8)
            .map(|k| ((k * 7919 + i * 31) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut b = vec![0u8; ty.row_bytes(256).unwrap() as usize * 8];
        quant::quantize(*ty, &x, &mut b).unwrap();
        data.push(b);
    }
    let part = tmp(&format!(
        "all-types.{}.gguf",
        std::thread::current()
            .name()
            .unwrap_or("x")
            .replace("::", "_")
    ));
    w.write_file(&part, |i, _| Ok(Cow::Borrowed(&data[i][..])))
        .unwrap();
    std::fs::rename(&part, &path).unwrap();
    path
}

fn tensor_hashes(f: &GgufFile) -> Vec<Vec<u8>> {
    use sha2::Digest;
    f.tensors()
        .iter()
        .map(|t| sha2::Sha256::digest(f.tensor_data(t).unwrap()).to_vec())
        .collect()
}

/// The adapters the property test draws from: sparse at 1% and 20%, and rank-2 LoRA.
fn pool(f: &GgufFile) -> Vec<Adapter> {
    let p = Path::new("synth");
    vec![
        synth::synth(f, Spec::Sparse { density: 0.01 }, 1, p).unwrap(),
        synth::synth(f, Spec::Sparse { density: 0.2 }, 2, p).unwrap(),
        synth::synth(f, Spec::Lora { rank: 2 }, 3, p).unwrap(),
        synth::synth(f, Spec::Sparse { density: 0.05 }, 4, p).unwrap(),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Apply(usize, f32),
    Compose(usize, usize, f32),
    Unapply,
    Switch(usize, f32),
}

fn op() -> impl Strategy<Value = Op> {
    // Scales include large ones, so that deltas leave the blocks' grids and force re-encodes.
    let scale = prop_oneof![Just(1.0f32), Just(-0.5), Just(3.0), Just(40.0)];
    prop_oneof![
        (0..4usize, scale.clone()).prop_map(|(i, s)| Op::Apply(i, s)),
        (0..4usize, 0..4usize, scale.clone()).prop_map(|(i, j, s)| Op::Compose(i, j, s)),
        Just(Op::Unapply),
        (0..4usize, scale).prop_map(|(i, s)| Op::Switch(i, s)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_restores_every_tensor(ops in proptest::collection::vec(op(), 1..12)) {
        let mut f = GgufFile::open(all_types_file()).unwrap();
        let adapters = pool(&f);
        let original = tensor_hashes(&f);
        let mut stack = Stack::default();
        // Hashes before each entry of the stack, to check LIFO restores every state.
        let mut states: Vec<(u64, Vec<Vec<u8>>)> = Vec::new();
        // Hashes after each list of (adapter, scale) fused onto the bare base: the first
        // time by editing, later by replaying the compiled patch; both must agree.
        let mut bare: HashMap<Vec<(usize, u32)>, Vec<Vec<u8>>> = HashMap::new();
        let mut on_bare = |key: Vec<(usize, u32)>, got: Vec<Vec<u8>>| match bare.get(&key) {
            Some(want) => assert_eq!(&got, want, "{key:?} fused on the bare base again"),
            None => {
                bare.insert(key, got);
            }
        };
        let mut changed = false;
        for op in ops {
            let before = tensor_hashes(&f);
            match op {
                Op::Apply(i, s) => {
                    let id = stack.apply(&mut f, &[(&adapters[i], s)], Default::default()).unwrap();
                    if states.is_empty() {
                        on_bare(vec![(i, s.to_bits())], tensor_hashes(&f));
                    }
                    states.push((id, before));
                }
                Op::Compose(i, j, s) => {
                    let id = stack
                        .apply(&mut f, &[(&adapters[i], s), (&adapters[j], 1.0)], Default::default())
                        .unwrap();
                    if states.is_empty() {
                        on_bare(vec![(i, s.to_bits()), (j, 1f32.to_bits())], tensor_hashes(&f));
                    }
                    states.push((id, before));
                }
                Op::Unapply => {
                    if let Some((id, want)) = states.pop() {
                        stack.unapply(&mut f, id).unwrap();
                        prop_assert_eq!(tensor_hashes(&f), want);
                    }
                }
                Op::Switch(i, s) => {
                    if let Some((id, below)) = states.pop() {
                        let new = stack.switch(&mut f, id, &adapters[i], s).unwrap();
                        if states.is_empty() {
                            on_bare(vec![(i, s.to_bits())], tensor_hashes(&f));
                        }
                        states.push((new, below));
                    }
                }
            }
            changed |= tensor_hashes(&f) != original;
        }
        stack.unapply_all(&mut f);
        prop_assert!(stack.applied().is_empty());
        prop_assert_eq!(tensor_hashes(&f), original);
        let _ = changed;
    }
}

/// A patch fused onto the bare base again is replayed from the bytes its first apply wrote
/// (see `Stack`'s compiled patches): for every type, every adapter of the pool, blocks
/// re-encoded or not (scale 40), by apply and by switch, the bytes are those of an edit in
/// a stack that compiles nothing; and unapplying a replayed patch restores the base.
#[test]
fn replayed_patches_write_what_the_edit_wrote() {
    for scale in [1.0f32, 40.0] {
        let mut f = GgufFile::open(all_types_file()).unwrap();
        let adapters = pool(&f);
        let original = tensor_hashes(&f);
        let mut plain = Stack::with_compiled_budget(0);
        let edited: Vec<Vec<Vec<u8>>> = adapters
            .iter()
            .map(|a| {
                let id = plain
                    .apply(&mut f, &[(a, scale)], Default::default())
                    .unwrap();
                let h = tensor_hashes(&f);
                plain.unapply(&mut f, id).unwrap();
                h
            })
            .collect();
        assert_eq!(plain.compiled_bytes(), 0);
        assert_eq!(tensor_hashes(&f), original);

        let mut stack = Stack::default();
        for (a, want) in adapters.iter().zip(&edited) {
            let before = stack.compiled_bytes();
            let id = stack
                .apply(&mut f, &[(a, scale)], Default::default())
                .unwrap();
            assert!(stack.compiled_bytes() > before, "the first apply compiles");
            assert_eq!(&tensor_hashes(&f), want);
            stack.unapply(&mut f, id).unwrap();
            let held = stack.compiled_bytes();
            let id = stack
                .apply(&mut f, &[(a, scale)], Default::default())
                .unwrap();
            assert_eq!(stack.compiled_bytes(), held, "the second apply replays");
            assert_eq!(&tensor_hashes(&f), want, "replayed");
            stack.unapply(&mut f, id).unwrap();
            assert_eq!(tensor_hashes(&f), original);
        }
        let mut id = stack
            .apply(&mut f, &[(&adapters[0], scale)], Default::default())
            .unwrap();
        for (i, want) in [1, 2, 3, 0, 2].into_iter().map(|i| (i, &edited[i])) {
            id = stack.switch(&mut f, id, &adapters[i], scale).unwrap();
            assert_eq!(&tensor_hashes(&f), want, "switched to {i}");
        }
        stack.unapply(&mut f, id).unwrap();
        assert_eq!(tensor_hashes(&f), original);
    }
}

/// The compiled patches stay within their budget, the least recently used going first, and
/// a patch on top of another adapter is never compiled (its base bytes are not the base's).
#[test]
fn compiled_patches_keep_to_their_budget() {
    let mut f = GgufFile::open(all_types_file()).unwrap();
    let adapters = pool(&f);
    let one = {
        let mut s = Stack::default();
        let id = s
            .apply(&mut f, &[(&adapters[1], 1.0)], Default::default())
            .unwrap();
        s.unapply(&mut f, id).unwrap();
        s.compiled_bytes()
    };
    assert!(one > 0);
    let mut stack = Stack::with_compiled_budget(one + one / 2);
    for scale in [1.0f32, 2.0, 3.0] {
        let id = stack
            .apply(&mut f, &[(&adapters[1], scale)], Default::default())
            .unwrap();
        stack.unapply(&mut f, id).unwrap();
        assert!(stack.compiled_bytes() <= one + one / 2);
    }
    let base = stack
        .apply(&mut f, &[(&adapters[0], 1.0)], Default::default())
        .unwrap();
    let held = stack.compiled_bytes();
    let top = stack
        .apply(&mut f, &[(&adapters[3], 1.0)], Default::default())
        .unwrap();
    assert_eq!(
        stack.compiled_bytes(),
        held,
        "nothing compiled on top of an adapter"
    );
    stack.unapply(&mut f, top).unwrap();
    stack.unapply(&mut f, base).unwrap();
    stack.set_compiled_budget(0);
    assert_eq!(stack.compiled_bytes(), 0);
}

/// Applying any adapter of the pool changes every tensor type (the patcher writes all of
/// them), so the property test above is not vacuous.
#[test]
fn every_type_is_patched() {
    let mut f = GgufFile::open(all_types_file()).unwrap();
    let adapters = pool(&f);
    let original = tensor_hashes(&f);
    let mut stack = Stack::default();
    let id = stack
        .apply(&mut f, &[(&adapters[0], 1.0)], Default::default())
        .unwrap();
    let after = tensor_hashes(&f);
    for (i, (a, b)) in original.iter().zip(&after).enumerate() {
        assert_ne!(a, b, "tensor {i} ({}) unchanged", WEIGHT_TYPES[i]);
    }
    let s = stack.applied()[0].stats;
    assert_eq!(s.tensors, WEIGHT_TYPES.len());
    stack.unapply(&mut f, id).unwrap();
    assert_eq!(tensor_hashes(&f), original);
}

// ---------------------------------------------------------------------------------------
// Mismatched and malformed adapters.

fn tiny_model() -> Model {
    Model::open(
        fixtures().join("tiny/tiny-llama.q8_0.gguf"),
        &ModelOptions {
            threads: 1,
            kv_type: KvType::F16,
        },
    )
    .unwrap()
}

/// Loading and applying `path` to the tiny q8_0 llama fails with a message containing
/// `want`, and the model's bytes do not change.
fn refused(path: &Path, want: &str) {
    let mut m = tiny_model();
    let before = m.file().bytes().to_vec();
    let e = match Adapter::load(path) {
        Err(e) => e,
        Ok(a) => m.apply_adapter(&a, 1.0).unwrap_err(),
    };
    let msg = e.to_string();
    eprintln!("{}: {msg}", path.display());
    assert!(msg.contains(want), "`{msg}` does not mention `{want}`");
    assert!(
        m.file().bytes() == before,
        "a refused adapter changed the model"
    );
    assert!(m.applied_adapters().is_empty());
}

fn sparse(name: &str, rows: usize, cols: usize, idx: Vec<u32>) -> Target {
    let val = idx.iter().map(|&i| 0.01 * (i % 7) as f32).collect();
    Target {
        name: name.into(),
        rows,
        cols,
        delta: Delta::Sparse(SparseDelta { idx, val }),
    }
}

fn write_sdelta(
    name: &str,
    names: NameScheme,
    targets: Vec<Target>,
    hash: Option<String>,
) -> PathBuf {
    let a = Adapter::new(name.into(), Format::SparseDelta, names, targets);
    let p = tmp(name);
    sdelta::write(
        &p,
        &a,
        &sdelta::WriteOptions {
            base_shape_hash: hash,
            ..Default::default()
        },
    )
    .unwrap();
    p
}

/// A good first target followed by a bad one: nothing may be written.
fn good_then(bad: Target) -> Vec<Target> {
    vec![sparse("blk.0.attn_q.weight", 64, 64, vec![0, 5, 4095]), bad]
}

#[test]
fn wrong_shape() {
    let p = write_sdelta(
        "shape.sdelta.safetensors",
        NameScheme::Gguf,
        good_then(sparse("blk.1.ffn_up.weight", 64, 128, vec![1, 2])),
        None,
    );
    refused(
        &p,
        "delta is 64 x 128, base tensor `blk.1.ffn_up.weight` is 128 x 64",
    );
}

#[test]
fn unknown_modules() {
    let p = write_sdelta(
        "unknown-gguf.sdelta.safetensors",
        NameScheme::Gguf,
        good_then(sparse("blk.7.attn_q.weight", 64, 64, vec![1])),
        None,
    );
    refused(&p, "does not exist in the base model");
    let p = write_sdelta(
        "unknown-hf.sdelta.safetensors",
        NameScheme::Hf,
        vec![sparse("model.layers.0.self_attn.qkv_proj", 64, 64, vec![1])],
        None,
    );
    refused(&p, "has no GGUF tensor");
}

#[test]
fn another_base() {
    // A sparse delta made for another model's shapes.
    let qwen = GgufFile::open(fixtures().join("tiny/tiny-qwen2.f32.gguf")).unwrap();
    let p = write_sdelta(
        "other-base.sdelta.safetensors",
        NameScheme::Gguf,
        vec![sparse("blk.0.attn_q.weight", 64, 64, vec![1])],
        Some(sparrow::adapter::base_shape_hash(&qwen)),
    );
    refused(&p, "made for another base model");
    // A llama GGUF LoRA on a qwen2 model.
    let mut m = Model::open(
        fixtures().join("tiny/tiny-qwen2.f32.gguf"),
        &ModelOptions::default(),
    )
    .unwrap();
    let before = m.file().bytes().to_vec();
    let a = Adapter::load(fixtures().join("adapters/lora_plain.lora.f32.gguf")).unwrap();
    let e = m.apply_adapter(&a, 1.0).unwrap_err().to_string();
    assert!(e.contains("made for architecture `llama`"), "{e}");
    assert!(m.file().bytes() == before);
    // A model given where an adapter is expected.
    refused(
        &fixtures().join("tiny/tiny-qwen2.f32.gguf"),
        "a model, not an adapter",
    );
}

#[test]
fn truncated_files() {
    for src in [
        fixtures().join("adapters/lora_plain.lora.f32.gguf"),
        write_sdelta(
            "whole.sdelta.safetensors",
            NameScheme::Gguf,
            vec![sparse("blk.0.attn_q.weight", 64, 64, vec![1, 2, 3])],
            None,
        ),
    ] {
        let bytes = std::fs::read(&src).unwrap();
        for cut in [3, 8, 30, bytes.len() / 2, bytes.len() - 1] {
            let p = tmp(&format!(
                "cut{cut}-{}",
                src.file_name().unwrap().to_string_lossy()
            ));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = Adapter::load(&p).unwrap_err().to_string();
            eprintln!("cut at {cut}: {e}");
            assert!(
                [
                    "too short",
                    "truncated",
                    "not a valid safetensors",
                    "invalid GGUF"
                ]
                .iter()
                .any(|w| e.contains(w)),
                "{e}"
            );
        }
    }
    // A PEFT folder whose weights file is cut.
    let d = tmp("cut-peft");
    std::fs::create_dir_all(&d).unwrap();
    let src = fixtures().join("adapters/lora_plain");
    std::fs::copy(
        src.join("adapter_config.json"),
        d.join("adapter_config.json"),
    )
    .unwrap();
    let w = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    std::fs::write(d.join("adapter_model.safetensors"), &w[..w.len() - 100]).unwrap();
    refused(&d, "not a valid safetensors file");
    std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
    refused(&d, "adapter_model.safetensors is missing");
}

/// Raw sparse delta tensors, bypassing the writer's checks.
fn raw_sdelta(name: &str, idx: &[u32], shape: [i64; 2], extra_md: &[(&str, &str)]) -> PathBuf {
    let t = "blk.0.attn_q.weight";
    let i: Vec<u8> = idx.iter().flat_map(|x| x.to_le_bytes()).collect();
    let v: Vec<u8> = idx.iter().flat_map(|_| 0.5f32.to_le_bytes()).collect();
    let s: Vec<u8> = shape.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        (
            format!("{t}.sd_idx"),
            TensorView::new(Dtype::U32, vec![idx.len()], &i).unwrap(),
        ),
        (
            format!("{t}.sd_val"),
            TensorView::new(Dtype::F32, vec![idx.len()], &v).unwrap(),
        ),
        (
            format!("{t}.sd_shape"),
            TensorView::new(Dtype::I64, vec![2], &s).unwrap(),
        ),
    ];
    let mut md: HashMap<String, String> = [
        ("format", "sparse_delta"),
        ("format_version", "1"),
        ("semantics", "add"),
        ("index", "flat_row_major"),
        ("name_scheme", "gguf"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra_md {
        md.insert(k.to_string(), v.to_string());
    }
    let p = tmp(name);
    std::fs::write(&p, safetensors::serialize(views, Some(md)).unwrap()).unwrap();
    p
}

#[test]
fn bad_indices() {
    refused(
        &raw_sdelta("oob.sdelta.safetensors", &[1, 4096], [64, 64], &[]),
        "index 4096 is outside 0..4096",
    );
    refused(
        &raw_sdelta("order.sdelta.safetensors", &[5, 3], [64, 64], &[]),
        "not strictly increasing",
    );
    refused(
        &raw_sdelta("dup.sdelta.safetensors", &[5, 5], [64, 64], &[]),
        "not strictly increasing",
    );
    refused(
        &raw_sdelta(
            "v2.sdelta.safetensors",
            &[1],
            [64, 64],
            &[("format_version", "2")],
        ),
        "format_version",
    );
    // A SHiRA index outside its weight (PEFT stores no shape: caught against the base).
    let d = tmp("bad-shira");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("adapter_config.json"),
        r#"{"peft_type": "SHIRA", "r": 1}"#,
    )
    .unwrap();
    let ij: Vec<u8> = [0i32, 64, 3, 3]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let w: Vec<u8> = [0.5f32, 0.25]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let m = "base_model.model.model.layers.0.self_attn.q_proj";
    let views = vec![
        (
            format!("{m}.shira_indices"),
            TensorView::new(Dtype::I32, vec![2, 2], &ij).unwrap(),
        ),
        (
            format!("{m}.shira_weight"),
            TensorView::new(Dtype::F32, vec![2], &w).unwrap(),
        ),
    ];
    std::fs::write(
        d.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    refused(&d, "index (64, 3) is outside the 64 x 64 weight");
}

#[test]
fn not_an_adapter() {
    let p = tmp("garbage.bin");
    std::fs::write(&p, b"this is not an adapter at all").unwrap();
    refused(&p, "not a valid safetensors file");
    let e = Adapter::load(tmp("does-not-exist"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does-not-exist"), "{e}");
}

/// The patcher's fast path (no residuals) and its general path (residuals kept) write the
/// same bytes, for every type, including blocks that leave their grid (scale 40).
#[test]
fn fast_and_general_paths_agree() {
    for scale in [1.0f32, 40.0] {
        let mut f = GgufFile::open(all_types_file()).unwrap();
        let adapters = pool(&f);
        let mut stack = Stack::default();
        let mut out = Vec::new();
        for residual in [false, true] {
            let o = sparrow::adapter::patch::Options {
                residual,
                ..Default::default()
            };
            let id = stack.apply(&mut f, &[(&adapters[1], scale)], o).unwrap();
            out.push(tensor_hashes(&f));
            stack.unapply(&mut f, id).unwrap();
        }
        assert_eq!(out[0], out[1], "scale {scale}");
    }
}

/// Random corruption of adapter files (a sparse delta, a GGUF LoRA, a PEFT weights file):
/// loading and applying never panics; a refused adapter leaves the model byte-identical,
/// and one that still loads and applies unapplies to the same bytes.
mod corruption {
    use super::*;

    fn sources() -> Vec<(String, Vec<u8>)> {
        let sd = write_sdelta(
            "corrupt-src.sdelta.safetensors",
            NameScheme::Gguf,
            vec![
                sparse("blk.0.attn_q.weight", 64, 64, vec![0, 7, 300, 4095]),
                sparse("blk.1.ffn_down.weight", 64, 128, vec![1, 2, 8000]),
            ],
            None,
        );
        vec![
            ("sdelta".into(), std::fs::read(sd).unwrap()),
            (
                "gguf".into(),
                std::fs::read(fixtures().join("adapters/lora_qv.lora.f32.gguf")).unwrap(),
            ),
            (
                "peft".into(),
                std::fs::read(fixtures().join("adapters/lora_qv/adapter_model.safetensors"))
                    .unwrap(),
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn corrupted_adapters_never_panic(
            which in 0..3usize,
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
            cut in proptest::option::of(any::<proptest::sample::Index>()),
        ) {
            let (kind, mut bytes) = sources().swap_remove(which);
            for (at, v) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= v | 1;
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len()));
            }
            let path = if kind == "peft" {
                let d = tmp(&format!("corrupt-peft-{which}"));
                std::fs::create_dir_all(&d).unwrap();
                std::fs::copy(
                    fixtures().join("adapters/lora_qv/adapter_config.json"),
                    d.join("adapter_config.json"),
                )
                .unwrap();
                std::fs::write(d.join("adapter_model.safetensors"), &bytes).unwrap();
                d
            } else {
                let p = tmp(&format!("corrupt-{kind}"));
                std::fs::write(&p, &bytes).unwrap();
                p
            };
            let mut m = tiny_model();
            let before = m.file().bytes().to_vec();
            if let Ok(a) = Adapter::load(&path) {
                match m.apply_adapter(&a, 1.0) {
                    Ok(id) => {
                        m.unapply_adapter(id).unwrap();
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }
            prop_assert!(m.file().bytes() == before);
        }
    }
}

/// A switch to a bad adapter fails before anything is written: the adapter in place stays,
/// byte for byte, and can still be removed.
#[test]
fn switch_to_a_bad_adapter_keeps_the_current_one() {
    let mut m = tiny_model();
    let base = m.file().bytes().to_vec();
    let good = Adapter::load(fixtures().join("adapters/shira")).unwrap();
    let id = m.apply_adapter(&good, 1.0).unwrap();
    let patched = m.file().bytes().to_vec();
    let bad = Adapter::load(write_sdelta(
        "switch-bad.sdelta.safetensors",
        NameScheme::Gguf,
        good_then(sparse("blk.1.ffn_up.weight", 64, 128, vec![1])),
        None,
    ))
    .unwrap();
    let e = m.switch_adapter(id, &bad, 1.0).unwrap_err().to_string();
    assert!(e.contains("delta is 64 x 128"), "{e}");
    let e = m
        .switch_adapter(id, &good, f32::NAN)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not finite"), "{e}");
    assert!(m.file().bytes() == patched);
    assert_eq!(m.applied_adapters().len(), 1);
    m.unapply_adapter(id).unwrap();
    assert!(m.file().bytes() == base);
}
