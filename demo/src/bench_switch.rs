//! `sparrow bench-switch`: how fast adapters are fused, removed and switched, what fusing
//! costs in memory, and decode speed with each adapter fused (and, for a LoRA, unfused).
//!
//! Per adapter, on a freshly opened model:
//! 1. memory, in a child process of its own (so that no earlier adapter's pages or freed
//!    heap hide the cost): the model is warmed up (one decode run pages the weights in), the
//!    resident set is read from /proc/self/status, the adapter applied, the resident set
//!    read again. `rss_added_bytes` is the growth of the resident set; `anon_added_bytes`
//!    the growth of its anonymous part, which also counts the pages of the private mapping
//!    copied on write (they replace page-cache pages in the resident set, so RSS alone
//!    does not see them, but unlike page cache they cannot be dropped under pressure);
//! 2. decode G tokens greedily after a short prompt: on the untouched mapping first
//!    (`base_decode_tokens_per_s`), then R rounds of [unapply, decode, apply, decode]:
//!    `decode_tokens_per_s` is the median with the adapter fused, and
//!    `unpatched_decode_tokens_per_s` the median with it removed, on the same (now
//!    copied-on-write) pages; the unapply and apply of those rounds give `unapply_ms` and
//!    `apply_ms` (medians). `first_apply_ms` is the apply before those rounds: the edit of
//!    the weights, plus keeping the bytes it wrote when the patch fits the model's budget of
//!    compiled patches (`compiled_bytes` after it; see `sparrow::adapter::stack::Stack`),
//!    in which case the later applies copy those bytes in. For a LoRA, `fuse_ms` is
//!    `first_apply_ms`;
//! 3. for a LoRA: decode with it unfused (`unfused_decode_tokens_per_s`).
//!
//! Then, with all adapters loaded in one model: `switch_ms`, the median over R rounds of
//! replacing the previous adapter of the list (cyclically) by this one (unapply + apply);
//! `first_switch_ms` is the first of those rounds (the new adapter is edited in and
//! compiled), and `edit_switch_ms` the median of the same rounds on a model that compiles
//! nothing (every switch edits).

use clap::Args;
use serde_json::json;
use sparrow::adapter::{Adapter, Kind};
use sparrow::model::{Backend, Logits, Model, ModelOptions};
use sparrow::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::time::Instant;

use crate::bench::{argmax, median, prompt_tokens, rate};

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

#[derive(Args)]
pub struct BenchSwitchArgs {
    #[arg(short, long)]
    model: PathBuf,
    /// Adapters to measure, PATH[:SCALE] each.
    #[arg(long, num_args = 1.., required = true, value_name = "PATH[:SCALE]")]
    adapters: Vec<crate::adapter::AdapterSpec>,
    /// Timed repetitions of each measurement (medians are reported).
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    /// Tokens decoded per decode measurement.
    #[arg(short = 'n', long, default_value_t = 64)]
    gen_tokens: usize,
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    #[arg(long)]
    json: bool,
    /// Internal: measure the memory one adapter adds and print it as JSON.
    #[arg(long, hide = true)]
    memory_probe: bool,
}

/// A field of /proc/self/status in bytes (`VmRSS`, `RssAnon`; 0 where unavailable).
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The child's side of the memory measurement: one adapter, one fresh model.
fn memory_probe(a: &BenchSwitchArgs, opts: &ModelOptions) -> AnyResult {
    let spec = &a.adapters[0];
    let raw = Adapter::load(&spec.path)?;
    let mut m = Model::open(&a.model, opts)?;
    let ad = m.bind_adapter(&raw)?;
    let tok = Tokenizer::from_metadata(m.file().metadata())?;
    let prompt = prompt_tokens(&tok, 16)?;
    decode_rate(&mut m, &prompt, a.gen_tokens, 1)?;
    let (rss0, anon0) = (status_bytes("VmRSS"), status_bytes("RssAnon"));
    m.apply_adapter(&ad, spec.scale.unwrap_or(raw.default_scale))?;
    let (rss1, anon1) = (status_bytes("VmRSS"), status_bytes("RssAnon"));
    println!(
        "{}",
        json!({
            "rss_added_bytes": rss1.saturating_sub(rss0),
            "anon_added_bytes": anon1.saturating_sub(anon0),
        })
    );
    Ok(())
}

