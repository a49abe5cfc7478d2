//! Printing tokens as they are generated: pieces are bytes, and a UTF-8 character can span
//! several tokens (byte-level BPE and SentencePiece byte fallback both split emoji and CJK),
//! so text is released only up to the last complete character.

use super::Tokenizer;
use crate::Result;

/// Turns ids into text one at a time. Control tokens add nothing unless
/// [`special`](Self::special) is set. The concatenation of everything [`push`](Self::push)
/// and [`finish`](Self::finish) return equals [`Tokenizer::decode`] of the same ids for
/// vocabularies without space clean-up (SmolLM2, Gemma, Llama 3, Qwen 2); where the
/// vocabulary cleans spaces before punctuation, the stream does not.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
    first: bool,
    special: bool,
}

impl<'a> StreamDecoder<'a> {
    pub(crate) fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            pending: Vec::new(),
            first: true,
            special: false,
        }
    }

    /// Render control tokens (`<|im_end|>`, ...) as their text.
    pub fn special(mut self, yes: bool) -> Self {
        self.special = yes;
        self
    }

    /// Adds `id` and returns the text that is now complete (possibly empty). Bytes that
    /// can never be UTF-8 come out as U+FFFD, as in [`Tokenizer::decode`].
    pub fn push(&mut self, id: u32) -> Result<String> {
        let mut piece = self.tok.token_to_piece(id, self.special)?;
        if self.first && self.tok.add_space_prefix {
            piece = piece.strip_prefix(b" ").unwrap_or(piece);
        }
        self.first = false;
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (ok, bad) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(ok).unwrap_or_default());
                    match e.error_len() {
                        // invalid, not merely unfinished
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &bad[n..];
                        }
                        None => {
                            rest = bad;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        Ok(out)
    }

    /// The bytes still held back (an unfinished character), lossily, and the end of the
    /// stream.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}
