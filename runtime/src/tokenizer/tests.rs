//! Unit tests on hand-built metadata: error paths (missing, ill-typed or unsupported keys)
//! and small vocabularies whose ids can be worked out by hand. The comparison with llama.cpp
//! on real vocabularies is tests/tests/tokenizer.rs.

use super::*;
use crate::gguf::{Metadata, Value, ValueType};

fn strings(v: &[&str]) -> Value {
    Value::Array(
        ValueType::String,
        v.iter().map(|s| Value::String(s.to_string())).collect(),
    )
}

fn floats(v: &[f32]) -> Value {
    Value::Array(ValueType::F32, v.iter().map(|&x| Value::F32(x)).collect())
}

fn ints(v: &[i32]) -> Value {
    Value::Array(ValueType::I32, v.iter().map(|&x| Value::I32(x)).collect())
}

fn md(entries: Vec<(&str, Value)>) -> Metadata {
    let mut m = Metadata::default();
    for (k, v) in entries {
        m.insert(k.to_string(), v);
    }
    m
}

/// A SentencePiece vocabulary: control tokens, pieces with scores, a few byte tokens.
fn spm_md() -> Metadata {
    let tokens = [
        "<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab", "<0x63>", "<0xE4>", "<0xB8>",
        "<0xAD>", "<ctl>", "<ud>", "bb",
    ];
    let scores = [
        0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -3.0, -1.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.5,
    ];
    let types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 6, 6, 6, 6, 3, 4, 1];
    md(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.scores", floats(&scores)),
        ("tokenizer.ggml.token_type", ints(&types)),
    ])
}

/// A byte-level BPE vocabulary with the gpt-2 pre-tokenizer.
fn bpe_md() -> Metadata {
    let tokens = [
        "<|endoftext|>",
        "a",
        "b",
        "Ġ",
        "ab",
        "Ġa",
        "Ġab",
        "<|im_end|>",
        "c",
        "Ċ",
    ];
    let types = [3, 1, 1, 1, 1, 1, 1, 3, 1, 1];
    md(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", ints(&types)),
        ("tokenizer.ggml.merges", strings(&["a b", "Ġ a", "Ġ ab"])),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ])
}

