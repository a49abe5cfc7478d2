//! The GGUF reader and writer against the `gguf` Python package (the reference writer and
//! reader), and every kind of malformed file against clear errors.
//!
//! Fixture: tests/fixtures/gguf/all_types.{gguf,json}, made by tests/gen/gguf_fixtures.py.

use serde_json::Value as Json;
use sparrow::gguf::{parse_header, GgufFile, GgufWriter, Value, ValueType};
use sparrow::quant::GgmlType;
use sparrow_tests::fixtures;
use std::borrow::Cow;
use std::process::Command;

fn fixture() -> (Vec<u8>, Json) {
    let dir = fixtures().join("gguf");
    let bytes = std::fs::read(dir.join("all_types.gguf"))
        .expect("fixture all_types.gguf (run tests/gen/gguf_fixtures.py)");
    let json: Json =
        serde_json::from_slice(&std::fs::read(dir.join("all_types.json")).expect("all_types.json"))
            .unwrap();
    (bytes, json)
}

fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::U8 => "UINT8",
        ValueType::I8 => "INT8",
        ValueType::U16 => "UINT16",
        ValueType::I16 => "INT16",
        ValueType::U32 => "UINT32",
        ValueType::I32 => "INT32",
        ValueType::F32 => "FLOAT32",
        ValueType::Bool => "BOOL",
        ValueType::String => "STRING",
        ValueType::Array => "ARRAY",
        ValueType::U64 => "UINT64",
        ValueType::I64 => "INT64",
        ValueType::F64 => "FLOAT64",
    }
}

