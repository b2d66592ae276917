//! The budget of one fuzz target, shared by `crates/qwen2vl/tests/fuzz_parsers.rs` and
//! `crates/qwen2vl-server/tests/fuzz_request.rs` (each includes this file with `#[path]`):
//! how many cases and seconds it runs (`QWEN2VL_FUZZ_CASES`, `QWEN2VL_FUZZ_SECS`, default 3)
//! and its seed (`QWEN2VL_FUZZ_SEED` mixed with the target's name), and a proptest driver
//! that spends it.

use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseResult, TestRng, TestRunner};

fn env_f64(key: &str) -> Option<f64> {
    std::env::var(key).ok().and_then(|v| v.trim().parse().ok())
}

/// How long and how many cases one target runs, and its seed.
pub struct Budget {
    pub name: &'static str,
    secs: f64,
    cases: u64,
    pub seed: u64,
    start: Instant,
}

impl Budget {
    /// `default_cases` unless `QWEN2VL_FUZZ_CASES`; `factor` x `QWEN2VL_FUZZ_SECS` (3) seconds.
    pub fn new(name: &'static str, default_cases: u64, factor: f64) -> Budget {
        let secs = env_f64("QWEN2VL_FUZZ_SECS").unwrap_or(3.0) * factor;
        let cases = env_f64("QWEN2VL_FUZZ_CASES")
            .map(|c| c as u64)
            .unwrap_or(default_cases);
        let base = std::env::var("QWEN2VL_FUZZ_SEED")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0x05ee_d2b1_u64);
        // FNV-1a of the name: each target its own stream from one seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Budget {
            name,
            secs,
            cases,
            seed: base ^ h,
            start: Instant::now(),
        }
    }

    /// Whether another case fits after `done` cases.
    pub fn more(&self, done: u64) -> bool {
        done < self.cases && self.start.elapsed().as_secs_f64() < self.secs
    }

    /// Runs `test` on values of `strategy` in rounds of up to 256 cases (each a proptest run
    /// with its own seed, so a failure is shrunk and reported with its input) until the budget
    /// is spent; returns the number of cases.
    pub fn run_prop<S: Strategy>(
        &self,
        strategy: &S,
        test: impl Fn(S::Value) -> TestCaseResult,
    ) -> u64 {
        let mut done = 0u64;
        let mut round = 0u64;
        while self.more(done) {
            let chunk = (self.cases - done).min(256) as u32;
            let mut config = Config::with_cases(chunk);
            config.failure_persistence = None;
            config.max_shrink_time = 20_000;
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&self.seed.to_le_bytes());
            seed[8..16].copy_from_slice(&round.to_le_bytes());
            let mut runner =
                TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
            if let Err(e) = runner.run(strategy, &test) {
                panic!(
                    "fuzz {}: {e} (seed {:#x}, round {round})",
                    self.name, self.seed
                );
            }
            done += u64::from(chunk);
            round += 1;
        }
        done
    }

    pub fn report(&self, done: u64, extra: &str) {
        eprintln!(
            "fuzz {}: {done} cases in {:.1} s (seed {:#x}){extra}",
            self.name,
            self.start.elapsed().as_secs_f64(),
            self.seed
        );
    }
}
