//! A team of spinning worker threads for the many short parallel products of a decode step.
//!
//! Why: a 2B decode step is ~113 weight products of 0.1–2 ms each. Handed to rayon, each one
//! wakes the pool's sleeping workers (a futex wake and a context switch, tens of µs) and the
//! step runs at ~65% of the memory-bandwidth floor although one long product (the LM head)
//! streams at ~87%. llama.cpp keeps its threads spinning between the operations of a graph;
//! this is the same idea for the products that matter: the team's threads poll for the next
//! product for a short while after each one ([`SPIN`]) and only then sleep.
//!
//! Why not rayon's own workers polling: a rayon worker that polls inside a job it stole from
//! the step can end up waiting under its own poller (measured: +6–11% decode, and a hang in
//! the engine tests). The team's threads run nothing but leaf closures (a range of weight
//! rows dotted with the activations), so no task ever waits on another.
//!
//! Use: [`for_each`] runs a closure on `0..n`, [`for_each_split_mut`] on the pieces of a
//! buffer, on the caller and the team. One caller owns the team at a time; a second caller (another thread's
//! step, or a nested call) gets rayon instead, with the same chunks, so results never depend
//! on who ran them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a team thread keeps polling for work after its last task before it sleeps: longer
/// than the gaps between the products of a step (norms, attention, sampling), short enough
/// that an idle process stops using the cores at once.
const SPIN: Duration = Duration::from_millis(2);

/// Pure `pause` spins before a poller starts yielding its core to other runnable threads.
const PAUSE_SPINS: u32 = 256;

/// Runs `f(i)` for every `i` in `0..n`, on the calling thread and the team's threads;
/// returns when all are done.
///
/// The indices are claimed dynamically, so a thread that got slower work takes fewer. Falls
/// back to rayon when the team is in use (another thread's product, or a call from inside
/// `f`), to the caller alone when the process runs one thread.
///
/// # Panics
/// Re-raises a panic of `f` on the caller after every task has finished.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n <= 1 {
        (0..n).for_each(f);
        return;
    }
    let Some(team) = Team::get() else {
        (0..n).into_par_iter().for_each(&f);
        return;
    };
    let Some(_owner) = team.try_own() else {
        (0..n).into_par_iter().for_each(&f);
        return;
    };
    team.run(n, &f);
}

/// Runs `f(i, &mut data[bounds[i]..bounds[i + 1]])` for every piece `i` through
/// [`for_each`].
///
/// # Panics
/// When `bounds` is not increasing or runs past `data` (a caller's bug), before any task.
pub fn for_each_split_mut<T: Send>(
    data: &mut [T],
    bounds: &[usize],
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    assert!(
        bounds.windows(2).all(|w| w[0] <= w[1]) && bounds.last().is_none_or(|&e| e <= data.len()),
        "team: split points must increase within the buffer"
    );
    let base = SendPtr(data.as_mut_ptr());
    for_each(bounds.len().saturating_sub(1), move |i| {
        let (start, end) = (bounds[i], bounds[i + 1]);
        // SAFETY: the pieces `start..end` are disjoint (the bounds increase, checked above)
        // and inside `data`, `for_each` runs every index exactly once, and `data` stays
        // mutably borrowed by this call until every task has finished.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, piece);
    });
}

/// A raw pointer that may cross threads (the chunks it addresses are disjoint).
struct SendPtr<T>(*mut T);

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SendPtr<T> {}
// SAFETY: used only to hand disjoint chunks of a `&mut [T]` with `T: Send` to other threads.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; the pointer itself is only copied, never written through concurrently.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

/// One parallel call: `n` tasks of a closure that lives on the caller's stack.
struct Job {
    /// The caller's closure, its lifetime erased. Only called for an index `< n` claimed from
    /// `next`, and the caller returns only when `pending` is 0, so it is alive whenever it is
    /// called; a stale `Job` a thread still holds has `next >= n` and never calls it.
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    pending: AtomicUsize,
    panicked: AtomicBool,
}

// SAFETY: `f` points to a `Sync` closure, called from several threads only while the caller
// keeps it alive (see the field's comment); the counters are atomics.
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    /// Runs tasks until none is left to claim.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: `i < n` was claimed, so the caller is still waiting on `pending`.
            let f = unsafe { &*self.f };
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }
}

/// The team: `threads - 1` pollers beside whichever thread calls [`Team::run`].
struct Team {
    /// The newest job (a poller takes it when `generation` moves).
    slot: Mutex<Option<Arc<Job>>>,
    /// Bumped once per published job.
    generation: AtomicU64,
    /// Pollers asleep on `wake`, counted under its mutex.
    sleepers: Mutex<usize>,
    wake: Condvar,
    /// Held by the caller that owns the team.
    busy: AtomicBool,
}

/// Ownership of the team for one call.
struct Owner<'a>(&'a Team);

impl Drop for Owner<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

