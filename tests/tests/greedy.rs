//! Greedy decoding of SmolLM2-135M-Instruct against llama.cpp, token for token.
//!
//! Fixtures: tests/fixtures/greedy/*.json, made by tests/gen/llama_cpp_greedy.py with
//! llama-cpp-python 0.3.36 (flash attention off). For each prompt llama.cpp's prompt ids, its
//! 64 greedy tokens, the gap between its top-2 logits at every step, and its logits at the last
//! prompt position. Tokens are compared up to the first step where llama.cpp's own top-2
//! logits lie within 0.05 of each other: past that point a different but equally valid
//! summation order may pick the other token, and everything after diverges.
//!
//! The Q8_0, Q4_0 and Q4_K_M models are made from the Q4_1 file by `sparrow quantize` (here,
//! through the same library call); the fixture records the sha256 of the file llama.cpp ran,
//! and the test checks that its own conversion is that very file.

use sparrow::convert::{quantize_file, FileType};
use sparrow::gguf::GgufFile;
use sparrow::model::{Logits, Model, ModelOptions};
use sparrow::sample::argmax;
use sparrow_tests::{fixtures, model_from_env, read_f32};
use std::path::{Path, PathBuf};

/// Last-position logits: max |sparrow - llama.cpp| over the whole vocabulary.
///
/// Both runtimes quantize activations to the same block formats and round the KV cache and
/// attention weights to f16 in the same places; what differs is summation order (ggml's
/// AVX2/AVX-512 kernels sum 8 or 16 lanes and reduce, ours sums differently) and the f32
/// rounding of each partial sum. Over 30 layers those differences reach a few hundredths on
/// logits of magnitude ~10-30: 0.1 leaves room for that while an error in any op (a wrong
/// scale, an off-by-one position, a wrong RoPE pairing) moves logits by whole units.
const LOGIT_TOLERANCE: f32 = 0.1;

#[derive(serde::Deserialize)]
struct Fixture {
    model_sha256: String,
    prompts: Vec<Prompt>,
}

#[derive(serde::Deserialize)]
struct Prompt {
    name: String,
    prompt_tokens: Vec<u32>,
    tokens: Vec<u32>,
    first_close_step: Option<usize>,
    last_logits_file: String,
}

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let b = std::fs::read(p).unwrap();
    sha2::Sha256::digest(&b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check(model: &Path, fixture_name: &str) {
    let dir = fixtures().join("greedy");
    let fx: Fixture = serde_json::from_slice(
        &std::fs::read(dir.join(format!("{fixture_name}.json"))).expect("greedy fixture"),
    )
    .unwrap();
    assert_eq!(
        sha256_file(model),
        fx.model_sha256,
        "{} is not the file the fixture was made from",
        model.display()
    );
    let mut m = Model::open(
        model,
        &ModelOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut compared = 0;
    let mut worst = 0.0f32;
    let mut failures = Vec::new();
    for p in &fx.prompts {
        let mut s = m
            .new_session(p.prompt_tokens.len() + p.tokens.len() + 1)
            .unwrap();
        let mut logits = m.eval(&mut s, &p.prompt_tokens, Logits::Last).unwrap();

        let want = read_f32(&dir.join(&p.last_logits_file));
        assert_eq!(want.len(), logits.len());
        let diff = logits
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        worst = worst.max(diff);
        eprintln!("{}: last logits diff {diff}", p.name);
        assert!(
            diff <= LOGIT_TOLERANCE,
            "{}: last-position logits differ by {diff} (> {LOGIT_TOLERANCE})",
            p.name
        );

        let n = p
            .first_close_step
            .unwrap_or(p.tokens.len())
            .min(p.tokens.len());
        for (step, &want_tok) in p.tokens.iter().enumerate().take(n) {
            let cand: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            let tok = argmax(&cand);
            if tok != want_tok {
                failures.push(format!(
                    "{}: step {step} of {n}: sparrow chose {tok}, llama.cpp {want_tok}",
                    p.name
                ));
                break;
            }
            compared += 1;
            logits = m.eval(&mut s, &[tok], Logits::Last).unwrap();
        }
    }
    assert!(
        failures.is_empty(),
        "{fixture_name}: {} of {} prompts diverge: {failures:#?}",
        failures.len(),
        fx.prompts.len()
    );
    eprintln!("{fixture_name}: {compared} tokens identical over {} prompts; worst last-logit diff {worst}", fx.prompts.len());
    assert!(compared > 0);
}

fn q4_1() -> PathBuf {
    model_from_env("SPARROW_SMOLLM2_Q4_1")
}

/// The Q4_1 model converted by sparrow into `ftype`, cached next to the test binary.
fn converted(ftype: FileType) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = dir.join(format!("SmolLM2-135M-Instruct.{}.gguf", ftype.name()));
    if !out.is_file() {
        let src = GgufFile::open(q4_1()).unwrap();
        quantize_file(&src, &out, ftype, false, |_, _, _| {}).unwrap();
    }
    out
}

#[test]
fn smollm2_q4_1_matches_llama_cpp() {
    check(&q4_1(), "smollm2-q4_1");
}

#[test]
fn smollm2_q8_0_matches_llama_cpp() {
    check(&converted(FileType::Q8_0), "smollm2-q8_0");
}

#[test]
fn smollm2_q4_0_matches_llama_cpp() {
    check(&converted(FileType::Q4_0), "smollm2-q4_0");
}

#[test]
fn smollm2_q4_k_m_matches_llama_cpp() {
    check(&converted(FileType::Q4_K_M), "smollm2-q4_k_m");
}
