//! Helpers shared by the integration tests: where fixtures and models live.

use std::path::PathBuf;

/// `tests/fixtures` in the source tree.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A model file named by environment variable `var`. Panics (fails the test, never skips)
/// with the command that fetches it when the variable is unset or the file is missing.
pub fn model_from_env(var: &str) -> PathBuf {
    let hint =
        "run `eval \"$(bash tests/fetch_models.sh)\"` to fetch the models and set the variables";
    let p = std::env::var_os(var).unwrap_or_else(|| panic!("{var} is not set; {hint}"));
    let p = PathBuf::from(p);
    assert!(p.is_file(), "{var}={} does not exist; {hint}", p.display());
    p
}

/// Reads a file of little-endian f32.
pub fn read_f32(path: &std::path::Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
