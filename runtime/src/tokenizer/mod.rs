//! The tokenizer built from GGUF metadata, giving llama.cpp's token ids, and chat templates.
//!
//! Two model types, as `tokenizer.ggml.model` names them:
//! - `gpt2`: byte-level BPE (`bpe.rs`), on the `tokenizers` crate, with the pre-tokenizer
//!   regexes llama.cpp uses for the file's `tokenizer.ggml.pre`;
//! - `llama`: SentencePiece (`spm.rs`), llama.cpp's score-ordered merge, hand-written.
//!
//! Around either, llama.cpp's behaviour is reproduced: special tokens written in the text are
//! found first (`special.rs`: user-defined tokens always, control tokens when asked), bos/eos
//! are added per `tokenizer.ggml.add_bos_token` / `add_eos_token` with llama.cpp's defaults,
//! the end-of-generation set is derived as `llama_vocab::is_eog` derives it, and
//! detokenization follows `llama_detokenize` (leading-space removal, clean-up of spaces).
//! Checked against llama.cpp on a few hundred strings for SmolLM2 (BPE) and Gemma 3 (SPM) by
//! `tests/tests/tokenizer.rs`.

mod attr;
mod bpe;
mod chat;
mod pycompat;
mod special;
mod spm;
mod stream;
#[cfg(test)]
mod tests;
mod vocab;

pub use attr::TokenAttr;
pub use chat::{ChatTemplate, Message};
pub use stream::StreamDecoder;
pub use vocab::SpecialTokens;

use crate::gguf::Metadata;
use crate::{Error, Result};
use special::Fragment;
use vocab::{opt_bool, Defaults, Vocab, KEY_ADD_PREFIX, KEY_MODEL, KEY_PRE};

/// Which tokenization algorithm a vocabulary uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Byte-level BPE (`tokenizer.ggml.model = gpt2`).
    BytePairEncoding,
    /// SentencePiece (`tokenizer.ggml.model = llama`).
    SentencePiece,
}

enum Model {
    Bpe(Box<tokenizers::Tokenizer>),
    Spm,
}