fn err_of(m: &Metadata) -> String {
    match Tokenizer::from_metadata(m) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn with(mut m: Metadata, key: &str, v: Value) -> Metadata {
    m.insert(key.to_string(), v);
    m
}

fn without(mut m: Metadata, key: &str) -> Metadata {
    m.remove(key);
    m
}

#[test]
fn missing_model_type() {
    let e = err_of(&without(spm_md(), "tokenizer.ggml.model"));
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn model_type_of_the_wrong_type() {
    let e = err_of(&with(spm_md(), "tokenizer.ggml.model", Value::U32(1)));
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("string"),
        "{e}"
    );
}

#[test]
fn unknown_and_unsupported_model_names() {
    let e = err_of(&with(
        spm_md(),
        "tokenizer.ggml.model",
        Value::String("wordpiece9".into()),
    ));
    assert!(e.contains("unknown tokenizer model `wordpiece9`"), "{e}");
    let e = err_of(&with(
        spm_md(),
        "tokenizer.ggml.model",
        Value::String("t5".into()),
    ));
    assert!(e.contains("`t5` is not supported"), "{e}");
    let e = err_of(&with(
        spm_md(),
        "tokenizer.ggml.model",
        Value::String("no_vocab".into()),
    ));
    assert!(e.contains("no vocabulary"), "{e}");
}

#[test]
fn missing_tokens_array() {
    let e = err_of(&without(spm_md(), "tokenizer.ggml.tokens"));
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn tokens_of_the_wrong_type() {
    let e = err_of(&with(
        spm_md(),
        "tokenizer.ggml.tokens",
        Value::String("a".into()),
    ));
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("array of strings"),
        "{e}"
    );
    let e = err_of(&with(spm_md(), "tokenizer.ggml.tokens", ints(&[1, 2])));
    assert!(e.contains("array of strings") && e.contains("I32"), "{e}");
    let e = err_of(&with(spm_md(), "tokenizer.ggml.tokens", strings(&[])));
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn duplicate_token_text() {
    let e = err_of(&with(
        bpe_md(),
        "tokenizer.ggml.tokens",
        strings(&["a", "b", "a"]),
    ));
    assert!(
        e.contains("occurs twice") && e.contains("ids 0 and 2"),
        "{e}"
    );
}

#[test]
fn scores_and_types_checked() {
    let e = err_of(&with(spm_md(), "tokenizer.ggml.scores", floats(&[0.0])));
    assert!(
        e.contains("tokenizer.ggml.scores") && e.contains("1 scores for 16 tokens"),
        "{e}"
    );
    let e = err_of(&with(
        spm_md(),
        "tokenizer.ggml.scores",
        strings(&["x"; 16]),
    ));
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");
    let e = err_of(&with(spm_md(), "tokenizer.ggml.token_type", ints(&[1])));
    assert!(
        e.contains("tokenizer.ggml.token_type") && e.contains("1 token types"),
        "{e}"
    );
    let e = err_of(&with(spm_md(), "tokenizer.ggml.token_type", Value::I32(1)));
    assert!(
        e.contains("tokenizer.ggml.token_type") && e.contains("array"),
        "{e}"
    );
}

#[test]
fn merges_missing_malformed_or_ill_typed() {
    let e = err_of(&without(bpe_md(), "tokenizer.ggml.merges"));
    assert!(
        e.contains("tokenizer.ggml.merges") && e.contains("missing"),
        "{e}"
    );
    let e = err_of(&with(
        bpe_md(),
        "tokenizer.ggml.merges",
        strings(&["a b", "ab"]),
    ));
    assert!(
        e.contains("tokenizer.ggml.merges") && e.contains("merge 1"),
        "{e}"
    );
    let e = err_of(&with(bpe_md(), "tokenizer.ggml.merges", ints(&[1])));
    assert!(
        e.contains("tokenizer.ggml.merges") && e.contains("array of strings"),
        "{e}"
    );
}

#[test]
fn unknown_pre_tokenizer() {
    let e = err_of(&with(
        bpe_md(),
        "tokenizer.ggml.pre",
        Value::String("mystery".into()),
    ));
    assert!(
        e.contains("tokenizer.ggml.pre") && e.contains("`mystery` is not supported"),
        "{e}"
    );
    let e = err_of(&with(bpe_md(), "tokenizer.ggml.pre", Value::U8(3)));
    assert!(e.contains("tokenizer.ggml.pre"), "{e}");
}

#[test]
fn flags_and_ids_of_the_wrong_type() {
    let e = err_of(&with(
        spm_md(),
        "tokenizer.ggml.add_bos_token",
        Value::String("yes".into()),
    ));
    assert!(e.contains("tokenizer.ggml.add_bos_token"), "{e}");
    let e = err_of(&with(
        spm_md(),
        "tokenizer.ggml.bos_token_id",
        Value::String("1".into()),
    ));
    assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");
    let e = err_of(&with(
        spm_md(),
        "tokenizer.ggml.add_space_prefix",
        Value::U32(1),
    ));
    assert!(e.contains("tokenizer.ggml.add_space_prefix"), "{e}");
}

#[test]
fn add_bos_without_a_bos_token() {
    // llama's default bos is id 1, outside a one-token vocabulary; add_bos defaults to true.
    // As in llama.cpp, that fails only when bos is to be added.
    let m = md(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&["a"])),
    ]);
    let t = Tokenizer::from_metadata(&m).unwrap();
    assert_eq!(t.bos(), None);
    let e = t.encode("a", true, false).unwrap_err().to_string();
    assert!(e.contains("no bos"), "{e}");
    // (without bos, "▁a" then fails on "▁", which has neither a piece nor byte tokens)
    let e = t.encode("a", false, false).unwrap_err().to_string();
    assert!(e.contains("<0xE2>"), "{e}");
    // an out-of-range id from the metadata keeps the default
    let t = Tokenizer::from_metadata(&with(
        spm_md(),
        "tokenizer.ggml.bos_token_id",
        Value::U32(999),
    ))
    .unwrap();
    assert_eq!(t.bos(), Some(1));
}

#[test]
fn spm_merges_by_score_with_byte_fallback() {
    let t = Tokenizer::from_metadata(&spm_md()).unwrap();
    assert_eq!(t.kind(), TokenizerKind::SentencePiece);
    assert_eq!(
        (t.bos(), t.eos(), t.add_bos(), t.add_eos()),
        (Some(1), Some(2), true, false)
    );
    // " ab" -> "▁ab": "▁a" (-3) and "ab" (-1.5) compete; "ab" wins, then "▁ab" (-0.5)
    assert_eq!(t.encode("ab", false, false).unwrap(), vec![8]);
    assert_eq!(t.encode("ab", true, false).unwrap(), vec![1, 8]);
    // "c" has no piece: byte fallback; "abb": "ab" and "bb" tie at -1.5, the left pair wins
    assert_eq!(t.encode("c", false, false).unwrap(), vec![3, 9]);
    assert_eq!(t.encode("abb", false, false).unwrap(), vec![8, 5]);
    // 中 = E4 B8 AD, all byte tokens
    assert_eq!(t.encode("中", false, false).unwrap(), vec![3, 10, 11, 12]);
    // a character with neither piece nor byte token
    let e = t.encode("z", false, false).unwrap_err().to_string();
    assert!(e.contains("<0x7A>"), "{e}");
    assert_eq!(t.decode(&[1, 8, 5]).unwrap(), " abb");
    assert_eq!(t.decode(&[8, 5]).unwrap(), "abb");
    assert_eq!(t.decode(&[8, 10, 11, 12]).unwrap(), "ab中");
    assert_eq!(t.decode(&[8, 10, 11]).unwrap(), "ab\u{FFFD}");
}

