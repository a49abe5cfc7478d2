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
    /// Keep what requantization drops as a sparse side term: the exact merge of sparse
    /// adapters on 4-bit bases, at the cost of a sparse product per matrix (LoRAs: use
    /// --unfused instead).
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
    type Scaled<'a> = Vec<&'a (Adapter, f32)>;
    let (unfused, fused): (Scaled, Scaled) = loaded
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
        if st.dropped > 0 {
            eprintln!(
                "adapter {}: {} deltas fall on pruned positions of sparse matrices; {}",
                e.label,
                st.dropped,
                if a.exact {
                    "they are kept beside the weights (--exact)"
                } else {
                    "they are dropped (the pattern stays sparse; --exact keeps them)"
                }
            );
        }
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
    let stored: usize = a.targets().iter().map(|t| t.stored()).sum();
    println!(
        "  targets      {} tensors, {} parameters stored",
        a.targets().len(),
        stored
    );
    println!();
    println!("  {:<44} {:>12} {:>10}  delta", "target", "shape", "stored");
    for t in a.targets().iter().take(if all { usize::MAX } else { 20 }) {
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
    if !all && a.targets().len() > 20 {
        println!("  ... {} more (--all)", a.targets().len() - 20);
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
        && GgufFile::open(input).ok().is_some_and(|f| {
            f.metadata().get("general.type").and_then(|v| v.as_str()) != Some("adapter")
        });
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
        } else if a.targets().iter().any(|t| matches!(t.delta, Delta::Coo(_))) {
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
    let nnz: usize = adapter.targets().iter().map(|t| t.stored()).sum();
    eprintln!(
        "wrote {} ({} tensors, {nnz} entries)",
        output.display(),
        adapter.targets().len()
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
        (SynthKind::Shira, _, _) => {
            return Err("--kind shira takes --density D (and no --rank)".into())
        }
        (SynthKind::Lora, _, _) => {
            return Err("--kind lora takes --rank R (and no --density)".into())
        }
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
                return Err(
                    "--kind lora writes a GGUF LoRA: give an output ending in .gguf".into(),
                );
            }
            let arch = base.metadata().str("general.architecture")?;
            synth::write_gguf_lora(output, &a, arch)?;
        }
    }
    eprintln!(
        "wrote {} ({} tensors, {} parameters stored, {} weights touched)",
        output.display(),
        a.targets().len(),
        a.targets().iter().map(|t| t.stored()).sum::<usize>(),
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

/// Fidelity of fusing on a quantized base.
///
/// Weights: for every target, how much of the delta the stored weights hold,
/// ||(dequant(fused) - dequant(base)) - delta||_F / ||delta||_F over all targets ("lost"):
/// 0 for an exact merge, 1 when every delta vanished in rounding. With `--exact` the
/// residuals complete it (0 up to f32 rounding, checked in tests).
///
/// Logits of every position of a prompt against the f32 merge: the base dequantized to F32
/// (a temporary file) with the adapter added in f32 and an f32 KV cache. The quantized base
/// alone gives the floor (its weights and activations are rounded); fused, fused `--exact`
/// and unfused (LoRA) are compared with it. Decode speed of each variant is timed too.
fn fidelity(model: &Path, spec: &AdapterSpec, n: usize, threads: usize, json: bool) -> AnyResult {
    let raw = Adapter::load(&spec.path)?;
    let scale = spec.scale.unwrap_or(raw.default_scale);
    let src = GgufFile::open(model)?;
    let a = raw.bind(&src)?;
    let tmp =
        std::env::temp_dir().join(format!("sparrow-fidelity-{}.f32.gguf", std::process::id()));
    sparrow::convert::quantize_file(
        &src,
        &tmp,
        sparrow::convert::FileType::parse("F32")?,
        true,
        |_, _, _| {},
    )?;
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
        let decode = |m: &mut Model| -> AnyResult<f64> {
            let mut s = m.new_session(prompt.len() + 32)?;
            let mut next = crate::bench::argmax(&m.eval(&mut s, &prompt, Logits::Last)?);
            let t = Instant::now();
            for _ in 0..32 {
                next = crate::bench::argmax(&m.eval(&mut s, &[next], Logits::Last)?);
            }
            Ok(32.0 / t.elapsed().as_secs_f64())
        };
        let base_f32 = eval(&mut f32m)?;
        f32m.apply_adapter(&a, scale)?;
        let merged_f32 = eval(&mut f32m)?;
        drop(f32m);

        let mut q = Model::open(model, &opts)?;
        let base_q = eval(&mut q)?;
        let base_tps = decode(&mut q)?;
        let before = q.file().bytes().to_vec();
        let t = Instant::now();
        let id = q.apply_adapter(&a, scale)?;
        let plain_ms = t.elapsed().as_secs_f64() * 1e3;
        let st = q.applied_adapters()[0].stats;
        let lost_w = weight_loss(&a, scale, &src, &before, q.file().bytes())?;
        let fused = eval(&mut q)?;
        let fused_tps = decode(&mut q)?;
        q.unapply_adapter(id)?;
        let exact = if a.kind() == Kind::Sparse {
            let t = Instant::now();
            let id = q.apply_adapters(
                &[(&a, scale)],
                Options {
                    residual: true,
                    ..Default::default()
                },
            )?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let entries: usize = q.applied_adapters()[0].residuals().map(|r| r.3.len()).sum();
            let l = eval(&mut q)?;
            let tps = decode(&mut q)?;
            q.unapply_adapter(id)?;
            Some((l, ms, entries, tps))
        } else {
            None
        };
        let unfused = if a.kind() == Kind::Lora {
            q.set_unfused_adapters(&[(&a, scale)])?;
            let u = eval(&mut q)?;
            let tps = decode(&mut q)?;
            q.set_unfused_adapters(&[])?;
            Some((u, tps))
        } else {
            None
        };
        let effect = diff(&merged_f32, &base_f32);
        let row = |name: &str, v: &[f32], tps: f64| {
            let (max, rms) = diff(v, &merged_f32);
            json!({"what": name, "max_abs": max, "rms": rms, "decode_tokens_per_s": tps})
        };
        let mut rows = vec![
            row("quantized base, no adapter", &base_q, base_tps),
            row("fused", &fused, fused_tps),
        ];
        if let Some((l, _, _, tps)) = &exact {
            rows.push(row("fused --exact (residuals)", l, *tps));
        }
        if let Some((u, tps)) = &unfused {
            rows.push(row("unfused LoRA", u, *tps));
        }
        Ok(json!({
            "model": model.display().to_string(),
            "adapter": spec.path.display().to_string(),
            "scale": scale,
            "tokens": prompt.len(),
            "adapter_effect": {"max_abs": effect.0, "rms": effect.1},
            "weights_delta_lost": lost_w,
            "vs_f32_merge": rows,
            "blocks": st.blocks,
            "reencoded": st.reencoded,
            "apply_ms": plain_ms,
            "exact_apply_ms": exact.as_ref().map(|e| e.1),
            "residual_entries": exact.as_ref().map(|e| e.2),
        }))
    })();
    let _ = std::fs::remove_file(&tmp);
    let v = res?;
    if json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} + {} (scale {scale}): {} blocks patched ({} re-encoded) in {:.1} ms",
        model.display(),
        spec.path.display(),
        v["blocks"],
        v["reencoded"],
        v["apply_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  weights: {:.1}% of the delta lost in rounding (||stored - exact|| / ||delta||)",
        100.0 * v["weights_delta_lost"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  logits of {} positions; adapter effect (f32 merge - f32 base): max {:.4}, rms {:.4}",
        v["tokens"],
        v["adapter_effect"]["max_abs"].as_f64().unwrap_or(0.0),
        v["adapter_effect"]["rms"].as_f64().unwrap_or(0.0)
    );
    println!("  against the f32 merge:");
    for r in v["vs_f32_merge"].as_array().into_iter().flatten() {
        println!(
            "    {:<28} max {:.4}, rms {:.4}, decode {:.1} tok/s",
            r["what"].as_str().unwrap_or(""),
            r["max_abs"].as_f64().unwrap_or(0.0),
            r["rms"].as_f64().unwrap_or(0.0),
            r["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(e) = v["residual_entries"].as_u64() {
        println!(
            "  --exact keeps {e} residuals; its apply took {:.1} ms",
            v["exact_apply_ms"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// ||(dequant(after) - dequant(before)) - scale * delta||_F / ||scale * delta||_F over the
/// targets of `a` (bound to `base`), with `before` and `after` whole mappings.
fn weight_loss(
    a: &Adapter,
    scale: f32,
    base: &GgufFile,
    before: &[u8],
    after: &[u8],
) -> AnyResult<f64> {
    let (mut err2, mut norm2) = (0f64, 0f64);
    for t in a.targets() {
        let info = base.tensor(&t.name).ok_or("target vanished")?;
        let r = base.range(info)?;
        let n = t.rows * t.cols;
        let (mut x, mut y) = (vec![0f32; n], vec![0f32; n]);
        sparrow::quant::dequantize(info.ty, &before[r.clone()], &mut x)?;
        sparrow::quant::dequantize(info.ty, &after[r], &mut y)?;
        let mut delta = vec![0f32; n];
        match &t.delta {
            Delta::Sparse(s) => {
                for (&i, &v) in s.idx.iter().zip(&s.val) {
                    delta[i as usize] = v * scale;
                }
            }
            Delta::LowRank(l) => {
                delta = lowrank::dense_low_rank(l, t.rows, t.cols);
                delta.iter_mut().for_each(|d| *d *= scale);
            }
            Delta::Coo(_) => return Err("adapter not bound".into()),
        }
        for i in 0..n {
            let got = y[i] as f64 - x[i] as f64;
            err2 += (got - delta[i] as f64).powi(2);
            norm2 += (delta[i] as f64).powi(2);
        }
    }
    Ok(if norm2 > 0.0 {
        (err2 / norm2).sqrt()
    } else {
        0.0
    })
}
