//! `sparrow`: the desktop demo. Runs models, tokenizes, dumps logits, inspects and converts
//! GGUF files. Errors print one line naming what was wrong and exit with status 1.

mod adapter;
mod bench;
mod bench_switch;
mod fetch;
mod inspect;
mod perplexity;
mod prune;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use sparrow::convert::{self, FileType};
use sparrow::generate::{generate, GenerateOptions};
use sparrow::gguf::GgufFile;
use sparrow::model::{Backend, KvType, Logits, Model, ModelOptions};
use sparrow::sample::SamplerConfig;
use sparrow::tokenizer::{ChatTemplate, Message, Tokenizer};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "sparrow",
    version,
    about = "On-device inference runtime: run, inspect and convert GGUF models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streaming tokens as they come.
    Run(RunArgs),
    /// Chat with a model through its chat template (multi-turn; an empty line or EOF ends).
    Chat(ChatArgs),
    /// Measure prompt and decode tokens/s, and decode against the memory-bandwidth roofline.
    Bench(bench::BenchArgs),
    /// Inspect, convert and synthesize adapters.
    #[command(subcommand)]
    Adapter(adapter::AdapterCmd),
    /// Measure adapter apply, unapply and switch times, memory, and decode speed.
    BenchSwitch(bench_switch::BenchSwitchArgs),
    /// Perplexity over a text file, computed as llama.cpp's perplexity tool does.
    Perplexity(perplexity::PerplexityArgs),
    /// Prune a dense model into an N:M sparse one (magnitude or Wanda).
    Prune(prune::PruneArgs),
    /// Print the token ids of TEXT as a JSON array.
    Tokenize {
        #[arg(short, long)]
        model: PathBuf,
        /// Parse special tokens written in the text (e.g. <|im_start|>).
        #[arg(long)]
        special: bool,
        /// Do not add BOS/EOS even where the model asks for them.
        #[arg(long)]
        no_add_special: bool,
        text: String,
    },
    /// Write the logits of every position as little-endian f32, [n_tokens, vocab].
    Logits {
        #[arg(short, long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Keep the KV cache in f32 instead of f16 (exact reference comparisons).
        #[arg(long)]
        kv_f32: bool,
        #[command(flatten)]
        adapters: adapter::AdapterArgs,
    },
    /// Show metadata, the tensor table and bytes by type, without reading weights.
    Inspect {
        model: PathBuf,
        /// Print every tensor (default: the first 40).
        #[arg(long)]
        all: bool,
    },
    /// Convert a GGUF model to another block format.
    Quantize {
        #[arg(short, long)]
        model: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K(_S), Q4_K_M, Q5_K(_S), Q5_K_M, Q6_K.
        #[arg(long = "type")]
        ty: String,
        /// Every weight matrix in the one type (no llama.cpp mixing rules).
        #[arg(long)]
        pure: bool,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// GGUF model (default: SmolLM2-135M-Instruct Q4_1, fetched on first use).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(short = 'c', long, default_value_t = 0)]
    ctx: usize,
    #[command(flatten)]
    adapters: adapter::AdapterArgs,
}

