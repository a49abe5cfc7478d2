//! Byte-level BPE (`tokenizer.ggml.model = gpt2`) on the `tokenizers` crate: a BPE model from
//! the GGUF vocabulary and merges, behind a sequence of `Split` pre-tokenizers with the
//! regexes llama.cpp uses for the file's `tokenizer.ggml.pre`, then `ByteLevel` without its
//! own regex (GPT-2's byte-to-unicode mapping only).
//!
//! llama.cpp splits with its own code for some of these regexes (`unicode_regex_split_custom_*`)
//! and with `std::regex` over a category-collapsed copy of the text for others; both follow
//! the regex semantics that `fancy-regex` implements, so a `Split` per regex in llama.cpp's
//! order (each one refining the pieces of the one before, matches isolated) gives the same
//! words. The merge loop in `tokenizers` is llama.cpp's: lowest rank first, leftmost on ties.

use super::vocab::{string_array, Texts, KEY_MERGES, KEY_PRE};
use crate::{Error, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

// Regexes from llama.cpp's src/llama-vocab.cpp (`llm_tokenizer_bpe`), adapted there from the
// models' tokenizer.json (`(?i:'s|...)` spelled out as `'[sS]|...`).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];

/// How a `tokenizer.ggml.pre` value tokenizes: its regexes and the flags llama.cpp sets
/// with it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PreTokenizer {
    pub regexes: &'static [&'static str],
    /// A word that is itself a token is not merged further (llama3).
    pub ignore_merges: bool,
    /// The default for add_bos when the metadata does not say.
    pub add_bos: bool,
    /// Detokenization removes spaces before punctuation (clean_up_tokenization_spaces).
    pub clean_spaces: bool,
}

/// The pre-tokenizer types sparrow implements, by their `tokenizer.ggml.pre` names.
pub(crate) const SUPPORTED_PRE: &str =
    "default, gpt-2, phi-2, mpt, olmo, llama3, llama-v3, llama-bpe, falcon3, falcon-h1, pixtral, \
     midm-2.0, lfm2, jina-v5-nano, dbrx, smaug-bpe, qwen2, deepseek-r1-qwen, kormo, f2llmv2, \
     stablelm2, megrez, smollm, starcoder, refact, command-r, codeshell";

impl PreTokenizer {
    /// llama.cpp's mapping from `tokenizer.ggml.pre` to regexes and flags. `None` (the key
    /// absent) is llama.cpp's "default" with its warning about degraded quality.
    pub(crate) fn from_name(pre: Option<&str>) -> Result<PreTokenizer> {
        let p = |regexes, ignore_merges, add_bos, clean_spaces| PreTokenizer {
            regexes,
            ignore_merges,
            add_bos,
            clean_spaces,
        };
        Ok(match pre.unwrap_or("default") {
            "default" => {
                if pre.is_none() {
                    log::warn!("{KEY_PRE} is missing: using llama.cpp's 'default' pre-tokenizer; generation quality may suffer");
                }
                p(DEFAULT, false, false, true)
            }
            "gpt-2" | "phi-2" | "mpt" | "olmo" => p(&[GPT2], false, false, true),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" => p(&[LLAMA3], true, true, true),
            "dbrx" | "smaug-bpe" => p(&[LLAMA3], false, false, true),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" => p(&[QWEN2], false, false, false),
            "stablelm2" | "megrez" => p(&[QWEN2], false, false, true),
            "smollm" | "command-r" => p(&[r"\p{N}", GPT2], false, false, false),
            "starcoder" | "refact" | "codeshell" => p(&[r"\p{N}", GPT2], false, false, true),
            other => {
                return Err(Error::metadata(
                    KEY_PRE,
                    format!(
                        "pre-tokenizer `{other}` is not supported (supported: {SUPPORTED_PRE})"
                    ),
                ))
            }
        })
    }
}

/// Reads `tokenizer.ggml.merges` ("left right" strings) and builds the `tokenizers` BPE.
pub(crate) fn build(
    md: &crate::gguf::Metadata,
    texts: &Texts,
    pre: &PreTokenizer,
) -> Result<tokenizers::Tokenizer> {
    let merges_raw = string_array(md, KEY_MERGES)?;
    let vocab: tokenizers::models::bpe::Vocab = (0..texts.len() as u32)
        .map(|id| (texts.text(id).to_string(), id))
        .collect();
    // llama.cpp splits each merge at the first space after the first byte and keeps the
    // first rank of a pair that occurs twice. `tokenizers` wants every part and result in
    // the vocabulary; a merge that breaks that could never produce a token in llama.cpp
    // either (its result would fall back to bytes), so it is dropped with a warning.
    let mut merges = Vec::with_capacity(merges_raw.len());
    let mut seen = std::collections::HashSet::with_capacity(merges_raw.len());
    let mut dropped = 0usize;
    for (i, m) in merges_raw.iter().enumerate() {
        let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
            return Err(Error::metadata(
                KEY_MERGES,
                format!("merge {i} ({m:?}) is not two tokens separated by a space"),
            ));
        };
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        if !seen.insert((a, b)) {
            continue;
        }
        let joined = format!("{a}{b}");
        if texts.id(a).is_none() || texts.id(b).is_none() || texts.id(&joined).is_none() {
            dropped += 1;
            continue;
        }
        merges.push((a.to_string(), b.to_string()));
    }
    if dropped > 0 {
        log::warn!("{KEY_MERGES}: dropped {dropped} merges whose parts or result are not tokens");
    }
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building the BPE model: {e}")))?;
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(pre.regexes.len() + 1);
    for r in pre.regexes {
        let split = Split::new(
            SplitPattern::Regex((*r).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex {r:?}: {e}")))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(tok)
}

const fn printable(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The 68 bytes that are not printable, in order: GPT-2 maps them to U+0100..U+0143.
const UNPRINTABLE: [u8; 68] = {
    let mut t = [0u8; 68];
    let (mut b, mut n) = (0usize, 0usize);
    while b < 256 {
        if !printable(b as u8) {
            t[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    t
};

/// GPT-2's byte-to-unicode table inverted: the byte each stand-in character encodes
/// (llama.cpp's `unicode_utf8_to_byte`).
fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        0..=0xFF if printable(c as u8) => Some(c as u8),
        0x100..=0x143 => Some(UNPRINTABLE[(c - 0x100) as usize]),
        _ => None,
    }
}

/// A byte-level token's text back to bytes, as llama.cpp's `llama_decode_text` does it,
/// including its marker for a character outside the byte table.
pub(crate) fn decode_text(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_on_256_bytes() {
        let mut seen = [false; 256];
        for c in (0u32..0x200).filter_map(char::from_u32) {
            if let Some(b) = char_to_byte(c) {
                assert!(!seen[b as usize], "byte {b} twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&x| x));
        assert_eq!(char_to_byte('Ġ'), Some(b' '));
        assert_eq!(char_to_byte('Ċ'), Some(b'\n'));
    }

    #[test]
    fn every_supported_name_resolves() {
        for name in SUPPORTED_PRE.split(',').map(str::trim) {
            PreTokenizer::from_name(Some(name)).unwrap();
        }
        assert!(PreTokenizer::from_name(Some("no-such-pre")).is_err());
    }
}
