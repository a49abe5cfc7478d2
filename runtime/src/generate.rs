//! Text generation: the prompt as one batch, then token-by-token decode with a sampler,
//! streaming complete UTF-8 text as it comes, stopping on end-of-generation tokens, stop
//! strings, a token limit, or the caller's word.

use crate::model::{Backend, Logits, Model, Session};
use crate::sample::{Sampler, SamplerConfig};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Stop at end-of-generation tokens (EOS, EOT, `<|im_end|>`...). The token is kept in
    /// `tokens` but not in `text`.
    pub stop_at_eog: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampler: SamplerConfig::default(),
            stop: Vec::new(),
            stop_at_eog: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    EndOfGeneration,
    StopString,
    Cancelled,
    ContextFull,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::MaxTokens => "max_tokens",
            StopReason::EndOfGeneration => "eog",
            StopReason::StopString => "stop_string",
            StopReason::Cancelled => "cancelled",
            StopReason::ContextFull => "context_full",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    /// Seconds spent on the prompt batch.
    pub prompt_secs: f64,
    /// Seconds spent on single-token decode steps, and how many there were.
    pub decode_secs: f64,
    pub decode_steps: usize,
}

impl Generation {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens.len(), self.prompt_secs)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Generates after `prompt` (already tokenized) in `session`. `on_text` receives each piece
/// of new text as soon as it is complete UTF-8; returning `false` cancels.
pub fn generate<B: Backend>(
    model: &mut Model<B>,
    session: &mut Session<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generation> {
    generate_each(model, session, tokenizer, prompt, opts, |_, piece| {
        piece.is_empty() || on_text(piece)
    })
}

/// [`generate`] with a callback per token: `on_token(Some(id), text)` after each sampled
/// token that is not an end-of-generation token, with the text it completed (empty while a
/// UTF-8 character is unfinished or a possible stop-string prefix is held back), and
/// `on_token(None, text)` once at the end if held-back text remains. Returning `false`
/// cancels (the final call's answer is ignored).
pub fn generate_each<B: Backend>(
    model: &mut Model<B>,
    session: &mut Session<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(Option<u32>, &str) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt has no tokens".into()));
    }
    let mut sampler = Sampler::new(opts.sampler.clone());
    let mut history: Vec<u32> = prompt.to_vec();
    let mut out = Generation {
        prompt_tokens: prompt.to_vec(),
        tokens: Vec::new(),
        text: String::new(),
        stop_reason: StopReason::MaxTokens,
        prompt_secs: 0.0,
        decode_secs: 0.0,
        decode_steps: 0,
    };
    let t0 = Instant::now();
    let mut logits = model.eval(session, prompt, Logits::Last)?;
    out.prompt_secs = t0.elapsed().as_secs_f64();

    // Text grows by what the stream decoder completes (whole UTF-8 characters) and is
    // emitted from where the last emission ended, holding back a possible stop-string prefix.
    let mut stream = tokenizer.stream();
    let mut emitted = 0usize;
    let hold = opts.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    loop {
        if out.tokens.len() >= opts.max_tokens {
            out.stop_reason = StopReason::MaxTokens;
            break;
        }
        let tok = sampler.sample(&logits, &history);
        out.tokens.push(tok);
        history.push(tok);
        if opts.stop_at_eog && tokenizer.is_eog(tok) {
            out.stop_reason = StopReason::EndOfGeneration;
            break;
        }
        out.text.push_str(&stream.push(tok)?);
        // A stop string not found before ends in the new text; since at most hold - 1
        // bytes were held back, it starts at or after `emitted`.
        let found = opts
            .stop
            .iter()
            .filter_map(|s| out.text[emitted..].find(s.as_str()))
            .min();
        if let Some(at) = found {
            out.text.truncate(emitted + at);
            out.stop_reason = StopReason::StopString;
            break;
        }
        let mut upto = out
            .text
            .len()
            .saturating_sub(hold.saturating_sub(1))
            .max(emitted);
        while !out.text.is_char_boundary(upto) {
            upto -= 1;
        }
        let go = on_token(Some(tok), &out.text[emitted..upto]);
        emitted = upto;
        if !go {
            out.stop_reason = StopReason::Cancelled;
            break;
        }
        if out.tokens.len() >= opts.max_tokens {
            out.stop_reason = StopReason::MaxTokens;
            break;
        }
        if session.pos() >= session.n_ctx() {
            out.stop_reason = StopReason::ContextFull;
            break;
        }
        let t = Instant::now();
        model.eval_into(session, &[tok], Logits::Last, &mut logits)?;
        out.decode_secs += t.elapsed().as_secs_f64();
        out.decode_steps += 1;
    }
    if !matches!(
        out.stop_reason,
        StopReason::StopString | StopReason::Cancelled
    ) {
        // An unfinished character at the very end, as `decode` would show it.
        out.text.push_str(&stream.finish());
    }
    if out.stop_reason != StopReason::Cancelled && out.text.len() > emitted {
        on_token(None, &out.text[emitted..]);
    }
    Ok(out)
}
