//! The C client (tests/c/client.c), compiled with gcc against include/sparrow.h and the
//! cdylib, runs the whole flow of the C ABI on the tiny llama of tests/fixtures/tiny; its
//! greedy tokens are compared with the Rust runtime's. The same client runs under valgrind,
//! which must report no error and no definitely lost byte. Both tests fail (not skip) when
//! gcc or valgrind is missing.

use sparrow::adapter::Adapter;
use sparrow::generate::{generate, GenerateOptions};
use sparrow::model::{Model, ModelOptions};
use sparrow::sample::SamplerConfig;
use sparrow::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// The folder with the cdylib that cargo built for this test run: target/<profile>/deps,
/// beside this test (cargo test does not refresh the copy in target/<profile>). The client
/// finds it through its rpath; LD_LIBRARY_PATH, which cargo sets to folders that include
/// target/<profile>, is removed from its environment so that the stale copy is not found
/// first.
fn lib_dir() -> PathBuf {
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

fn tool(name: &str, install: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("`{name}` is not installed; it is needed here ({install})"))
}

/// Compiles the client for the test `tag`; returns its path.
fn client(tag: &str) -> PathBuf {
    compile("client", tag)
}

/// Compiles tests/c/NAME.c against the header and the library into a program of its own for
/// the test `tag` (tests run in parallel in one process: a shared path would be rewritten
/// by one while another runs it); returns the program's path.
fn compile(name: &str, tag: &str) -> PathBuf {
    let gcc = tool("gcc", "apt-get install gcc");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_client");
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(format!("{name}-{tag}-{}", std::process::id()));
    let lib = lib_dir();
    let ffi = repo().join("ffi");
    let st = Command::new(gcc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .arg("-I")
        .arg(ffi.join("include"))
        .arg(ffi.join(format!("tests/c/{name}.c")))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lsparrow_ffi", "-lpthread"])
        .status()
        .expect("run gcc");
    assert!(st.success(), "gcc failed to build tests/c/{name}.c");
    exe
}

/// The client's arguments: models, adapters, and a file that is not a model.
fn client_args(tag: &str) -> Vec<PathBuf> {
    let not_a_model =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("not-a-model-{tag}.gguf"));
    std::fs::write(&not_a_model, b"this is not a GGUF file\n").unwrap();
    vec![
        fixture("tiny/tiny-llama.f32.gguf"),
        fixture("tiny/tiny-llama.q8_0.gguf"),
        fixture("tiny/tiny-qwen2.f32.gguf"),
        fixture("adapters/lora_plain.lora.f32.gguf"),
        fixture("adapters/shira"),
        not_a_model,
    ]
}

fn show(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Greedy token ids after "The little bird" from the Rust runtime, with `adapters` fused.
fn runtime_greedy(adapters: &[&str]) -> Vec<u32> {
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

fn printed(stdout: &str, label: &str) -> Vec<u32> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{label}:")))
        .unwrap_or_else(|| panic!("the client printed no `{label}:` line"));
    line.split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect()
}

#[test]
fn c_client_runs_the_whole_flow() {
    let exe = client("flow");
    let o = Command::new(&exe)
        .args(client_args("flow"))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(o.status.success(), "the C client failed:\n{}", show(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("ok: ")),
        "{}",
        show(&o)
    );

    // What the client generated through the C ABI is what the runtime generates.
    assert_eq!(printed(&stdout, "greedy"), runtime_greedy(&[]));
    assert_eq!(
        printed(&stdout, "greedy+lora"),
        runtime_greedy(&["adapters/lora_plain.lora.f32.gguf"])
    );
    assert_eq!(
        printed(&stdout, "greedy+lora+shira"),
        runtime_greedy(&["adapters/lora_plain.lora.f32.gguf", "adapters/shira"])
    );
    assert_eq!(
        printed(&stdout, "greedy+shira"),
        runtime_greedy(&["adapters/shira"])
    );
    // The adapters change the output, so the comparisons above see them.
    assert_ne!(printed(&stdout, "greedy"), printed(&stdout, "greedy+lora"));
    assert_ne!(printed(&stdout, "greedy"), printed(&stdout, "greedy+shira"));
    let _ = std::fs::remove_file(exe);
}

#[test]
fn c_client_is_clean_under_valgrind() {
    let valgrind = tool("valgrind", "apt-get install valgrind");
    let exe = client("valgrind");
    let o = Command::new(valgrind)
        .args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--show-leak-kinds=definite",
            "--errors-for-leak-kinds=definite",
            "--track-origins=yes",
        ])
        .arg(&exe)
        .args(client_args("valgrind"))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "valgrind found errors:\n{}", show(&o));
    assert!(
        stderr.contains("ERROR SUMMARY: 0 errors"),
        "no clean error summary:\n{}",
        show(&o)
    );
    assert!(
        stderr.contains("definitely lost: 0 bytes")
            || stderr.contains("All heap blocks were freed"),
        "leaks:\n{}",
        show(&o)
    );
    let _ = std::fs::remove_file(exe);
}

/// The C example of the README is tests/c/readme_example.c, word for word, and it runs.
#[test]
fn readme_c_example_runs() {
    let src = std::fs::read_to_string(repo().join("ffi/tests/c/readme_example.c")).unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("```c\n{src}```")),
        "README.md's C example differs from ffi/tests/c/readme_example.c"
    );
    let exe = compile("readme_example", "readme");
    let o = Command::new(&exe)
        .arg(fixture("tiny/tiny-llama.f32.gguf"))
        .arg(fixture("adapters/lora_plain.lora.f32.gguf"))
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        !o.stdout.is_empty(),
        "the example printed nothing:\n{}",
        show(&o)
    );
    let _ = std::fs::remove_file(exe);
}