/// Runs this binary as a memory probe for one adapter.
fn probe_memory(
    a: &BenchSwitchArgs,
    spec: &crate::adapter::AdapterSpec,
) -> AnyResult<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let mut arg = spec.path.display().to_string();
    if let Some(s) = spec.scale {
        arg.push_str(&format!(":{s}"));
    }
    let out = std::process::Command::new(exe)
        .args(["bench-switch", "--memory-probe", "-m"])
        .arg(&a.model)
        .args(["--adapters", &arg, "-n", "4", "-t", &a.threads.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "memory probe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Median decode rate over `reps` runs of `gen` greedy tokens after `prompt`.
fn decode_rate(m: &mut Model, prompt: &[u32], gen: usize, reps: usize) -> AnyResult<f64> {
    let mut s = m.new_session(prompt.len() + gen)?;
    let mut rates = Vec::with_capacity(reps);
    let mut l = Vec::new();
    for _ in 0..reps {
        s.reset();
        let mut next = argmax(&m.eval(&mut s, prompt, Logits::Last)?);
        let mut secs = 0.0;
        for _ in 0..gen {
            let t = Instant::now();
            m.eval_into(&mut s, &[next], Logits::Last, &mut l)?;
            secs += t.elapsed().as_secs_f64();
            next = argmax(&l);
        }
        rates.push(rate(gen, secs));
    }
    Ok(median(&rates))
}

pub fn bench_switch(a: BenchSwitchArgs) -> AnyResult {
    if a.reps == 0 || a.gen_tokens == 0 {
        return Err("--reps and --gen-tokens must be at least 1".into());
    }
    if cfg!(not(target_os = "linux")) {
        log::warn!("rss_added_bytes reads /proc/self/status and is 0 on this system");
    }
    let opts = ModelOptions {
        threads: a.threads,
        ..Default::default()
    };
    if a.memory_probe {
        return memory_probe(&a, &opts);
    }
    let open = || -> AnyResult<Model> { Ok(Model::open(&a.model, &opts)?) };
    let mut m = open()?;
    let tok = Tokenizer::from_metadata(m.file().metadata())?;
    let prompt = prompt_tokens(&tok, 16)?;
    let threads = m.backend().threads();
    // Load and bind every adapter once (not timed: reading files is not switching).
    let mut adapters: Vec<(Adapter, f32, f64)> = Vec::new();
    for s in &a.adapters {
        let t = Instant::now();
        let raw = Adapter::load(&s.path)?;
        let bound = m.bind_adapter(&raw)?;
        let scale = s.scale.unwrap_or(raw.default_scale);
        adapters.push((bound, scale, ms(t)));
    }
    decode_rate(&mut m, &prompt, a.gen_tokens, 1)?; // warm-up
    let base_tps = decode_rate(&mut m, &prompt, a.gen_tokens, a.reps)?;
    drop(m);

    let mut rows = Vec::new();
    for (i, (ad, scale, load_ms)) in adapters.iter().enumerate() {
        let mem = probe_memory(&a, &a.adapters[i])?;
        let mut m = open()?;
        decode_rate(&mut m, &prompt, a.gen_tokens, 1)?;
        let pristine = decode_rate(&mut m, &prompt, a.gen_tokens, a.reps)?;
        let t = Instant::now();
        let mut id = m.apply_adapter(ad, *scale)?;
        let first_apply = ms(t);
        let compiled = m.compiled_patch_bytes();
        let entry = &m.applied_adapters()[0];
        let (stats, undo_bytes) = (entry.stats, entry.undo_bytes());
        let (mut applies, mut unapplies) = (Vec::new(), Vec::new());
        let (mut fused, mut unpatched) = (Vec::new(), Vec::new());
        for _ in 0..a.reps {
            let t = Instant::now();
            m.unapply_adapter(id)?;
            unapplies.push(ms(t));
            unpatched.push(decode_rate(&mut m, &prompt, a.gen_tokens, 1)?);
            let t = Instant::now();
            id = m.apply_adapter(ad, *scale)?;
            applies.push(ms(t));
            fused.push(decode_rate(&mut m, &prompt, a.gen_tokens, 1)?);
        }
        m.unapply_adapter(id)?;
        let unfused_tps = if ad.kind() == Kind::Lora {
            m.set_unfused_adapters(&[(ad, *scale)])?;
            let r = decode_rate(&mut m, &prompt, a.gen_tokens, a.reps)?;
            m.set_unfused_adapters(&[])?;
            Some(r)
        } else {
            None
        };
        rows.push(json!({
            "path": a.adapters[i].path.display().to_string(),
            "kind": ad.kind().name(),
            "scale": scale,
            "load_ms": load_ms,
            "first_apply_ms": first_apply,
            "compiled_bytes": compiled,
            "apply_ms": median(&applies),
            "unapply_ms": median(&unapplies),
            "decode_tokens_per_s": median(&fused),
            "unpatched_decode_tokens_per_s": median(&unpatched),
            "base_decode_tokens_per_s": pristine,
            "unfused_decode_tokens_per_s": unfused_tps,
            "rss_added_bytes": mem["rss_added_bytes"],
            "anon_added_bytes": mem["anon_added_bytes"],
            "undo_bytes": undo_bytes,
            "tensors": stats.tensors,
            "elements": stats.elements,
            "blocks": stats.blocks,
            "reencoded": stats.reencoded,
        }));
    }

    // Switching: previous adapter of the list -> this one, in one model; once with compiled
    // patches (the first round edits and compiles, later ones replay) and once editing
    // every time.
    let switch_rounds = |budget: Option<usize>| -> AnyResult<Vec<Vec<f64>>> {
        let mut m = open()?;
        if let Some(b) = budget {
            m.set_compiled_patch_budget(b);
        }
        decode_rate(&mut m, &prompt, a.gen_tokens, 1)?;
        let n = adapters.len();
        let mut switch = vec![Vec::new(); n];
        let mut id = m.apply_adapter(&adapters[n - 1].0, adapters[n - 1].1)?;
        for _ in 0..a.reps {
            for (i, (ad, scale, _)) in adapters.iter().enumerate() {
                let t = Instant::now();
                id = m.switch_adapter(id, ad, *scale)?;
                switch[i].push(ms(t));
            }
        }
        m.unapply_adapter(id)?;
        Ok(switch)
    };
    let compiled = switch_rounds(None)?;
    let edited = switch_rounds(Some(0))?;
    for ((row, s), e) in rows.iter_mut().zip(&compiled).zip(&edited) {
        row["switch_ms"] = json!(median(s));
        row["first_switch_ms"] = json!(s[0]);
        row["edit_switch_ms"] = json!(median(e));
        if row["kind"] == "lora" {
            row["fuse_ms"] = row["first_apply_ms"].clone();
        }
    }

    let v = json!({
        "model": a.model.display().to_string(),
        "threads": threads,
        "reps": a.reps,
        "gen_tokens": a.gen_tokens,
        "base_decode_tokens_per_s": base_tps,
        "adapters": rows,
    });
    if a.json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} ({threads} threads), base decode {base_tps:.1} tok/s; medians of {} reps",
        a.model.display(),
        a.reps
    );
    println!(
        "{:<36} {:>6} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "adapter",
        "kind",
        "1st apply",
        "apply ms",
        "unapply",
        "switch",
        "1st switch",
        "edit sw",
        "fused",
        "removed",
        "unfused",
        "RSS+MiB",
        "anon+MiB"
    );
    for r in v["adapters"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<36} {:>6} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8.2} {:>8.1} {:>8.1} {:>8} {:>8.1} {:>8.1}",
            r["path"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            f("first_apply_ms"),
            f("apply_ms"),
            f("unapply_ms"),
            f("switch_ms"),
            f("first_switch_ms"),
            f("edit_switch_ms"),
            f("decode_tokens_per_s"),
            f("unpatched_decode_tokens_per_s"),
            r["unfused_decode_tokens_per_s"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.1}")),
            f("rss_added_bytes") / (1 << 20) as f64,
            f("anon_added_bytes") / (1 << 20) as f64
        );
    }
    println!("(decode tok/s: fused = with the adapter, removed = after unapply on the same pages)");
    Ok(())
}
