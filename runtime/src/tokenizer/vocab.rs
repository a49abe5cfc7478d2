//! The vocabulary read from GGUF metadata, as llama.cpp's `llama_vocab::impl::load` reads it:
//! token texts, scores and attributes, the special token ids (with llama.cpp's defaults and
//! its text-based detection of end-of-turn and fill-in-the-middle tokens), the
//! end-of-generation set, and the tokenizer flags.
//!
//! Token texts live in one string arena with an open-addressing index over it, so a
//! 262k-token vocabulary costs a few MB rather than two `String`s per token.

use super::attr::TokenAttr;
use crate::gguf::{Metadata, Value, ValueType};
use crate::{Error, Result};
use std::collections::HashMap;

pub(crate) const KEY_MODEL: &str = "tokenizer.ggml.model";
pub(crate) const KEY_PRE: &str = "tokenizer.ggml.pre";
pub(crate) const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
pub(crate) const KEY_SCORES: &str = "tokenizer.ggml.scores";
pub(crate) const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub(crate) const KEY_MERGES: &str = "tokenizer.ggml.merges";
pub(crate) const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub(crate) const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
pub(crate) const KEY_ADD_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// Token ids with a role. `None` where the vocabulary has no such token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End of turn (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, ...).
    pub eot: Option<u32>,
    /// End of message (`<|eom_id|>`).
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
    pub mask: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

/// Token texts in one arena, looked up by id or by text.
#[derive(Clone, Debug, Default)]
pub(crate) struct Texts {
    arena: String,
    /// `offsets[i]..offsets[i + 1]` is token i's text.
    offsets: Vec<u32>,
    /// Open addressing, linear probing: token id + 1, 0 for an empty slot.
    slots: Vec<u32>,
}

fn fnv1a(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Texts {
    /// Builds the arena and index; a text that occurs twice is an error (llama.cpp asserts
    /// that every text maps to one id).
    pub(crate) fn new(texts: Vec<String>) -> Result<Self> {
        let total: usize = texts.iter().map(|t| t.len()).sum();
        if total > u32::MAX as usize {
            return Err(Error::metadata(KEY_TOKENS, "token texts exceed 4 GiB"));
        }
        let mut arena = String::with_capacity(total);
        let mut offsets = Vec::with_capacity(texts.len() + 1);
        offsets.push(0);
        for t in &texts {
            arena.push_str(t);
            offsets.push(arena.len() as u32);
        }
        let n_slots = (texts.len() * 2).next_power_of_two().max(16);
        let mut me = Texts {
            arena,
            offsets,
            slots: vec![0; n_slots],
        };
        let mask = n_slots - 1;
        for id in 0..texts.len() {
            let text = me.text(id as u32).as_bytes();
            let mut i = fnv1a(text) as usize & mask;
            loop {
                match me.slots[i] {
                    0 => {
                        me.slots[i] = id as u32 + 1;
                        break;
                    }
                    s if me.text(s - 1).as_bytes() == text => {
                        return Err(Error::metadata(
                            KEY_TOKENS,
                            format!(
                                "token text {:?} occurs twice, at ids {} and {id}",
                                me.text(s - 1),
                                s - 1
                            ),
                        ));
                    }
                    _ => i = (i + 1) & mask,
                }
            }
        }
        Ok(me)
    }

    pub(crate) fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The text of `id`, which must be in range.
    pub(crate) fn text(&self, id: u32) -> &str {
        let (a, b) = (self.offsets[id as usize], self.offsets[id as usize + 1]);
        &self.arena[a as usize..b as usize]
    }

    pub(crate) fn id(&self, text: &str) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = fnv1a(text.as_bytes()) as usize & mask;
        loop {
            match self.slots[i] {
                0 => return None,
                s if self.text(s - 1) == text => return Some(s - 1),
                _ => i = (i + 1) & mask,
            }
        }
    }
}

