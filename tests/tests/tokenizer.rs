//! sparrow's tokenizer against llama.cpp, and its chat templates against jinja2.
//!
//! Fixtures: tests/fixtures/tokenizer/{smollm2,gemma3}.json hold llama.cpp's ids (three
//! (add_special, parse_special) settings), detokenizations and vocabulary facts for ~300
//! strings; chat_templates.json holds jinja2 renders (as transformers renders them). All from
//! tests/gen/tokenizer_fixtures.py with llama-cpp-python 0.3.36.
//!
//! Models: SPARROW_SMOLLM2_Q4_1 and SPARROW_GEMMA3 (`eval "$(bash tests/fetch_models.sh)"`).
//! Tolerance: exact everywhere; token ids, bytes and text are discrete.

use serde_json::Value;
use sha2::{Digest, Sha256};
use sparrow::gguf::GgufFile;
use sparrow::tokenizer::{ChatTemplate, Message, Tokenizer};
use sparrow_tests::{fixtures, model_from_env};
use std::fmt::Write as _;

fn load(name: &str) -> Value {
    let p = fixtures().join("tokenizer").join(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn opt_id(v: &Value) -> Option<u32> {
    v.as_u64().map(|x| x as u32)
}

/// A fixture's bytes: a JSON string (UTF-8) or {"hex": "..."}.
fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Object(o) => {
            let h = o["hex"].as_str().expect("hex");
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                .collect()
        }
        v => panic!("not bytes: {v}"),
    }
}

