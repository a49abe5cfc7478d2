//! sparrow: an on-device inference runtime for transformer language models.
//!
//! The crate is organised as DESIGN.md lays it out: [`gguf`] maps and parses model files
//! without copying weights, [`quant`] holds one module per block format with its reference
//! routines, [`kernels`] is the CPU dispatch table for matrix products, [`model`] the forward
//! pass, [`tokenizer`] and [`sample`] turn text into tokens and logits into text.

pub mod adapter;
pub mod convert;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod perplexity;
pub mod quant;
pub mod sample;
pub mod sparse;
pub mod tokenizer;

pub use error::{Error, Result};