#[test]
fn spm_special_tokens_in_text() {
    let t = Tokenizer::from_metadata(&spm_md()).unwrap();
    // a user-defined token is always matched, a control token only with parse_special;
    // SentencePiece puts a space before text that follows a matched token
    assert_eq!(t.encode("<ud>ab", false, false).unwrap(), vec![14, 8]);
    assert_eq!(t.encode("<ctl>ab", false, true).unwrap(), vec![13, 8]);
    // as text, "<ctl>" has neither pieces nor byte tokens in this vocabulary
    assert!(t.encode("<ctl>ab", false, false).is_err());
    assert!(t.is_special(13) && !t.is_special(14) && !t.is_special(8));
    assert_eq!(t.token_to_piece(13, false).unwrap(), b"");
    assert_eq!(t.token_to_piece(13, true).unwrap(), b"<ctl>");
    assert_eq!(t.token_to_piece(14, false).unwrap(), b"<ud>");
    assert_eq!(t.detokenize(&[13, 8], false, true).unwrap(), b"<ctl> ab");
}

#[test]
fn detokenize_remove_special_as_llama_cpp() {
    let t = Tokenizer::from_metadata(&spm_md()).unwrap();
    // removing bos also keeps the leading space (llama_detokenize's remove_space = false)
    assert_eq!(t.detokenize(&[1, 8], true, false).unwrap(), b" ab");
    assert_eq!(t.detokenize(&[1, 8], false, false).unwrap(), b" ab");
    assert_eq!(t.detokenize(&[8], false, false).unwrap(), b"ab");
    assert_eq!(t.detokenize(&[1, 8], false, true).unwrap(), b"<s> ab");
    assert_eq!(t.detokenize(&[], true, true).unwrap(), b"");
}

#[test]
fn out_of_range_ids() {
    let t = Tokenizer::from_metadata(&spm_md()).unwrap();
    let e = t.decode(&[8, 1000]).unwrap_err().to_string();
    assert!(
        e.contains("token id 1000") && e.contains("16 tokens"),
        "{e}"
    );
    assert!(t.token_to_piece(16, true).is_err());
    assert!(!t.is_eog(u32::MAX) && !t.is_special(u32::MAX));
    assert_eq!(t.token_text(16), None);
}

#[test]
fn bpe_words_merges_and_special_tokens() {
    let t = Tokenizer::from_metadata(&bpe_md()).unwrap();
    assert_eq!(t.kind(), TokenizerKind::BytePairEncoding);
    // gpt-2 regex: "ab", " ab"; byte-level: "ab", "Ġab"; "a b" (rank 0) before "Ġ a"
    assert_eq!(t.encode("ab ab", false, false).unwrap(), vec![4, 6]);
    assert_eq!(t.encode(" a", false, false).unwrap(), vec![5]);
    assert_eq!(t.encode("ab<|im_end|>", false, true).unwrap(), vec![4, 7]);
    assert_eq!(t.decode(&[4, 6, 9]).unwrap(), "ab ab\n");
    // eos (0) and <|im_end|> end generation, found by their text
    assert_eq!(t.eog_tokens(), &[0, 7]);
    assert_eq!(t.eot(), Some(0));
    assert!(!t.add_bos());
}

#[test]
fn clean_spaces_as_llama_cpp() {
    let run = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        clean_spaces(&mut b);
        String::from_utf8(b).unwrap()
    };
    assert_eq!(run("Hello , world !"), "Hello, world!");
    assert_eq!(run("a ' b"), "a'b");
    assert_eq!(
        run("it 's he 'll we 're I 'm don 't"),
        "it's he 'll we're I'm don 't"
    );
    // the blanked space of the second pass is not a space for the next check
    assert_eq!(run("a ' ' b"), "a'' b");
    assert_eq!(run(""), "");
}

#[test]
fn stream_holds_back_partial_characters() {
    let t = Tokenizer::from_metadata(&spm_md()).unwrap();
    let mut s = t.stream();
    assert_eq!(s.push(8).unwrap(), "ab"); // leading space of the first piece removed
    assert_eq!(s.push(10).unwrap(), "");
    assert_eq!(s.push(11).unwrap(), "");
    assert_eq!(s.push(12).unwrap(), "中");
    assert_eq!(s.push(10).unwrap(), "");
    assert_eq!(s.finish(), "\u{FFFD}");
    // invalid bytes do not stall the stream
    let mut s = t.stream();
    assert_eq!(s.push(12).unwrap(), "\u{FFFD}");
}