/// Text to token ids and back, for one model's vocabulary. Cheap to share between threads.
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    pre: Option<String>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// Spaces become U+2581 before the model tokenizer sees the text (SentencePiece).
    escape_whitespaces: bool,
    clean_spaces: bool,
    /// Every token's piece with special tokens rendered (llama.cpp's
    /// `cache_token_to_piece`): `pieces[offsets[i]..offsets[i + 1]]`.
    pieces: Vec<u8>,
    piece_offsets: Vec<u32>,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
};

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("pre", &self.pre)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.vocab.special)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer that `tokenizer.ggml.*` describes, as llama.cpp's
    /// `llama_vocab::impl::load` reads it. Errors name the key that is missing, ill-typed or
    /// unsupported.
    pub fn from_metadata(md: &Metadata) -> Result<Tokenizer> {
        let model_name = md.str(KEY_MODEL)?;
        let pre_name = md.opt(KEY_PRE, |v| v.as_str().map(str::to_string))?;
        let (kind, pre, defaults) = match model_name {
            "gpt2" => {
                let pre = bpe::PreTokenizer::from_name(pre_name.as_deref())?;
                let d = Defaults {
                    bos: Some(11),
                    eos: Some(11),
                    unk: None,
                    add_bos: pre.add_bos,
                    add_eos: false,
                };
                (TokenizerKind::BytePairEncoding, Some(pre), d)
            }
            "llama" => {
                let d = Defaults {
                    bos: Some(1),
                    eos: Some(2),
                    unk: Some(0),
                    add_bos: true,
                    add_eos: false,
                };
                (TokenizerKind::SentencePiece, None, d)
            }
            "no_vocab" | "none" => {
                return Err(Error::metadata(
                    KEY_MODEL,
                    format!("`{model_name}`: the model has no vocabulary"),
                ))
            }
            "bert" | "t5" | "rwkv" | "plamo2" | "gemma4" | "hybriddna" | "whitespace" => {
                return Err(Error::metadata(
                    KEY_MODEL,
                    format!(
                        "tokenizer model `{model_name}` is not supported (supported: gpt2, llama)"
                    ),
                ))
            }
            other => {
                return Err(Error::metadata(
                    KEY_MODEL,
                    format!("unknown tokenizer model `{other}` (supported: gpt2, llama)"),
                ))
            }
        };
        let spm = kind == TokenizerKind::SentencePiece;
        let add_space_prefix = opt_bool(md, KEY_ADD_PREFIX)?.unwrap_or(spm);
        let (vocab, add_bos, add_eos) = Vocab::load(md, defaults)?;
        let model = match &pre {
            Some(p) => Model::Bpe(Box::new(bpe::build(md, &vocab.texts, p)?)),
            None => Model::Spm,
        };
        let clean_spaces = pre.as_ref().is_some_and(|p| p.clean_spaces);
        let mut tok = Tokenizer {
            vocab,
            model,
            pre: pre_name,
            add_bos,
            add_eos,
            add_space_prefix,
            escape_whitespaces: spm,
            clean_spaces,
            pieces: Vec::new(),
            piece_offsets: Vec::new(),
        };
        tok.build_pieces();
        Ok(tok)
    }

    pub fn kind(&self) -> TokenizerKind {
        match self.model {
            Model::Bpe(_) => TokenizerKind::BytePairEncoding,
            Model::Spm => TokenizerKind::SentencePiece,
        }
    }

    /// `tokenizer.ggml.pre`, where the file has one.
    pub fn pre(&self) -> Option<&str> {
        self.pre.as_deref()
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.vocab.special
    }

    pub fn bos(&self) -> Option<u32> {
        self.vocab.special.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.vocab.special.eos
    }

    /// End of turn. Where the metadata does not name it, llama.cpp finds it by its text
    /// (`<|im_end|>`, `<end_of_turn>`, ...).
    pub fn eot(&self) -> Option<u32> {
        self.vocab.special.eot
    }

    pub fn eom(&self) -> Option<u32> {
        self.vocab.special.eom
    }

    /// Whether [`encode`](Self::encode) with `add_special` puts bos first.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`encode`](Self::encode) with `add_special` puts eos last.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The tokens that end generation, sorted (llama.cpp's `llama_vocab_is_eog` set: eos,
    /// eot, eom, fim pad/repo/sep and tokens such as `<|im_end|>` or `<end_of_turn>`).
    pub fn eog_tokens(&self) -> &[u32] {
        &self.vocab.eog
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.eog.binary_search(&id).is_ok()
    }

    /// The attributes of `id`; `None` out of range.
    pub fn token_attr(&self, id: u32) -> Option<TokenAttr> {
        self.vocab.attrs.get(id as usize).copied()
    }

    /// Whether `id` is a control or unknown token: one that text shows only when special
    /// tokens are rendered (bos, eos, `<|im_start|>`, ...). False out of range.
    pub fn is_special(&self, id: u32) -> bool {
        self.token_attr(id)
            .is_some_and(|a| a.has(TokenAttr::CONTROL | TokenAttr::UNKNOWN))
    }

    /// The token's text as the vocabulary stores it (`Ġ` for a space in byte-level BPE, `▁`
    /// in SentencePiece).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.vocab.len()).then(|| self.vocab.texts.text(id))
    }

    /// The id of a vocabulary text, exactly as stored.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.texts.id(text)
    }

    fn check(&self, id: u32) -> Result<()> {
        if (id as usize) < self.vocab.len() {
            Ok(())
        } else {
            Err(Error::Tokenizer(format!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.vocab.len()
            )))
        }
    }

    /// The bytes `id` stands for, as llama.cpp's `llama_token_to_piece` (no space stripped).
    /// Control and unknown tokens are empty unless `special`. A piece can be part of a UTF-8
    /// character: see [`StreamDecoder`] for printing tokens as they come.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Result<&[u8]> {
        self.check(id)?;
        if !special && self.is_special(id) {
            return Ok(&[]);
        }
        let (a, b) = (
            self.piece_offsets[id as usize],
            self.piece_offsets[id as usize + 1],
        );
        Ok(&self.pieces[a as usize..b as usize])
    }

    /// The bytes `id` adds to generated text: [`token_to_piece`](Self::token_to_piece)
    /// without special tokens.
    pub fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        self.token_to_piece(id, false)
    }

    /// A decoder that turns ids into text as they are generated, emitting only complete
    /// UTF-8.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    fn build_pieces(&mut self) {
        let n = self.vocab.len();
        let mut pieces = Vec::with_capacity(self.vocab.texts.len() * 4);
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0u32);
        for id in 0..n as u32 {
            self.piece_uncached(id, &mut pieces);
            offsets.push(pieces.len() as u32);
        }
        self.pieces = pieces;
        self.piece_offsets = offsets;
    }

    /// llama.cpp's `token_to_piece` with special = true, from the token text.
    fn piece_uncached(&self, id: u32, out: &mut Vec<u8>) {
        let attr = self.vocab.attrs[id as usize];
        let text = self.vocab.texts.text(id);
        if attr.has(TokenAttr::UNKNOWN | TokenAttr::CONTROL | TokenAttr::USER_DEFINED) {
            out.extend_from_slice(text.as_bytes());
        } else if attr.has(TokenAttr::NORMAL) {
            match self.model {
                Model::Spm => out.extend_from_slice(text.replace('\u{2581}', " ").as_bytes()),
                Model::Bpe(_) => bpe::decode_text(text, out),
            }
        } else if attr.has(TokenAttr::BYTE) {
            out.push(byte_of_token(text));
        }
        // Unused and undefined tokens render as nothing.
    }

    /// Token ids of `text`, as llama.cpp's `llama_tokenize`: with `add_special`, bos and eos
    /// as the metadata asks; with `parse_special`, control tokens written in the text
    /// (`<|im_start|>`) become those tokens, otherwise they are tokenized as text.
    /// User-defined tokens are always matched.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let frags = special::partition(&self.vocab, text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            let bos = self.vocab.special.bos.ok_or_else(|| {
                Error::Tokenizer("bos is to be added but the vocabulary has no bos token".into())
            })?;
            out.push(bos);
        }
        // SentencePiece: a space goes before text that starts the input or follows a token.
        let mut prev_special = true;
        for f in frags {
            match f {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(a, b) => {
                    let raw = &text[a..b];
                    match &self.model {
                        Model::Bpe(hf) => {
                            let enc = hf
                                .encode_fast(raw, false)
                                .map_err(|e| Error::Tokenizer(e.to_string()))?;
                            out.extend_from_slice(enc.get_ids());
                        }
                        Model::Spm => {
                            let mut s = String::with_capacity(raw.len() + 4);
                            if self.add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(raw);
                            if self.escape_whitespaces {
                                s = s.replace(' ', "\u{2581}");
                            }
                            spm::tokenize(&self.vocab, &s, &mut out)?;
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            let eos = self.vocab.special.eos.ok_or_else(|| {
                Error::Tokenizer("eos is to be added but the vocabulary has no eos token".into())
            })?;
            out.push(eos);
        }
        Ok(out)
    }

    /// The text of `ids` as llama.cpp's `llama_detokenize` with remove_special and
    /// unparse_special false: control tokens show nothing, invalid UTF-8 (a character split
    /// across the end) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes = self.detokenize(ids, false, false)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// llama.cpp's `llama_detokenize`: the bytes of `ids`. `remove_special` drops a leading
    /// bos and trailing eos where the vocabulary adds them; `unparse_special` renders control
    /// tokens. SentencePiece's leading space (add_space_prefix) is removed, and for
    /// vocabularies that ask for it, spaces before punctuation and contractions are cleaned.
    pub fn detokenize(
        &self,
        ids: &[u32],
        remove_special: bool,
        unparse_special: bool,
    ) -> Result<Vec<u8>> {
        let mut ids = ids;
        let mut remove_space = self.add_space_prefix;
        if remove_special && self.add_bos && ids.first().is_some_and(|&f| Some(f) == self.bos()) {
            remove_space = false;
            ids = &ids[1..];
        }
        if remove_special && self.add_eos && ids.last().is_some_and(|&l| Some(l) == self.eos()) {
            ids = &ids[..ids.len() - 1];
        }
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let mut piece = self.token_to_piece(id, unparse_special)?;
            if remove_space {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            remove_space = false;
            out.extend_from_slice(piece);
        }
        if self.clean_spaces {
            clean_spaces(&mut out);
        }
        Ok(out)
    }
}

/// The byte of a byte token `<0xNN>` (llama.cpp parses the two characters after `<0x` with
/// strtol, which gives 0 for anything else).
fn byte_of_token(text: &str) -> u8 {
    let hex: String = text
        .chars()
        .skip(3)
        .take(2)
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    u8::from_str_radix(&hex, 16).unwrap_or(0)
}

/// llama.cpp's three clean-up passes of `detokenize` with clean_spaces (Hugging Face's
/// `clean_up_tokenization_spaces`): " ?" " !" " ." " ," lose the space, " ' " loses both,
/// and " 's" " 'm" " 're" " 've" lose the space. Written in place as llama.cpp writes it,
/// since later checks read what earlier steps left (the second pass blanks a skipped space).
fn clean_spaces(text: &mut Vec<u8>) {
    if text.is_empty() {
        return;
    }
    let n1 = text.len();
    let mut total = 1;
    for i in 1..n1 {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }
    let n2 = total;
    total = 1;
    let mut i = 1;
    while i < n2 {
        let x = text[i];
        if x == b'\'' && i + 1 < n2 && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    let n3 = total;
    total = 1;
    for i in 1..n3 {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < n3 {
            let x1 = text[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if x1 != b't' && x1 != b'd' && i + 2 < n3 {
                let x2 = text[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}
