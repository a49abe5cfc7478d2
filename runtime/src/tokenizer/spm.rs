//! SentencePiece (`tokenizer.ggml.model = llama`) the way llama.cpp's `llm_tokenizer_spm`
//! does it: start from single characters and repeatedly merge the adjacent pair whose
//! concatenation is a vocabulary piece with the highest score (the leftmost pair on ties);
//! a final piece that is not in the vocabulary becomes byte tokens `<0xNN>`.
//!
//! Why this is hand-written rather than a `tokenizers` BPE with merges derived from the
//! scores: such a BPE (every split of every piece into two pieces, ranked by the piece's
//! score, as transformers' GGUF converter builds it) does give llama.cpp's ids on the 229
//! Gemma 3 fixture strings without special tokens (checked with the `tokenizers` Python
//! bindings), but it needs ~513k merges for Gemma's 262k pieces, tens of MB on a phone, and
//! it cannot express pieces of equal score (a merge's rank is its index, so ties are broken
//! by list order rather than by position as llama.cpp breaks them). llama.cpp's rule is the
//! few dozen lines below, exact by construction.

use super::vocab::Vocab;
use crate::{Error, Result};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Clone, Copy)]
struct Symbol {
    prev: i32,
    next: i32,
    start: usize,
    len: usize,
}

struct Bigram {
    left: i32,
    right: i32,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// The heap's top is the highest score, then the leftmost pair (llama.cpp's
    /// `llm_bigram_spm::comparator`).
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// Appends the ids of `text` (already whitespace-escaped) to `out`.
pub(crate) fn tokenize(vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<()> {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        let len = c.len_utf8();
        let next = if start + len == text.len() {
            -1
        } else {
            i as i32 + 1
        };
        symbols.push(Symbol {
            prev: i as i32 - 1,
            next,
            start,
            len,
        });
    }
    let mut queue = BinaryHeap::new();
    let try_add = |symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>, left: i32, right: i32| {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        let piece = &text[l.start..l.start + l.len + r.len];
        if let Some(id) = vocab.texts.id(piece) {
            queue.push(Bigram {
                left,
                right,
                score: vocab.scores[id as usize],
                size: piece.len(),
            });
        }
    };
    for i in 1..symbols.len() as i32 {
        try_add(&symbols, &mut queue, i - 1, i);
    }
    while let Some(b) = queue.pop() {
        let (l, r) = (symbols[b.left as usize], symbols[b.right as usize]);
        // Stale: one side was merged away or grew since the pair was queued.
        if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
            continue;
        }
        symbols[b.left as usize].len += r.len;
        symbols[b.right as usize].len = 0;
        symbols[b.left as usize].next = r.next;
        if r.next >= 0 {
            symbols[r.next as usize].prev = b.left;
        }
        let l = symbols[b.left as usize];
        try_add(&symbols, &mut queue, l.prev, b.left);
        try_add(&symbols, &mut queue, b.left, l.next);
    }
    // Every merged piece is a token, so only single characters can miss the vocabulary
    // (llama.cpp's `resegment` recursion never finds a split for them); they become bytes.
    let mut i = if symbols.is_empty() { -1 } else { 0 };
    while i >= 0 {
        let s = symbols[i as usize];
        let piece = &text[s.start..s.start + s.len];
        match vocab.texts.id(piece) {
            Some(id) => out.push(id),
            None => {
                for &b in piece.as_bytes() {
                    out.push(byte_to_token(vocab, b)?);
                }
            }
        }
        i = s.next;
    }
    Ok(())
}

/// The byte-fallback token `<0xNN>` of `b` (or, as llama.cpp falls back, the one-byte piece).
pub(crate) fn byte_to_token(vocab: &Vocab, b: u8) -> Result<u32> {
    let hex = format!("<0x{b:02X}>");
    if let Some(id) = vocab.texts.id(&hex) {
        return Ok(id);
    }
    let single = [b];
    std::str::from_utf8(&single)
        .ok()
        .and_then(|s| vocab.texts.id(s))
        .ok_or_else(|| {
            Error::Tokenizer(format!(
                "the vocabulary has no byte token {hex} for byte fallback"
            ))
        })
}