fn sha256_file(path: &std::path::Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// Opens the model the fixture was made from and checks it is the same file.
fn open(fx: &Value) -> (Tokenizer, GgufFile) {
    let var = fx["model_env"].as_str().unwrap();
    let path = model_from_env(var);
    let want = fx["model_sha256"].as_str().unwrap();
    let got = sha256_file(&path);
    assert_eq!(
        got,
        want,
        "{var}={} is not the file the fixtures were made from ({}); run tests/fetch_models.sh",
        path.display(),
        fx["model_file"]
    );
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_metadata(f.metadata()).unwrap();
    (tok, f)
}

/// Checks the vocabulary facts; returns failures.
fn check_vocab(tok: &Tokenizer, v: &Value, fails: &mut Vec<String>) {
    let mut expect = |what: &str, ok: bool, detail: String| {
        if !ok {
            fails.push(format!("vocab {what}: {detail}"));
        }
    };
    let n = v["n_tokens"].as_u64().unwrap() as usize;
    expect(
        "n_tokens",
        tok.vocab_size() == n,
        format!("{} != {n}", tok.vocab_size()),
    );
    for (what, got, want) in [
        ("bos", tok.bos(), opt_id(&v["bos"])),
        ("eos", tok.eos(), opt_id(&v["eos"])),
        ("eot", tok.eot(), opt_id(&v["eot"])),
    ] {
        expect(
            what,
            got == want,
            format!("{got:?} != llama.cpp's {want:?}"),
        );
    }
    expect(
        "add_bos",
        tok.add_bos() == v["add_bos"].as_bool().unwrap(),
        format!("{}", tok.add_bos()),
    );
    expect(
        "add_eos",
        tok.add_eos() == v["add_eos"].as_bool().unwrap(),
        format!("{}", tok.add_eos()),
    );
    let eog = ids(&v["eog"]);
    expect(
        "eog",
        tok.eog_tokens() == eog.as_slice(),
        format!("{:?} != llama.cpp's {eog:?}", tok.eog_tokens()),
    );
    for id in 0..n as u32 {
        if tok.is_eog(id) != eog.contains(&id) {
            expect("is_eog", false, format!("id {id}"));
            break;
        }
    }

    // attributes: every id, through a digest; the listed runs say where a difference is
    let mut h = Sha256::new();
    for id in 0..n as u32 {
        h.update(tok.token_attr(id).unwrap().0.to_le_bytes());
    }
    let got = format!("{:x}", h.finalize());
    if got != v["attrs_sha256"].as_str().unwrap() {
        let mut first = String::new();
        for run in v["not_normal_attrs"].as_array().unwrap() {
            let (a, b, attr) = (
                run[0].as_u64().unwrap(),
                run[1].as_u64().unwrap(),
                run[2].as_u64().unwrap(),
            );
            for id in a..b {
                let mine = tok.token_attr(id as u32).unwrap().0 as u64;
                if mine != attr && first.is_empty() {
                    first = format!(
                        "id {id} ({:?}): {mine} != llama.cpp's {attr}",
                        tok.token_text(id as u32)
                    );
                }
            }
        }
        expect(
            "attributes",
            false,
            format!("digest differs; first listed difference: {first}"),
        );
    }

    // pieces of every id, special false and true, through digests; then the samples
    for (special, key) in [(false, "pieces_sha256"), (true, "pieces_special_sha256")] {
        let mut h = Sha256::new();
        for id in 0..n as u32 {
            let p = tok.token_to_piece(id, special).unwrap();
            h.update((p.len() as u32).to_le_bytes());
            h.update(p);
        }
        let got = format!("{:x}", h.finalize());
        expect(
            key,
            got == v[key].as_str().unwrap(),
            "digest differs (see piece samples)".into(),
        );
    }
    for s in v["piece_samples"].as_array().unwrap() {
        let id = s[0].as_u64().unwrap() as u32;
        for (special, want) in [(false, &s[1]), (true, &s[2])] {
            let got = tok.token_to_piece(id, special).unwrap();
            let want = bytes(want);
            expect(
                "piece",
                got == want.as_slice(),
                format!("id {id} special={special}: {got:?} != {want:?}"),
            );
        }
    }
}

struct Report {
    cases: usize,
    ids_ok: usize,
    detok_ok: usize,
    roundtrip: usize,
    roundtrip_llama_fails: usize,
    fails: Vec<String>,
}

fn check_cases(tok: &Tokenizer, cases: &[Value]) -> Report {
    let mut r = Report {
        cases: cases.len(),
        ids_ok: 0,
        detok_ok: 0,
        roundtrip: 0,
        roundtrip_llama_fails: 0,
        fails: Vec::new(),
    };
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let mut ok = true;
        for (key, add, parse) in [
            ("ids", false, false),
            ("ids_add_special", true, false),
            ("ids_parse_special", false, true),
        ] {
            let want = ids(&c[key]);
            match tok.encode(text, add, parse) {
                Ok(got) if got == want => {}
                Ok(got) => {
                    ok = false;
                    r.fails.push(format!(
                        "{text:?} {key}: sparrow {got:?}\n    llama.cpp {want:?}"
                    ));
                }
                Err(e) => {
                    ok = false;
                    r.fails.push(format!("{text:?} {key}: error {e}"));
                }
            }
        }
        r.ids_ok += ok as usize;

        // detokenization of llama.cpp's ids (so that an encode difference does not hide it)
        let plain = ids(&c["ids"]);
        let special = ids(&c["ids_parse_special"]);
        let d1 = tok.detokenize(&plain, false, false).unwrap();
        let d2 = tok.detokenize(&special, false, true).unwrap();
        let (w1, w2) = (bytes(&c["detok"]), bytes(&c["detok_parse_special_unparse"]));
        if d1 == w1 && d2 == w2 {
            r.detok_ok += 1;
        } else {
            r.fails.push(format!(
                "{text:?} detokenize: sparrow {:?} / {:?}\n    llama.cpp {:?} / {:?}",
                String::from_utf8_lossy(&d1),
                String::from_utf8_lossy(&d2),
                String::from_utf8_lossy(&w1),
                String::from_utf8_lossy(&w2)
            ));
        }

        // decode(encode(s)) == s, wherever llama.cpp round-trips too
        let back = tok
            .decode(&tok.encode(text, false, false).unwrap())
            .unwrap();
        if w1 == text.as_bytes() {
            if back == text {
                r.roundtrip += 1;
            } else {
                r.fails.push(format!("{text:?} round trip gave {back:?}"));
            }
        } else {
            r.roundtrip_llama_fails += 1;
        }

        // streaming gives the same text as decode
        let mut st = tok.stream();
        let mut streamed = String::new();
        for &id in &plain {
            streamed.push_str(&st.push(id).unwrap());
        }
        streamed.push_str(&st.finish());
        let decoded = tok.decode(&plain).unwrap();
        if streamed != decoded {
            r.fails.push(format!(
                "{text:?} stream {streamed:?} != decode {decoded:?}"
            ));
        }
    }
    r
}

fn run_vocab(fixture: &str) {
    let fx = load(fixture);
    let (tok, _f) = open(&fx);
    let mut vocab_fails = Vec::new();
    check_vocab(&tok, &fx["vocab"], &mut vocab_fails);
    let r = check_cases(&tok, fx["cases"].as_array().unwrap());
    eprintln!(
        "{fixture}: {} strings; ids equal llama.cpp's for {} (x3 settings), detokenization for {}, \
         decode(encode(s)) == s for {} ({} where llama.cpp does not round-trip either)",
        r.cases, r.ids_ok, r.detok_ok, r.roundtrip, r.roundtrip_llama_fails
    );
    let all: Vec<String> = vocab_fails.into_iter().chain(r.fails).collect();
    if !all.is_empty() {
        let mut msg = format!("{fixture}: {} differences from llama.cpp:\n", all.len());
        for f in all.iter().take(40) {
            let _ = writeln!(msg, "  {f}");
        }
        panic!("{msg}");
    }
}

