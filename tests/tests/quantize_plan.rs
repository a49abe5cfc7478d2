//! `sparrow quantize` picks the same type for every tensor as llama.cpp's quantizer does, for
//! every file type it offers. Fixture: tests/fixtures/quantize/llama_cpp_types.json, made by
//! tests/gen/llama_cpp_quant_types.py with llama.cpp's `llama_model_quantize` on SmolLM2.

use sparrow::convert::{FileType, TypePlan};
use sparrow::gguf::GgufFile;
use sparrow_tests::{fixtures, model_from_env};
use std::collections::BTreeMap;

#[test]
fn per_tensor_types_match_llama_cpp() {
    let j: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("quantize/llama_cpp_types.json")).unwrap(),
    )
    .unwrap();
    let want: BTreeMap<String, BTreeMap<String, String>> =
        serde_json::from_value(j["types"].clone()).unwrap();
    let f = GgufFile::open(model_from_env("SPARROW_SMOLLM2_Q4_1")).unwrap();
    for (ft_name, types) in &want {
        let ft = FileType::parse(ft_name).unwrap();
        let mut plan = TypePlan::new(ft, false, f.tensors());
        let mut wrong = Vec::new();
        for t in f.tensors() {
            let got = plan.choose(t);
            if got.name() != types[&t.name] {
                wrong.push(format!(
                    "{}: {} (llama.cpp {})",
                    t.name, got, types[&t.name]
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{ft_name}: {} tensors differ: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}