impl Team {
    /// The process's team, started on first use with rayon's thread count (`--threads`);
    /// `None` with one thread, when its threads cannot be started, or when the environment
    /// sets `QWEN2VL_NO_TEAM=1` (products then go to rayon: for a process that shares its
    /// cores and would rather not have threads polling, and to measure the team's effect).
    fn get() -> Option<&'static Team> {
        static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
        *TEAM.get_or_init(|| {
            let threads = rayon::current_num_threads();
            if threads <= 1 || std::env::var_os("QWEN2VL_NO_TEAM").is_some_and(|v| v != "0") {
                return None;
            }
            let team: &'static Team = Box::leak(Box::new(Team {
                slot: Mutex::new(None),
                generation: AtomicU64::new(0),
                sleepers: Mutex::new(0),
                wake: Condvar::new(),
                busy: AtomicBool::new(false),
            }));
            for i in 1..threads {
                let spawned = std::thread::Builder::new()
                    .name(format!("qwen2vl-team-{i}"))
                    .spawn(move || team.poll());
                if spawned.is_err() {
                    return None;
                }
            }
            Some(team)
        })
    }

    fn try_own(&self) -> Option<Owner<'_>> {
        self.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Owner(self))
    }

    /// Publishes `f(0..n)`, works on it, waits until every task is done.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: only the lifetime is erased; see `Job::f` for why the pointer stays valid.
        let f: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        let job = Arc::new(Job {
            f,
            n,
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(n),
            panicked: AtomicBool::new(false),
        });
        *lock(&self.slot) = Some(job.clone());
        self.generation.fetch_add(1, Ordering::Release);
        if *lock(&self.sleepers) > 0 {
            self.wake.notify_all();
        }
        job.work();
        let mut spins = 0u32;
        while job.pending.load(Ordering::Acquire) != 0 {
            backoff(&mut spins);
        }
        if job.panicked.load(Ordering::Relaxed) {
            panic!("a parallel task of the compute team panicked");
        }
    }

    /// A team thread: takes each new job, polls for [`SPIN`] after it, then sleeps.
    fn poll(&self) {
        let mut seen = self.generation.load(Ordering::Acquire);
        loop {
            let mut spins = 0u32;
            let since = Instant::now();
            loop {
                let g = self.generation.load(Ordering::Acquire);
                if g != seen {
                    seen = g;
                    break;
                }
                if spins >= PAUSE_SPINS && since.elapsed() > SPIN {
                    let mut sleepers = lock(&self.sleepers);
                    *sleepers += 1;
                    while self.generation.load(Ordering::Acquire) == seen {
                        sleepers = self.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
                    }
                    *sleepers -= 1;
                    continue;
                }
                backoff(&mut spins);
            }
            let job = lock(&self.slot).clone();
            if let Some(job) = job {
                job.work();
            }
        }
    }
}

/// A busy wait's next step: `pause` first, then give the core to any other runnable thread
/// (candle's rayon workers run the step's other operations between products).
fn backoff(spins: &mut u32) {
    if *spins < PAUSE_SPINS {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *spins = spins.saturating_add(1);
}

/// A mutex's guard, also after a panic elsewhere poisoned it (the data is a plain slot).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `data` into pieces of `chunk` (the last shorter) through `for_each_split_mut`.
    fn chunks<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
        let mut bounds: Vec<usize> = (0..data.len()).step_by(chunk).collect();
        bounds.push(data.len());
        for_each_split_mut(data, &bounds, f);
    }

    #[test]
    fn every_piece_runs_once_with_its_own_index() {
        for (len, chunk) in [(0, 3), (1, 1), (10, 3), (1000, 7), (4096, 64), (5, 100)] {
            let mut data = vec![0u64; len];
            chunks(&mut data, chunk, |i, c| {
                for (j, v) in c.iter_mut().enumerate() {
                    *v += (i * chunk + j) as u64 + 1;
                }
            });
            let want: Vec<u64> = (1..=len as u64).collect();
            assert_eq!(data, want, "len {len}, chunk {chunk}");
        }
        let hits: Vec<std::sync::atomic::AtomicU32> =
            (0..999).map(|_| Default::default()).collect();
        for_each(hits.len(), |i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    #[should_panic(expected = "split points")]
    fn decreasing_bounds_are_refused() {
        let mut data = vec![0u8; 10];
        for_each_split_mut(&mut data, &[0, 6, 4, 10], |_, _| {});
    }

    #[test]
    fn callers_on_many_threads_and_nested_calls_all_finish() {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                s.spawn(move || {
                    for round in 0..200u64 {
                        let mut outer = vec![0u64; 64];
                        chunks(&mut outer, 8, |i, c| {
                            // A nested call finds the team owned and goes to rayon.
                            let mut inner = vec![0u64; 16];
                            chunks(&mut inner, 4, |_, d| d.fill(1));
                            let s: u64 = inner.iter().sum();
                            c.fill(i as u64 * s + t + round);
                        });
                        for (j, v) in outer.iter().enumerate() {
                            assert_eq!(*v, (j / 8) as u64 * 16 + t + round);
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_team_keeps_working() {
        let r = catch_unwind(|| {
            let mut data = vec![0u8; 64];
            chunks(&mut data, 1, |i, _| assert!(i != 37, "task 37"));
        });
        assert!(r.is_err());
        let mut data = vec![0u8; 64];
        chunks(&mut data, 1, |_, c| c[0] = 1);
        assert!(data.iter().all(|&v| v == 1));
    }

    #[test]
    fn sleeping_pollers_wake_for_the_next_job() {
        let mut data = vec![0u32; 32];
        chunks(&mut data, 4, |_, c| c.fill(1));
        std::thread::sleep(SPIN * 3);
        chunks(&mut data, 4, |_, c| c.iter_mut().for_each(|v| *v += 1));
        assert!(data.iter().all(|&v| v == 2));
    }
}
