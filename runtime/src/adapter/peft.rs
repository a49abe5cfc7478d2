//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! LoRA (`peft_type = LORA`): per module `<m>.lora_A.weight` [r, in] and `<m>.lora_B.weight`
//! [out, r]; the merged weight is W + s B A with s = alpha / r, or alpha / sqrt(r) with
//! `use_rslora`, where r and alpha come from `rank_pattern` / `alpha_pattern` when a key
//! matches the module (PEFT's `get_pattern_key`: the module name equals the key or ends with
//! `.` + key) and from `r` / `lora_alpha` otherwise. DoRA, LoRA on embeddings, bias training
//! and `modules_to_save` are refused with an error naming what was found.
//!
//! SHiRA (`peft_type = SHIRA`, peft >= 0.17): per module `<m>.shira_indices` [2, nnz]
//! (row, col) and `<m>.shira_weight` [nnz]; the merge is W[row, col] += scale * weight with
//! scale 1 (PEFT's default; `set_scale` is a run-time knob, given here as the user scale).
//!
//! Module names are HF names (`model.layers.0.self_attn.q_proj`); [`super::Adapter::bind`]
//! maps them to GGUF tensors.

use super::st;
use super::{
    check_low_rank, check_sparse, Adapter, Coo, Delta, Format, LowRank, NameScheme, SparseDelta,
    Target,
};
use crate::{Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";

pub fn load(dir: &Path) -> Result<Adapter> {
    let cfg_path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| Error::adapter(&cfg_path, format!("invalid JSON: {e}")))?;
    let err = |m: String| Error::adapter(dir, m);
    let peft_type = cfg
        .get("peft_type")
        .and_then(Value::as_str)
        .ok_or_else(|| err(format!("{CONFIG} has no `peft_type`")))?;
    let weights_path = dir.join(WEIGHTS);
    if !weights_path.exists() {
        let bin = dir.join("adapter_model.bin");
        return Err(if bin.exists() {
            err("adapter_model.bin (pickle) is not read; save the adapter with safetensors".into())
        } else {
            err(format!("{WEIGHTS} is missing"))
        });
    }
    let file = st::File::read(&weights_path)?;
    let parsed = file.parse(&weights_path)?;
    let mut info = vec![("peft_type".to_string(), peft_type.to_string())];
    for k in [
        "base_model_name_or_path",
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
    ] {
        if let Some(v) = cfg.get(k).filter(|v| !v.is_null()) {
            info.push((k.to_string(), v.to_string()));
        }
    }

    // Group tensors by module: (module, role) where role is the key's suffix.
    let mut modules: BTreeMap<String, BTreeMap<&'static str, safetensors::tensor::TensorView>> =
        BTreeMap::new();
    const ROLES: [&str; 4] = [
        ".lora_A.weight",
        ".lora_B.weight",
        ".shira_indices",
        ".shira_weight",
    ];
    for (key, view) in parsed.iter() {
        let name = key.strip_prefix("base_model.model.").unwrap_or(key);
        if name.contains("lora_magnitude_vector") {
            return Err(err(format!(
                "`{key}`: DoRA adapters are not supported (merging one rescales every column \
                 of the base weight); merge it with PEFT and convert the result instead"
            )));
        }
        if name.contains("lora_embedding_") {
            return Err(err(format!(
                "`{key}`: LoRA on embedding layers is not supported"
            )));
        }
        // PEFT writes `shira_indices` with an adapter-name suffix in some versions.
        let name = match name.rsplit_once(".shira_indices.") {
            Some((m, _)) => format!("{m}.shira_indices"),
            None => name.to_string(),
        };
        let Some(role) = ROLES.iter().find(|r| name.ends_with(*r)) else {
            return Err(err(format!(
                "tensor `{key}` is not a LoRA or SHiRA weight (bias training and \
                 modules_to_save are not supported)"
            )));
        };
        let module = name[..name.len() - role.len()].to_string();
        modules.entry(module).or_default().insert(role, view);
    }
    if modules.is_empty() {
        return Err(err(format!("{WEIGHTS} holds no adapter tensors")));
    }

    let targets = match peft_type {
        "LORA" => lora_targets(dir, &cfg, &modules)?,
        "SHIRA" => shira_targets(dir, &modules)?,
        other => {
            return Err(err(format!(
                "peft_type `{other}` is not supported (LORA and SHIRA are)"
            )))
        }
    };
    Ok(Adapter {
        uid: super::new_uid(),
        source: dir.to_path_buf(),
        format: if peft_type == "LORA" {
            Format::PeftLora
        } else {
            Format::PeftShira
        },
        names: NameScheme::Hf,
        targets,
        default_scale: 1.0,
        info,
        base_hash: None,
        base_arch: None,
    })
}