/// The vocabulary and what llama.cpp derives from it.
#[derive(Clone, Debug)]
pub(crate) struct Vocab {
    pub texts: Texts,
    pub scores: Vec<f32>,
    pub attrs: Vec<TokenAttr>,
    pub special: SpecialTokens,
    /// Sorted.
    pub eog: Vec<u32>,
    /// Control, user-defined and unknown tokens, longest text first: the order in which
    /// llama.cpp looks for them in the text (`cache_special_tokens`).
    pub special_cache: Vec<u32>,
    /// The special tokens by their first two bytes, and the one-byte ones by their byte, to
    /// find the ones that occur in a text in one pass.
    pub special_by_pair: HashMap<[u8; 2], Vec<u32>>,
    pub special_by_byte: HashMap<u8, Vec<u32>>,
}

/// The strings in a required array of strings.
pub(crate) fn string_array<'a>(md: &'a Metadata, key: &str) -> Result<Vec<&'a str>> {
    let v = md.get(key).ok_or_else(|| Error::metadata(key, "missing"))?;
    match v {
        Value::Array(ValueType::String, items) => items
            .iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| Error::metadata(key, "expected an array of strings"))
            })
            .collect(),
        Value::Array(t, _) => Err(Error::metadata(
            key,
            format!("expected an array of strings, found an array of {t:?}"),
        )),
        v => Err(Error::metadata(
            key,
            format!("expected an array of strings, found {:?}", v.value_type()),
        )),
    }
}

/// An optional array whose elements `f` converts; present with another type is an error.
fn opt_array<T>(
    md: &Metadata,
    key: &str,
    what: &str,
    f: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let items = v.as_array().ok_or_else(|| {
        Error::metadata(
            key,
            format!("expected an array of {what}, found {:?}", v.value_type()),
        )
    })?;
    items
        .iter()
        .map(|x| {
            f(x).ok_or_else(|| {
                Error::metadata(key, format!("expected an array of {what}, found {x}"))
            })
        })
        .collect::<Result<Vec<T>>>()
        .map(Some)
}

/// An optional boolean flag.
pub(crate) fn opt_bool(md: &Metadata, key: &str) -> Result<Option<bool>> {
    md.opt(key, |v| v.as_bool())
}

/// llama.cpp's `LLAMA_TOKEN_TYPE_*` to `llama_token_attr`.
fn attr_of_type(t: i32) -> TokenAttr {
    match t {
        1 => TokenAttr::NORMAL,
        2 => TokenAttr::UNKNOWN,
        3 => TokenAttr::CONTROL,
        4 => TokenAttr::USER_DEFINED,
        5 => TokenAttr::UNUSED,
        6 => TokenAttr::BYTE,
        _ => TokenAttr::UNDEFINED,
    }
}