/// Compares a parsed value with the JSON the Python writer was given.
fn same(v: &Value, j: &Json) -> bool {
    match v {
        Value::Array(_, items) => j.as_array().is_some_and(|a| {
            a.len() == items.len() && items.iter().zip(a).all(|(x, y)| same(x, y))
        }),
        Value::String(s) => j.as_str() == Some(s),
        Value::Bool(b) => j.as_bool() == Some(*b),
        Value::F32(x) => j.as_f64().is_some_and(|y| *x == y as f32),
        Value::F64(x) => j.as_f64().is_some_and(|y| *x == y),
        Value::U64(x) => j.as_u64() == Some(*x),
        other => other.as_i64().is_some_and(|x| j.as_i64() == Some(x)),
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check_against_json(bytes: &[u8], json: &Json) {
    let h = parse_header(bytes).unwrap();
    let meta = json["metadata"].as_object().unwrap();
    assert_eq!(h.metadata.len(), meta.len(), "number of metadata keys");
    for (k, want) in meta {
        let v = h
            .metadata
            .get(k)
            .unwrap_or_else(|| panic!("key {k} missing"));
        assert_eq!(
            type_name(v.value_type()),
            want["type"].as_str().unwrap(),
            "type of {k}"
        );
        assert!(
            same(v, &want["value"]),
            "value of {k}: {v:?} vs {}",
            want["value"]
        );
    }
    let tensors = json["tensors"].as_array().unwrap();
    assert_eq!(h.tensors.len(), tensors.len());
    for (t, want) in h.tensors.iter().zip(tensors) {
        assert_eq!(t.name, want["name"].as_str().unwrap());
        let shape: Vec<u64> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape, shape, "shape of {}", t.name);
        assert_eq!(
            t.ty.name(),
            want["type"].as_str().unwrap(),
            "type of {}",
            t.name
        );
        assert_eq!(
            t.n_bytes,
            want["n_bytes"].as_u64().unwrap(),
            "size of {}",
            t.name
        );
        let start = (h.data_offset + t.offset) as usize;
        let data = &bytes[start..start + t.n_bytes as usize];
        assert_eq!(
            sha256_hex(data),
            want["sha256"].as_str().unwrap(),
            "data of {}",
            t.name
        );
    }
}

#[test]
fn reads_every_value_and_block_type_written_by_the_gguf_package() {
    let (bytes, json) = fixture();
    check_against_json(&bytes, &json);
}

#[test]
fn reads_version_2_files() {
    let (mut bytes, json) = fixture();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    check_against_json(&bytes, &json);
    assert_eq!(parse_header(&bytes).unwrap().version, 2);
}

#[test]
fn open_maps_the_file_and_views_tensors_without_copying() {
    let path = fixtures().join("gguf").join("all_types.gguf");
    let f = GgufFile::open(&path).unwrap();
    let t = f.tensor("t.q4_k").unwrap().clone();
    let view = f.tensor_data(&t).unwrap();
    let base = f.bytes().as_ptr() as usize;
    let at = view.as_ptr() as usize;
    assert_eq!(
        at - base,
        (f.header().data_offset + t.offset) as usize,
        "the view points into the mapping"
    );
}

/// Rewriting the reference file with sparrow's writer reproduces it byte for byte.
#[test]
fn writer_reproduces_the_reference_file_byte_for_byte() {
    let (bytes, _) = fixture();
    let h = parse_header(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in h.metadata.iter() {
        w.set(k, v.clone());
    }
    for t in &h.tensors {
        w.add_tensor(&t.name, &t.shape, t.ty).unwrap();
    }
    let mut out = Vec::new();
    w.write(&mut out, |i, _| {
        let t = &h.tensors[i];
        let s = (h.data_offset + t.offset) as usize;
        Ok(Cow::Borrowed(&bytes[s..s + t.n_bytes as usize]))
    })
    .unwrap();
    assert_eq!(out.len(), bytes.len());
    assert!(
        out == bytes,
        "rewritten file differs from the gguf package's"
    );
}

/// The reference reader reads what sparrow writes, including what the Python writer cannot
/// produce (empty and nested arrays).
#[test]
fn gguf_package_reads_what_sparrow_writes() {
    let dir = std::env::temp_dir().join(format!("sparrow-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("written.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("a.empty", Value::Array(ValueType::I32, vec![]));
    w.set(
        "a.nested",
        Value::Array(
            ValueType::Array,
            vec![
                Value::Array(ValueType::U8, vec![Value::U8(7)]),
                Value::Array(ValueType::U8, vec![]),
            ],
        ),
    );
    w.set("a.f64", Value::F64(1.5));
    w.set("a.s", Value::String("ß".into()));
    w.add_tensor("x", &[32, 2], GgmlType::Q8_0).unwrap();
    w.add_tensor("y", &[3], GgmlType::F32).unwrap();
    w.write_file(&path, |i, t| {
        Ok(Cow::Owned(vec![i as u8 + 1; t.n_bytes as usize]))
    })
    .unwrap();

    let script = r#"
import sys, json, gguf
r = gguf.GGUFReader(sys.argv[1])
out = {"fields": {}, "tensors": []}
for k, f in r.fields.items():
    if k.startswith("GGUF."): continue
    out["fields"][k] = [t.name for t in f.types]
for t in r.tensors:
    out["tensors"].append([t.name, [int(d) for d in t.shape], t.tensor_type.name, int(t.n_bytes), int(t.data.tobytes()[0])])
print(json.dumps(out))
"#;
    let o = Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .output()
        .expect("python3 is required for this test (pip install gguf)");
    assert!(
        o.status.success(),
        "the gguf package failed to read sparrow's file: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: Json = serde_json::from_slice(&o.stdout).unwrap();
    // The package reports an empty array's element type only when it has elements.
    assert_eq!(j["fields"]["a.empty"][0], "ARRAY");
    assert_eq!(j["fields"]["a.nested"][0], "ARRAY");
    assert_eq!(j["fields"]["a.f64"], serde_json::json!(["FLOAT64"]));
    assert_eq!(
        j["tensors"],
        serde_json::json!([["x", [32, 2], "Q8_0", 68, 1], ["y", [3], "F32", 12, 2]])
    );
    let back = GgufFile::open(&path).unwrap();
    assert_eq!(
        back.metadata().get("a.empty"),
        Some(&Value::Array(ValueType::I32, vec![]))
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---- malformed input -------------------------------------------------------------------

/// A small valid file built by hand, with the byte offsets of its fields, so that tests can
/// corrupt one field at a time.
struct Built {
    bytes: Vec<u8>,
    n_tensors_at: usize,
    n_kv_at: usize,
    key_len_at: usize,
    value_type_at: usize,
    arr_len_at: usize,
    n_dims_at: usize,
    dim0_at: usize,
    ttype_at: usize,
    offset_at: usize,
}

fn build() -> Built {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    let n_tensors_at = b.len();
    b.extend(1u64.to_le_bytes());
    let n_kv_at = b.len();
    b.extend(2u64.to_le_bytes());
    // key 1: a string
    let key_len_at = b.len();
    b.extend(4u64.to_le_bytes());
    b.extend(b"name");
    let value_type_at = b.len();
    b.extend(8u32.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    b.extend(b"ok");
    // key 2: an array of u32
    b.extend(3u64.to_le_bytes());
    b.extend(b"arr");
    b.extend(9u32.to_le_bytes());
    b.extend(4u32.to_le_bytes());
    let arr_len_at = b.len();
    b.extend(2u64.to_le_bytes());
    b.extend(1u32.to_le_bytes());
    b.extend(2u32.to_le_bytes());
    // tensor: "w" F32 [8, 2]
    b.extend(1u64.to_le_bytes());
    b.extend(b"w");
    let n_dims_at = b.len();
    b.extend(2u32.to_le_bytes());
    let dim0_at = b.len();
    b.extend(8u64.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    let ttype_at = b.len();
    b.extend(0u32.to_le_bytes());
    let offset_at = b.len();
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(std::iter::repeat_n(0u8, 64));
    Built {
        bytes: b,
        n_tensors_at,
        n_kv_at,
        key_len_at,
        value_type_at,
        arr_len_at,
        n_dims_at,
        dim0_at,
        ttype_at,
        offset_at,
    }
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[track_caller]
fn fails_with(bytes: &[u8], needle: &str) {
    match parse_header(bytes) {
        Ok(_) => panic!("parsed a malformed file (expected an error with `{needle}`)"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error `{msg}` does not mention `{needle}`"
            );
        }
    }
}

#[test]
fn the_hand_built_file_is_valid() {
    let h = parse_header(&build().bytes).unwrap();
    assert_eq!(h.tensors[0].shape, vec![8, 2]);
    assert_eq!(h.metadata.get("arr").unwrap().as_array().unwrap().len(), 2);
}

#[test]
fn every_truncation_is_an_error() {
    let b = build().bytes;
    let header_end = build().offset_at + 8;
    for n in 0..header_end {
        fails_with(&b[..n], "truncated");
    }
    // Cut inside the tensor data: the tensor runs past the end.
    fails_with(&b[..b.len() - 1], "past the end of the file");
    // And the reference file, cut anywhere, never parses or panics.
    let (full, _) = fixture();
    for n in (0..full.len()).step_by(7) {
        assert!(
            parse_header(&full[..n]).is_err(),
            "prefix of {n} bytes parsed"
        );
    }
}

#[test]
fn wrong_magic() {
    let mut b = build().bytes;
    b[0] = b'X';
    fails_with(&b, "bad magic");
}

#[test]
fn unsupported_versions() {
    let mut b = build().bytes;
    put_u32(&mut b, 4, 1);
    fails_with(&b, "version 1");
    put_u32(&mut b, 4, 7);
    fails_with(&b, "unsupported GGUF version 7");
    put_u32(&mut b, 4, 3u32.swap_bytes());
    fails_with(&b, "big-endian");
}

#[test]
fn absurd_counts() {
    let x = build();
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.n_tensors_at, u64::MAX);
    fails_with(&b, "tensor count");
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.n_kv_at, 1 << 40);
    fails_with(&b, "metadata key/value count");
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.key_len_at, u64::MAX);
    fails_with(&b, "length");
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.arr_len_at, 1 << 62);
    fails_with(&b, "array length");
}

#[test]
fn unknown_types() {
    let x = build();
    let mut b = x.bytes.clone();
    put_u32(&mut b, x.value_type_at, 13);
    fails_with(&b, "unknown type 13");
    let mut b = x.bytes.clone();
    put_u32(&mut b, x.ttype_at, 4); // removed Q4_2
    fails_with(&b, "unknown type id 4");
    let mut b = x.bytes.clone();
    put_u32(&mut b, x.ttype_at, 1000);
    fails_with(&b, "unknown type id 1000");
}

#[test]
fn absurd_dimensions() {
    let x = build();
    let mut b = x.bytes.clone();
    put_u32(&mut b, x.n_dims_at, 5);
    fails_with(&b, "5 dimensions");
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.dim0_at, u64::MAX);
    fails_with(&b, "absurd dimension");
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.dim0_at, 1 << 62);
    fails_with(&b, "too many elements");
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.dim0_at, i64::MAX as u64);
    put_u64(&mut b, x.dim0_at + 8, 4);
    fails_with(&b, "overflows");
    // A row that is not whole blocks of its type.
    let mut b = x.bytes.clone();
    put_u32(&mut b, x.ttype_at, GgmlType::Q8_0.id());
    fails_with(&b, "not a multiple of the Q8_0 block size");
}

#[test]
fn bad_offsets() {
    let x = build();
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.offset_at, 4);
    fails_with(&b, "not a multiple of the alignment");
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.offset_at, 1 << 20);
    fails_with(&b, "past the end of the file");
    let mut b = x.bytes.clone();
    put_u64(&mut b, x.offset_at, u64::MAX - 31);
    fails_with(&b, "past the end of the file");
}

