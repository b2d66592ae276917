//! Token selection from one row of logits, in the order transformers' `generate` applies
//! its logits processors.
//!
//! Reference: transformers 4.49 `generation/utils.py::GenerationMixin._get_logits_processor`
//! and `_sample`, with the processors of `generation/logits_process.py`:
//! 1. `RepetitionPenaltyLogitsProcessor` (when `repetition_penalty != 1`): for every token id
//!    that occurs in the sequence so far (prompt included), `logit < 0 ? logit * p : logit / p`.
//! 2. `TemperatureLogitsWarper` (when `temperature != 1`): `logits / temperature`.
//! 3. `TopKLogitsWarper` (when `top_k != 0`): keep logits `>=` the k-th largest (ties kept).
//! 4. `TopPLogitsWarper` (when `top_p < 1`): sort ascending, drop tokens whose cumulative
//!    probability is `<= 1 - top_p`, always keep the most probable one (`min_tokens_to_keep=1`).
//! 5. `softmax` and `torch.multinomial` (we draw from a seeded ChaCha8 stream; the values
//!    differ from torch's, the distribution is the same).
//!
//! Greedy decoding (`do_sample=False`) applies only the repetition penalty, then
//! `argmax` (the first maximum, i.e. the lowest id, as `torch.argmax`). Here greedy is
//! `temperature == 0` or `top_k == 1`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::GenerationConfig;
use crate::{Error, Result};

/// The most top-logprobs one step may report (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How to pick the next token. Defaults are transformers' `GenerationConfig` defaults with
/// sampling on (temperature 1, top_p 1, no top-k, no penalty).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; `0` means greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; `1` disables it.
    pub top_p: f64,
    /// Keep the k most likely tokens; `0` disables it, `1` is greedy.
    pub top_k: usize,
    /// HF's multiplicative repetition penalty (> 0); `1` disables it.
    pub repetition_penalty: f64,
    /// Seed of the sampler's random stream; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// How many top tokens (with log-probabilities) to report per step, 0..=20.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: None,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), no penalty.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// The defaults a model ships in `generation_config.json`, as `generate()` reads them:
    /// `do_sample: false` means greedy (the penalty still applies); a missing `top_k` is
    /// HF's default 50.
    pub fn from_generation_config(g: &GenerationConfig) -> Self {
        SamplingParams {
            temperature: if g.do_sample { g.temperature } else { 0.0 },
            top_p: g.top_p,
            top_k: g.top_k.unwrap_or(50),
            repetition_penalty: g.repetition_penalty,
            seed: None,
            top_logprobs: 0,
        }
    }

    /// Whether these parameters pick the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks every value; errors name the field and the allowed range.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::bad_input(
                format!("temperature {} is invalid", self.temperature),
                "a finite number >= 0 (0 = greedy)",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::bad_input(
                format!("top_p {} is invalid", self.top_p),
                "a number in (0, 1]",
            ));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(Error::bad_input(
                format!("repetition_penalty {} is invalid", self.repetition_penalty),
                "a finite number > 0 (1 = off)",
            ));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(Error::bad_input(
                format!("top_logprobs {} is too many", self.top_logprobs),
                format!("0 to {MAX_TOP_LOGPROBS}"),
            ));
        }
        Ok(())
    }
}

/// One chosen token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The token id.
    pub token: u32,
    /// Its log-probability under the model's raw distribution, `log_softmax(logits)`
    /// before penalty, temperature and truncation (what OpenAI-style APIs report as
    /// `logprob`, and vLLM's default `raw_logprobs`).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens under the same raw distribution, most likely
    /// first (ties by lower id).
    pub top: Vec<(u32, f32)>,
}

/// A sampler: the parameters, a random stream and scratch buffers (one per sequence).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scores: Vec<f32>,
    vals: Vec<f32>,
    seen: Vec<u32>,
}