#[derive(Args)]
struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(short, long, default_value_t = 0x5eed)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn options(&self, max_tokens: usize, ignore_eos: bool) -> GenerateOptions {
        GenerateOptions {
            max_tokens,
            sampler: SamplerConfig {
                temperature: self.temp,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            stop_at_eog: !ignore_eos,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(short, long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 128)]
    n_predict: usize,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// Tokens per answer at most.
    #[arg(short = 'n', long, default_value_t = 512)]
    n_predict: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn dispatch(cmd: Cmd) -> AnyResult {
    match cmd {
        Cmd::Run(a) => run(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Perplexity(a) => perplexity::run(a),
        Cmd::Prune(a) => prune::run(a),
        Cmd::Adapter(c) => adapter::dispatch(c),
        Cmd::BenchSwitch(a) => bench_switch::bench_switch(a),
        Cmd::Tokenize {
            model,
            special,
            no_add_special,
            text,
        } => {
            let f = GgufFile::open(&model)?;
            let tok = Tokenizer::from_metadata(f.metadata())?;
            let ids = tok.encode(&text, !no_add_special, special)?;
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Cmd::Logits {
            model,
            tokens,
            output,
            threads,
            kv_f32,
            adapters,
        } => {
            let kv_type = if kv_f32 { KvType::F32 } else { KvType::F16 };
            let mut m = Model::open(&model, &ModelOptions { threads, kv_type })?;
            adapter::apply_args(&mut m, &adapters)?;
            let mut s = m.new_session(tokens.len().max(1))?;
            let logits = m.eval(&mut s, &tokens, Logits::All)?;
            let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(&output, bytes).map_err(|e| format!("{}: {e}", output.display()))?;
            eprintln!(
                "wrote {} x {} logits to {}",
                tokens.len(),
                m.config().n_vocab,
                output.display()
            );
            Ok(())
        }
        Cmd::Inspect { model, all } => inspect::inspect(&model, all),
        Cmd::Quantize {
            model,
            output,
            ty,
            pure,
        } => {
            let ftype = FileType::parse(&ty)?;
            let src = GgufFile::open(&model)?;
            let bar = indicatif::ProgressBar::new(src.tensors().len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            convert::quantize_file(&src, &output, ftype, pure, |i, _, name| {
                bar.set_position(i as u64);
                bar.set_message(name.to_string());
            })?;
            bar.finish_and_clear();
            eprintln!("wrote {} ({})", output.display(), ftype.name());
            Ok(())
        }
    }
}

fn open_model(a: &ModelArgs) -> AnyResult<(Model, Tokenizer)> {
    let path = match &a.model {
        Some(p) => p.clone(),
        None => fetch::default_model()?,
    };
    let m = Model::open(
        &path,
        &ModelOptions {
            threads: a.threads,
            ..Default::default()
        },
    )?;
    let mut m = m;
    adapter::apply_args(&mut m, &a.adapters)?;
    let tok = Tokenizer::from_metadata(m.file().metadata())?;
    Ok((m, tok))
}

fn run(a: RunArgs) -> AnyResult {
    let (mut m, tok) = open_model(&a.model)?;
    let prompt = tok.encode(&a.prompt, true, true)?;
    let n_ctx = if a.model.ctx > 0 {
        a.model.ctx
    } else {
        (prompt.len() + a.n_predict).max(1)
    };
    let mut s = m.new_session(n_ctx)?;
    let opts = a.sampling.options(a.n_predict, a.ignore_eos);
    let stdout = std::io::stdout();
    let g = generate(&mut m, &mut s, &tok, &prompt, &opts, |piece| {
        if !a.json {
            let mut o = stdout.lock();
            let _ = o.write_all(piece.as_bytes());
            let _ = o.flush();
        }
        true
    })?;
    if a.json {
        let v = json!({
            "model": m.file().path().display().to_string(),
            "threads": m.backend().threads(),
            "prompt_tokens": g.prompt_tokens,
            "tokens": g.tokens,
            "text": g.text,
            "stop_reason": g.stop_reason.as_str(),
            "prompt_tokens_per_s": g.prompt_tokens_per_s(),
            "decode_tokens_per_s": g.decode_tokens_per_s(),
            "prompt_ms": g.prompt_secs * 1e3,
            "decode_ms": g.decode_secs * 1e3,
            "decode_steps": g.decode_steps,
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} tokens at {:.1} tok/s, stop: {}]",
            g.prompt_tokens.len(),
            g.prompt_tokens_per_s(),
            g.tokens.len(),
            g.decode_tokens_per_s(),
            g.stop_reason.as_str()
        );
    }
    Ok(())
}

fn chat(a: ChatArgs) -> AnyResult {
    let (mut m, tok) = open_model(&a.model)?;
    let template = ChatTemplate::from_metadata(m.file().metadata())?;
    let n_ctx = if a.model.ctx > 0 {
        a.model.ctx
    } else {
        m.config().n_ctx_train.min(4096)
    };
    let mut s = m.new_session(n_ctx)?;
    let mut messages: Vec<Message> = Vec::new();
    if let Some(sys) = &a.system {
        messages.push(Message::new("system", sys));
    }
    let opts = a.sampling.options(a.n_predict, false);
    let stdin = std::io::stdin();
    let mut line = String::new();
    // The session holds the tokens of the conversation rendered so far; each turn renders
    // the whole conversation and evaluates only what is new.
    let mut seen: Vec<u32> = Vec::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(Message::new("user", line.trim_end()));
        let text = template.render(&messages, true)?;
        let all = tok.encode(&text, true, true)?;
        let common = seen.iter().zip(&all).take_while(|(a, b)| a == b).count();
        let common = common.min(all.len().saturating_sub(1));
        s.truncate(common);
        let stdout = std::io::stdout();
        let g = generate(&mut m, &mut s, &tok, &all[common..], &opts, |piece| {
            let mut o = stdout.lock();
            let _ = o.write_all(piece.as_bytes());
            let _ = o.flush();
            true
        })?;
        println!();
        seen = all;
        seen.extend(&g.tokens[..g.decode_steps]);
        messages.push(Message::new("assistant", g.text.trim()));
    }
    Ok(())
}
