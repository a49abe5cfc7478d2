//! `sparrow prune`: a dense model pruned into a sparse one (see sparrow::sparse::prune).

use crate::AnyResult;
use clap::{Args, ValueEnum};
use sparrow::gguf::GgufFile;
use sparrow::model::{Logits, Model, ModelOptions};
use sparrow::sparse::prune::{prune_file, Method, PruneOptions, Structure};
use sparrow::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Magnitude,
    Wanda,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ValuesArg {
    Q8,
    Q4,
}

#[derive(Args)]
pub struct PruneArgs {
    /// The dense GGUF model.
    #[arg(short, long)]
    model: PathBuf,
    /// The sparse GGUF model to write.
    #[arg(short, long)]
    output: PathBuf,
    /// N:M structure, e.g. 2:4 (N kept in every M consecutive inputs).
    #[arg(long, value_name = "N:M")]
    nm: Option<String>,
    /// Group sparsity: groups of G consecutive inputs (4, 8, 16, 32).
    #[arg(long, value_name = "G")]
    group: Option<usize>,
    /// Fraction of groups removed (with --group).
    #[arg(long)]
    sparsity: Option<f32>,
    /// Row tiles (with --group): every R consecutive rows drop the same groups (8, 16 or
    /// 32), which the kernels turn into speed as the dense ones do (eight rows per vector).
    #[arg(long, value_name = "R")]
    tile: Option<usize>,
    #[arg(long, value_enum, default_value = "magnitude")]
    method: MethodArg,
    /// Calibration text (Wanda): its inputs to every matrix weigh the weights.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration windows of 512 tokens at most (Wanda).
    #[arg(long, default_value_t = 16)]
    calib_windows: usize,
    /// Tensors to prune (glob, repeatable); default: attention and MLP matrices.
    #[arg(long)]
    tensors: Vec<String>,
    /// Precision of the kept values; default: q8 for sources of 6 bits or more, else q4.
    #[arg(long, value_enum)]
    values: Option<ValuesArg>,
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
}

fn parse_nm(s: &str) -> AnyResult<(usize, usize)> {
    let bad = || format!("--nm {s}: expected N:M with 1 <= N <= M <= 16, e.g. 2:4");
    let (n, m) = s.split_once(':').ok_or_else(bad)?;
    let n: usize = n.trim().parse().map_err(|_| bad())?;
    let m: usize = m.trim().parse().map_err(|_| bad())?;
    if n == 0 || n > m || m > 16 {
        return Err(bad().into());
    }
    Ok((n, m))
}

/// Sums of squared inputs of every matrix over up to `windows` windows of `text`.
fn calibrate(
    path: &PathBuf,
    text: &str,
    windows: usize,
    threads: usize,
) -> AnyResult<std::collections::HashMap<String, Vec<f64>>> {
    let mut m = Model::open(
        path,
        &ModelOptions {
            threads,
            ..Default::default()
        },
    )?;
    let tok = Tokenizer::from_metadata(m.file().metadata())?;
    let ids = tok.encode(text, true, false)?;
    let n_ctx = 512.min(ids.len());
    if n_ctx < 16 {
        return Err(format!("the calibration text has {} tokens; 16 at least", ids.len()).into());
    }
    let mut s = m.new_session(n_ctx)?;
    m.backend_mut().collect_input_stats(true);
    let bar = indicatif::ProgressBar::new(windows.min(ids.len() / n_ctx) as u64);
    bar.set_message("calibrating");
    for w in ids.chunks_exact(n_ctx).take(windows) {
        s.reset();
        m.eval(&mut s, w, Logits::Last)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(m.backend().input_stats())
}

pub fn run(a: PruneArgs) -> AnyResult {
    let structure = match (&a.nm, a.group, a.sparsity) {
        (Some(nm), None, None) => {
            let (n, m) = parse_nm(nm)?;
            Structure::Nm { n, m }
        }
        (None, Some(g), Some(s)) => Structure::Group {
            g,
            sparsity: s as f64,
            tile: a.tile.unwrap_or(0),
        },
        (None, Some(_), None) => return Err("--group needs --sparsity S (e.g. 0.5)".into()),
        (Some(_), _, Some(_)) => return Err("--sparsity goes with --group, not --nm".into()),
        _ => return Err("give exactly one of --nm N:M and --group G".into()),
    };
    if a.tile.is_some() && a.group.is_none() {
        return Err("--tile goes with --group".into());
    }
    let method = match a.method {
        MethodArg::Magnitude => Method::Magnitude,
        MethodArg::Wanda => Method::Wanda,
    };
    let input_sq = match (method, &a.calib) {
        (Method::Wanda, Some(p)) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            Some(calibrate(&a.model, &text, a.calib_windows, a.threads)?)
        }
        (Method::Wanda, None) => return Err("--method wanda needs --calib FILE".into()),
        (Method::Magnitude, Some(_)) => return Err("--calib goes with --method wanda".into()),
        (Method::Magnitude, None) => None,
    };
    let src = GgufFile::open(&a.model)?;
    let o = PruneOptions {
        structure,
        q8: a.values.map(|v| matches!(v, ValuesArg::Q8)),
        method,
        tensors: a.tensors.clone(),
        input_sq,
    };
    let bar = indicatif::ProgressBar::new(src.tensors().len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let r = prune_file(&src, &a.output, &o, |i, _, name| {
        bar.set_position(i as u64 + 1);
        bar.set_message(name.to_string());
    })?;
    bar.finish_and_clear();
    let how = match structure {
        Structure::Nm { n, m } => format!("{n}:{m}"),
        Structure::Group { g, sparsity, tile } => {
            let tiles = if tile > 0 {
                format!(", tiles of {tile} rows")
            } else {
                String::new()
            };
            format!("{:.0}% in groups of {g}{tiles}", sparsity * 100.0)
        }
    };
    println!(
        "{}: {} matrices pruned {how}, {:.1} MB -> {:.1} MB",
        a.output.display(),
        r.tensors,
        r.dense_bytes as f64 / 1e6,
        r.sparse_bytes as f64 / 1e6
    );
    Ok(())
}