// Texts by which llama.cpp recognises roles when the metadata does not name them
// (llama-vocab.cpp, "auto-detect special tokens by text").
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Per-model defaults that [`Vocab::load`] needs (set from the model and pre-tokenizer type).
pub(crate) struct Defaults {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

impl Vocab {
    /// Reads tokens, scores and types, then resolves special ids and flags as llama.cpp
    /// does. Returns the vocabulary and the resolved (add_bos, add_eos).
    pub(crate) fn load(md: &Metadata, defaults: Defaults) -> Result<(Vocab, bool, bool)> {
        let raw = string_array(md, KEY_TOKENS)?;
        let n = raw.len();
        if n == 0 {
            return Err(Error::metadata(KEY_TOKENS, "the vocabulary is empty"));
        }
        if n > i32::MAX as usize {
            return Err(Error::metadata(
                KEY_TOKENS,
                format!("{n} tokens is more than token ids can address"),
            ));
        }
        // llama.cpp names empty texts so that every text stays unique.
        let texts: Vec<String> = raw
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    (*t).to_string()
                }
            })
            .collect();
        let texts = Texts::new(texts)?;

        let scores = match md.get(KEY_SCORES) {
            None => vec![0.0; n],
            Some(Value::Array(ValueType::F32 | ValueType::I32, items)) => {
                if items.len() < n {
                    return Err(Error::metadata(
                        KEY_SCORES,
                        format!("{} scores for {n} tokens", items.len()),
                    ));
                }
                items[..n]
                    .iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect::<Option<Vec<f32>>>()
                    .ok_or_else(|| Error::metadata(KEY_SCORES, "expected an array of numbers"))?
            }
            Some(v) => {
                return Err(Error::metadata(
                    KEY_SCORES,
                    format!("expected an array of f32 or i32, found {v}"),
                ))
            }
        };

        let types = opt_array(md, KEY_TOKEN_TYPE, "integers", |v| match v {
            Value::I32(x) => Some(*x),
            v => v.as_i64().and_then(|x| i32::try_from(x).ok()),
        })?;
        let attrs = match types {
            None => vec![TokenAttr::NORMAL; n],
            Some(t) if t.len() < n => {
                return Err(Error::metadata(
                    KEY_TOKEN_TYPE,
                    format!("{} token types for {n} tokens", t.len()),
                ))
            }
            Some(t) => t[..n].iter().map(|&x| attr_of_type(x)).collect(),
        };

        // Special ids: defaults out of range are dropped; ids from the metadata replace
        // them when in range (an id out of range keeps the default, as in llama.cpp).
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let mut sp = SpecialTokens {
            bos: in_range(defaults.bos),
            eos: in_range(defaults.eos),
            unk: in_range(defaults.unk),
            ..SpecialTokens::default()
        };
        type Slot = fn(&mut SpecialTokens) -> &mut Option<u32>;
        let keys: [(&str, Slot); 17] = [
            ("tokenizer.ggml.bos_token_id", |s| &mut s.bos),
            ("tokenizer.ggml.eos_token_id", |s| &mut s.eos),
            ("tokenizer.ggml.eot_token_id", |s| &mut s.eot),
            ("tokenizer.ggml.eom_token_id", |s| &mut s.eom),
            ("tokenizer.ggml.unknown_token_id", |s| &mut s.unk),
            ("tokenizer.ggml.seperator_token_id", |s| &mut s.sep),
            ("tokenizer.ggml.padding_token_id", |s| &mut s.pad),
            ("tokenizer.ggml.mask_token_id", |s| &mut s.mask),
            ("tokenizer.ggml.fim_pre_token_id", |s| &mut s.fim_pre),
            ("tokenizer.ggml.fim_suf_token_id", |s| &mut s.fim_suf),
            ("tokenizer.ggml.fim_mid_token_id", |s| &mut s.fim_mid),
            ("tokenizer.ggml.fim_pad_token_id", |s| &mut s.fim_pad),
            ("tokenizer.ggml.fim_rep_token_id", |s| &mut s.fim_rep),
            ("tokenizer.ggml.fim_sep_token_id", |s| &mut s.fim_sep),
            // deprecated names
            ("tokenizer.ggml.prefix_token_id", |s| &mut s.fim_pre),
            ("tokenizer.ggml.suffix_token_id", |s| &mut s.fim_suf),
            ("tokenizer.ggml.middle_token_id", |s| &mut s.fim_mid),
        ];
        for (key, slot) in keys {
            let id = md.opt(key, |v| v.as_u64())?;
            let Some(id) = id else { continue };
            let slot = slot(&mut sp);
            if id < n as u64 {
                *slot = Some(id as u32);
            } else {
                log::warn!("{key} = {id} is outside the vocabulary ({n} tokens); using {slot:?}");
            }
        }
        let add_bos = opt_bool(md, KEY_ADD_BOS)?.unwrap_or(defaults.add_bos);
        let add_eos = opt_bool(md, KEY_ADD_EOS)?.unwrap_or(defaults.add_eos);

        let mut v = Vocab {
            texts,
            scores,
            attrs,
            special: sp,
            eog: Vec::new(),
            special_cache: Vec::new(),
            special_by_pair: HashMap::new(),
            special_by_byte: HashMap::new(),
        };
        v.detect_roles();
        v.build_eog();
        v.build_special_cache();
        Ok((v, add_bos, add_eos))
    }

    pub(crate) fn len(&self) -> usize {
        self.texts.len()
    }

    /// The lowest id whose text is one of `candidates`.
    ///
    /// llama.cpp takes the first match in `std::unordered_map` iteration order, which is
    /// not specified; the lowest id is a deterministic choice that agrees with it on the
    /// vocabularies we test (SmolLM2: `<|endoftext|>` over `<|im_end|>`). Only the single
    /// `eot` / `fim_*` id depends on it: the end-of-generation set contains every candidate.
    fn find_lowest(&self, candidates: &[&str]) -> Option<u32> {
        candidates.iter().filter_map(|t| self.texts.id(t)).min()
    }

    /// Fills eot, eom and fim ids found by their text, marking them control tokens; then
    /// marks control tokens whose text contains "unused" as unused.
    fn detect_roles(&mut self) {
        type Slot = fn(&mut SpecialTokens) -> &mut Option<u32>;
        let table: [(&[&str], Slot); 8] = [
            (EOT_TEXTS, |s| &mut s.eot),
            (EOM_TEXTS, |s| &mut s.eom),
            (FIM_PRE_TEXTS, |s| &mut s.fim_pre),
            (FIM_SUF_TEXTS, |s| &mut s.fim_suf),
            (FIM_MID_TEXTS, |s| &mut s.fim_mid),
            (FIM_PAD_TEXTS, |s| &mut s.fim_pad),
            (FIM_REP_TEXTS, |s| &mut s.fim_rep),
            (FIM_SEP_TEXTS, |s| &mut s.fim_sep),
        ];
        for (texts, slot) in table {
            if slot(&mut self.special).is_none() {
                if let Some(id) = self.find_lowest(texts) {
                    *slot(&mut self.special) = Some(id);
                    self.attrs[id as usize] |= TokenAttr::CONTROL;
                }
            }
        }
        for (id, a) in self.attrs.iter_mut().enumerate() {
            if a.has(TokenAttr::CONTROL) && self.texts.text(id as u32).contains("unused") {
                *a |= TokenAttr::UNUSED;
            }
        }
        // The end-of-generation texts become control tokens too (llama.cpp overrides a
        // type that the converter got wrong).
        for t in EOG_TEXTS {
            if let Some(id) = self.texts.id(t) {
                self.attrs[id as usize] |= TokenAttr::CONTROL;
            }
        }
        // gpt-oss: these are always rendered.
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(id) = self.texts.id(t) {
                self.attrs[id as usize] = TokenAttr::USER_DEFINED;
            }
        }
    }

    /// The end-of-generation set, as llama.cpp's `special_eog_ids`.
    fn build_eog(&mut self) {
        let sp = &self.special;
        let mut eog: Vec<u32> = [sp.fim_pad, sp.fim_rep, sp.fim_sep]
            .into_iter()
            .flatten()
            .collect();
        eog.extend(EOG_TEXTS.iter().filter_map(|t| self.texts.id(t)));
        eog.extend([sp.eos, sp.eot, sp.eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        let has = |eog: &[u32], t: &str| {
            self.texts
                .id(t)
                .is_some_and(|id| eog.binary_search(&id).is_ok())
        };
        // o200k_harmony and solar-open: "<|end|>" ends a message, not the generation.
        let (has_return, has_call, has_flush, has_end) = (
            has(&eog, "<|return|>"),
            has(&eog, "<|call|>") || has(&eog, "<|calls|>"),
            has(&eog, "<|flush|>"),
            has(&eog, "<|end|>"),
        );
        if let Some(end) = self.texts.id("<|end|>").filter(|_| has_end) {
            if has_call && (has_return || has_flush) {
                eog.retain(|&x| x != end);
                self.attrs[end as usize] = TokenAttr::USER_DEFINED;
            }
        }
        // gemma4 and plamo2: "</s>" is a normal token there.
        if has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>") {
            if let Some(s) = self.texts.id("</s>").filter(|_| has(&eog, "</s>")) {
                eog.retain(|&x| x != s);
                self.attrs[s as usize] = TokenAttr::NORMAL;
            }
        }
        self.eog = eog;
    }

    fn build_special_cache(&mut self) {
        let mask = TokenAttr::CONTROL | TokenAttr::USER_DEFINED | TokenAttr::UNKNOWN;
        let mut ids: Vec<u32> = (0..self.len() as u32)
            .filter(|&id| self.attrs[id as usize].has(mask))
            .collect();
        // Longest first; llama.cpp's std::sort leaves ties unordered, we keep id order.
        ids.sort_by_key(|&id| (std::cmp::Reverse(self.texts.text(id).len()), id));
        for &id in &ids {
            match self.texts.text(id).as_bytes() {
                [] => {}
                [b] => self.special_by_byte.entry(*b).or_default().push(id),
                [a, b, ..] => self.special_by_pair.entry([*a, *b]).or_default().push(id),
            }
        }
        self.special_cache = ids;
    }
}
