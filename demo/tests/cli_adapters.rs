//! The adapter side of the `sparrow` binary, on the tiny llama fixtures: `--adapter` on
//! logits against PEFT's merges, `adapter inspect | convert | synth`, `bench-switch --json`,
//! and error paths (one `error:` line, status 1, never a panic).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn tiny(ty: &str) -> String {
    fixtures()
        .join(format!("tiny/tiny-llama.{ty}.gguf"))
        .display()
        .to_string()
}

fn adapters() -> PathBuf {
    fixtures().join("adapters")
}

fn sparrow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparrow"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> (String, String) {
    let o = sparrow(args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "{args:?} failed: {err}");
    (out, err)
}

fn fails(args: &[&str], needle: &str) {
    let o = sparrow(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{args:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparrow-cli-adapters-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn read_f32(p: &Path) -> Vec<f32> {
    std::fs::read(p)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Token ids of fixture sequence s0, comma-separated.
fn s0() -> String {
    let idx: Value =
        serde_json::from_slice(&std::fs::read(adapters().join("index.json")).unwrap()).unwrap();
    idx["sequences"][0]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `sparrow logits` of s0 on the f32 tiny llama with `extra` arguments, max |diff| to
/// `reference` (a fixture file).
fn logits_vs(extra: &[&str], reference: &str) -> f32 {
    let out = tmp(&format!("logits-{}.f32", reference.replace('/', "_")));
    let (tokens, model) = (s0(), tiny("f32"));
    let mut args = vec![
        "logits",
        "-m",
        &model,
        "--kv-f32",
        "--tokens",
        &tokens,
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    let got = read_f32(&out);
    let want = read_f32(&fixtures().join(reference));
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// f32 weights and cache: 1e-4 is summation-order noise (tests/tests/adapters.rs).
const F32_EXACT: f32 = 1e-4;

#[test]
fn logits_with_adapters_match_peft() {
    let plain = adapters().join("lora_plain");
    let p = plain.to_str().unwrap();
    let d = logits_vs(
        &["--adapter", p],
        "adapters/hf.lora_plain.merged.s0.logits.f32",
    );
    assert!(d <= F32_EXACT, "fused: {d}");
    let d = logits_vs(
        &["--adapter", p, "--unfused"],
        "adapters/hf.lora_plain.unmerged.s0.logits.f32",
    );
    assert!(d <= F32_EXACT, "unfused: {d}");
    // Scale 0 is the base model.
    let d = logits_vs(
        &["--adapter", &format!("{p}:0")],
        "tiny/hf.tiny-llama.s0.logits.f32",
    );
    assert!(d <= F32_EXACT, "scale 0: {d}");
    // Two halves of SHiRA composed are SHiRA.
    let sh = adapters().join("shira").display().to_string();
    let d = logits_vs(
        &[
            "--adapter",
            &format!("{sh}:0.5"),
            "--adapter",
            &format!("{sh}:0.5"),
        ],
        "adapters/hf.shira.merged.s0.logits.f32",
    );
    assert!(d <= F32_EXACT, "composed halves: {d}");
}

#[test]
fn convert_a_fine_tuned_model_and_a_peft_shira() {
    let out = tmp("tuned.sdelta.safetensors");
    let (_, err) = ok(&[
        "adapter",
        "convert",
        adapters().join("merged-shira.f32.gguf").to_str().unwrap(),
        "--base",
        &tiny("f32"),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("relative Frobenius error 0.0000"), "{err}");
    let d = logits_vs(
        &["--adapter", out.to_str().unwrap()],
        "adapters/hf.shira.merged.s0.logits.f32",
    );
    assert!(d <= F32_EXACT, "{d}");
    // PEFT SHiRA stores no shapes: --base is needed.
    let shira = adapters().join("shira");
    fails(
        &[
            "adapter",
            "convert",
            shira.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        "--base",
    );
    let out2 = tmp("shira.sdelta.safetensors");
    ok(&[
        "adapter",
        "convert",
        shira.to_str().unwrap(),
        "--base",
        &tiny("f32"),
        "-o",
        out2.to_str().unwrap(),
    ]);
    let d = logits_vs(
        &["--adapter", out2.to_str().unwrap()],
        "adapters/hf.shira.merged.s0.logits.f32",
    );
    assert!(d <= F32_EXACT, "{d}");
    let (text, _) = ok(&["adapter", "inspect", out2.to_str().unwrap()]);
    assert!(
        text.contains("sparse delta v1") && text.contains("14 tensors"),
        "{text}"
    );
    assert!(text.contains("blk.0.attn_q.weight"), "{text}");
}

#[test]
fn convert_a_lora_reports_its_error() {
    let lora = adapters().join("lora_plain");
    let out = tmp("lora.sdelta.safetensors");
    fails(
        &[
            "adapter",
            "convert",
            lora.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        "--density",
    );
    let (_, err) = ok(&[
        "adapter",
        "convert",
        lora.to_str().unwrap(),
        "--density",
        "0.25",
        "-o",
        out.to_str().unwrap(),
    ]);
    let e: f64 = err
        .split("relative Frobenius error ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(0.0 < e && e < 1.0, "{err}");
    let (text, _) = ok(&["adapter", "inspect", lora.to_str().unwrap()]);
    assert!(
        text.contains("PEFT LoRA") && text.contains("rank 8, scale 2"),
        "{text}"
    );
}

#[test]
fn synth_and_bench_switch() {
    let s = tmp("synth.sdelta.safetensors");
    let l = tmp("synth-lora.gguf");
    let q8 = tiny("q8_0");
    ok(&[
        "adapter",
        "synth",
        "-m",
        &q8,
        "--kind",
        "shira",
        "--density",
        "0.05",
        "-o",
        s.to_str().unwrap(),
    ]);
    ok(&[
        "adapter",
        "synth",
        "-m",
        &q8,
        "--kind",
        "lora",
        "--rank",
        "4",
        "-o",
        l.to_str().unwrap(),
    ]);
    fails(
        &[
            "adapter",
            "synth",
            "-m",
            &q8,
            "--kind",
            "lora",
            "--density",
            "0.1",
            "-o",
            l.to_str().unwrap(),
        ],
        "--rank",
    );
    fails(
        &[
            "adapter",
            "synth",
            "-m",
            &q8,
            "--kind",
            "lora",
            "--rank",
            "4",
            "-o",
            tmp("x.bin").to_str().unwrap(),
        ],
        ".gguf",
    );
    let (out, _) = ok(&[
        "bench-switch",
        "-m",
        &q8,
        "--adapters",
        s.to_str().unwrap(),
        l.to_str().unwrap(),
        "-r",
        "2",
        "-n",
        "2",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let rows = v["adapters"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["kind"], "sparse");
    assert_eq!(rows[1]["kind"], "lora");
    for r in rows {
        for k in [
            "apply_ms",
            "first_apply_ms",
            "unapply_ms",
            "switch_ms",
            "first_switch_ms",
            "edit_switch_ms",
            "decode_tokens_per_s",
        ] {
            assert!(r[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {r}");
        }
        assert!(r["rss_added_bytes"].as_u64().is_some(), "{r}");
        assert!(r["compiled_bytes"].as_u64().is_some_and(|b| b > 0), "{r}");
        assert!(r["path"].as_str().is_some());
    }
    assert!(rows[1]["unfused_decode_tokens_per_s"].as_f64().is_some());
    assert!(rows[1]["fuse_ms"].as_f64().is_some());
}

#[test]
fn adapter_errors_are_one_line() {
    let m = tiny("q8_0");
    fails(
        &[
            "run",
            "-m",
            &m,
            "-p",
            "x",
            "--adapter",
            "/nonexistent/adapter",
        ],
        "/nonexistent/adapter",
    );
    fails(
        &[
            "run",
            "-m",
            &m,
            "-p",
            "x",
            "--adapter",
            adapters().join("lora_dora").to_str().unwrap(),
        ],
        "DoRA",
    );
    fails(
        &["run", "-m", &m, "-p", "x", "--unfused"],
        "need at least one --adapter",
    );
    fails(
        &[
            "run",
            "-m",
            &m,
            "-p",
            "x",
            "--adapter",
            adapters().join("shira").to_str().unwrap(),
            "--unfused",
            "--adapter",
            &tiny("f16"),
        ],
        "a model, not an adapter",
    );
    fails(&["adapter", "inspect", &m], "a model, not an adapter");
}
