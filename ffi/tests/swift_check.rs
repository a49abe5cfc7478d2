//! The Swift package in ios/ cannot be compiled here (no Swift toolchain), so it is checked
//! with ios/check/check-swift.mjs: every .swift file parses with the tree-sitter Swift grammar,
//! every C name the Swift files use is in include/sparrow.h, and every function and constant
//! of the header is used by the Swift API. The check's npm packages are installed with `npm
//! ci` (from ios/check/package-lock.json) when ios/check/node_modules is missing. Both tests
//! fail (not skip) when node or npm is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn tool(name: &str, install: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("`{name}` is not installed; it is needed here ({install})"))
}

fn text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// ios/check with its node_modules installed (once per test binary run).
fn check_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = repo().join("ios/check");
        if !dir.join("node_modules").is_dir() {
            let npm = tool("npm", "apt-get install npm");
            let out = Command::new(npm)
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .output()
                .expect("run npm ci");
            assert!(
                out.status.success(),
                "`npm ci` failed in {}\n{}",
                dir.display(),
                text(&out)
            );
        }
        dir
    })
}

/// Runs the check on the repository at `root`.
fn run_check(root: &Path) -> Output {
    let node = tool("node", "apt-get install nodejs");
    Command::new(node)
        .arg(check_dir().join("check-swift.mjs"))
        .arg("--root")
        .arg(root)
        .output()
        .expect("run node")
}

#[test]
fn swift_package_parses_and_wraps_the_whole_c_abi() {
    let out = run_check(&repo());
    assert!(
        out.status.success(),
        "ios/check/check-swift.mjs failed\n{}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("check-swift: ok"),
        "no success line\n{}",
        text(&out)
    );
}

/// Copies `from` into `to`, leaving out node_modules and build output.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if ["node_modules", ".build", "SparrowFFI.xcframework"].contains(&name.to_str().unwrap()) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// Replaces the one occurrence of `from` in `file`; returns the 1-based line it was on.
fn break_file(file: &Path, from: &str, to: &str) -> usize {
    let src = std::fs::read_to_string(file).unwrap();
    assert_eq!(
        src.matches(from).count(),
        1,
        "`{from}` is not in {} exactly once",
        file.display()
    );
    let line = src[..src.find(from).unwrap()].lines().count() + 1;
    std::fs::write(file, src.replacen(from, to, 1)).unwrap();
    line
}

/// The check is not vacuous: on a copy of the package with a missing brace, a misspelled C
/// function, constant and type, and a C function left unused, it fails and names each.
#[test]
fn check_reports_broken_swift() {
    let root =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("swift-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    copy_tree(&repo().join("ios"), &root.join("ios"));
    std::fs::create_dir_all(root.join("ffi/include")).unwrap();
    std::fs::copy(
        repo().join("ffi/include/sparrow.h"),
        root.join("ffi/include/sparrow.h"),
    )
    .unwrap();
    let sources = root.join("ios/Sources/Sparrow");

    let brace_line = break_file(
        &sources.join("Model.swift"),
        "public func unapplyAll() throws {",
        "public func unapplyAll() throws",
    );
    break_file(
        &sources.join("Model.swift"),
        "sparrow_adapter_set_scale(",
        "sparrow_adapter_set_scal(",
    );
    break_file(
        &sources.join("SparrowError.swift"),
        "SPARROW_ERR_BUSY)",
        "SPARROW_ERR_BUZY)",
    );
    break_file(
        &sources.join("Session.swift"),
        "SparrowGenerateResult()",
        "SparrowGenerateResults()",
    );
    break_file(
        &sources.join("Session.swift"),
        "try check(sparrow_session_reset(handle))",
        "_ = handle",
    );

    let out = run_check(&root);
    let report = text(&out);
    assert!(
        !out.status.success(),
        "the check passed a broken package\n{report}"
    );
    for want in [
        format!("ios/Sources/Sparrow/Model.swift:{brace_line}:"),
        "syntax error".to_string(),
        "sparrow_adapter_set_scal is not a function of ffi/include/sparrow.h".to_string(),
        "SPARROW_ERR_BUZY is not a constant of ffi/include/sparrow.h".to_string(),
        "SparrowGenerateResults is neither a type".to_string(),
        "sparrow_session_reset is not used by the Swift API".to_string(),
        "sparrow_adapter_set_scale is not used by the Swift API".to_string(),
        "SPARROW_ERR_BUSY is not used by the Swift API".to_string(),
    ] {
        assert!(
            report.contains(&want),
            "the report lacks `{want}`\n{report}"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}
