//! Sparse models end to end: `sparse::prune` writes an N:M model, the model loads it from the
//! GGUF container and runs it; its logits are compared with those of a dense F32 model whose
//! matrices are the sparse matrices decoded (so only the sparse kernels' activation
//! quantization separates the two). Also Wanda's masks and the refusals.

use sparrow::gguf::{GgufFile, GgufWriter};
use sparrow::model::{Logits, Model, ModelOptions};
use sparrow::quant::GgmlType;
use sparrow::sparse::group::GroupMatrix;
use sparrow::sparse::nm::{self, NmValues};
use sparrow::sparse::prune::{prune_file, Method, PruneOptions, Structure};
use sparrow::sparse::store::{self, Encoding};
use sparrow_tests::fixtures;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    fixtures().join("tiny/tiny-llama.f32.gguf")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sparrow-sparse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn options(n: usize, m: usize, values: NmValues) -> PruneOptions {
    PruneOptions {
        structure: Structure::Nm { n, m },
        q8: Some(values == NmValues::Q8),
        method: Method::Magnitude,
        tensors: Vec::new(),
        input_sq: None,
    }
}

/// `sparse` with every sparse matrix decoded to dense F32.
fn decoded_copy(sparse: &Path, out: &Path) {
    let f = GgufFile::open(sparse).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata().iter() {
        if !k.starts_with("sparrow.sparse.") {
            w.set(k, v.clone());
        }
    }
    let mut dense: Vec<Option<Vec<u8>>> = Vec::new();
    for t in f.tensors() {
        match store::read(f.metadata(), t).unwrap() {
            None => {
                w.add_tensor(&t.name, &t.shape, t.ty).unwrap();
                dense.push(None);
            }
            Some(s) => {
                let data = f.tensor_data(t).unwrap();
                let decoded: Vec<f32> = match s.encoding {
                    Encoding::Nm(fmt) => {
                        let rb = s.row_bytes().unwrap();
                        let mut row = vec![0.0f32; s.cols];
                        let mut all = Vec::with_capacity(s.rows * s.cols);
                        for r in data.chunks_exact(rb) {
                            nm::decode_row(&fmt, r, &mut row).unwrap();
                            all.extend_from_slice(&row);
                        }
                        all
                    }
                    Encoding::Group(_) => GroupMatrix::new(data).unwrap().decode(),
                };
                let bytes: Vec<u8> = decoded.iter().flat_map(|v| v.to_le_bytes()).collect();
                w.add_tensor(&t.name, &[s.cols as u64, s.rows as u64], GgmlType::F32)
                    .unwrap();
                dense.push(Some(bytes));
            }
        }
    }
    w.write_file(out, |i, _| match &dense[i] {
        Some(b) => Ok(Cow::Owned(b.clone())),
        None => Ok(Cow::Owned(f.tensor_data(&f.tensors()[i])?.to_vec())),
    })
    .unwrap();
}

