//! Perplexity over a text, computed as llama.cpp's perplexity tool computes it, so that the
//! figures compare: the text is tokenized once (with BOS where the model adds one), cut into
//! non-overlapping windows of `n_ctx` tokens (the tail that does not fill a window is
//! dropped), each window is evaluated from an empty cache with its first token replaced by
//! BOS (where the model adds one), and only the second half of each window is scored: the
//! logits at positions n_ctx/2 .. n_ctx-2 predict the tokens after them. The log-softmax is
//! llama.cpp's: the maximum in f32, `expf` terms summed in f64.

use crate::model::{Backend, Logits, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Options {
    /// Window size in tokens (llama.cpp's `-c`).
    pub n_ctx: usize,
    /// Windows to score at most (llama.cpp's `--chunks`); `None` scores every full window.
    pub max_chunks: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood of the scored tokens).
    pub ppl: f64,
    /// The standard error of `ppl` as llama.cpp prints it after "+/-".
    pub ppl_stderr: f64,
    /// Tokens of the whole text.
    pub text_tokens: usize,
    /// Windows scored.
    pub chunks: usize,
    /// Tokens scored (chunks x (n_ctx - 1 - n_ctx/2)).
    pub scored: usize,
    /// Seconds spent evaluating windows.
    pub secs: f64,
}

/// Scores `text` (see the module documentation). `on_chunk(i, n, ppl)` runs after window
/// `i` of `n` with the estimate so far (llama.cpp's `[i]ppl` line).
pub fn perplexity<B: Backend>(
    model: &mut Model<B>,
    tokenizer: &Tokenizer,
    text: &str,
    o: &Options,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    let n_ctx = o.n_ctx;
    if n_ctx < 4 {
        return Err(Error::InvalidArgument(format!(
            "a perplexity window of {n_ctx} tokens is too small (4 at least)"
        )));
    }
    let mut tokens = tokenizer.encode(text, true, false)?;
    if tokens.len() < 2 * n_ctx {
        return Err(Error::InvalidArgument(format!(
            "the text has {} tokens; perplexity with windows of {n_ctx} needs at least {}",
            tokens.len(),
            2 * n_ctx
        )));
    }
    let n_chunk_max = tokens.len() / n_ctx;
    let n_chunk = o.max_chunks.map_or(n_chunk_max, |c| c.min(n_chunk_max));
    if n_chunk == 0 {
        return Err(Error::InvalidArgument(
            "no window to score (--chunks 0)".into(),
        ));
    }
    let bos = tokenizer.add_bos().then(|| tokenizer.bos()).flatten();
    let n_vocab = model.config().n_vocab;
    let first = n_ctx / 2;
    let mut session = model.new_session(n_ctx)?;
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let t0 = Instant::now();
    for i in 0..n_chunk {
        let start = i * n_ctx;
        let end = start + n_ctx;
        session.reset();
        let original = tokens[start];
        if let Some(b) = bos {
            tokens[start] = b;
        }
        // Logits of the scored half only, as llama.cpp asks for.
        let logits = model.eval(&mut session, &tokens[start..end], Logits::From(first));
        tokens[start] = original;
        let logits = logits?;
        for j in first..n_ctx - 1 {
            let row = &logits[(j - first) * n_vocab..(j - first + 1) * n_vocab];
            let lp = log_softmax(row, tokens[start + j + 1] as usize);
            nll -= lp;
            nll2 += lp * lp;
        }
        count += n_ctx - 1 - first;
        on_chunk(i, n_chunk, (nll / count as f64).exp());
    }
    let secs = t0.elapsed().as_secs_f64();
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let ppl_stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        ppl_stderr,
        text_tokens: tokens.len(),
        chunks: n_chunk,
        scored: count,
        secs,
    })
}

/// log p(tok) under softmax(logits), as llama.cpp's perplexity tool computes it.
fn log_softmax(logits: &[f32], tok: usize) -> f64 {
    let max = logits.iter().copied().fold(logits[0], f32::max);
    let sum: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    (logits[tok] - max) as f64 - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::log_softmax;

    #[test]
    fn log_softmax_of_uniform_and_peaked_rows() {
        let n = 8;
        let uniform = vec![0.25f32; n];
        assert!((log_softmax(&uniform, 3) + (n as f64).ln()).abs() < 1e-12);
        // exp(a) / (exp(a) + exp(b)) for a = 2, b = 0: computed independently in f64.
        let lp = log_softmax(&[2.0, 0.0], 0);
        let want = (2.0f64.exp() / (2.0f64.exp() + 1.0)).ln();
        assert!((lp - want).abs() < 1e-7, "{lp} vs {want}");
    }
}
