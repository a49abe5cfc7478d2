//! Sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.
//!
//! The order is llama.cpp's default chain: penalties, top-k, top-p, min-p, temperature, then
//! a draw from the softmax. Temperature 0 (or below) is greedy: the first maximum wins.

/// Sampling settings. `Default` is llama.cpp's defaults with temperature 0.8.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// 1.0 keeps every token.
    pub top_p: f32,
    /// 0.0 keeps every token.
    pub min_p: f32,
    /// 1.0 is no penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// splitmix64: small, fast and good enough for sampling; seeded for reproducible runs.
#[derive(Clone, Debug)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = Rng(cfg.seed);
        Sampler {
            cfg,
            rng,
            cand: Vec::new(),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Picks the next token from `logits`, given the tokens so far (`history`, for the
    /// repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = &self.cfg;
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if c.repeat_penalty != 1.0 && c.repeat_last_n > 0 {
            let start = history.len().saturating_sub(c.repeat_last_n);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(e) = self.cand.get_mut(id as usize) {
                    // llama.cpp: divide positive logits, multiply negative ones.
                    e.1 = if e.1 > 0.0 {
                        e.1 / c.repeat_penalty
                    } else {
                        e.1 * c.repeat_penalty
                    };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(&self.cand);
        }
        // Sort descending; NaN logits sink to the end.
        self.cand
            .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        self.cand.retain(|e| !e.1.is_nan());
        if self.cand.is_empty() {
            return 0;
        }
        if c.top_k > 0 {
            self.cand.truncate(c.top_k.max(1));
        }
        let max = self.cand[0].1;
        let probs = |cand: &[(u32, f32)], t: f32| -> Vec<f32> {
            let e: Vec<f32> = cand.iter().map(|x| ((x.1 - max) / t).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect()
        };
        if c.top_p < 1.0 {
            let p = probs(&self.cand, 1.0);
            let mut acc = 0.0;
            let mut keep = p.len();
            for (i, pi) in p.iter().enumerate() {
                acc += pi;
                if acc >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }
        if c.min_p > 0.0 {
            // Keep tokens whose probability is at least min_p times the top one's.
            let cut = max + c.min_p.ln();
            let keep = self.cand.iter().take_while(|x| x.1 >= cut).count();
            self.cand.truncate(keep.max(1));
        }
        let p = probs(&self.cand, c.temperature);
        let r = self.rng.next_f32();
        let mut acc = 0.0;
        for (i, pi) in p.iter().enumerate() {
            acc += pi;
            if r < acc {
                return self.cand[i].0;
            }
        }
        self.cand[self.cand.len() - 1].0
    }
}

/// The index of the first maximum (NaN never wins).
pub fn argmax(cand: &[(u32, f32)]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for &(i, l) in cand {
        if l > best.1 {
            best = (i, l);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.0, 3.0, 1.0, 2.9, -1.0, 0.5]
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&logits(), &[]), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, 1.0, 0.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 1.5,
            ..SamplerConfig::greedy()
        });
        // 3.0 / 1.5 = 2.0 < 2.9
        assert_eq!(s.sample(&logits(), &[1]), 3);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits(), &[]), 1);
        }
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        // exp(-4) < 0.05: min_p 0.05 leaves only tokens within ln(20) ~ 3.0 of the top.
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.05,
            ..Default::default()
        });
        for _ in 0..200 {
            let t = s.sample(&logits(), &[]);
            assert!(t != 4, "token 4 is below min_p");
        }
        // top_p 0.5: token 1 alone holds ~0.44, with token 3 ~0.84; so only 1 and 3 remain.
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            ..Default::default()
        });
        for _ in 0..200 {
            let t = s.sample(&logits(), &[]);
            assert!(t == 1 || t == 3, "token {t} is outside top_p");
        }
    }

    #[test]
    fn same_seed_same_draws_and_frequencies_follow_softmax() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        };
        let (mut a, mut b) = (Sampler::new(cfg.clone()), Sampler::new(cfg));
        let l = [0.0f32, (3.0f32).ln()]; // probabilities 0.25, 0.75
        let mut ones = 0;
        for _ in 0..4000 {
            let x = a.sample(&l, &[]);
            assert_eq!(x, b.sample(&l, &[]));
            ones += x as usize;
        }
        let f = ones as f32 / 4000.0;
        assert!((f - 0.75).abs() < 0.03, "frequency {f}");
    }
}
