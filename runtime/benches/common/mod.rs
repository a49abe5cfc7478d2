//! What the kernel benches share: SmolLM2-135M's matrix shapes and a reproducible source of
//! random weights.

#![allow(dead_code)] // each bench uses its own subset

pub struct Shape {
    pub name: &'static str,
    pub rows: usize,
    pub cols: usize,
    /// Cycle over copies of the matrix totalling at least this many bytes (0: one copy).
    pub stream_bytes: usize,
}

pub const SHAPES: [Shape; 3] = [
    Shape {
        name: "ffn_up",
        rows: 1536,
        cols: 576,
        stream_bytes: 0,
    },
    Shape {
        name: "ffn_down",
        rows: 576,
        cols: 1536,
        stream_bytes: 0,
    },
    Shape {
        name: "output",
        rows: 49152,
        cols: 576,
        // Four times a 32 MiB L3.
        stream_bytes: 128 << 20,
    },
];

/// xorshift64*: reproducible values without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        // Uniform in [-1, 1).
        u as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn fill(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}