type Modules<'a> = BTreeMap<String, BTreeMap<&'static str, safetensors::tensor::TensorView<'a>>>;

fn lora_targets(dir: &Path, cfg: &Value, modules: &Modules<'_>) -> Result<Vec<Target>> {
    let err = |m: String| Error::adapter(dir, m);
    let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("use_dora") {
        return Err(err(
            "DoRA adapters (use_dora) are not supported: merging one rescales every column of \
             the base weight; merge it with PEFT and convert the result instead"
                .into(),
        ));
    }
    for k in ["fan_in_fan_out", "lora_bias"] {
        if flag(k) {
            return Err(err(format!("`{k}: true` is not supported")));
        }
    }
    if cfg.get("layer_replication").is_some_and(|v| !v.is_null()) {
        return Err(err("`layer_replication` is not supported".into()));
    }
    let num = |k: &str| cfg.get(k).and_then(Value::as_f64);
    let r = num("r").ok_or_else(|| err(format!("{CONFIG} has no numeric `r`")))?;
    let alpha = num("lora_alpha").unwrap_or(8.0);
    let rslora = flag("use_rslora");
    let rank_pattern = patterns(dir, cfg, "rank_pattern")?;
    let alpha_pattern = patterns(dir, cfg, "alpha_pattern")?;

    let mut out = Vec::with_capacity(modules.len());
    for (m, roles) in modules {
        let (Some(a), Some(b)) = (roles.get(".lora_A.weight"), roles.get(".lora_B.weight")) else {
            return Err(err(format!(
                "module `{m}` needs both lora_A and lora_B (found {:?})",
                roles.keys().collect::<Vec<_>>()
            )));
        };
        if roles.len() != 2 {
            return Err(err(format!("module `{m}` mixes LoRA and SHiRA tensors")));
        }
        let (sa, sb) = (a.shape(), b.shape());
        let (rank, cols, rows) = match (sa, sb) {
            ([ra, c], [o, rb]) if ra == rb && *ra > 0 => (*ra, *c, *o),
            _ => {
                return Err(err(format!(
                "module `{m}`: lora_A is {sa:?} and lora_B {sb:?}; [r, in] and [out, r] expected"
            )))
            }
        };
        let r_m = matched(dir, &rank_pattern, m)?.unwrap_or(r);
        if r_m != rank as f64 {
            return Err(err(format!(
                "module `{m}`: the config gives rank {r_m} but lora_A has {rank} rows"
            )));
        }
        let alpha_m = matched(dir, &alpha_pattern, m)?.unwrap_or(alpha);
        let scale = if rslora {
            alpha_m / r_m.sqrt()
        } else {
            alpha_m / r_m
        } as f32;
        let l = LowRank {
            rank,
            a: st::floats(dir, &format!("{m}.lora_A.weight"), a)?,
            b: st::floats(dir, &format!("{m}.lora_B.weight"), b)?,
            scale,
        };
        check_low_rank(dir, m, rows, cols, &l)?;
        out.push(Target {
            name: m.clone(),
            rows,
            cols,
            delta: Delta::LowRank(l),
        });
    }
    Ok(out)
}

/// A `rank_pattern` / `alpha_pattern` map. Keys are regular expressions in PEFT; literal
/// module names (dots included) are what PEFT writes for per-module settings and all that
/// is accepted here.
fn patterns(dir: &Path, cfg: &Value, key: &str) -> Result<Vec<(String, f64)>> {
    let Some(map) = cfg.get(key).and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(k, v)| {
            if k.chars().any(|c| "*+?[](){}|^$\\".contains(c)) {
                return Err(Error::adapter(
                    dir,
                    format!(
                        "{key} key `{k}` is a regular expression; only module names are supported"
                    ),
                ));
            }
            let v = v.as_f64().ok_or_else(|| {
                Error::adapter(dir, format!("{key} value for `{k}` is not a number"))
            })?;
            Ok((k.clone(), v))
        })
        .collect()
}

