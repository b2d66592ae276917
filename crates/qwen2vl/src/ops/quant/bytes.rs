//! The memory quantized weights live in: 2 MiB-aligned and, on Linux, backed by 2 MiB pages
//! where the kernel grants them.
//!
//! Why: decoding streams every weight once per token, 1–2 GB for the 2B model. With 4 KiB
//! pages that is 250–500 thousand pages per token, and every one is a TLB miss and a page
//! walk in the middle of the stream; with 2 MiB pages it is under a thousand. Measured on
//! the 2-core Xeon VM (`examples/quant_decode.rs`, a 2B q8_0 step, back to back): 72 → 66 ms.
//!
//! How: Linux backs anonymous memory with transparent huge pages only inside ranges marked
//! `madvise(MADV_HUGEPAGE)` when `/sys/kernel/mm/transparent_hugepage/enabled` is `madvise`
//! (the common default), and only for 2 MiB-aligned extents touched *after* the advice. So a
//! buffer of at least 2 MiB is allocated 2 MiB-aligned, advised, then zeroed (the first
//! touch). Smaller buffers and other systems get plain 64-byte-aligned memory; the advice
//! is a hint, and its failure changes nothing but speed.
//!
//! Where: on Linux, buffers of 64 KiB (`OWN_MAP`) or more get their own anonymous mapping
//! instead of a block of the malloc heap. Weights live as long as the model, and from the
//! heap each one (with the 2 MiB alignment gap before it) sat between the load's and the
//! forward passes' temporary blocks, so freed activations could not merge into large
//! free runs and the heap kept growing: after a 640x480 image through the 2B's vision
//! tower, glibc held 170-230 MiB of free but unreturned heap beside 130-160 MiB in use
//! (`mallinfo2`, q8_0 model, 2 threads); peak RSS was 13% above the weights + KV cache.
//! Own mappings leave the heap to the activations, and free them for good on drop.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;

/// Size of a huge page, and the alignment of buffers at least this large.
const HUGE: usize = 2 << 20;

/// Buffers at least this large get their own mapping on Linux (module docs); smaller ones
/// (a layer's bias-sized tensors) come from the allocator, where a page-sized mapping each
/// would waste more than it saves.
const OWN_MAP: usize = 64 << 10;

/// A zero-initialised, fixed-size byte buffer for weights (see the module docs).
pub struct WeightBytes {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `WeightBytes` owns its allocation exclusively, like a `Box<[u8]>`.
unsafe impl Send for WeightBytes {}
// SAFETY: shared access only reads.
unsafe impl Sync for WeightBytes {}

impl WeightBytes {
    fn layout(len: usize) -> Layout {
        let align = if len >= HUGE { HUGE } else { 64 };
        Layout::from_size_align(len.max(1), align).expect("a weight buffer's size fits isize")
    }

    /// `len` bytes, allocated and advised but not yet touched; `fill` must write every byte
    /// (it is the first touch, so the pages come in huge where the kernel grants them).
    fn filled(len: usize, fill: impl FnOnce(*mut u8)) -> WeightBytes {
        let layout = Self::layout(len);
        let raw = match map::own(len) {
            Some(p) => p,
            // SAFETY: the layout's size is non-zero.
            None => unsafe { alloc(layout) },
        };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        if len >= HUGE {
            advise_huge(raw, len);
        }
        fill(raw);
        WeightBytes { ptr, len }
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> WeightBytes {
        // SAFETY: `p` points to `layout(len).size() >= len` writable bytes.
        Self::filled(len, |p| unsafe { std::ptr::write_bytes(p, 0, len.max(1)) })
    }

    /// `len` zero bytes, zeroed by all cores: the zeroing is the first touch, so its page
    /// faults (and the kernel's clearing of each page) are spread over the threads instead
    /// of serialised on one. For buffers about to be overwritten in parallel (repacking a
    /// matrix at load).
    pub fn zeroed_par(len: usize) -> WeightBytes {
        use rayon::prelude::*;
        Self::filled(len, |p| {
            let base = p as usize;
            (0..len.div_ceil(HUGE)).into_par_iter().for_each(|i| {
                let start = i * HUGE;
                let n = HUGE.min(len - start);
                // SAFETY: `start + n <= len` bytes of the allocation at `base` are ours, and
                // every extent is written by exactly one task.
                unsafe { std::ptr::write_bytes((base + start) as *mut u8, 0, n) };
            });
            if len == 0 {
                // SAFETY: the layout has size 1.
                unsafe { p.write(0) };
            }
        })
    }

    /// A copy of `src` (one pass: no zeroing first).
    pub fn copy_of(src: &[u8]) -> WeightBytes {
        Self::concat(&[src])
    }

    /// The pieces one after another (one pass over each).
    pub fn concat(parts: &[&[u8]]) -> WeightBytes {
        let len = parts.iter().map(|p| p.len()).sum();
        Self::filled(len, |dst| {
            let mut at = 0;
            for part in parts {
                // SAFETY: `dst` has room for `len` = Σ part lengths bytes; the source is a
                // separate allocation.
                unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), dst.add(at), part.len()) };
                at += part.len();
            }
            if len == 0 {
                // The one byte of an empty buffer's allocation, initialised all the same.
                // SAFETY: the layout has size 1.
                unsafe { dst.write(0) };
            }
        })
    }
}

