//! Finding special tokens written in the text before the model tokenizer sees it, as
//! llama.cpp's `tokenizer_st_partition` does: for each special token, longest first, every
//! occurrence in what is still plain text becomes that token. User-defined tokens are always
//! matched; control and unknown tokens only when the caller asks to parse special tokens.

use super::attr::TokenAttr;
use super::vocab::Vocab;
use std::collections::HashSet;

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

/// The special tokens that occur somewhere in `text`, in `vocab.special_cache` order: the
/// candidates are bucketed by their first two bytes (one byte for one-byte tokens), so one
/// pass over the text finds them without a search per token (Gemma has ~6000 special
/// tokens). Occurring in the whole text is necessary for occurring in a fragment of it, so
/// the partition below gives the same result as trying every token.
fn present(vocab: &Vocab, text: &[u8], parse_special: bool) -> Vec<u32> {
    let wanted = |id: u32| {
        parse_special || !vocab.attrs[id as usize].has(TokenAttr::CONTROL | TokenAttr::UNKNOWN)
    };
    let mut found: HashSet<u32> = HashSet::new();
    for i in 0..text.len() {
        if let Some(ids) = vocab.special_by_byte.get(&text[i]) {
            found.extend(ids.iter().copied().filter(|&id| wanted(id)));
        }
        if i + 1 < text.len() {
            if let Some(ids) = vocab.special_by_pair.get(&[text[i], text[i + 1]]) {
                for &id in ids {
                    if wanted(id)
                        && !found.contains(&id)
                        && text[i..].starts_with(vocab.texts.text(id).as_bytes())
                    {
                        found.insert(id);
                    }
                }
            }
        }
    }
    // special_cache's order: longest first, then by id
    let mut ids: Vec<u32> = found.into_iter().collect();
    ids.sort_by_key(|&id| (std::cmp::Reverse(vocab.texts.text(id).len()), id));
    ids
}

pub(crate) fn partition(vocab: &Vocab, text: &str, parse_special: bool) -> Vec<Fragment> {
    if text.is_empty() {
        return Vec::new();
    }
    let bytes = text.as_bytes();
    let mut frags = vec![Fragment::Text(0, text.len())];
    for id in present(vocab, bytes, parse_special) {
        let attr = vocab.attrs[id as usize];
        let tok = vocab.texts.text(id);
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
