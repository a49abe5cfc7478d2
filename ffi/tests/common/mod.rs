//! Helpers shared by the tests that run clients of the library (C, JVM): paths, the
//! cdylib that cargo built, tools, and the runtime's own greedy tokens to compare with.

#![allow(dead_code)] // each test binary uses its own subset

use sparrow::adapter::Adapter;
use sparrow::generate::{generate, GenerateOptions};
use sparrow::model::{Model, ModelOptions};
use sparrow::sample::SamplerConfig;
use sparrow::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::Output;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// The folder with the cdylib that cargo built for this test run: target/<profile>/deps,
/// beside the test (cargo test does not refresh the copy in target/<profile>). Clients find
/// it through an rpath or java.library.path; LD_LIBRARY_PATH, which cargo sets to folders
/// that include target/<profile>, must be removed from their environment so that the stale
/// copy is not found first.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().to_path_buf();
    let lib = dir.join(format!(
        "{}sparrow_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(lib.exists(), "{} was not built", lib.display());
    dir
}

pub fn tool(name: &str, install: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("`{name}` is not installed; it is needed here ({install})"))
}

pub fn show(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Greedy token ids after "The little bird" from the Rust runtime, with `adapters` fused.
pub fn runtime_greedy(adapters: &[&str]) -> Vec<u32> {
    let mut m = Model::open(
        fixture("tiny/tiny-llama.f32.gguf"),
        &ModelOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    for a in adapters {
        let a = Adapter::load(fixture(a)).unwrap();
        m.apply_adapter(&a, 1.0).unwrap();
    }
    let tok = Tokenizer::from_metadata(m.file().metadata()).unwrap();
    let prompt = tok.encode("The little bird", true, true).unwrap();
    let mut s = m.new_session(128).unwrap();
    let opts = GenerateOptions {
        max_tokens: 12,
        sampler: SamplerConfig::greedy(),
        stop: Vec::new(),
        stop_at_eog: false,
    };
    generate(&mut m, &mut s, &tok, &prompt, &opts, |_| true)
        .unwrap()
        .tokens
}

pub fn printed(stdout: &str, label: &str) -> Vec<u32> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{label}:")))
        .unwrap_or_else(|| panic!("the client printed no `{label}:` line"));
    line.split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect()
}