#[cfg(target_os = "linux")]
fn advise_huge(ptr: *mut u8, len: usize) {
    // Whole 2 MiB extents only; the tail (if any) stays in small pages.
    let extent = len / HUGE * HUGE;
    // SAFETY: `ptr` is 2 MiB-aligned (so page-aligned) and `extent <= len` bytes of it are
    // ours; madvise only changes how the kernel backs them.
    unsafe {
        libc::madvise(ptr.cast(), extent, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_ptr: *mut u8, _len: usize) {}

impl Drop for WeightBytes {
    fn drop(&mut self) {
        if map::is_own(self.len) {
            // SAFETY: `filled` mapped `ptr` for `len` bytes (`map::own` succeeded for this
            // length, or the process would have aborted in `handle_alloc_error`).
            unsafe { map::release(self.ptr.as_ptr(), self.len) };
        } else {
            // SAFETY: allocated in `filled` with this layout.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

/// Buffers in their own anonymous mappings (module docs, "Where").
#[cfg(target_os = "linux")]
mod map {
    use super::{HUGE, OWN_MAP};

    /// Whether a buffer of `len` bytes is (to be) in its own mapping.
    pub fn is_own(len: usize) -> bool {
        len >= OWN_MAP
    }

    /// A fresh private anonymous mapping of `len` bytes (untouched), 2 MiB-aligned when
    /// `len >= HUGE`, else page-aligned; `None` below [`OWN_MAP`] bytes, and a null pointer
    /// when the kernel refuses (the caller reports it as an allocation failure).
    pub fn own(len: usize) -> Option<*mut u8> {
        if !is_own(len) {
            return None;
        }
        let align = if len >= HUGE { HUGE } else { 4096 };
        // Map `align` bytes more, then unmap what lies before the first aligned address and
        // after its `len` bytes (rounded up to pages).
        let Some(span) = len.checked_add(align) else {
            return Some(std::ptr::null_mut());
        };
        // SAFETY: a new private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Some(std::ptr::null_mut());
        }
        let base = base as usize;
        let start = base.next_multiple_of(align);
        let end = start + len.next_multiple_of(4096);
        // SAFETY: both ranges lie inside the mapping just made, page-aligned (`base` and
        // `start` are page-aligned, and so are `end` and `base + span`), and nothing
        // else refers to them.
        unsafe {
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            if base + span > end {
                libc::munmap(end as *mut libc::c_void, base + span - end);
            }
        }
        Some(start as *mut u8)
    }

    /// Unmaps a buffer from [`own`].
    ///
    /// # Safety
    /// `ptr` came from `own(len)` and is not used afterwards.
    pub unsafe fn release(ptr: *mut u8, len: usize) {
        // SAFETY: the caller's contract: `ptr..ptr + len` rounded up to pages is our mapping.
        unsafe { libc::munmap(ptr.cast(), len.next_multiple_of(4096)) };
    }
}

/// Other systems: every buffer comes from the allocator.
#[cfg(not(target_os = "linux"))]
mod map {
    pub fn is_own(_len: usize) -> bool {
        false
    }

    pub fn own(_len: usize) -> Option<*mut u8> {
        None
    }

    /// Never called: no buffer is in its own mapping here.
    ///
    /// # Safety
    /// None needed.
    pub unsafe fn release(_ptr: *mut u8, _len: usize) {}
}

impl std::ops::Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for WeightBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for WeightBytes {
    fn clone(&self) -> Self {
        WeightBytes::copy_of(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_and_hold_their_bytes() {
        for (len, par) in [
            0,
            1,
            100,
            OWN_MAP - 1,
            OWN_MAP,
            HUGE - 1,
            HUGE,
            HUGE * 2 + 3,
        ]
        .into_iter()
        .flat_map(|l| [(l, false), (l, true)])
        {
            let mut b = if par {
                WeightBytes::zeroed_par(len)
            } else {
                WeightBytes::zeroed(len)
            };
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0));
            let align = if len >= HUGE { HUGE } else { 64 };
            assert_eq!(b.as_ptr() as usize % align, 0, "len {len}");
            if cfg!(target_os = "linux") && len >= OWN_MAP {
                // Its own mapping: page-aligned whatever its size.
                assert_eq!(b.as_ptr() as usize % 4096, 0, "len {len}");
            }
            for (i, v) in b.iter_mut().enumerate() {
                *v = (i % 251) as u8;
            }
            let c = b.clone();
            assert_eq!(&c[..], &b[..]);
            assert_eq!(&WeightBytes::copy_of(&b)[..], &b[..]);
            let (x, y) = b.split_at(len / 3);
            assert_eq!(&WeightBytes::concat(&[x, &[], y])[..], &b[..]);
        }
    }
}