impl Sampler {
    /// A sampler for validated parameters (returns the validation error otherwise).
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Ok(Sampler {
            params,
            rng,
            scores: Vec::new(),
            vals: Vec::new(),
            seen: Vec::new(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one row, `(vocab,)`), given every token of the
    /// sequence so far (`previous_tokens`: prompt and generated, for the repetition
    /// penalty; ids outside the vocabulary are ignored).
    ///
    /// NaN or `+inf` logits, or all `-inf`, are an error (the model misbehaved), not a
    /// panic. `-inf` entries are allowed (masked tokens).
    pub fn sample(&mut self, logits: &[f32], previous_tokens: &[u32]) -> Result<Sampled> {
        let n = logits.len();
        if n == 0 {
            return Err(Error::bad_input(
                "the logits are empty",
                "one logit per vocabulary entry",
            ));
        }
        if n > u32::MAX as usize {
            return Err(Error::bad_input(
                "the logits row is too long",
                "at most 2^32 entries",
            ));
        }
        let mut max = f32::NEG_INFINITY;
        for (i, &x) in logits.iter().enumerate() {
            if x.is_nan() || x == f32::INFINITY {
                return Err(Error::bad_input(
                    format!("the model produced a non-finite logit ({x}) for token {i}"),
                    "finite logits (check the weights and the dtype)",
                ));
            }
            if x > max {
                max = x;
            }
        }
        if max == f32::NEG_INFINITY {
            return Err(Error::bad_input(
                "every logit is -inf",
                "at least one finite logit",
            ));
        }
        // Raw log-softmax normaliser: sum of exp(x - max) (vectorised f32 exp, f64 sum).
        let lse = f64::from(max) + sum_exp_shifted(logits, max).ln();
        let raw_logprob = |id: u32| (f64::from(logits[id as usize]) - lse) as f32;

        // 1. Repetition penalty (RepetitionPenaltyLogitsProcessor), in f32 as torch does.
        self.scores.clear();
        self.scores.extend_from_slice(logits);
        let p = self.params.repetition_penalty as f32;
        if self.params.repetition_penalty != 1.0 {
            self.seen.clear();
            self.seen.extend(
                previous_tokens
                    .iter()
                    .copied()
                    .filter(|&t| (t as usize) < n),
            );
            self.seen.sort_unstable();
            self.seen.dedup();
            for &t in &self.seen {
                let s = &mut self.scores[t as usize];
                *s = if *s < 0.0 { *s * p } else { *s / p };
            }
        }

        let token = if self.params.is_greedy() {
            argmax(&self.scores)
        } else {
            self.sample_processed()
        };
        let top = top_n(logits, self.params.top_logprobs)
            .into_iter()
            .map(|id| (id, raw_logprob(id)))
            .collect();
        Ok(Sampled {
            token,
            logprob: raw_logprob(token),
            top,
        })
    }

    /// Steps 2–5 on `self.scores` (already penalised).
    fn sample_processed(&mut self) -> u32 {
        let scores = &mut self.scores;
        let n = scores.len();
        // 2. Temperature.
        if self.params.temperature != 1.0 {
            let t = self.params.temperature as f32;
            for s in scores.iter_mut() {
                *s /= t;
            }
        }
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let k = self.params.top_k;
        let mut probs: Vec<(u32, f64)> = if k > 0 && k < n {
            top_k_probs(scores, &mut self.vals, k, m)
        } else {
            // Softmax over the whole vocabulary (-inf → 0), in place.
            for s in scores.iter_mut() {
                *s = exp_f32(*s - m);
            }
            let z = sum_f32(scores);
            if self.params.top_p >= 1.0 {
                // 5. Draw straight from the weights.
                return draw_from_weights(scores, z, self.rng.random::<f64>());
            }
            scores
                .iter()
                .enumerate()
                .filter(|(_, &w)| w > 0.0)
                .map(|(i, &w)| (i as u32, f64::from(w) / z))
                .collect()
        };
        // 4. Top-p. HF removes a token when the ascending cumulative probability up to and
        // including it is <= 1 - top_p, i.e. when the mass of the tokens ranked above it is
        // >= top_p; the most likely token is always kept.
        if self.params.top_p < 1.0 {
            let kept = nucleus(&mut probs, self.params.top_p);
            probs.truncate(kept);
        }
        // 5. Draw.
        draw(&probs, self.rng.random::<f64>())
    }
}

/// Step 3, top-k: the candidates are every token >= the k-th largest score (ties kept), with
/// their softmax probabilities among themselves (`m` is the largest score). `vals` is scratch.
fn top_k_probs(scores: &[f32], vals: &mut Vec<f32>, k: usize, m: f32) -> Vec<(u32, f64)> {
    vals.clear();
    vals.extend_from_slice(scores);
    let (_, kth, _) = vals.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    let mut probs: Vec<(u32, f64)> = scores
        .iter()
        .enumerate()
        .filter(|(_, &s)| s >= kth && s > f32::NEG_INFINITY)
        .map(|(i, &s)| (i as u32, f64::from(exp_f32(s - m))))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    for p in probs.iter_mut() {
        p.1 /= z;
    }
    probs
}

/// Draws an index from unnormalised `weights` summing to `z`, with `r` uniform in [0, 1):
/// the first index where the running sum passes `r * z`; rounding past the end takes the
/// last index with a non-zero weight.
fn draw_from_weights(weights: &[f32], z: f64, r: f64) -> u32 {
    let mut u = r * z;
    let mut last = 0u32;
    for (i, &w) in weights.iter().enumerate() {
        let w = f64::from(w);
        if w > 0.0 {
            if u < w {
                return i as u32;
            }
            u -= w;
            last = i as u32;
        }
    }
    last
}

/// Draws a token from `(id, probability)` pairs with `r` uniform in [0, 1), scaled by their
/// total; rounding past the end takes the last token with non-zero probability.
fn draw(probs: &[(u32, f64)], r: f64) -> u32 {
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = r * total;
    for &(id, p) in probs {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs
        .iter()
        .rev()
        .find(|p| p.1 > 0.0)
        .or(probs.last())
        .map_or(0, |p| p.0)
}

/// Sorts the most probable tokens to the front (descending, ties by lower id) far enough to
/// find the nucleus, and returns its size. Sorts only a growing prefix: O(n) for a peaked
/// distribution instead of a full sort of 152k entries.
fn nucleus(probs: &mut [(u32, f64)], top_p: f64) -> usize {
    let n = probs.len();
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut m = 64.min(n);
    loop {
        if m < n {
            probs.select_nth_unstable_by(m - 1, order);
        }
        probs[..m].sort_unstable_by(order);
        let mut above = 0.0f64;
        for (j, p) in probs[..m].iter().enumerate() {
            if j > 0 && above >= top_p {
                return j;
            }
            above += p.1;
        }
        if m == n {
            return n;
        }
        m = (m * 8).min(n);
    }
}

/// `exp(x)` for `x <= 0` (a shifted logit), Cephes' `expf` polynomial: relative error
/// about 2e-7, branch-free so loops over a vocabulary vectorise. Inputs below -87.3
/// (including -inf) give 0.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Round to nearest with the 1.5 * 2^23 trick (no libm call, vectorises on SSE2).
    const ROUND: f32 = 12_582_912.0;
    let under = x < -87.3;
    let x = x.clamp(-87.3, 88.7);
    let shifted = x * LOG2E + ROUND;
    // The rounded integer sits in the low mantissa bits (no saturating float→int cast,
    // which would stop vectorisation).
    let ni = shifted.to_bits() as i32 - 0x4B40_0000;
    let n = shifted - ROUND;
    let r = x - n * C1 - n * C2;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let pow2 = f32::from_bits(((ni + 127) as u32) << 23);
    if under {
        0.0
    } else {
        e * pow2
    }
}

/// `sum(exp(x - max))` over a row (vectorised exps into a block buffer, then summed).
fn sum_exp_shifted(xs: &[f32], max: f32) -> f64 {
    const BLOCK: usize = 1024;
    let mut buf = [0.0f32; BLOCK];
    let mut total = 0.0f64;
    for block in xs.chunks(BLOCK) {
        let out = &mut buf[..block.len()];
        for (o, &x) in out.iter_mut().zip(block) {
            *o = exp_f32(x - max);
        }
        total += sum_f32(out);
    }
    total
}

/// A sum of non-negative f32 values in 8 f32 lanes, flushed to f64 every 1024 values.
fn sum_f32(xs: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for block in xs.chunks(1024) {
        let mut lanes = [0.0f32; 8];
        let mut it = block.chunks_exact(8);
        for c in &mut it {
            for k in 0..8 {
                lanes[k] += c[k];
            }
        }
        let tail: f32 = it.remainder().iter().sum();
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(tail);
    }
    total
}

/// The index of the largest value, the lowest on ties (`torch.argmax`).
fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// The ids of the `k` largest logits, largest first, ties by lower id: one pass keeping a
/// sorted list of the best `k` (k is at most [`MAX_TOP_LOGPROBS`]).
fn top_n(logits: &[f32], k: usize) -> Vec<u32> {
    if k == 0 {
        return vec![];
    }
    let k = k.min(logits.len());
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &x) in logits.iter().enumerate() {
        if top.len() == k && top[k - 1].0.total_cmp(&x).is_ge() {
            continue;
        }
        // After every equal value: earlier (lower) ids stay ahead.
        let at = top.partition_point(|&(v, _)| v.total_cmp(&x).is_ge());
        top.insert(at, (x, i as u32));
        top.truncate(k);
    }
    top.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p).unwrap()
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -90.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            if x >= -87.3 {
                assert!((got - want).abs() <= 4e-7 * want, "{x}: {got} vs {want}");
            } else {
                assert_eq!(got, 0.0);
            }
            x += 0.0137;
        }
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        let xs: Vec<f32> = (0..10_001).map(|i| -(i as f32) / 1000.0).collect();
        let want: f64 = xs.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((sum_exp_shifted(&xs, 0.0) - want).abs() < 1e-6 * want);
    }

    #[test]
    fn top_n_orders_by_value_then_id() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NEG_INFINITY, 2.0, 0.5];
        assert_eq!(top_n(&logits, 0), Vec::<u32>::new());
        assert_eq!(top_n(&logits, 1), vec![1]);
        assert_eq!(top_n(&logits, 3), vec![1, 3, 2]);
        assert_eq!(top_n(&logits, 5), vec![1, 3, 2, 5, 0]);
        assert_eq!(top_n(&logits, 10), vec![1, 3, 2, 5, 0, 6, 4]);
    }

    #[test]
    fn validation() {
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        for bad in [
            SamplingParams {
                temperature: -0.1,
                ..Default::default()
            },
            SamplingParams {
                temperature: f64::NAN,
                ..Default::default()
            },
            SamplingParams {
                temperature: f64::INFINITY,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.01,
                ..Default::default()
            },
            SamplingParams {
                top_p: f64::NAN,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_logprobs: 21,
                ..Default::default()
            },
        ] {
            let e = bad.validate().unwrap_err();
            assert!(matches!(e, Error::BadInput { .. }), "{bad:?}");
            assert!(Sampler::new(bad).is_err());
        }
    }

    #[test]
    fn from_generation_config() {
        let g = GenerationConfig::from_json_str(
            r#"{"do_sample": true, "temperature": 0.01, "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.05}"#,
        )
        .unwrap();
        let p = SamplingParams::from_generation_config(&g);
        assert_eq!(p.top_k, 1);
        assert!(p.is_greedy());
        assert_eq!(p.repetition_penalty, 1.05);
        let g = GenerationConfig::from_json_str("{}").unwrap();
        let p = SamplingParams::from_generation_config(&g);
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_k, 50);
    }

    #[test]
    fn greedy_is_argmax_lowest_id_on_ties() {
        let mut s = sampler(SamplingParams::greedy());
        let r = s.sample(&[0.5, 2.0, -1.0, 2.0], &[]).unwrap();
        assert_eq!(r.token, 1);
        let mut s = sampler(SamplingParams {
            top_k: 1,
            temperature: 0.7,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.5, 2.0, -1.0, 2.0], &[]).unwrap().token, 1);
    }

    #[test]
    fn repetition_penalty_as_hf() {
        // Token 0 (logit 2.0) is penalised to 2.0/1.5 = 1.33 < 1.5 → token 1 wins.
        let mut s = sampler(SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[2.0, 1.5, -3.0], &[0, 0, 99]).unwrap().token, 1);
        // A negative logit is multiplied: -1.0 * 2 = -2.0 < -1.5 → token 1 wins.
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[-1.0, -1.5, -3.0], &[0]).unwrap().token, 1);
        // A penalty < 1 encourages repetition.
        let mut s = sampler(SamplingParams {
            repetition_penalty: 0.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[2.0, 3.0], &[0]).unwrap().token, 0);
    }

    #[test]
    fn logprobs_are_raw_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0, 3.0];
        let mut s = sampler(SamplingParams {
            top_logprobs: 3,
            repetition_penalty: 3.0,
            ..SamplingParams::greedy()
        });
        let r = s.sample(&logits, &[2]).unwrap();
        let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        let lp = |x: f32| (f64::from(x) - z.ln()) as f32;
        assert_eq!(r.token, 3);
        assert!((r.logprob - lp(3.0)).abs() < 1e-6);
        assert_eq!(r.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 3, 1]);
        assert!((r.top[2].1 - lp(2.0)).abs() < 1e-6);
    }

    #[test]
    fn bad_logits_are_errors() {
        let mut s = sampler(SamplingParams::default());
        assert!(s.sample(&[0.0, f32::NAN], &[]).is_err());
        assert!(s.sample(&[0.0, f32::INFINITY], &[]).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY; 3], &[]).is_err());
        assert!(s.sample(&[], &[]).is_err());
        // -inf entries are masked tokens, never chosen.
        for _ in 0..50 {
            let r = s
                .sample(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0], &[])
                .unwrap();
            assert!(r.token == 1 || r.token == 3);
        }
    }

    #[test]
    fn same_seed_same_sequence() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 101) as f32 / 25.0)
            .collect();
        let params = SamplingParams {
            seed: Some(42),
            temperature: 1.3,
            top_p: 0.95,
            top_k: 200,
            ..Default::default()
        };
        let run = |p: SamplingParams| {
            let mut s = sampler(p);
            (0..200)
                .map(|_| s.sample(&logits, &[]).unwrap().token)
                .collect::<Vec<_>>()
        };
        let a = run(params.clone());
        assert_eq!(a, run(params.clone()));
        let b = run(SamplingParams {
            seed: Some(43),
            ..params
        });
        assert_ne!(a, b);
        // Sampling actually varies.
        assert!(a.iter().any(|&t| t != a[0]));
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_follows_hf() {
        // top_k = 2 with a tie at the 2nd value keeps 3 tokens.
        let logits = [5.0f32, 4.0, 4.0, 1.0];
        let mut s = sampler(SamplingParams {
            top_k: 2,
            seed: Some(1),
            ..Default::default()
        });
        let mut seen = [0usize; 4];
        for _ in 0..3000 {
            seen[s.sample(&logits, &[]).unwrap().token as usize] += 1;
        }
        assert!(
            seen[0] > 0 && seen[1] > 0 && seen[2] > 0 && seen[3] == 0,
            "{seen:?}"
        );

        // probs = [0.5, 0.3, 0.2] (as logs). HF, top_p = 0.8: ascending cumsum
        // [0.2, 0.5, 1.0] <= 0.2 removes only the 0.2 token → keep {0, 1}.
        let logits = [0.5f64.ln() as f32, 0.3f64.ln() as f32, 0.2f64.ln() as f32];
        let mut probs: Vec<(u32, f64)> = vec![(0, 0.5), (1, 0.3), (2, 0.2)];
        assert_eq!(nucleus(&mut probs, 0.8), 2);
        // top_p = 0.5: mass above token 1 is 0.5 >= 0.5 → removed; keep only {0}.
        assert_eq!(nucleus(&mut probs, 0.5), 1);
        assert_eq!(nucleus(&mut probs, 0.81), 3);
        assert_eq!(nucleus(&mut probs, 1e-9), 1);
        let mut s = sampler(SamplingParams {
            top_p: 0.8,
            seed: Some(3),
            ..Default::default()
        });
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            seen[s.sample(&logits, &[]).unwrap().token as usize] += 1;
        }
        assert!(seen[2] == 0 && seen[0] > seen[1] && seen[1] > 0, "{seen:?}");
    }

    #[test]
    fn nucleus_on_a_large_flat_vocab() {
        // A flat distribution over 152k tokens forces the prefix to grow to the end.
        let n = 152_064;
        let mut probs: Vec<(u32, f64)> = (0..n as u32).map(|i| (i, 1.0 / n as f64)).collect();
        let kept = nucleus(&mut probs, 0.5);
        assert!((kept as f64 - n as f64 * 0.5).abs() <= 2.0, "{kept}");
        // Ties are ordered by id.
        assert_eq!(probs[0].0, 0);
        assert_eq!(probs[1].0, 1);
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let mut s = sampler(SamplingParams {
            seed: Some(7),
            temperature: 2.0,
            ..Default::default()
        });
        let mut seen = [0f64; 3];
        let trials = 20_000;
        for _ in 0..trials {
            seen[s.sample(&logits, &[]).unwrap().token as usize] += 1.0;
        }
        let w: Vec<f64> = logits.iter().map(|&x| (f64::from(x) / 2.0).exp()).collect();
        let z: f64 = w.iter().sum();
        for i in 0..3 {
            let expect = w[i] / z;
            assert!(
                (seen[i] / trials as f64 - expect).abs() < 0.02,
                "{i}: {seen:?}"
            );
        }
    }
}
