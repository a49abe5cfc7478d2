//! Adapters in the demo: `--adapter PATH[:SCALE]` on run, chat and logits, and the
//! `sparrow adapter inspect | convert | synth | fidelity` commands.

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use sparrow::adapter::patch::Options;
use sparrow::adapter::synth::{self, Spec};
use sparrow::adapter::{lowrank, sdelta, Adapter, Delta, Kind};
use sparrow::gguf::GgufFile;
use sparrow::model::{KvType, Logits, Model, ModelOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// `PATH[:SCALE]`: a PEFT folder, GGUF LoRA or sparse delta, with an optional scale.
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    pub path: PathBuf,
    pub scale: Option<f32>,
}

impl std::str::FromStr for AdapterSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // A scale is what follows the last ':' when it parses as a number (paths may hold ':').
        if let Some((p, sc)) = s.rsplit_once(':') {
            if let Ok(v) = sc.parse::<f32>() {
                if !v.is_finite() {
                    return Err(format!("scale `{sc}` is not finite"));
                }
                return Ok(AdapterSpec {
                    path: p.into(),
                    scale: Some(v),
                });
            }
        }
        if s.is_empty() {
            return Err("empty adapter path".into());
        }
        Ok(AdapterSpec {
            path: s.into(),
            scale: None,
        })
    }
}

/// The adapter options of run, chat and logits.
#[derive(Args, Clone, Debug, Default)]
pub struct AdapterArgs {
    /// Adapter to apply, PATH[:SCALE] (repeatable): a PEFT LoRA or SHiRA folder, a GGUF
    /// LoRA file or a .sdelta.safetensors file. Several are composed and fused at once.
    #[arg(long = "adapter", value_name = "PATH[:SCALE]")]
    pub adapters: Vec<AdapterSpec>,
    /// Run LoRA adapters unfused (y = W x + s B (A x)) instead of patching the weights.
    #[arg(long)]
    pub unfused: bool,
    /// Keep what requantization drops as a sparse side term (exact merge on 4-bit bases).
    #[arg(long)]
    pub exact: bool,
}

