//! The `sparrow` binary's interfaces, end to end, against llama.cpp's outputs recorded in
//! tests/fixtures/greedy (same model file, same prompts).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> PathBuf {
    let var = "SPARROW_SMOLLM2_Q4_1";
    let p = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set; run `eval \"$(bash tests/fetch_models.sh)\"`")
    });
    let p = PathBuf::from(p);
    assert!(p.is_file(), "{var}={} does not exist", p.display());
    p
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn sparrow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sparrow"))
        .args(args)
        .output()
        .expect("run sparrow")
}

fn ok(args: &[&str]) -> String {
    let o = sparrow(args);
    assert!(
        o.status.success(),
        "sparrow {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn greedy_fixture() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("greedy/smollm2-q4_1.json")).unwrap())
        .unwrap()
}

#[test]
fn run_json_matches_llama_cpp_greedy_tokens() {
    let fx = greedy_fixture();
    let m = model();
    // The whitespace prompt has no close call in 64 steps: all 64 tokens must agree.
    let p = fx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "whitespace_newlines")
        .unwrap();
    let out = ok(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        p["prompt"].as_str().unwrap(),
        "-n",
        "64",
        "--temp",
        "0",
        "--ignore-eos",
        "--threads",
        "2",
        "--json",
    ]);
    let j: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(
        j["prompt_tokens"], p["prompt_tokens"],
        "prompt tokenization"
    );
    assert_eq!(j["tokens"], p["tokens"], "generated tokens");
    for k in ["text", "prompt_tokens_per_s", "decode_tokens_per_s"] {
        assert!(!j[k].is_null(), "missing {k}");
    }
    assert!(j["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(
        j["text"].as_str().unwrap(),
        p["text"].as_str().unwrap(),
        "detokenized text"
    );
}

#[test]
fn run_streams_text_and_stops_at_end_of_generation() {
    // llama.cpp's greedy answer to the chat prompt ends with <|im_end|> at step 36.
    let fx = greedy_fixture();
    let p = &fx["prompts"][0];
    let eos = p["first_eos_step"]
        .as_u64()
        .expect("the fixture's chat answer ends") as usize;
    let m = model();
    let prompt = p["prompt"].as_str().unwrap();
    let out = ok(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        prompt,
        "-n",
        "200",
        "--temp",
        "0",
        "--json",
    ]);
    let j: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        j["stop_reason"], "eog",
        "the instruct model ends its answer"
    );
    assert_eq!(
        j["tokens"].as_array().unwrap()[..],
        p["tokens"].as_array().unwrap()[..=eos],
        "tokens up to and with the end token"
    );
    assert!(!j["text"].as_str().unwrap().contains("<|im_end|>"));
    let streamed = ok(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        prompt,
        "-n",
        "200",
        "--temp",
        "0",
    ]);
    assert_eq!(
        streamed.trim_end(),
        j["text"].as_str().unwrap().trim_end(),
        "streamed text equals the final text"
    );
}

#[test]
fn stop_strings_cut_the_text() {
    let m = model();
    let out = ok(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "1, 2, 3, 4,",
        "-n",
        "40",
        "--temp",
        "0",
        "--stop",
        "8",
        "--json",
    ]);
    let j: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["stop_reason"], "stop_string");
    assert!(!j["text"].as_str().unwrap().contains('8'), "{}", j["text"]);
}

#[test]
fn sampling_is_seeded() {
    let m = model();
    let run = |seed: &str| {
        ok(&[
            "run",
            "-m",
            m.to_str().unwrap(),
            "-p",
            "Once upon a time",
            "-n",
            "16",
            "--temp",
            "1.0",
            "--seed",
            seed,
            "--json",
        ])
    };
    let tokens = |s: String| serde_json::from_str::<Value>(s.trim()).unwrap()["tokens"].clone();
    assert_eq!(tokens(run("7")), tokens(run("7")));
}

#[test]
fn tokenize_matches_llama_cpp() {
    let fx = greedy_fixture();
    let m = model();
    for p in fx["prompts"].as_array().unwrap() {
        let out = ok(&[
            "tokenize",
            "-m",
            m.to_str().unwrap(),
            "--special",
            p["prompt"].as_str().unwrap(),
        ]);
        let ids: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(ids, p["prompt_tokens"], "{}", p["name"]);
    }
}

