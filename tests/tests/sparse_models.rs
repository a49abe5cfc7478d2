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
    let tiled = |g, sparsity, q8, tile| PruneOptions {
        structure: Structure::Group { g, sparsity, tile },
        q8: Some(q8),
        ..options(2, 4, NmValues::Q8)
    };
    let group = |g, sparsity, q8| tiled(g, sparsity, q8, 0);
    for (label, o) in [
        ("2:4 q8", options(2, 4, NmValues::Q8)),
        ("4:8 q8", options(4, 8, NmValues::Q8)),
        ("2:4 q4", options(2, 4, NmValues::Q4)),
        ("g16 50% q8", group(16, 0.5, true)),
        ("g16 50% q4", group(16, 0.5, false)),
        ("g8 75% q8", group(8, 0.75, true)),
        ("g16 50% q4 tiles of 8", tiled(16, 0.5, false, 8)),
        ("g32 50% q4 tiles of 16", tiled(32, 0.5, false, 16)),
        ("g16 50% q8 tiles of 8", tiled(16, 0.5, true, 8)),
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
            tile: 0,
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

/// The tiny model pruned 2:4 with Q8 values, as `tmp(name)`.
fn pruned_2_4(name: &str) -> PathBuf {
    let path = tmp(name);
    prune_file(
        &GgufFile::open(tiny()).unwrap(),
        &path,
        &options(2, 4, NmValues::Q8),
        |_, _, _| {},
    )
    .unwrap();
    path
}

/// A sparse matrix of a model file decoded by the encoding's own decoder: (weights, kept
/// positions), row-major. For group-sparse matrices a position is kept when its group is
/// stored with a nonzero weight (the pruned tiny models hold random weights).
fn decoded(f: &GgufFile, name: &str) -> (Vec<f32>, Vec<bool>) {
    let t = f.tensor(name).unwrap();
    let s = store::read(f.metadata(), t).unwrap().unwrap();
    let data = f.tensor_data(t).unwrap();
    match s.encoding {
        Encoding::Nm(fmt) => {
            let rb = s.row_bytes().unwrap();
            let (mut w, mut k) = (vec![0f32; s.cols], vec![false; s.cols]);
            let (mut all_w, mut all_k) = (Vec::new(), Vec::new());
            for r in data.chunks_exact(rb) {
                nm::decode_row(&fmt, r, &mut w).unwrap();
                nm::kept_positions(&fmt, r, &mut k).unwrap();
                all_w.extend_from_slice(&w);
                all_k.extend_from_slice(&k);
            }
            (all_w, all_k)
        }
        Encoding::Group(fmt) => {
            let w = GroupMatrix::new(data).unwrap().decode();
            let k = w
                .chunks_exact(fmt.g)
                .flat_map(|grp| {
                    let kept = grp.iter().any(|&v| v != 0.0);
                    std::iter::repeat_n(kept, fmt.g)
                })
                .collect();
            (w, k)
        }
    }
}

/// The dense delta of a bound adapter's target at `scale`, row-major.
fn dense_delta(t: &sparrow::adapter::Target, scale: f32) -> Vec<f32> {
    use sparrow::adapter::Delta;
    match &t.delta {
        Delta::Sparse(d) => {
            let mut out = vec![0f32; t.rows * t.cols];
            for (&i, &v) in d.idx.iter().zip(&d.val) {
                out[i as usize] += v * scale;
            }
            out
        }
        Delta::LowRank(l) => sparrow::adapter::lowrank::dense_low_rank(l, t.rows, t.cols)
            .into_iter()
            .map(|v| v * scale)
            .collect(),
        Delta::Coo(_) => unreachable!("bound"),
    }
}

/// Adapters on sparse bases follow `sparse::edit`'s rule, checked weight by weight against
/// the encodings' own decoders, for every sparse format, a SHiRA (PEFT) and a LoRA adapter:
/// the kept positions stay the kept positions; a pruned position stays exactly 0 and its
/// delta is counted as dropped (the count computed here from the mask); a kept position
/// holds base + delta to within the requantization step of its block; unapplying gives the
/// base's bytes back; and a switch between the two adapters writes what applying does.
#[test]
fn adapters_on_sparse_bases_keep_the_pattern_and_drop_pruned_deltas() {
    let tiled = |g, sparsity, q8, tile| PruneOptions {
        structure: Structure::Group { g, sparsity, tile },
        q8: Some(q8),
        ..options(2, 4, NmValues::Q8)
    };
    let group = |g, sparsity, q8| tiled(g, sparsity, q8, 0);
    let shira = sparrow::adapter::Adapter::load(fixtures().join("adapters/shira")).unwrap();
    let lora = sparrow::adapter::Adapter::load(fixtures().join("adapters/lora_plain")).unwrap();
    for (label, o, q8) in [
        ("2:4 q8", options(2, 4, NmValues::Q8), true),
        ("4:8 q4", options(4, 8, NmValues::Q4), false),
        ("g16 50% q8", group(16, 0.5, true), true),
        ("g8 75% q4", group(8, 0.75, false), false),
    ] {
        let file = label.replace([' ', ':', '%'], "_");
        let sparse = tmp(&format!("adapter-base-{file}.gguf"));
        prune_file(&GgufFile::open(tiny()).unwrap(), &sparse, &o, |_, _, _| {}).unwrap();
        let mut m = Model::open(&sparse, &ModelOptions::default()).unwrap();
        let pristine = m.file().bytes().to_vec();
        let mut applied_bytes = Vec::new();
        for (kind, a, scale) in [("shira", &shira, 2.0f32), ("lora", &lora, 1.0)] {
            let bound = m.bind_adapter(a).unwrap();
            let sparse_targets: Vec<_> = bound
                .targets()
                .iter()
                .filter(|t| {
                    let info = m.file().tensor(&t.name).unwrap();
                    store::read(m.file().metadata(), info).unwrap().is_some()
                })
                .collect();
            assert!(
                !sparse_targets.is_empty(),
                "{label} {kind}: no sparse target"
            );
            let before: Vec<_> = sparse_targets
                .iter()
                .map(|t| decoded(m.file(), &t.name))
                .collect();
            let id = m.apply_adapter(a, scale).unwrap();
            let stats = m.applied_adapters()[0].stats;
            let mut dropped = 0;
            let mut moved = 0.0f32;
            for (t, (w0, k0)) in sparse_targets.iter().zip(&before) {
                let (w1, k1) = decoded(m.file(), &t.name);
                let d = dense_delta(t, scale);
                assert_eq!(&k1, k0, "{label} {kind} {}: kept positions changed", t.name);
                for (r, ((((w0r, w1r), k0r), dr), _)) in w0
                    .chunks_exact(t.cols)
                    .zip(w1.chunks_exact(t.cols))
                    .zip(k0.chunks_exact(t.cols))
                    .zip(d.chunks_exact(t.cols))
                    .zip(0..)
                    .enumerate()
                {
                    // Requantization step of the row's coarsest block, from the exact sums:
                    // Q8 rounds to d / 2 (d = amax / 127), plus up to 127 ulps of the f16
                    // scale where levels come from the unrounded scale (group-sparse): 0.56 d;
                    // Q4_0's rule can clamp a level and miss by up to d = max / 8.
                    let amax = w0r
                        .iter()
                        .zip(dr)
                        .zip(k0r)
                        .filter(|(_, &k)| k)
                        .fold(0f32, |a, ((&w, &dv), _)| a.max((w + dv).abs()));
                    let tol = if q8 {
                        amax / 127.0 * 0.57
                    } else {
                        amax / 8.0 * 1.01
                    } + 1e-7;
                    for c in 0..t.cols {
                        if !k0r[c] {
                            assert_eq!(w1r[c], 0.0, "{label} {kind} {} [{r},{c}] pruned", t.name);
                            dropped += (dr[c] != 0.0) as usize;
                            continue;
                        }
                        let err = (w1r[c] - (w0r[c] + dr[c])).abs();
                        assert!(
                            err <= tol,
                            "{label} {kind} {} [{r},{c}]: {} + {} stored as {} (tol {tol})",
                            t.name,
                            w0r[c],
                            dr[c],
                            w1r[c]
                        );
                        moved = moved.max((w1r[c] - w0r[c]).abs());
                    }
                }
            }
            assert_eq!(stats.dropped, dropped, "{label} {kind}: dropped deltas");
            assert!(
                dropped > 0,
                "{label} {kind}: no delta fell on a pruned position"
            );
            assert!(moved > 0.0, "{label} {kind}: nothing changed");
            applied_bytes.push(m.file().bytes().to_vec());
            m.unapply_adapter(id).unwrap();
            assert!(m.file().bytes() == &pristine[..], "{label} {kind}: unapply");
            eprintln!("{label} {kind}: {stats:?}");
        }
        let id = m.apply_adapter(&shira, 2.0).unwrap();
        let id = m.switch_adapter(id, &lora, 1.0).unwrap();
        assert!(
            m.file().bytes() == &applied_bytes[1][..],
            "{label}: switch to the LoRA"
        );
        let id = m.switch_adapter(id, &shira, 2.0).unwrap();
        assert!(
            m.file().bytes() == &applied_bytes[0][..],
            "{label}: switch back (replayed)"
        );
        m.unapply_adapter(id).unwrap();
        assert!(
            m.file().bytes() == &pristine[..],
            "{label}: unapply after switches"
        );
    }
}

/// With residuals kept, a SHiRA adapter fused into a sparse base is exact: the model's
/// logits match those of the decoded dense twin with the whole delta added in f32 (pruned
/// positions included), and differ from the twin with only the kept deltas by more than the
/// tolerance (so the dropped deltas are really carried by the side term).
#[test]
fn residuals_make_adapters_on_sparse_bases_exact() {
    use sparrow::adapter::patch::Options;
    let tokens: Vec<u32> = vec![316, 278, 283, 450, 366, 267, 298, 259, 267, 269, 73, 348];
    let shira = sparrow::adapter::Adapter::load(fixtures().join("adapters/shira")).unwrap();
    let scale = 20.0f32;
    let sparse = pruned_2_4("residual-base.gguf");
    let twin = tmp("residual-twin.gguf");
    decoded_copy(&sparse, &twin);
    let mut m = Model::open(&sparse, &ModelOptions::default()).unwrap();
    let bound = m.bind_adapter(&shira).unwrap();
    // The twin with the delta added: everywhere (exact) or at kept positions only.
    let with_delta = |out: &Path, masked: bool| {
        let f = GgufFile::open(&twin).unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in f.metadata().iter() {
            w.set(k, v.clone());
        }
        let mut data = Vec::new();
        for t in f.tensors() {
            w.add_tensor(&t.name, &t.shape, t.ty).unwrap();
            let mut bytes = f.tensor_data(t).unwrap().to_vec();
            if let Some(target) = bound.targets().iter().find(|x| x.name == t.name) {
                let d = dense_delta(target, scale);
                for (i, c) in bytes.chunks_exact_mut(4).enumerate() {
                    let v = f32::from_le_bytes(c.try_into().unwrap());
                    if !masked || v != 0.0 {
                        c.copy_from_slice(&(v + d[i]).to_le_bytes());
                    }
                }
            }
            data.push(bytes);
        }
        w.write_file(out, |i, _| Ok(Cow::Owned(data[i].clone())))
            .unwrap();
    };
    let (exact, masked) = (tmp("residual-exact.gguf"), tmp("residual-masked.gguf"));
    with_delta(&exact, false);
    with_delta(&masked, true);
    m.apply_adapters(
        &[(&shira, scale)],
        Options {
            residual: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(m.applied_adapters()[0].stats.dropped > 0);
    let mut s = m.new_session(64).unwrap();
    let got = m.eval(&mut s, &tokens, Logits::All).unwrap();
    let want = logits(&exact, &tokens);
    let without = logits(&masked, &tokens);
    let spread = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let max_diff =
        |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let (err, dropped_effect) = (max_diff(&got, &want), max_diff(&without, &want));
    eprintln!(
        "residual: error {err}, effect of the dropped deltas {dropped_effect}, spread {spread}"
    );
    // The same activation-quantization tolerance as the twin test above.
    assert!(err < 0.05 * spread, "error {err} (spread {spread})");
    assert!(
        dropped_effect > 2.0 * err,
        "the dropped deltas change little ({dropped_effect})"
    );
}

/// A sparse row that does not decode is found while editing: the apply (and a switch to
/// that adapter) fails naming the tensor, and the model is left as it was, the adapter in
/// place before the switch included.
#[test]
fn a_bad_sparse_row_undoes_the_whole_apply() {
    let sparse = pruned_2_4("bad-row-base.gguf");
    // Row 3 of one matrix: every byte 0xFF, so its 2:4 indices are 3, 3 (not increasing).
    let name = "blk.1.ffn_down.weight";
    let mut bytes = std::fs::read(&sparse).unwrap();
    {
        let f = GgufFile::open(&sparse).unwrap();
        let info = f.tensor(name).unwrap();
        let rb = store::read(f.metadata(), info)
            .unwrap()
            .unwrap()
            .row_bytes()
            .unwrap();
        let at = f.range(info).unwrap().start + 3 * rb;
        bytes[at..at + rb].fill(0xFF);
    }
    let bad = tmp("bad-row.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let mut m = Model::open(&bad, &ModelOptions::default()).unwrap();
    let pristine = m.file().bytes().to_vec();
    let shira = sparrow::adapter::Adapter::load(fixtures().join("adapters/shira")).unwrap();
    let lora = sparrow::adapter::Adapter::load(fixtures().join("adapters/lora_qv")).unwrap();
    let e = m.apply_adapter(&shira, 1.0).unwrap_err().to_string();
    assert!(e.contains(name), "{e}");
    assert!(
        m.file().bytes() == &pristine[..],
        "a failed apply changed the model"
    );
    assert!(m.applied_adapters().is_empty());
    // lora_qv does not touch the bad matrix: it applies; switching to SHiRA fails and
    // keeps the LoRA.
    let id = m.apply_adapter(&lora, 1.0).unwrap();
    let with_lora = m.file().bytes().to_vec();
    let e = m.switch_adapter(id, &shira, 1.0).unwrap_err().to_string();
    assert!(e.contains(name), "{e}");
    assert!(
        m.file().bytes() == &with_lora[..],
        "a failed switch changed the model"
    );
    assert_eq!(m.applied_adapters().len(), 1);
    m.unapply_adapter(m.applied_adapters()[0].id).unwrap();
    assert!(m.file().bytes() == &pristine[..]);
}

/// Files of an older byte layout (no `.layout` key: layout 1, before the N:M value sums and
/// the group-sparse count and index) are refused at load with a message naming the layout,
/// for both encodings.
#[test]
fn older_byte_layouts_are_refused() {
    let group = PruneOptions {
        structure: Structure::Group {
            g: 16,
            sparsity: 0.5,
            tile: 0,
        },
        q8: Some(true),
        ..options(2, 4, NmValues::Q8)
    };
    for (label, o) in [("nm", options(2, 4, NmValues::Q8)), ("group", group)] {
        let new = tmp(&format!("layout-new-{label}.gguf"));
        prune_file(&GgufFile::open(tiny()).unwrap(), &new, &o, |_, _, _| {}).unwrap();
        let f = GgufFile::open(&new).unwrap();
        let mut w = GgufWriter::new();
        let mut dropped = 0;
        for (k, v) in f.metadata().iter() {
            if k.starts_with("sparrow.sparse.") && k.ends_with(".layout") {
                dropped += 1;
            } else {
                w.set(k, v.clone());
            }
        }
        assert!(dropped > 0, "{label}: no layout key written");
        for t in f.tensors() {
            w.add_tensor(&t.name, &t.shape, t.ty).unwrap();
        }
        let old = tmp(&format!("layout-old-{label}.gguf"));
        w.write_file(&old, |i, _| {
            Ok(Cow::Owned(f.tensor_data(&f.tensors()[i])?.to_vec()))
        })
        .unwrap();
        let e = match Model::open(&old, &ModelOptions::default()) {
            Ok(_) => panic!("{label}: a layout-1 file loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("layout 1 (no layout key)"), "{label}: {e}");
    }
}
