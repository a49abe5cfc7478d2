//! `sparrow bench`: prompt and decode speed of a model, and how close decode comes to the
//! memory-bandwidth roofline.
//!
//! Each repetition evaluates a fixed prompt of exactly P tokens as one batch, then decodes G
//! tokens greedily one at a time (argmax of the logits, fed back), in the same session reset
//! to position 0. One warm-up repetition runs first and is not counted. Rates are medians over
//! the repetitions; the times are those of the model's `eval` calls, as `sparrow run` reports
//! them.
//!
//! The roofline: a decode step reads every weight it uses once (`Model::decode_weight_bytes`),
//! so at best it takes that many bytes over the memory read bandwidth, which the command
//! measures itself with the same number of threads ([`measure_read_bandwidth`]). The roofline
//! fraction is the achieved decode rate over that best rate.

use clap::Args;
use serde_json::json;
use sparrow::kernels::bandwidth::measure_read_bandwidth;
use sparrow::kernels::KernelTable;
use sparrow::model::{Backend, Logits, Model, ModelOptions};
use sparrow::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::time::Instant;

/// English text the prompt is cut from (repeated as often as P needs).
const PROMPT_TEXT: &str = "The house sparrow is a bird of the sparrow family, found in most \
parts of the world. It is a small bird that has a typical length of 16 cm and a mass of 24 to \
39 g. Females and young birds are coloured pale brown and grey, and males have brighter black, \
white, and brown markings. One of about 25 species in the genus Passer, the house sparrow is \
native to most of Europe, the Mediterranean Basin, and a large part of Asia. Its intentional or \
accidental introductions to many regions, including parts of Australasia, Africa, and the \
Americas, make it the most widely distributed wild bird. The house sparrow is strongly \
associated with human habitation, and can live in urban or rural settings. Though found in \
widely varied habitats and climates, it typically avoids extensive woodlands, grasslands, \
polar regions, and deserts far away from human development. For food, the house sparrow \
mostly eats the seeds of grains and weeds, but it is an opportunistic eater and commonly eats \
insects and many other foods. ";

