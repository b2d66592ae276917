//! The thread pool the model's arithmetic runs in.
//!
//! Why: a decode step is about 200 products, each split over the cores with rayon. Called
//! from a thread outside any pool (the CLI's main thread, the engine's scheduler thread),
//! every product is injected into the global pool and the caller sleeps until a worker
//! finishes it: two thread wake-ups per product, about 5% of a 2B q8_0 decode step on two
//! cores (`examples/quant_decode.rs`). Inside [`install`] the caller *is* one of the pool's
//! workers for the whole step: it runs its share of each product itself and only the
//! other workers are woken (or are still spinning from the previous product).
//!
//! The pool has as many threads as rayon's global pool (`RAYON_NUM_THREADS`, which
//! `--threads` sets); candle's CPU kernels and [`crate::ops::gemv`] run in whichever pool
//! calls them, so everything inside [`install`] shares these threads.

use std::sync::OnceLock;

use rayon::{ThreadPool, ThreadPoolBuilder};

/// Runs `f` on a worker of the compute pool (directly when already on a rayon worker).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: OnceLock<Option<ThreadPool>> = OnceLock::new();
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let pool = POOL.get_or_init(|| {
        ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("qwen2vl-compute-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}
