//! Group-sparse matrix-vector benchmarks (to be written).
fn main() {}
