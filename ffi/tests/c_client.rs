//! The C client (tests/c/client.c), compiled with gcc against include/sparrow.h and the
//! cdylib, runs the whole flow of the C ABI on the tiny llama of tests/fixtures/tiny; its
//! greedy tokens are compared with the Rust runtime's. The same client runs under valgrind,
//! which must report no error and no definitely lost byte. Both tests fail (not skip) when
//! gcc or valgrind is missing.

mod common;

use common::{fixture, lib_dir, printed, repo, runtime_greedy, show, tool};
use std::path::{Path, PathBuf};
use std::process::Command;

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