/// The value of the pattern keys that match `module` as PEFT matches them (`(.*\.)?key$`).
/// PEFT takes the first matching key in file order; when several keys match with different
/// values the order decides, so that case is refused rather than guessed.
fn matched(dir: &Path, pats: &[(String, f64)], module: &str) -> Result<Option<f64>> {
    let hits: Vec<&(String, f64)> = pats
        .iter()
        .filter(|(k, _)| module == k || module.ends_with(&format!(".{k}")))
        .collect();
    match hits.as_slice() {
        [] => Ok(None),
        [(_, v), rest @ ..] if rest.iter().all(|(_, w)| w == v) => Ok(Some(*v)),
        _ => Err(Error::adapter(
            dir,
            format!(
                "module `{module}` matches several pattern keys with different values: {:?}",
                hits.iter().map(|h| &h.0).collect::<Vec<_>>()
            ),
        )),
    }
}

fn shira_targets(dir: &Path, modules: &Modules<'_>) -> Result<Vec<Target>> {
    let err = |m: String| Error::adapter(dir, m);
    let mut out = Vec::with_capacity(modules.len());
    for (m, roles) in modules {
        let (Some(idx), Some(w)) = (roles.get(".shira_indices"), roles.get(".shira_weight")) else {
            return Err(err(format!(
                "module `{m}` needs shira_indices and shira_weight (found {:?})",
                roles.keys().collect::<Vec<_>>()
            )));
        };
        if roles.len() != 2 {
            return Err(err(format!("module `{m}` mixes LoRA and SHiRA tensors")));
        }
        let nnz = match (idx.shape(), w.shape()) {
            ([2, n], [k]) if n == k => *n,
            (si, sw) => {
                return Err(err(format!(
                    "module `{m}`: shira_indices is {si:?} and shira_weight {sw:?}; [2, nnz] and [nnz] expected"
                )))
            }
        };
        // The weight shape is not stored: rows and columns are bounded by the base tensor,
        // which `bind` checks; here only the largest index is known.
        let ij = shira_indices(dir, m, idx)?;
        let vals = st::floats(dir, &format!("{m}.shira_weight"), w)?;
        let (rows_i, cols_i) = ij.split_at(nnz);
        if let Some(v) = vals.iter().find(|v| !v.is_finite()) {
            return Err(err(format!("module `{m}`: shira_weight holds {v}")));
        }
        // PEFT does not store the weight's shape: `bind` takes it from the base.
        out.push(Target {
            name: m.clone(),
            rows: 0,
            cols: 0,
            delta: Delta::Coo(Coo {
                row: rows_i.to_vec(),
                col: cols_i.to_vec(),
                val: vals,
            }),
        });
    }
    Ok(out)
}

/// Indices as u32, from an integer tensor or (as PEFT writes them on Windows) a float one.
fn shira_indices(dir: &Path, m: &str, t: &safetensors::tensor::TensorView) -> Result<Vec<u32>> {
    let name = format!("{m}.shira_indices");
    let v: Vec<u64> = match t.dtype() {
        safetensors::Dtype::F32 => st::floats(dir, &name, t)?
            .into_iter()
            .map(|x| {
                if x >= 0.0 && x.fract() == 0.0 && x < u32::MAX as f32 {
                    Ok(x as u64)
                } else {
                    Err(Error::adapter(
                        dir,
                        format!("`{name}` holds {x}, not an index"),
                    ))
                }
            })
            .collect::<Result<_>>()?,
        _ => st::indices(dir, &name, t, u32::MAX as u64)?,
    };
    Ok(v.into_iter().map(|x| x as u32).collect())
}

/// Turns (row, col) coordinates into a flat sparse delta once the base shape is known:
/// indices checked against `rows` x `cols`, sorted, duplicates summed (PEFT merges SHiRA
/// through a sparse COO tensor, which sums them).
pub(crate) fn coo_to_sparse(
    path: &Path,
    name: &str,
    s: &Coo,
    rows: usize,
    cols: usize,
) -> Result<SparseDelta> {
    let mut pairs = Vec::with_capacity(s.val.len());
    for ((&r, &c), &v) in s.row.iter().zip(&s.col).zip(&s.val) {
        let (r, c) = (r as usize, c as usize);
        if r >= rows || c >= cols {
            return Err(Error::adapter(
                path,
                format!("module `{name}`: index ({r}, {c}) is outside the {rows} x {cols} weight"),
            ));
        }
        pairs.push(((r * cols + c) as u32, v));
    }
    pairs.sort_unstable_by_key(|p| p.0);
    let mut out = SparseDelta::default();
    for (i, v) in pairs {
        if out.idx.last() == Some(&i) {
            *out.val.last_mut().unwrap() += v;
        } else {
            out.idx.push(i);
            out.val.push(v);
        }
    }
    check_sparse(path, name, &out, rows * cols)?;
    Ok(out)
}
