//! `sparrow perplexity`: perplexity of a model over a text file, computed as llama.cpp's
//! perplexity tool does (see sparrow::perplexity), so the figures compare.

use crate::{open_model, AnyResult, ModelArgs};
use clap::Args;
use serde_json::json;
use sparrow::perplexity::{perplexity, Options};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct PerplexityArgs {
    /// The model, threads and adapters; -c/--ctx is the window size (default 512, as
    /// llama.cpp's `-c 512`).
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text to score.
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Score at most this many windows (llama.cpp's --chunks); default: every full window.
    #[arg(long)]
    chunks: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: PerplexityArgs) -> AnyResult {
    let text = std::fs::read(&a.file).map_err(|e| format!("{}: {e}", a.file.display()))?;
    let text =
        String::from_utf8(text).map_err(|e| format!("{}: not UTF-8: {e}", a.file.display()))?;
    let n_ctx = if a.model.ctx > 0 { a.model.ctx } else { 512 };
    let (mut m, tok) = open_model(&a.model)?;
    let bar = (!a.json).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} windows {msg} ({eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut running = String::new();
    let r = perplexity(
        &mut m,
        &tok,
        &text,
        &Options {
            n_ctx,
            max_chunks: a.chunks,
        },
        |i, n, ppl| {
            if let Some(bar) = &bar {
                bar.set_length(n as u64);
                bar.set_position(i as u64 + 1);
                bar.set_message(format!("ppl {ppl:.4}"));
            }
            running.push_str(&format!("[{}]{ppl:.4},", i + 1));
        },
    )?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if a.json {
        println!(
            "{}",
            json!({
                "file": a.file.display().to_string(),
                "ctx": n_ctx,
                "text_tokens": r.text_tokens,
                "chunks": r.chunks,
                "scored_tokens": r.scored,
                "perplexity": r.ppl,
                "perplexity_stderr": r.ppl_stderr,
                "seconds": r.secs,
                "tokens_per_s": (r.chunks * n_ctx) as f64 / r.secs.max(1e-9),
            })
        );
    } else {
        let mut o = std::io::stdout().lock();
        writeln!(o, "{running}")?;
        writeln!(
            o,
            "{} tokens, {} windows of {n_ctx}, {} tokens scored, {:.1} s ({:.0} tokens/s)",
            r.text_tokens,
            r.chunks,
            r.scored,
            r.secs,
            (r.chunks * n_ctx) as f64 / r.secs.max(1e-9)
        )?;
        writeln!(
            o,
            "Final estimate: PPL = {:.4} +/- {:.5}",
            r.ppl, r.ppl_stderr
        )?;
    }
    Ok(())
}
