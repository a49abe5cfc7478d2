//! Token attributes: llama.cpp's `llama_token_attr` bit set.

use std::ops::{BitOr, BitOrAssign};

/// What kind of token an id is, as llama.cpp's `llama_token_attr` bits (the GGUF token type
/// read from `tokenizer.ggml.token_type`, adjusted as llama.cpp adjusts it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TokenAttr(pub u32);

impl TokenAttr {
    pub const UNDEFINED: TokenAttr = TokenAttr(0);
    pub const UNKNOWN: TokenAttr = TokenAttr(1 << 0);
    pub const UNUSED: TokenAttr = TokenAttr(1 << 1);
    pub const NORMAL: TokenAttr = TokenAttr(1 << 2);
    /// Rendered only on request (bos, eos, `<|im_start|>`, ...).
    pub const CONTROL: TokenAttr = TokenAttr(1 << 3);
    /// Added by the model author; always matched as a whole in the text, always rendered.
    pub const USER_DEFINED: TokenAttr = TokenAttr(1 << 4);
    /// A SentencePiece byte-fallback token `<0xNN>`.
    pub const BYTE: TokenAttr = TokenAttr(1 << 5);
    pub const NORMALIZED: TokenAttr = TokenAttr(1 << 6);
    /// Swallows whitespace to its left when matched in the text.
    pub const LSTRIP: TokenAttr = TokenAttr(1 << 7);
    /// Swallows whitespace to its right when matched in the text.
    pub const RSTRIP: TokenAttr = TokenAttr(1 << 8);
    pub const SINGLE_WORD: TokenAttr = TokenAttr(1 << 9);

    /// Whether any of the bits of `any` is set.
    pub fn has(self, any: TokenAttr) -> bool {
        self.0 & any.0 != 0
    }
}

impl BitOr for TokenAttr {
    type Output = TokenAttr;
    fn bitor(self, rhs: TokenAttr) -> TokenAttr {
        TokenAttr(self.0 | rhs.0)
    }
}

impl BitOrAssign for TokenAttr {
    fn bitor_assign(&mut self, rhs: TokenAttr) {
        self.0 |= rhs.0;
    }
}
