//! Helpers shared by the integration tests: where fixtures and models live.

use std::path::PathBuf;

/// `tests/fixtures` in the source tree.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}
