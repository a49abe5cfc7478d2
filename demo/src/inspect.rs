//! `sparrow inspect`: what a GGUF file holds, read from the header alone.

use sparrow::gguf::{GgufFile, Value};
use std::collections::BTreeMap;
use std::path::Path;

pub fn inspect(path: &Path, all: bool) -> Result<(), Box<dyn std::error::Error>> {
    let f = GgufFile::open(path)?;
    let h = f.header();
    println!("file: {}", path.display());
    println!(
        "GGUF version {}, alignment {}, data at offset {}",
        h.version, h.alignment, h.data_offset
    );
    println!("\nmetadata ({} keys):", f.metadata().len());
    for (k, v) in f.metadata().iter() {
        let shown = match v {
            Value::String(s) if s.contains('\n') => format!("<{} bytes of text>", s.len()),
            v => v.to_string(),
        };
        println!("  {k:<44} {shown}");
    }
    let mut by_type: BTreeMap<&str, (usize, u64, u64)> = BTreeMap::new();
    for t in f.tensors() {
        let e = by_type.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
        e.2 += t.n_bytes;
    }
    println!("\ntensors ({}):", f.tensors().len());
    let limit = if all { usize::MAX } else { 40 };
    for t in f.tensors().iter().take(limit) {
        println!(
            "  {:<32} {:<6} {:>22} {:>12} bytes",
            t.name,
            t.ty.name(),
            format!("{:?}", t.shape),
            t.n_bytes
        );
    }
    if f.tensors().len() > limit {
        println!(
            "  ... {} more (--all shows them)",
            f.tensors().len() - limit
        );
    }
    let total: u64 = f.tensors().iter().map(|t| t.n_bytes).sum();
    let params: u64 = f.tensors().iter().map(|t| t.n_elements()).sum();
    println!("\nbytes by type:");
    for (ty, (n, elems, bytes)) in &by_type {
        println!(
            "  {ty:<6} {n:>5} tensors {elems:>12} elements {bytes:>12} bytes ({:.1}%), {:.2} bits/weight",
            100.0 * *bytes as f64 / total.max(1) as f64,
            8.0 * *bytes as f64 / (*elems).max(1) as f64
        );
    }
    println!(
        "  total  {:>5} tensors {params:>12} elements {total:>12} bytes",
        f.tensors().len()
    );
    Ok(())
}