#[derive(Args)]
pub struct BenchArgs {
    /// GGUF model (default: SmolLM2-135M-Instruct Q4_1, fetched on first use).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// Prompt length in tokens, evaluated as one batch.
    #[arg(short = 'p', long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded one at a time after the prompt.
    #[arg(short = 'n', long, default_value_t = 128)]
    gen_tokens: usize,
    /// Timed repetitions (after one warm-up); rates are their medians.
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// One timed repetition.
struct Rep {
    prompt_secs: f64,
    decode_secs: f64,
}

pub fn bench(a: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.prompt_tokens == 0 {
        return Err("--prompt-tokens must be at least 1".into());
    }
    if a.gen_tokens == 0 {
        return Err("--gen-tokens must be at least 1".into());
    }
    if a.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    let path = match &a.model {
        Some(p) => p.clone(),
        None => crate::fetch::default_model()?,
    };
    let mut m = Model::open(
        &path,
        &ModelOptions {
            threads: a.threads,
            ..Default::default()
        },
    )?;
    let n_ctx = a
        .prompt_tokens
        .checked_add(a.gen_tokens)
        .ok_or("--prompt-tokens + --gen-tokens overflows")?;
    let ctx_train = m.config().n_ctx_train;
    if n_ctx > ctx_train {
        return Err(format!(
            "--prompt-tokens {} + --gen-tokens {} = {n_ctx} tokens exceed the model's context of {ctx_train}",
            a.prompt_tokens, a.gen_tokens
        )
        .into());
    }
    let tok = Tokenizer::from_metadata(m.file().metadata())?;
    let prompt = prompt_tokens(&tok, a.prompt_tokens)?;
    let threads = m.backend().threads();

    let mut s = m.new_session(n_ctx)?;
    let mut reps = Vec::with_capacity(a.reps);
    // One logits buffer for every step, as a generation loop keeps it.
    let mut logits = Vec::new();
    for i in 0..=a.reps {
        s.reset();
        let t = Instant::now();
        m.eval_into(&mut s, &prompt, Logits::Last, &mut logits)?;
        let prompt_secs = t.elapsed().as_secs_f64();
        let mut next = argmax(&logits);
        let mut decode_secs = 0.0;
        for _ in 0..a.gen_tokens {
            let t = Instant::now();
            m.eval_into(&mut s, &[next], Logits::Last, &mut logits)?;
            decode_secs += t.elapsed().as_secs_f64();
            next = argmax(&logits);
        }
        // Repetition 0 warms up (page cache, buffers, thread pool) and is not counted.
        if i > 0 {
            reps.push(Rep {
                prompt_secs,
                decode_secs,
            });
        }
    }

    let prompt_rates: Vec<f64> = reps
        .iter()
        .map(|r| rate(a.prompt_tokens, r.prompt_secs))
        .collect();
    let decode_rates: Vec<f64> = reps
        .iter()
        .map(|r| rate(a.gen_tokens, r.decode_secs))
        .collect();
    let prompt_tps = median(&prompt_rates);
    let decode_tps = median(&decode_rates);
    let weight_bytes = m.decode_weight_bytes();
    let bandwidth = measure_read_bandwidth(threads);
    let roofline_tps = bandwidth / weight_bytes.max(1) as f64;
    let roofline_fraction = decode_tps / roofline_tps;
    let kernels = KernelTable::get().level().name();

    if a.json {
        let runs: Vec<_> = reps
            .iter()
            .zip(prompt_rates.iter().zip(&decode_rates))
            .map(|(r, (p, d))| {
                json!({
                    "prompt_ms": r.prompt_secs * 1e3,
                    "decode_ms": r.decode_secs * 1e3,
                    "prompt_tokens_per_s": p,
                    "decode_tokens_per_s": d,
                })
            })
            .collect();
        let v = json!({
            "model": m.file().path().display().to_string(),
            "kernels": kernels,
            "threads": threads,
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "reps": a.reps,
            "prompt_tokens_per_s": prompt_tps,
            "decode_tokens_per_s": decode_tps,
            "roofline_fraction": roofline_fraction,
            "roofline_decode_tokens_per_s": roofline_tps,
            "bandwidth_bytes_per_s": bandwidth,
            "decode_weight_bytes": weight_bytes,
            "runs": runs,
        });
        println!("{v}");
        return Ok(());
    }

    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    println!(
        "{name}: {threads} thread{}, kernels {kernels}",
        plural(threads)
    );
    println!(
        "{} prompt tokens as one batch, then {} decoded tokens; {} rep{} after one warm-up",
        a.prompt_tokens,
        a.gen_tokens,
        a.reps,
        plural(a.reps)
    );
    println!();
    println!(
        "{:<14} {:>10} {:>10} {:>10}",
        "tokens/s", "median", "min", "max"
    );
    for (label, rates, med) in [
        ("prompt", &prompt_rates, prompt_tps),
        ("decode", &decode_rates, decode_tps),
    ] {
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        println!("{label:<14} {med:>10.1} {min:>10.1} {max:>10.1}");
    }
    println!();
    println!(
        "decode weight bytes per token  {:>10.2} MB",
        weight_bytes as f64 / 1e6
    );
    println!(
        "read bandwidth, {threads} thread{}    {:>10.2} GB/s",
        plural(threads),
        bandwidth / 1e9
    );
    println!("roofline decode tokens/s       {roofline_tps:>10.1}");
    println!(
        "roofline fraction              {:>10.1} %",
        roofline_fraction * 100.0
    );
    Ok(())
}

/// Exactly `n` tokens: BOS where the model adds one, then the tokens of [`PROMPT_TEXT`]
/// repeated and cut at `n`.
pub(crate) fn prompt_tokens(
    tok: &Tokenizer,
    n: usize,
) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    let body = tok.encode(PROMPT_TEXT, false, false)?;
    if body.is_empty() {
        return Err("the benchmark text tokenizes to no tokens".into());
    }
    let mut out = Vec::with_capacity(n);
    if tok.add_bos() {
        out.extend(tok.bos());
    }
    out.extend(
        body.iter()
            .copied()
            .cycle()
            .take(n.saturating_sub(out.len())),
    );
    out.truncate(n);
    Ok(out)
}

/// The index of the largest logit (the first one on ties).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub(crate) fn rate(n: usize, secs: f64) -> f64 {
    n as f64 / secs.max(1e-12)
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let h = s.len() / 2;
    if s.len() % 2 == 1 {
        s[h]
    } else {
        (s[h - 1] + s[h]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[5.0]), 5.0);
    }

    #[test]
    fn argmax_takes_the_first_largest() {
        assert_eq!(argmax(&[0.0, 2.0, -1.0, 2.0]), 1);
        assert_eq!(argmax(&[7.0]), 0);
    }
}