/// Loads and applies the adapters of `a` to `m`, reporting to stderr.
pub fn apply_args(m: &mut Model, a: &AdapterArgs) -> AnyResult {
    if a.adapters.is_empty() {
        if a.unfused || a.exact {
            return Err("--unfused and --exact need at least one --adapter".into());
        }
        return Ok(());
    }
    let loaded: Vec<(Adapter, f32)> = a
        .adapters
        .iter()
        .map(|s| {
            let ad = Adapter::load(&s.path)?;
            let scale = s.scale.unwrap_or(ad.default_scale);
            Ok((ad, scale))
        })
        .collect::<AnyResult<_>>()?;
    let (unfused, fused): (Vec<&(Adapter, f32)>, Vec<&(Adapter, f32)>) = loaded
        .iter()
        .partition(|(ad, _)| a.unfused && ad.kind() == Kind::Lora);
    if !unfused.is_empty() {
        let list: Vec<(&Adapter, f32)> = unfused.iter().map(|(ad, s)| (ad, *s)).collect();
        m.set_unfused_adapters(&list)?;
        for (ad, s) in &list {
            eprintln!("adapter {} (unfused, scale {s})", ad.source.display());
        }
    }
    if !fused.is_empty() {
        let list: Vec<(&Adapter, f32)> = fused.iter().map(|(ad, s)| (ad, *s)).collect();
        let t = Instant::now();
        let id = m.apply_adapters(
            &list,
            Options {
                residual: a.exact,
                ..Default::default()
            },
        )?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let e = m
            .applied_adapters()
            .iter()
            .find(|x| x.id == id)
            .expect("just applied");
        let st = e.stats;
        eprintln!(
            "adapter {}: fused into {} tensors, {} elements, {} blocks ({} re-encoded) in {ms:.1} ms",
            e.label, st.tensors, st.elements, st.blocks, st.reencoded
        );
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum AdapterCmd {
    /// Show an adapter's format, targets and sizes.
    Inspect {
        path: PathBuf,
        /// Print every target (default: the first 20).
        #[arg(long)]
        all: bool,
    },
    /// Write a sparse delta (.sdelta.safetensors) from a PEFT SHiRA or LoRA folder, a GGUF
    /// LoRA, another sparse delta, or a fine-tuned GGUF model minus its base (--base).
    Convert {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Fraction of each tensor's entries to keep, largest first (LoRA and model
        /// differences; default 1: every nonzero difference, required for a LoRA).
        #[arg(long)]
        density: Option<f64>,
        /// The base model: GGUF names and the base's row order are written, and the file
        /// records the base's shapes. Required for a fine-tuned model and for PEFT SHiRA.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Element type of the stored values.
        #[arg(long, value_enum, default_value_t = ValueTypeArg::F32)]
        values: ValueTypeArg,
    },
    /// A random adapter over every linear layer of MODEL, for benchmarks.
    Synth {
        #[arg(short, long)]
        model: PathBuf,
        #[arg(long, value_enum)]
        kind: SynthKind,
        /// Fraction of each matrix's entries (shira).
        #[arg(long)]
        density: Option<f64>,
        /// Rank (lora).
        #[arg(long)]
        rank: Option<usize>,
        /// Output: a .sdelta.safetensors file (shira) or a GGUF LoRA file (lora, .gguf).
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// How much of an adapter survives fusing into a quantized base: logits of the fused
    /// model (plain, and with --exact residuals) against an f32 merge of the same base.
    Fidelity {
        #[arg(short, long)]
        model: PathBuf,
        #[arg(long = "adapter", value_name = "PATH[:SCALE]")]
        adapter: AdapterSpec,
        /// Tokens of the prompt whose logits are compared.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        #[arg(short = 't', long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SynthKind {
    Shira,
    Lora,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ValueTypeArg {
    F32,
    F16,
    Bf16,
}

pub fn dispatch(cmd: AdapterCmd) -> AnyResult {
    match cmd {
        AdapterCmd::Inspect { path, all } => inspect(&path, all),
        AdapterCmd::Convert {
            input,
            output,
            density,
            base,
            values,
        } => convert(&input, &output, density, base.as_deref(), values),
        AdapterCmd::Synth {
            model,
            kind,
            density,
            rank,
            output,
            seed,
        } => synth_cmd(&model, kind, density, rank, &output, seed),
        AdapterCmd::Fidelity {
            model,
            adapter,
            tokens,
            threads,
            json,
        } => fidelity(&model, &adapter, tokens, threads, json),
    }
}

fn inspect(path: &Path, all: bool) -> AnyResult {
    let a = Adapter::load(path)?;
    println!("{}", path.display());
    println!("  format       {}", a.format.name());
    println!("  kind         {}", a.kind().name());
    println!(
        "  names        {}",
        match a.names {
            sparrow::adapter::NameScheme::Hf => "HF modules (mapped to GGUF when applied)",
            sparrow::adapter::NameScheme::Gguf => "GGUF tensors",
        }
    );
    println!("  scale        {} (default)", a.default_scale);
    for (k, v) in &a.info {
        println!("  {k:<12} {v}");
    }
    let stored: usize = a.targets.iter().map(|t| t.stored()).sum();
    println!(
        "  targets      {} tensors, {} parameters stored",
        a.targets.len(),
        stored
    );
    println!();
    println!("  {:<44} {:>12} {:>10}  delta", "target", "shape", "stored");
    for t in a.targets.iter().take(if all { usize::MAX } else { 20 }) {
        let shape = if t.rows == 0 {
            "(from base)".to_string()
        } else {
            format!("{}x{}", t.rows, t.cols)
        };
        let what = match &t.delta {
            Delta::Sparse(s) => format!(
                "sparse, density {:.4}",
                s.idx.len() as f64 / (t.rows * t.cols).max(1) as f64
            ),
            Delta::Coo(c) => format!("sparse, {} (row, col) pairs", c.val.len()),
            Delta::LowRank(l) => format!("rank {}, scale {}", l.rank, l.scale),
        };
        println!("  {:<44} {:>12} {:>10}  {what}", t.name, shape, t.stored());
    }
    if !all && a.targets.len() > 20 {
        println!("  ... {} more (--all)", a.targets.len() - 20);
    }
    Ok(())
}

fn convert(
    input: &Path,
    output: &Path,
    density: Option<f64>,
    base: Option<&Path>,
    values: ValueTypeArg,
) -> AnyResult {
    let base_file = base.map(GgufFile::open).transpose()?;
    // A GGUF model (not an adapter): the difference to its base.
    let is_model = input.is_file()
        && GgufFile::open(input)
            .ok()
            .is_some_and(|f| f.metadata().get("general.type").and_then(|v| v.as_str()) != Some("adapter"));
    let (adapter, kept) = if is_model {
        let base = base_file
            .as_ref()
            .ok_or("converting a fine-tuned model needs --base BASE_MODEL")?;
        let tuned = GgufFile::open(input)?;
        lowrank::diff_models(&tuned, base, density.unwrap_or(1.0), input)?
    } else {
        let mut a = Adapter::load(input)?;
        if let Some(b) = &base_file {
            a = a.bind(b)?;
            a.base_hash = Some(sparrow::adapter::base_shape_hash(b));
        } else if a.targets.iter().any(|t| matches!(t.delta, Delta::Coo(_))) {
            return Err("PEFT SHiRA files store no weight shapes: give --base BASE_MODEL".into());
        }
        if a.kind() == Kind::Lora {
            let d = density.ok_or(
                "converting a LoRA needs --density D (the fraction of s*B*A entries to keep)",
            )?;
            lowrank::lora_to_sparse(&a, d)?
        } else {
            (a, Vec::new())
        }
    };
    let opts = sdelta::WriteOptions {
        values: match values {
            ValueTypeArg::F32 => sdelta::ValueType::F32,
            ValueTypeArg::F16 => sdelta::ValueType::F16,
            ValueTypeArg::Bf16 => sdelta::ValueType::BF16,
        },
        default_scale: None,
        source: Some(input.display().to_string()),
        base_model: base.map(|b| b.display().to_string()),
        base_shape_hash: adapter.base_hash.clone(),
    };
    sdelta::write(output, &adapter, &opts)?;
    let nnz: usize = adapter.targets.iter().map(|t| t.stored()).sum();
    eprintln!(
        "wrote {} ({} tensors, {nnz} entries)",
        output.display(),
        adapter.targets.len()
    );
    if !kept.is_empty() {
        let total = lowrank::total(&kept);
        let worst = kept
            .iter()
            .max_by(|a, b| a.relative_error().total_cmp(&b.relative_error()))
            .expect("not empty");
        eprintln!(
            "kept {} of {} entries; relative Frobenius error {:.4} overall, worst {:.4} ({})",
            total.kept,
            total.total,
            total.relative_error(),
            worst.relative_error(),
            worst.name
        );
    }
    Ok(())
}

fn synth_cmd(
    model: &Path,
    kind: SynthKind,
    density: Option<f64>,
    rank: Option<usize>,
    output: &Path,
    seed: u64,
) -> AnyResult {
    let base = GgufFile::open(model)?;
    let spec = match (kind, density, rank) {
        (SynthKind::Shira, Some(d), None) => Spec::Sparse { density: d },
        (SynthKind::Lora, None, Some(r)) => Spec::Lora { rank: r },
        (SynthKind::Shira, _, _) => return Err("--kind shira takes --density D (and no --rank)".into()),
        (SynthKind::Lora, _, _) => return Err("--kind lora takes --rank R (and no --density)".into()),
    };
    let a = synth::synth(&base, spec, seed, output)?;
    match spec {
        Spec::Sparse { .. } => sdelta::write(
            output,
            &a,
            &sdelta::WriteOptions {
                source: Some(format!("sparrow adapter synth (seed {seed})")),
                base_model: Some(model.display().to_string()),
                base_shape_hash: a.base_hash.clone(),
                ..Default::default()
            },
        )?,
        Spec::Lora { .. } => {
            if output.extension().and_then(|e| e.to_str()) != Some("gguf") {
                return Err("--kind lora writes a GGUF LoRA: give an output ending in .gguf".into());
            }
            let arch = base.metadata().str("general.architecture")?;
            synth::write_gguf_lora(output, &a, arch)?;
        }
    }
    eprintln!(
        "wrote {} ({} tensors, {} parameters stored, {} weights touched)",
        output.display(),
        a.targets.len(),
        a.targets.iter().map(|t| t.stored()).sum::<usize>(),
        a.touched()
    );
    Ok(())
}

/// Logits statistics of `got` against `want`: (max |diff|, RMS diff).
fn diff(got: &[f32], want: &[f32]) -> (f64, f64) {
    let mut max = 0f64;
    let mut sq = 0f64;
    for (g, w) in got.iter().zip(want) {
        let d = (*g as f64 - *w as f64).abs();
        max = max.max(d);
        sq += d * d;
    }
    (max, (sq / got.len().max(1) as f64).sqrt())
}

/// Fidelity of fusing on a quantized base, from the logits of every position of a prompt.
/// The reference is the f32 merge: the base dequantized to F32 (a temporary file), the
/// adapter added in f32, run with an f32 KV cache. Against it: the quantized base alone, the
/// quantized base with the adapter fused (plain and exact), and the adapter unfused (LoRA).
/// Because a quantized model also quantizes its activations, the cleanest figure is on the
/// quantized base itself: the exact merge (fused with residuals) against the base gives the
/// adapter's effect, plain fused against exact what requantization dropped of it.
fn fidelity(model: &Path, spec: &AdapterSpec, n: usize, threads: usize, json: bool) -> AnyResult {
    let a = Adapter::load(&spec.path)?;
    let scale = spec.scale.unwrap_or(a.default_scale);
    let src = GgufFile::open(model)?;
    let tmp = std::env::temp_dir().join(format!("sparrow-fidelity-{}.f32.gguf", std::process::id()));
    sparrow::convert::quantize_file(&src, &tmp, sparrow::convert::FileType::parse("F32")?, true, |_, _, _| {})?;
    let opts = ModelOptions {
        threads,
        kv_type: KvType::F32,
    };
    let res = (|| -> AnyResult<serde_json::Value> {
        let mut f32m = Model::open(&tmp, &opts)?;
        let tok = sparrow::tokenizer::Tokenizer::from_metadata(f32m.file().metadata())?;
        let prompt = crate::bench::prompt_tokens(&tok, n)?;
        let eval = |m: &mut Model| -> AnyResult<Vec<f32>> {
            let mut s = m.new_session(prompt.len())?;
            Ok(m.eval(&mut s, &prompt, Logits::All)?)
        };
        let base_f32 = eval(&mut f32m)?;
        f32m.apply_adapter(&a, scale)?;
        let merged_f32 = eval(&mut f32m)?;
        drop(f32m);
        let mut q = Model::open(model, &opts)?;
        let base_q = eval(&mut q)?;
        let t = Instant::now();
        let id = q.apply_adapter(&a, scale)?;
        let plain_ms = t.elapsed().as_secs_f64() * 1e3;
        let st = q.applied_adapters()[0].stats;
        let fused = eval(&mut q)?;
        q.unapply_adapter(id)?;
        let t = Instant::now();
        let id = q.apply_adapters(
            &[(&a, scale)],
            Options {
                residual: true,
                ..Default::default()
            },
        )?;
        let exact_ms = t.elapsed().as_secs_f64() * 1e3;
        let residuals: usize = q.applied_adapters()[0].residuals().map(|r| r.3.len()).sum();
        let exact = eval(&mut q)?;
        q.unapply_adapter(id)?;
        let unfused = if a.kind() == Kind::Lora {
            q.set_unfused_adapters(&[(&a, scale)])?;
            let u = eval(&mut q)?;
            q.set_unfused_adapters(&[])?;
            Some(u)
        } else {
            None
        };
        let effect = diff(&merged_f32, &base_f32);
        let quant = diff(&base_q, &base_f32);
        // On the quantized base itself: the exact merge's effect, and what fusing lost.
        let effect_q = diff(&exact, &base_q);
        let lost = diff(&fused, &exact);
        let row = |name: &str, v: &[f32]| {
            let (max, rms) = diff(v, &merged_f32);
            json!({"what": name, "max_abs": max, "rms": rms})
        };
        let mut rows = vec![
            row("quantized base, no adapter", &base_q),
            row("fused", &fused),
            row("fused --exact (residuals)", &exact),
        ];
        if let Some(u) = &unfused {
            rows.push(row("unfused LoRA", u));
        }
        Ok(json!({
            "model": model.display().to_string(),
            "adapter": spec.path.display().to_string(),
            "scale": scale,
            "tokens": prompt.len(),
            "adapter_effect": {"max_abs": effect.0, "rms": effect.1},
            "base_quantization": {"max_abs": quant.0, "rms": quant.1},
            "effect_on_quantized_base": {"max_abs": effect_q.0, "rms": effect_q.1},
            "lost_by_fusing": {"max_abs": lost.0, "rms": lost.1, "rms_fraction": lost.1 / effect_q.1.max(1e-30)},
            "vs_f32_merge": rows,
            "blocks": st.blocks,
            "reencoded": st.reencoded,
            "residual_entries": residuals,
            "apply_ms": plain_ms,
            "apply_exact_ms": exact_ms,
        }))
    })();
    let _ = std::fs::remove_file(&tmp);
    let v = res?;
    if json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} + {} (scale {scale}), logits of {} positions against the f32 merge",
        model.display(),
        spec.path.display(),
        v["tokens"]
    );
    println!(
        "  adapter effect (f32 merge - f32 base): max {:.4}, rms {:.4}",
        v["adapter_effect"]["max_abs"].as_f64().unwrap_or(0.0),
        v["adapter_effect"]["rms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  base quantization (quantized - f32 base): max {:.4}, rms {:.4}",
        v["base_quantization"]["max_abs"].as_f64().unwrap_or(0.0),
        v["base_quantization"]["rms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  on the quantized base: exact merge - base: max {:.4}, rms {:.4}; fused - exact: max {:.4}, rms {:.4} ({:.1}% of the effect lost)",
        v["effect_on_quantized_base"]["max_abs"].as_f64().unwrap_or(0.0),
        v["effect_on_quantized_base"]["rms"].as_f64().unwrap_or(0.0),
        v["lost_by_fusing"]["max_abs"].as_f64().unwrap_or(0.0),
        v["lost_by_fusing"]["rms"].as_f64().unwrap_or(0.0),
        100.0 * v["lost_by_fusing"]["rms_fraction"].as_f64().unwrap_or(0.0)
    );
    println!("  against the f32 merge:");
    for r in v["vs_f32_merge"].as_array().into_iter().flatten() {
        println!(
            "  {:<30} max {:.4}, rms {:.4}",
            r["what"].as_str().unwrap_or(""),
            r["max_abs"].as_f64().unwrap_or(0.0),
            r["rms"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "  {} blocks patched, {} re-encoded; --exact keeps {} residuals; apply {:.1} ms, --exact {:.1} ms",
        v["blocks"], v["reencoded"], v["residual_entries"],
        v["apply_ms"].as_f64().unwrap_or(0.0),
        v["apply_exact_ms"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}
