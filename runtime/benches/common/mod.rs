//! What the kernel benches share: SmolLM2-135M's matrix shapes and a reproducible source of
//! random weights.

#![allow(dead_code)] // each bench uses its own subset

pub struct Shape {
    pub name: &'static str,
    pub rows: usize,
    pub cols: usize,
    /// Cycle over copies of the matrix totalling at least [`stream_bytes`] (else one copy),
    /// so that every product reads its weights from memory.
    pub stream: bool,
}

impl Shape {
    /// Bytes of the copies to cycle over (0: one copy).
    pub fn stream_bytes(&self) -> usize {
        if self.stream {
            stream_bytes()
        } else {
            0
        }
    }
}

/// Twice the largest CPU cache that sysfs reports for cpu0 (cycling through twice a cache's
/// size leaves nothing for it to hit), at least 128 MiB (128 MiB where sysfs says nothing): a
/// fixed 128 MiB fitted in the L3 of some machines (an Intel Xeon VM reports 480 MiB; there
/// the group bench holds nine such sets of copies at once, about 9 GB).
/// `SPARROW_BENCH_STREAM_MIB` sets it instead.
pub fn stream_bytes() -> usize {
    if let Some(mib) = std::env::var("SPARROW_BENCH_STREAM_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return mib << 20;
    }
    (2 * largest_cache_bytes().unwrap_or(0)).max(128 << 20)
}

/// The largest `size` of /sys/devices/system/cpu/cpu0/cache/index*/ (e.g. "491520K").
fn largest_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("size")).ok())
        .filter_map(|s| {
            let s = s.trim();
            let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
            let n: usize = num.parse().ok()?;
            Some(match unit {
                "K" => n << 10,
                "M" => n << 20,
                "G" => n << 30,
                _ => n,
            })
        })
        .max()
}

pub const SHAPES: [Shape; 3] = [
    Shape {
        name: "ffn_up",
        rows: 1536,
        cols: 576,
        stream: false,
    },
    Shape {
        name: "ffn_down",
        rows: 576,
        cols: 1536,
        stream: false,
    },
    Shape {
        name: "output",
        rows: 49152,
        cols: 576,
        stream: true,
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