fn logits(path: &Path, tokens: &[u32]) -> Vec<f32> {
    let mut m = Model::open(
        path,
        &ModelOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut s = m.new_session(64).unwrap();
    m.eval(&mut s, tokens, Logits::All).unwrap()
}

#[test]
fn pruned_models_run_as_their_decoded_dense_twins() {
    let tokens: Vec<u32> = vec![316, 278, 283, 450, 366, 267, 298, 259, 267, 269, 73, 348];
    let dense = logits(&tiny(), &tokens);
    let group = |g, sparsity, q8| PruneOptions {
        structure: Structure::Group { g, sparsity },
        q8: Some(q8),
        ..options(2, 4, NmValues::Q8)
    };
    for (label, o) in [
        ("2:4 q8", options(2, 4, NmValues::Q8)),
        ("4:8 q8", options(4, 8, NmValues::Q8)),
        ("2:4 q4", options(2, 4, NmValues::Q4)),
        ("g16 50% q8", group(16, 0.5, true)),
        ("g16 50% q4", group(16, 0.5, false)),
        ("g8 75% q8", group(8, 0.75, true)),
    ] {
        let file = label.replace([' ', ':', '%'], "_");
        let sparse = tmp(&format!("tiny-{file}.gguf"));
        let r = prune_file(&GgufFile::open(tiny()).unwrap(), &sparse, &o, |_, _, _| {}).unwrap();
        assert_eq!(
            r.tensors,
            7 * 2,
            "every attention and MLP matrix of both blocks"
        );
        let twin = tmp(&format!("twin-{file}.gguf"));
        decoded_copy(&sparse, &twin);
        let got = logits(&sparse, &tokens);
        let want = logits(&twin, &tokens);
        // The sparse kernels quantize activations to int8 per 64 inputs (up to 1/254 of a
        // block's largest input per element); through two blocks of this random model that
        // moves the largest logit error to 0.6-2.2% of the logits' spread (measured for the
        // six formats; group-sparse activations are quantized per 32 inputs). Pruning itself moves them by about 90% of the spread, so a wrong
        // index, value or scale cannot hide under 5%.
        let moved = dense
            .iter()
            .zip(&want)
            .fold(0.0f32, |a, (d, w)| a.max((d - w).abs()));
        let spread = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
        eprintln!("{label}: error {err}, moved {moved}, spread {spread}");
        assert!(
            err < 0.05 * spread,
            "{label}: max logit error {err} against the decoded twin (spread {spread})"
        );
        assert!(moved > 0.5 * spread, "pruning changed little ({moved})");
    }
}

#[test]
fn wanda_keeps_the_weights_of_loud_inputs() {
    let src = GgufFile::open(tiny()).unwrap();
    // Column 5 of every matrix's input is loud: Wanda must keep it in every row, where
    // magnitude keeps it only when its weight is among the two largest of its group.
    let mut sq = HashMap::new();
    for t in src.tensors() {
        if t.shape.len() == 2 && t.name.starts_with("blk.") {
            let mut v = vec![1.0f64; t.shape[0] as usize];
            v[5] = 1e12;
            sq.insert(t.name.clone(), v);
        }
    }
    let out = tmp("tiny-wanda.gguf");
    let mut o = options(2, 4, NmValues::Q8);
    o.method = Method::Wanda;
    o.input_sq = Some(sq);
    prune_file(&src, &out, &o, |_, _, _| {}).unwrap();
    let f = GgufFile::open(&out).unwrap();
    let t = f.tensor("blk.0.ffn_up.weight").unwrap();
    let s = store::read(f.metadata(), t).unwrap().unwrap();
    let Encoding::Nm(fmt) = s.encoding else {
        panic!("an N:M matrix was expected")
    };
    let rb = s.row_bytes().unwrap();
    let mut keep = vec![false; s.cols];
    for row in f.tensor_data(t).unwrap().chunks_exact(rb) {
        nm::kept_positions(&fmt, row, &mut keep).unwrap();
        assert!(keep[5], "Wanda dropped the loud input");
        assert_eq!(keep.iter().filter(|&&k| k).count(), s.cols / 2);
    }
    // Magnitude does drop it in some rows, so the check above can fail.
    let mag = tmp("tiny-mag.gguf");
    prune_file(&src, &mag, &options(2, 4, NmValues::Q8), |_, _, _| {}).unwrap();
    let f = GgufFile::open(&mag).unwrap();
    let t = f.tensor("blk.0.ffn_up.weight").unwrap();
    let dropped = f
        .tensor_data(t)
        .unwrap()
        .chunks_exact(rb)
        .filter(|row| {
            nm::kept_positions(&fmt, row, &mut keep).unwrap();
            !keep[5]
        })
        .count();
    assert!(dropped > 0);
}

#[test]
fn pruning_and_loading_refuse_what_does_not_fit() {
    let src = GgufFile::open(tiny()).unwrap();
    let out = tmp("refused.gguf");
    let mut o = options(2, 4, NmValues::Q8);
    o.tensors = vec!["nothing.*".into()];
    let e = prune_file(&src, &out, &o, |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("no tensor matches"), "{e}");
    o.tensors = vec!["token_embd.weight".into(), "blk.*.ffn_up.weight".into()];
    let e = prune_file(&src, &out, &o, |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("token_embd"), "{e}");
    let mut o = options(2, 4, NmValues::Q8);
    o.method = Method::Wanda;
    let e = prune_file(&src, &out, &o, |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("calibration"), "{e}");
    // N:M whose block span does not divide the rows' inputs (3:7 spans 70 inputs).
    let e = prune_file(&src, &out, &options(3, 7, NmValues::Q8), |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("blk."), "{e}");
    assert!(!out.exists(), "a refused prune leaves no file");

    // A sparse model pruned again, and metadata that contradicts the stored bytes.
    let sparse = tmp("again.gguf");
    prune_file(&src, &sparse, &options(2, 4, NmValues::Q8), |_, _, _| {}).unwrap();
    let f = GgufFile::open(&sparse).unwrap();
    let e = prune_file(&f, &out, &options(2, 4, NmValues::Q8), |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("sparse already"), "{e}");
    // Metadata that contradicts the stored bytes: another M (the rows are no longer whole
    // blocks), or other values (the stored row length is wrong).
    for (key, value, says) in [
        ("m", sparrow::gguf::Value::U32(8), "block span"),
        (
            "values",
            sparrow::gguf::Value::String("q4".into()),
            "expected I8",
        ),
    ] {
        let mut w = GgufWriter::new();
        for (k, v) in f.metadata().iter() {
            w.set(k, v.clone());
        }
        w.set(format!("sparrow.sparse.blk.0.ffn_up.weight.{key}"), value);
        for t in f.tensors() {
            w.add_tensor(&t.name, &t.shape, t.ty).unwrap();
        }
        let bad = tmp(&format!("contradiction-{key}.gguf"));
        w.write_file(&bad, |i, _| {
            Ok(Cow::Owned(f.tensor_data(&f.tensors()[i])?.to_vec()))
        })
        .unwrap();
        let e = match Model::open(&bad, &ModelOptions::default()) {
            Ok(_) => panic!("a contradictory sparse tensor ({key}) loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("blk.0.ffn_up.weight") && e.contains(says), "{e}");
    }
}

/// A group-sparse buffer whose metadata or bytes disagree is refused at load.
#[test]
fn contradictory_group_sparse_tensors_are_refused() {
    let src = GgufFile::open(tiny()).unwrap();
    let sparse = tmp("group-base.gguf");
    let o = PruneOptions {
        structure: Structure::Group {
            g: 16,
            sparsity: 0.5,
        },
        q8: Some(true),
        ..options(2, 4, NmValues::Q8)
    };
    prune_file(&src, &sparse, &o, |_, _, _| {}).unwrap();
    let f = GgufFile::open(&sparse).unwrap();
    let name = "blk.1.ffn_down.weight";
    for (label, meta, corrupt) in [
        ("rows", Some(("rows", sparrow::gguf::Value::U64(3))), false),
        ("g", Some(("g", sparrow::gguf::Value::U32(8))), false),
        ("magic", None, true),
    ] {
        let mut w = GgufWriter::new();
        for (k, v) in f.metadata().iter() {
            w.set(k, v.clone());
        }
        if let Some((k, v)) = meta {
            w.set(format!("sparrow.sparse.{name}.{k}"), v);
        }
        for t in f.tensors() {
            w.add_tensor(&t.name, &t.shape, t.ty).unwrap();
        }
        let bad = tmp(&format!("group-bad-{label}.gguf"));
        w.write_file(&bad, |i, _| {
            let t = &f.tensors()[i];
            let mut b = f.tensor_data(t)?.to_vec();
            if corrupt && t.name == name {
                b[0] ^= 0xff;
            }
            Ok(Cow::Owned(b))
        })
        .unwrap();
        let e = match Model::open(&bad, &ModelOptions::default()) {
            Ok(_) => panic!("a contradictory group-sparse tensor ({label}) loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(name), "{label}: {e}");
    }
}

/// Adapters are not fused into sparse matrices (yet): a clear refusal, the model unchanged.
#[test]
fn adapters_on_sparse_bases_are_refused_clearly() {
    let sparse = tmp("adapter-base.gguf");
    prune_file(
        &GgufFile::open(tiny()).unwrap(),
        &sparse,
        &options(2, 4, NmValues::Q8),
        |_, _, _| {},
    )
    .unwrap();
    let mut m = Model::open(&sparse, &ModelOptions::default()).unwrap();
    let before = m.file().bytes().to_vec();
    let a = sparrow::adapter::Adapter::load(fixtures().join("adapters/shira")).unwrap();
    let e = m.apply_adapter(&a, 1.0).unwrap_err().to_string();
    assert!(e.contains("sparse (pruned) matrix"), "{e}");
    assert!(
        m.file().bytes() == &before[..],
        "a refused adapter changed the model"
    );
}
