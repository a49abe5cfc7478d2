//! The JVM client of the Android library (android/src/test/kotlin/dev/sparrow/JvmClient.kt),
//! compiled with kotlinc together with the library's Kotlin sources (android/src/main/kotlin)
//! and run on the desktop JVM against the cdylib's JNI entry points (src/jni.rs): the flow of
//! the C client (open, tokens, streamed generation, every kind of cancel, adapters, closed and
//! stale handles, a Rust panic surfacing as a Java exception). Its greedy tokens are compared
//! with the Rust runtime's. Fails (never skips) when kotlinc or java is missing.

mod common;

use common::{fixture, printed, repo, runtime_greedy, show};
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL: &str = "apt-get install -y kotlin openjdk-17-jdk-headless";

/// [`common::lib_dir`], checked for the JNI entry points.
fn jni_lib_dir() -> PathBuf {
    let dir = common::lib_dir();
    let lib = dir.join(format!(
        "{}sparrow_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let bytes = std::fs::read(&lib).unwrap();
    let symbol = b"Java_dev_sparrow_Native_modelOpen";
    assert!(
        bytes.windows(symbol.len()).any(|w| w == symbol),
        "{} has no JNI entry points: build sparrow-ffi with its `jni` feature (on by default)",
        lib.display()
    );
    dir
}

/// Compiles the library's Kotlin sources and the client into one jar (with the Kotlin
/// runtime); returns its path.
fn client_jar() -> PathBuf {
    let kotlinc = common::tool("kotlinc", INSTALL);
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jvm_client");
    std::fs::create_dir_all(&out_dir).unwrap();
    let jar = out_dir.join(format!("client-{}.jar", std::process::id()));
    let android = repo().join("android");
    let o = Command::new(kotlinc)
        .arg(android.join("src/main/kotlin"))
        .arg(android.join("src/test/kotlin"))
        .arg("-include-runtime")
        .arg("-d")
        .arg(&jar)
        .output()
        .expect("run kotlinc");
    assert!(
        o.status.success() && jar.exists(),
        "kotlinc failed to build the JVM client:\n{}",
        show(&o)
    );
    jar
}

#[test]
fn jvm_client_runs_the_whole_flow() {
    let java = common::tool("java", INSTALL);
    let lib = jni_lib_dir();
    let jar = client_jar();
    let not_a_model = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jvm-not-a-model.gguf");
    std::fs::write(&not_a_model, b"this is not a GGUF file\n").unwrap();
    let o = Command::new(java)
        .arg(format!("-Djava.library.path={}", lib.display()))
        .arg("-cp")
        .arg(&jar)
        .arg("dev.sparrow.JvmClientKt")
        .args([
            fixture("tiny/tiny-llama.f32.gguf"),
            fixture("tiny/tiny-llama.q8_0.gguf"),
            fixture("tiny/tiny-qwen2.f32.gguf"),
            fixture("adapters/lora_plain.lora.f32.gguf"),
            fixture("adapters/shira"),
            not_a_model,
        ])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(o.status.success(), "the JVM client failed:\n{}", show(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("ok: ")),
        "{}",
        show(&o)
    );

    // What the client generated through JNI is what the runtime generates.
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
    let _ = std::fs::remove_file(jar);
}