#[test]
fn chat_template_errors() {
    let e = ChatTemplate::from_metadata(&spm_md()).unwrap_err();
    assert!(matches!(e, Error::Template(_)) && e.to_string().contains("tokenizer.chat_template"));
    let m = with(spm_md(), "tokenizer.chat_template", Value::U32(0));
    let e = ChatTemplate::from_metadata(&m).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.chat_template") && e.contains("string"),
        "{e}"
    );
    let e = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
    assert!(matches!(e, Error::Template(_)), "{e}");
    let t = ChatTemplate::new(
        "{{ raise_exception('no system role, ' + messages[0].role) }}",
        "",
        "",
    )
    .unwrap();
    let e = t
        .render(&[Message::new("system", "x")], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no system role, system"), "{e}");
}

#[test]
fn chat_template_from_metadata_uses_bos_eos_texts() {
    let m = with(
        with(spm_md(), "tokenizer.chat_template", Value::String("{{ bos_token }}{% for m in messages %}{{ m.content.strip() }}{% endfor %}{{ eos_token }}".into())),
        "tokenizer.ggml.bos_token_id",
        Value::U32(1),
    );
    let m = with(m, "tokenizer.ggml.eos_token_id", Value::U32(2));
    let t = ChatTemplate::from_metadata(&m).unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "  hi ")], false).unwrap(),
        "<s>hi</s>"
    );
}

#[test]
fn python_methods_and_tojson() {
    let t = ChatTemplate::new(
        "{{ messages[0].content.split(None, 1) | tojson }}|{{ messages[0].content.rsplit(None, 1) | tojson }}|\
         {{ {'a': [1, 2.0, none, true], 'b': 'x\"\n'} | tojson }}|{{ messages[0] | tojson(indent=2) }}|\
         {{ 'abc'.startswith(('x', 'a')) }}{{ 'a-b'.title() }}{{ 'ab'.find('z') }}",
        "",
        "",
    )
    .unwrap();
    let out = t.render(&[Message::new("u", " a  b c ")], false).unwrap();
    assert_eq!(
        out,
        "[\"a\", \"b c \"]|[\" a  b\", \"c\"]|{\"a\": [1, 2.0, null, true], \"b\": \"x\\\"\\n\"}|\
         {\n  \"role\": \"u\",\n  \"content\": \" a  b c \"\n}|TrueA-B-1"
    );
}

#[test]
fn strftime_fields() {
    // 2023-11-14 22:13:20 UTC, a Tuesday, day 318
    assert_eq!(
        pycompat::strftime(
            "%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %e %%",
            1_700_000_000
        ),
        "2023-11-14 22:13:20 Tue Tuesday Nov November 318 23 10PM 14 %"
    );
    assert_eq!(pycompat::strftime("%d %b %Y", 0), "01 Jan 1970");
    assert_eq!(pycompat::strftime("%j", 951_782_400), "060"); // 2000-02-29
}

/// Digit grouping and ignore_merges, which SmolLM2's vocabulary (single-digit tokens, all
/// words reachable by merges) cannot tell apart between llama3, qwen2 and gpt-2.
#[test]
fn pre_tokenizers_differ_where_llama_cpp_says() {
    let tokens = [
        "<eos>", "1", "2", "3", "4", "5", "6", "7", "12", "123", "45", "a", "b", "ba", "Ġ",
    ];
    let base = md(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&["1 2", "12 3", "4 5"])),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
    ]);
    let enc = |pre: &str, text: &str| {
        let m = with(
            base.clone(),
            "tokenizer.ggml.pre",
            Value::String(pre.into()),
        );
        Tokenizer::from_metadata(&m)
            .unwrap()
            .encode(text, false, false)
            .unwrap()
    };
    // llama3: \p{N}{1,3}; qwen2: \p{N}; gpt-2: ?\p{N}+
    // "3123": llama3 words "312" "3"; qwen2 one word per digit; gpt-2 one word
    assert_eq!(enc("llama-bpe", "3123"), vec![3, 8, 3]);
    assert_eq!(enc("qwen2", "3123"), vec![3, 1, 2, 3]);
    assert_eq!(enc("gpt-2", "3123"), vec![3, 9]);
    // llama3 takes a word that is a token as it is, without merges
    assert_eq!(enc("llama-bpe", "ba"), vec![13]);
    assert_eq!(enc("qwen2", "ba"), vec![12, 11]);
    // llama3 adds bos by default (unless the metadata says otherwise)
    let m = with(
        base.clone(),
        "tokenizer.ggml.pre",
        Value::String("llama-bpe".into()),
    );
    assert!(Tokenizer::from_metadata(&m).unwrap().add_bos());
}