#[test]
fn smollm2_bpe_matches_llama_cpp() {
    run_vocab("smollm2.json");
}

#[test]
fn gemma3_spm_matches_llama_cpp() {
    run_vocab("gemma3.json");
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

#[test]
fn chat_templates_render_as_jinja2() {
    let fx = load("chat_templates.json");
    let mut fails = Vec::new();
    let mut n = 0;
    for t in fx["templates"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let tpl = ChatTemplate::new(
            t["template"].as_str().unwrap(),
            t["bos_token"].as_str().unwrap(),
            t["eos_token"].as_str().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for r in t["renders"].as_array().unwrap() {
            let msgs = messages(&r["messages"]);
            let agp = r["add_generation_prompt"].as_bool().unwrap();
            n += 1;
            match (
                tpl.render(&msgs, agp),
                r.get("text").and_then(Value::as_str),
            ) {
                (Ok(got), Some(want)) if got == want => {}
                (got, want) => fails.push(format!(
                    "{name} agp={agp} {msgs:?}:\n  sparrow {got:?}\n  jinja2  {want:?}"
                )),
            }
        }
    }
    for e in fx["errors"].as_array().unwrap() {
        let t = fx["templates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == e["template"])
            .unwrap();
        let tpl = ChatTemplate::new(t["template"].as_str().unwrap(), "<bos>", "<eos>").unwrap();
        match tpl.render(&messages(&e["messages"]), true) {
            Err(sparrow::Error::Template(msg)) if msg.contains(e["message"].as_str().unwrap()) => {}
            other => fails.push(format!(
                "raise_exception: expected {:?}, got {other:?}",
                e["message"]
            )),
        }
    }
    assert!(
        fails.is_empty(),
        "{} of {n} renders differ from jinja2:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

#[test]
fn smollm2_chat_template_from_gguf() {
    let fx = load("chat_templates.json");
    let want = fx["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "smollm2")
        .unwrap();
    let f = GgufFile::open(model_from_env("SPARROW_SMOLLM2_Q4_1")).unwrap();
    let tpl = ChatTemplate::from_metadata(f.metadata()).unwrap();
    assert_eq!(tpl.source(), want["template"].as_str().unwrap());
    assert_eq!(tpl.bos_token(), "<|im_start|>");
    assert_eq!(tpl.eos_token(), "<|im_end|>");
    let r = &want["renders"][1];
    assert_eq!(
        tpl.render(&messages(&r["messages"]), true).unwrap(),
        r["text"].as_str().unwrap()
    );

    // the rendered prompt tokenizes with its control tokens parsed
    let tok = Tokenizer::from_metadata(f.metadata()).unwrap();
    let ids = tok.encode(r["text"].as_str().unwrap(), true, true).unwrap();
    assert_eq!(ids[0], tok.token_id("<|im_start|>").unwrap());
    assert!(ids.contains(&tok.token_id("<|im_end|>").unwrap()));
}

#[test]
fn gemma3_has_no_chat_template_in_its_gguf() {
    let f = GgufFile::open(model_from_env("SPARROW_GEMMA3")).unwrap();
    let e = ChatTemplate::from_metadata(f.metadata()).unwrap_err();
    assert!(e.to_string().contains("tokenizer.chat_template"), "{e}");
}

/// The other byte-level pre-tokenizers (llama3, qwen2, default, gpt-2) over SmolLM2's
/// vocabulary: the fixture's ids are llama.cpp's with `tokenizer.ggml.pre` replaced in the
/// file; here the same key is replaced in the metadata.
#[test]
fn other_bpe_pre_tokenizers_match_llama_cpp() {
    let fx = load("smollm2_pre.json");
    let (_, f) = open(&fx);
    let strings: Vec<&str> = fx["strings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let mut fails = Vec::new();
    for (pre, cases) in fx["ids"].as_object().unwrap() {
        let mut md = f.metadata().clone();
        md.insert(
            "tokenizer.ggml.pre".into(),
            sparrow::gguf::Value::String(pre.clone()),
        );
        let tok = Tokenizer::from_metadata(&md).unwrap_or_else(|e| panic!("pre {pre}: {e}"));
        let mut same = 0;
        for (text, want) in strings.iter().zip(cases.as_array().unwrap()) {
            let want = ids(want);
            let got = tok.encode(text, false, false).unwrap();
            if got == want {
                same += 1;
            } else {
                fails.push(format!(
                    "pre {pre}: {text:?}\n    sparrow   {got:?}\n    llama.cpp {want:?}"
                ));
            }
        }
        eprintln!(
            "pre {pre}: {same} of {} strings give llama.cpp's ids",
            strings.len()
        );
    }
    assert!(
        fails.is_empty(),
        "{} differences:\n{}",
        fails.len(),
        fails
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