#[test]
fn logits_file_equals_llama_cpp_last_position() {
    let fx = greedy_fixture();
    let m = model();
    let p = &fx["prompts"][1];
    let ids: Vec<String> = p["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let dir = std::env::temp_dir().join(format!("sparrow-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("logits.f32");
    ok(&[
        "logits",
        "-m",
        m.to_str().unwrap(),
        "--tokens",
        &ids.join(","),
        "-o",
        out.to_str().unwrap(),
    ]);
    let got = std::fs::read(&out).unwrap();
    let n_vocab = 49152;
    assert_eq!(got.len(), ids.len() * n_vocab * 4, "[n_tokens, vocab] f32");
    let want = std::fs::read(
        fixtures()
            .join("greedy")
            .join(p["last_logits_file"].as_str().unwrap()),
    )
    .unwrap();
    assert!(
        got[(ids.len() - 1) * n_vocab * 4..] == want[..],
        "last row differs from llama.cpp's logits"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inspect_reads_the_header() {
    let out = ok(&["inspect", model().to_str().unwrap()]);
    assert!(out.contains("tensors (272):"), "{out}");
    assert!(out.contains("Q4_1     210 tensors"), "{out}");
    assert!(out.contains("tokenizer.ggml.model"), "{out}");
}

#[test]
fn bad_input_gives_one_clear_line_and_status_1() {
    let dir = std::env::temp_dir().join(format!("sparrow-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (dir.join("missing.gguf"), "missing.gguf"),
        (
            {
                let p = dir.join("text.gguf");
                std::fs::write(&p, b"this is not a model at all, just text").unwrap();
                p
            },
            "bad magic",
        ),
        (
            {
                let p = dir.join("truncated.gguf");
                let b = std::fs::read(model()).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
                p
            },
            "past the end of the file",
        ),
    ];
    for (path, needle) in cases {
        for args in [
            vec!["inspect", path.to_str().unwrap()],
            vec!["run", "-m", path.to_str().unwrap(), "-p", "x"],
        ] {
            let o = sparrow(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}");
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.starts_with("error: ") && err.contains(needle),
                "{args:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    let o = sparrow(&[
        "quantize",
        "-m",
        model().to_str().unwrap(),
        "-o",
        dir.join("x.gguf").to_str().unwrap(),
        "--type",
        "Q3_Z",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown type `Q3_Z`"));
    let o = sparrow(&[
        "logits",
        "-m",
        model().to_str().unwrap(),
        "--tokens",
        "1,99999999",
        "-o",
        dir.join("l.f32").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("outside the vocabulary"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn quantize_writes_what_llama_cpp_ran() {
    // The Q8_0 fixture records the sha256 of the file llama.cpp decoded; sparrow's quantize
    // of the same source must produce that very file.
    let fx: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("greedy/smollm2-q8_0.json")).unwrap(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("sparrow-cli-q-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("q8.gguf");
    ok(&[
        "quantize",
        "-m",
        model().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(std::fs::read(&out).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hex, fx["model_sha256"].as_str().unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn chat_answers_each_turn_through_the_template() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_sparrow"))
        .args([
            "chat",
            "-m",
            model().to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "48",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first question is the fixture's chat prompt, whose greedy answer (llama.cpp's too)
    // starts "The capital of France is Paris".
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France, and why is it famous?\nThank you!\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    let answers: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(answers.len() >= 2, "two turns, two answers: {out:?}");
    assert!(out.starts_with("The capital of France is Paris"), "{out}");
    assert!(
        !out.contains("<|im_end|>") && !out.contains("<|im_start|>"),
        "special tokens are not printed: {out}"
    );
}

fn bench_json(extra: &[&str]) -> Value {
    let m = model();
    let mut args = vec!["bench", "-m", m.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = ok(&args);
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    serde_json::from_str(out.trim()).expect("one JSON object")
}

#[test]
fn bench_json_reports_rates_and_roofline() {
    let j = bench_json(&[
        "--threads",
        "1",
        "--prompt-tokens",
        "6",
        "--gen-tokens",
        "3",
        "--reps",
        "2",
    ]);
    for k in [
        "prompt_tokens_per_s",
        "decode_tokens_per_s",
        "roofline_fraction",
        "bandwidth_bytes_per_s",
        "decode_weight_bytes",
    ] {
        let x = j[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {j}"));
        assert!(x.is_finite() && x > 0.0, "{k} = {x}");
    }
    assert_eq!(j["threads"], 1);
    assert_eq!(j["prompt_tokens"], 6);
    assert_eq!(j["gen_tokens"], 3);
    assert_eq!(j["reps"], 2);
    assert!(j["model"].as_str().unwrap().ends_with(".gguf"), "{j}");
    assert!(!j["kernels"].as_str().unwrap().is_empty(), "{j}");
    // A decode step reads nearly every byte of the file's tensors (the tied embedding table
    // once, as the output matrix): about the file's size.
    let file_bytes = std::fs::metadata(model()).unwrap().len() as f64;
    let w = j["decode_weight_bytes"].as_f64().unwrap();
    assert!(
        w > 0.5 * file_bytes && w < 1.5 * file_bytes,
        "{w} vs {file_bytes}"
    );
    let runs = j["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "one entry per rep");
    for r in runs {
        for k in ["prompt_tokens_per_s", "decode_tokens_per_s"] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
    }
}

#[test]
fn bench_bad_arguments_fail_with_one_line() {
    let m = model();
    let m = m.to_str().unwrap();
    let missing = std::env::temp_dir().join("sparrow-bench-missing.gguf");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-m", m, "--prompt-tokens", "0"], "--prompt-tokens"),
        (vec!["-m", m, "--gen-tokens", "0"], "--gen-tokens"),
        (vec!["-m", m, "--reps", "0"], "--reps"),
        (
            vec!["-m", m, "--prompt-tokens", "9000", "--gen-tokens", "9000"],
            "exceed the model's context",
        ),
        (
            vec!["-m", missing.to_str().unwrap()],
            "sparrow-bench-missing.gguf",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["bench", "--json"];
        args.extend(extra);
        let o = sparrow(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing on stdout");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with("error: ")
                && err.contains(needle)
                && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}
