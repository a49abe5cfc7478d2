//! Finding special tokens written in the text before the model tokenizer sees it, as
//! llama.cpp's `tokenizer_st_partition` does: for each special token, longest first, every
//! occurrence in what is still plain text becomes that token. User-defined tokens are always
//! matched; control and unknown tokens only when the caller asks to parse special tokens.

use super::attr::TokenAttr;
use super::vocab::Vocab;

/// A piece of the input: plain text (a byte range) or a token found in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// C's `isspace` in the "C" locale, which llama.cpp's lstrip / rstrip use.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// Which byte pairs occur in `text`, so that tokens that cannot occur are skipped without a
/// search (the result is the same; Gemma's vocabulary has ~6000 special tokens).
struct PairFilter {
    bits: Vec<u64>,
    bytes: [bool; 256],
}

impl PairFilter {
    fn new(text: &[u8]) -> Self {
        let mut f = PairFilter { bits: vec![0; 1024], bytes: [false; 256] };
        for &b in text {
            f.bytes[b as usize] = true;
        }
        for w in text.windows(2) {
            let k = (w[0] as usize) << 8 | w[1] as usize;
            f.bits[k / 64] |= 1 << (k % 64);
        }
        f
    }

    fn may_contain(&self, tok: &[u8]) -> bool {
        match tok {
            [] => false,
            [b] => self.bytes[*b as usize],
            [a, b, ..] => {
                let k = (*a as usize) << 8 | *b as usize;
                self.bits[k / 64] & (1 << (k % 64)) != 0
            }
        }
    }
}

pub(crate) fn partition(vocab: &Vocab, text: &str, parse_special: bool) -> Vec<Fragment> {
    if text.is_empty() {
        return Vec::new();
    }
    let bytes = text.as_bytes();
    let filter = PairFilter::new(bytes);
    let mut frags = vec![Fragment::Text(0, text.len())];
    for &id in &vocab.special_cache {
        let attr = vocab.attrs[id as usize];
        if !parse_special && attr.has(TokenAttr::CONTROL | TokenAttr::UNKNOWN) {
            continue;
        }
        let tok = vocab.texts.text(id);
        if tok.len() > text.len() || !filter.may_contain(tok.as_bytes()) {
            continue;
        }
        let mut out = Vec::with_capacity(frags.len() + 2);
        for f in frags.drain(..) {
            let Fragment::Text(mut start, end) = f else {
                out.push(f);
                continue;
            };
            loop {
                let Some(rel) = text[start..end].find(tok) else {
                    out.push(Fragment::Text(start, end));
                    break;
                };
                let at = start + rel;
                let mut left_end = at;
                if attr.has(TokenAttr::LSTRIP) {
                    while left_end > start && is_c_space(bytes[left_end - 1]) {
                        left_end -= 1;
                    }
                }
                if left_end > start {
                    out.push(Fragment::Text(start, left_end));
                }
                out.push(Fragment::Token(id));
                start = at + tok.len();
                if attr.has(TokenAttr::RSTRIP) {
                    while start < end && is_c_space(bytes[start]) {
                        start += 1;
                    }
                }
                if start >= end {
                    break;
                }
            }
        }
        frags = out;
    }
    frags
}
