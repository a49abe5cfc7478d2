//! candle-bench: prompt and decode speed of candle-transformers' `quantized_llama` on a GGUF
//! file, for bench/compare.sh.
//!
//! Usage: candle-bench MODEL.gguf --threads K --prompt-tokens P --gen-tokens G
//!                     [--tokens ID,ID,...] [--no-warmup]
//!
//! The prompt (P token ids: the first P of --tokens, which must hold at least P; without
//! --tokens a fixed synthetic sequence) is evaluated as ONE forward pass (timed), then G
//! single-token forward passes (timed), each fed the previous greedy (argmax) token. The time
//! of a step covers the forward pass and the argmax over the logits (candle's CPU backend is
//! synchronous: the result is ready when `forward` returns). Prints one JSON line:
//! {"engine":"candle", prompt_tokens_per_s, decode_tokens_per_s, threads, tokens: [the G+1
//! greedy ids: the one chosen from the prompt logits, then one per decode step], ...}.
//!
//! Threads: candle 0.11 runs its CPU work on three pools: a "barrier pool" for the quantized
//! matmuls (sized by CANDLE_NUM_THREADS, else RAYON_NUM_THREADS, else the physical cores),
//! its private rayon pool installed by `Device::with_context` (RAYON_NUM_THREADS, else the
//! physical cores) and rayon's global pool (same). All three are created lazily, so this
//! program sets CANDLE_NUM_THREADS and RAYON_NUM_THREADS to K before touching candle, builds the
//! global rayon pool with K threads, and runs the model inside `with_context`.
//!
//! A warm-up (the prompt plus two decode steps, then the KV cache is cleared) runs before the
//! timed pass unless --no-warmup is given; the load time is reported separately.

use std::io::Write;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor, D};
use candle_transformers::models::quantized_llama::ModelWeights;

struct Args {
    model: String,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    tokens: Option<Vec<u32>>,
    warmup: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: candle-bench MODEL.gguf --threads K --prompt-tokens P --gen-tokens G \
         [--tokens ID,ID,...] [--no-warmup]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut model = None;
    let mut threads = 1usize;
    let mut prompt_tokens = 128usize;
    let mut gen_tokens = 128usize;
    let mut tokens = None;
    let mut warmup = true;
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, name: &str| -> usize {
        v.and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            eprintln!("candle-bench: {name} needs a number");
            usage()
        })
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" | "-t" => threads = num(it.next(), "--threads"),
            "--prompt-tokens" | "-p" => prompt_tokens = num(it.next(), "--prompt-tokens"),
            "--gen-tokens" | "-n" => gen_tokens = num(it.next(), "--gen-tokens"),
            "--tokens" => {
                let s = it.next().unwrap_or_else(|| usage());
                let ids: Result<Vec<u32>, _> = s
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .filter(|x| !x.trim().is_empty())
                    .map(|x| x.trim().parse::<u32>())
                    .collect();
                tokens = Some(ids.unwrap_or_else(|e| {
                    eprintln!("candle-bench: bad --tokens: {e}");
                    usage()
                }));
            }
            "--no-warmup" => warmup = false,
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => {
                eprintln!("candle-bench: unknown option {s}");
                usage()
            }
            _ if model.is_none() => model = Some(a),
            _ => usage(),
        }
    }
    let model = model.unwrap_or_else(|| usage());
    if threads == 0 || prompt_tokens == 0 {
        usage()
    }
    Args {
        model,
        threads,
        prompt_tokens,
        gen_tokens,
        tokens,
        warmup,
    }
}

fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    // logits: [1, vocab]; ties -> lowest id (candle's argmax keeps the first maximum).
    logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()
}

fn os_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn main() -> candle_core::Result<()> {
    let a = parse_args();
    // Before any candle call: every candle pool reads these lazily (see the module doc).
    // Edition 2021: set_var is safe; nothing else runs yet.
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", a.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()
        .map_err(|e| candle_core::Error::Msg(format!("rayon global pool: {e}")))?;

    let device = Device::Cpu;
    let t_load = Instant::now();
    let mut file = std::fs::File::open(&a.model)?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| e.with_path(&a.model))?;
    let vocab = content
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.len())
        .unwrap_or(32000);
    let mut model = ModelWeights::from_gguf(content, &mut file, &device)?;
    let load_s = t_load.elapsed().as_secs_f64();

    let prompt: Vec<u32> = match &a.tokens {
        Some(t) => {
            if t.len() < a.prompt_tokens {
                eprintln!(
                    "candle-bench: --tokens has {} ids, --prompt-tokens asks for {}",
                    t.len(),
                    a.prompt_tokens
                );
                std::process::exit(2)
            }
            t[..a.prompt_tokens].to_vec()
        }
        None => (0..a.prompt_tokens as u32)
            .map(|i| 1 + (i * 7919) % (vocab as u32 - 1))
            .collect(),
    };

    let res = device.with_context(|| -> candle_core::Result<_> {
        let run =
            |model: &mut ModelWeights, n_gen: usize| -> candle_core::Result<(f64, f64, Vec<u32>)> {
                model.clear_kv_cache();
                let x = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
                let t0 = Instant::now();
                let logits = model.forward(&x, 0)?;
                let mut next = argmax(&logits)?;
                let prompt_s = t0.elapsed().as_secs_f64();
                let mut out = vec![next];
                let t1 = Instant::now();
                for i in 0..n_gen {
                    let x = Tensor::new(&[next], &device)?.unsqueeze(0)?;
                    let logits = model.forward(&x, prompt.len() + i)?;
                    next = argmax(&logits)?;
                    out.push(next);
                }
                Ok((prompt_s, t1.elapsed().as_secs_f64(), out))
            };
        if a.warmup {
            run(&mut model, 2)?;
        }
        run(&mut model, a.gen_tokens)
    })?;
    let (prompt_s, decode_s, tokens) = res;

    let ids: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let decode_tps = if a.gen_tokens > 0 {
        a.gen_tokens as f64 / decode_s
    } else {
        0.0
    };
    let line = format!(
        "{{\"engine\":\"candle\",\"model\":{:?},\"threads\":{},\"candle_num_threads\":{},\
         \"os_threads\":{},\"prompt_tokens\":{},\"gen_tokens\":{},\"warmup\":{},\"load_s\":{:.6},\
         \"prompt_s\":{:.6},\"decode_s\":{:.6},\"prompt_tokens_per_s\":{:.4},\
         \"decode_tokens_per_s\":{:.4},\"tokens\":[{}]}}",
        a.model,
        a.threads,
        candle_core::utils::get_num_threads(),
        os_threads(),
        prompt.len(),
        a.gen_tokens,
        a.warmup,
        load_s,
        prompt_s,
        decode_s,
        prompt.len() as f64 / prompt_s,
        decode_tps,
        ids.join(",")
    );
    let mut so = std::io::stdout().lock();
    writeln!(so, "{line}")?;
    Ok(())
}
