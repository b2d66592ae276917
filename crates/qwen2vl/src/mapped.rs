//! Bytes of memory-mapped checkpoint files (safetensors and GGUF): widening a tensor's
//! elements on all cores, and giving a tensor's pages back once it has been copied out.
//!
//! One home for both, because the safetensors loader (`weights.rs`), the GGUF reader and
//! `qwen2vl quantize`'s checkpoint reader (`gguf/export/source.rs`) all need them.

use memmap2::Mmap;

/// Elements converted per parallel task.
const CHUNK: usize = 1 << 16;

/// `n` little-endian elements of `size` bytes each, decoded by `f` into `T`s on all cores;
/// an error naming the sizes when `bytes` is not exactly `n × size` long.
pub(crate) fn par_decode<T: Send + Copy + Default>(
    bytes: &[u8],
    n: usize,
    size: usize,
    f: impl Fn(&[u8]) -> T + Sync,
) -> std::result::Result<Vec<T>, String> {
    use rayon::prelude::*;
    if bytes.len() != n * size {
        return Err(format!(
            "{} bytes for {n} elements of {size} bytes",
            bytes.len()
        ));
    }
    // `vec!` of zeros maps fresh pages lazily; each task faults in and fills its own chunk.
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * size))
        .for_each(|(o, b)| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(size)) {
                *x = f(c);
            }
        });
    Ok(out)
}

/// The little-endian u16 of the first two bytes of `c`.
#[inline]
pub(crate) fn le16(c: &[u8]) -> u16 {
    u16::from_le_bytes([c[0], c[1]])
}

/// Drops the whole pages of `data` (a slice of `map`, already copied out) from this
/// process's resident set, so loading never holds a checkpoint twice (the file's pages plus
/// the converted copy). Pages shared with a neighbouring tensor are kept; a later read
/// faults the same bytes back in from the file. Nothing happens when `data` is not inside
/// `map`.
pub(crate) fn release_pages(map: &Mmap, data: &[u8]) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let base = map.as_ptr() as usize;
        let start = data.as_ptr() as usize;
        if start < base || start + data.len() > base + map.len() {
            return;
        }
        let (a, b) = (
            (start - base).div_ceil(PAGE) * PAGE,
            (start - base + data.len()) / PAGE * PAGE,
        );
        if b > a {
            // SAFETY: a read-only private file mapping; after MADV_DONTNEED a read faults the
            // same bytes back in from the file, so no reader sees a change.
            let _ =
                unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
        }
    }
    #[cfg(not(unix))]
    let _ = (map, data);
}
