//! `sparrow::perplexity` against llama.cpp's perplexity tool (llama-perplexity, same text,
//! window and chunk count; fixture made by tests/gen/llama_cpp_perplexity.py), and its
//! refusals.

use sparrow::model::{Model, ModelOptions};
use sparrow::perplexity::{perplexity, Options};
use sparrow::tokenizer::Tokenizer;
use sparrow_tests::{fixtures, model_from_env};

fn open(path: &std::path::Path) -> (Model, Tokenizer) {
    let m = Model::open(
        path,
        &ModelOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let tok = Tokenizer::from_metadata(m.file().metadata()).unwrap();
    (m, tok)
}

fn text() -> String {
    std::fs::read_to_string(fixtures().join("perplexity/kjv-genesis.txt")).unwrap()
}

/// The running estimate after each window, and the final figure, within 1% of llama.cpp's
/// (the tolerance; the logits of the two differ only by batch-kernel rounding).
#[test]
fn smollm2_q4_1_matches_llama_cpp_perplexity() {
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures().join("perplexity/llama_cpp.SmolLM2-135M-Instruct.Q4_1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let want: Vec<f64> = rec["running"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let (mut m, tok) = open(&model_from_env("SPARROW_SMOLLM2_Q4_1"));
    let mut got = Vec::new();
    let r = perplexity(
        &mut m,
        &tok,
        &text(),
        &Options {
            n_ctx: rec["ctx"].as_u64().unwrap() as usize,
            max_chunks: Some(want.len()),
        },
        |_, _, ppl| got.push(ppl),
    )
    .unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let rel = (g / w - 1.0).abs();
        assert!(rel < 0.01, "window {}: {g:.4} vs llama.cpp {w:.4}", i + 1);
    }
    let w = rec["ppl"].as_f64().unwrap();
    assert!((r.ppl / w - 1.0).abs() < 0.01, "{} vs llama.cpp {w}", r.ppl);
    let ws = rec["ppl_stderr"].as_f64().unwrap();
    assert!(
        (r.ppl_stderr / ws - 1.0).abs() < 0.05,
        "+/- {} vs {ws}",
        r.ppl_stderr
    );
    assert_eq!(r.scored, want.len() * 255);
}

#[test]
fn too_short_texts_and_bad_windows_are_refused() {
    let (mut m, tok) = open(&fixtures().join("tiny/tiny-llama.f32.gguf"));
    let o = |n_ctx, max_chunks| Options { n_ctx, max_chunks };
    let e = perplexity(&mut m, &tok, "The little bird.", &o(64, None), |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs at least 128"), "{e}");
    let e = perplexity(&mut m, &tok, &text(), &o(2, None), |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("too small"), "{e}");
    let e = perplexity(&mut m, &tok, &text(), &o(64, Some(0)), |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("no window"), "{e}");
}