#[test]
fn writer_rejects_what_the_reader_would() {
    let mut w = GgufWriter::new();
    assert!(w.add_tensor("a", &[33], GgmlType::Q8_0).is_err());
    assert!(w.add_tensor("a", &[1, 1, 1, 1, 1], GgmlType::F32).is_err());
    w.add_tensor("a", &[4], GgmlType::F32).unwrap();
    assert!(
        w.add_tensor("a", &[4], GgmlType::F32).is_err(),
        "duplicate name"
    );
    let mut out = Vec::new();
    let e = w
        .write(&mut out, |_, _| Ok(Cow::Owned(vec![0; 3])))
        .unwrap_err();
    assert!(
        e.to_string().contains("3 bytes of data given, 16 expected"),
        "{e}"
    );
}

#[test]
fn duplicates_bad_alignment_overlap_and_bad_bools() {
    // Duplicate keys and tensors, written with sparrow's writer then patched.
    let mk = |f: &dyn Fn(&mut GgufWriter)| -> Vec<u8> {
        let mut w = GgufWriter::new();
        f(&mut w);
        let mut out = Vec::new();
        w.write(&mut out, |_, t| Ok(Cow::Owned(vec![0; t.n_bytes as usize])))
            .unwrap();
        out
    };
    let mut b = mk(&|w| {
        w.set("aaaa", Value::U8(1));
        w.set("bbbb", Value::U8(2));
    });
    let at = b.windows(4).position(|x| x == b"bbbb").unwrap();
    b[at..at + 4].copy_from_slice(b"aaaa");
    fails_with(&b, "duplicate metadata key `aaaa`");

    let mut b = mk(&|w| {
        w.add_tensor("t1", &[8], GgmlType::F32).unwrap();
        w.add_tensor("t2", &[8], GgmlType::F32).unwrap();
    });
    let at = b.windows(2).rposition(|x| x == b"t2").unwrap();
    b[at + 1] = b'1';
    fails_with(&b, "duplicate tensor name `t1`");

    // The writer refuses a bad alignment, so write a good one and patch it.
    assert!(GgufWriter::new()
        .write(&mut Vec::new(), |_, _| unreachable!())
        .is_ok());
    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U32(24));
    assert!(w.write(&mut Vec::new(), |_, _| unreachable!()).is_err());
    let mut b = mk(&|w| w.set("general.alignment", Value::U32(32)));
    let at = b
        .windows(17)
        .position(|x| x == b"general.alignment")
        .unwrap()
        + 17
        + 4;
    put_u32(&mut b, at, 24);
    fails_with(&b, "power of two");
    put_u32(&mut b, at, 0);
    fails_with(&b, "power of two");

    // Two tensors at the same offset.
    let mut b = mk(&|w| {
        w.add_tensor("t1", &[8], GgmlType::F32).unwrap();
        w.add_tensor("t2", &[8], GgmlType::F32).unwrap();
    });
    let h = parse_header(&b).unwrap();
    assert_eq!(h.tensors[1].offset, 32);
    let name_at = b.windows(2).rposition(|x| x == b"t2").unwrap();
    let off_at = name_at + 2 + 4 + 8 + 4;
    put_u64(&mut b, off_at, 0);
    fails_with(&b, "overlap");

    let mut b = mk(&|w| w.set("flag", Value::Bool(true)));
    let at = b.windows(4).position(|x| x == b"flag").unwrap() + 4 + 4;
    b[at] = 2;
    fails_with(&b, "bool byte is 2");

    let mut b = mk(&|w| w.set("s", Value::String("ab".into())));
    let at = b.windows(2).rposition(|x| x == b"ab").unwrap();
    b[at] = 0xff;
    fails_with(&b, "not valid UTF-8");
}

