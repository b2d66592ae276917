//! Whether a model fits in memory, checked before its weights are read.
//!
//! Weights are read out of the memory-mapped checkpoint into memory of the compute dtype
//! (bf16 widened to f32 takes twice its file size; `--quant` shrinks the matrices), so a
//! checkpoint larger than the free memory would be read for minutes and then killed by the
//! kernel. [`check_fits`] compares the estimate ([`crate::weights::Weights::resident_bytes`])
//! with `MemAvailable` of `/proc/meminfo` and refuses up front with both figures.
//!
//! Setting the environment variable [`OVERRIDE_ENV`] (`QWEN2VL_IGNORE_MEMORY_CHECK=1`) skips
//! the check (swap, memory about to be freed, an estimate that is too cautious).

use crate::error::{Error, Result};

/// The environment variable that turns the check off (any value but `0` or empty).
pub const OVERRIDE_ENV: &str = "QWEN2VL_IGNORE_MEMORY_CHECK";

/// `MemAvailable` of `/proc/meminfo` in bytes, when readable (Linux).
pub fn mem_available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&s)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn overridden() -> bool {
    std::env::var(OVERRIDE_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Refuses loading `what` when its weights (`needed` bytes) exceed the memory available now;
/// passes when the figure is unknown or [`OVERRIDE_ENV`] is set.
pub fn check_fits(needed: u64, what: &str) -> Result<()> {
    if overridden() {
        return Ok(());
    }
    match mem_available_bytes() {
        Some(avail) => fits(needed, avail, what),
        None => Ok(()),
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn fits(needed: u64, avail: u64, what: &str) -> Result<()> {
    if needed <= avail {
        return Ok(());
    }
    Err(Error::bad_input(
        format!(
            "{what} needs about {:.2} GiB of memory for its weights, but only {:.2} GiB is available (MemAvailable)",
            gib(needed),
            gib(avail)
        ),
        format!(
            "a model that fits: a smaller one, --quant q8_0/q4_k_m, --dtype bf16/f16 for a bf16 checkpoint, or {OVERRIDE_ENV}=1 to load anyway"
        ),
    ))
}

/// Hands the heap's free pages back to the operating system (glibc `malloc_trim`; nothing
/// elsewhere). The CLI tunes malloc to keep freed memory (tensor buffers are then reused
/// instead of page-faulted again, see `keep_freed_memory` in the CLI's main.rs), which is
/// right during a burst of work but would keep a process at its peak forever; callers run
/// this where a burst ends: after a load (the tokenizer's temporary blocks) and each time
/// the engine goes idle, so an idle server returns to its resting size.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_with_both_figures() {
        assert!(fits(10, 10, "m").is_ok());
        let e = fits(3 << 30, 1 << 30, "model /x").unwrap_err().to_string();
        assert!(e.contains("model /x needs about 3.00 GiB"), "{e}");
        assert!(e.contains("only 1.00 GiB is available"), "{e}");
        assert!(e.contains(OVERRIDE_ENV), "{e}");
        assert_eq!(
            parse_mem_available("MemTotal: 10 kB\nMemAvailable:    2048 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(parse_mem_available("MemTotal: 10 kB\n"), None);
    }
}