#[test]
fn deeply_nested_arrays_are_refused() {
    let mut v = Value::Array(ValueType::U8, vec![]);
    for _ in 0..20 {
        v = Value::Array(ValueType::Array, vec![v]);
    }
    let mut w = GgufWriter::new();
    w.set("deep", v);
    let mut out = Vec::new();
    w.write(&mut out, |_, _| unreachable!()).unwrap();
    fails_with(&out, "nested deeper");
}

#[test]
fn open_names_the_file_in_errors() {
    let dir = std::env::temp_dir().join(format!("sparrow-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("tiny.gguf");
    std::fs::write(&p, b"GGUF").unwrap();
    let e = GgufFile::open(&p)
        .err()
        .expect("a 4-byte file must not open")
        .to_string();
    assert!(e.contains("tiny.gguf") && e.contains("truncated"), "{e}");
    let missing = GgufFile::open(dir.join("missing.gguf"))
        .err()
        .expect("missing file")
        .to_string();
    assert!(missing.contains("missing.gguf"), "{missing}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Found by cargo fuzz: a zero-size tensor in a file that ends before its data section.
#[test]
fn bug_fuzz_zero_size_tensor_past_the_end() {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // one tensor
    b.extend(0u64.to_le_bytes()); // no metadata
    b.extend(0u64.to_le_bytes()); // name ""
    b.extend(1u32.to_le_bytes()); // 1 dimension
    b.extend(0u64.to_le_bytes()); // of size 0
    b.extend(0u32.to_le_bytes()); // F32
    b.extend(0u64.to_le_bytes()); // offset 0
    b.extend([54, 51, 194, 233, 190, 0]); // 62 bytes; the data section would start at 64
    assert_eq!(b.len(), 62);
    fails_with(&b, "past the end of the file");
}

proptest::proptest! {
    /// Random corruption of a valid file: an error or a valid parse, never a panic.
    #[test]
    fn random_corruption_never_panics(flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..8)) {
        let (mut b, _) = fixture();
        let n = b.len();
        for (at, v) in flips {
            b[at % n] = v;
        }
        let _ = parse_header(&b);
    }
}
