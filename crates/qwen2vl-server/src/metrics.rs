//! Prometheus counters and histograms, written in the text exposition format by hand.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use qwen2vl::encoder_cache::EncoderCacheStats;
use qwen2vl::prefix_cache::PrefixCacheStats;

use crate::backend::BackendStats;

/// Histogram bucket bounds in seconds (time to first token, request latency).
const BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<u16, u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft: Histogram,
    latency: Histogram,
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut g) = self.inner.lock() {
            f(&mut g);
        }
    }

    /// Counts a chat-completion request by its HTTP status.
    pub fn request(&self, status: u16) {
        self.with(|m| *m.requests.entry(status).or_default() += 1);
    }

    /// Adds a finished request's tokens.
    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.with(|m| {
            m.prompt_tokens += prompt as u64;
            m.completion_tokens += completion as u64;
        });
    }

    /// Records the time to the first token, in seconds.
    pub fn ttft(&self, s: f64) {
        self.with(|m| m.ttft.observe(s));
    }

    /// Records a whole request's latency, in seconds.
    pub fn latency(&self, s: f64) {
        self.with(|m| m.latency.observe(s));
    }

    /// The text exposition format: the request counters, the token totals, the backend's
    /// gauges and counters, then the two histograms.
    pub fn render(&self, stats: BackendStats) -> String {
        let mut out = String::new();
        let Ok(m) = self.inner.lock() else {
            return out;
        };
        out.push_str(
            "# HELP qwen2vl_requests_total Chat completion requests by HTTP status.\n\
             # TYPE qwen2vl_requests_total counter\n",
        );
        for (status, n) in &m.requests {
            let _ = writeln!(out, "qwen2vl_requests_total{{status=\"{status}\"}} {n}");
        }
        let tokens = [
            Scalar {
                name: "qwen2vl_prompt_tokens_total",
                kind: "counter",
                help: "Prompt tokens of finished requests.",
                value: m.prompt_tokens,
            },
            Scalar {
                name: "qwen2vl_completion_tokens_total",
                kind: "counter",
                help: "Generated tokens of finished requests.",
                value: m.completion_tokens,
            },
        ];
        let scalars = backend_scalars(&stats);
        let cache = encoder_cache_scalars(&stats.encoder_cache);
        let prefix = prefix_cache_scalars(&stats.prefix_cache);
        for s in tokens.iter().chain(&scalars).chain(&cache).chain(&prefix) {
            s.write(&mut out);
        }
        m.ttft.write(
            &mut out,
            "qwen2vl_time_to_first_token_seconds",
            "Time from request to first generated token.",
        );
        m.latency.write(
            &mut out,
            "qwen2vl_request_duration_seconds",
            "Time from request to last token.",
        );
        out
    }
}

/// One gauge or counter without labels.
struct Scalar {
    name: &'static str,
    /// `gauge` or `counter`.
    kind: &'static str,
    help: &'static str,
    value: u64,
}

impl Scalar {
    fn write(&self, out: &mut String) {
        let Scalar {
            name,
            kind,
            help,
            value,
        } = self;
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

/// The backend's queue, batch and KV occupancy (gauges) and its step totals (counters).
fn backend_scalars(stats: &BackendStats) -> [Scalar; 9] {
    let gauge = |name, help, value: usize| Scalar {
        name,
        kind: "gauge",
        help,
        value: value as u64,
    };
    let counter = |name, help, value| Scalar {
        name,
        kind: "counter",
        help,
        value,
    };
    [
        gauge(
            "qwen2vl_queue_depth",
            "Requests waiting to start.",
            stats.queued,
        ),
        gauge(
            "qwen2vl_running_sequences",
            "Sequences being generated.",
            stats.running,
        ),
        gauge(
            "qwen2vl_kv_cache_tokens_used",
            "KV-cache tokens reserved by the running sequences.",
            stats.kv_tokens_used,
        ),
        gauge(
            "qwen2vl_kv_cache_tokens_budget",
            "The KV-cache budget in tokens (--kv-budget).",
            stats.kv_budget_tokens,
        ),
        gauge(
            "qwen2vl_preprocessing_requests",
            "Requests whose images and videos are being read and decoded.",
            stats.preprocessing,
        ),
        gauge(
            "qwen2vl_preprocess_threads_abandoned",
            "Preprocessing threads given up on at their deadline that have not ended yet.",
            stats.preprocess_threads_abandoned,
        ),
        counter(
            "qwen2vl_decode_steps_total",
            "Batched decode steps run.",
            stats.decode_steps,
        ),
        counter(
            "qwen2vl_decode_batch_sequences_total",
            "Sequences summed over the decode steps (divided by the steps: the mean batch).",
            stats.decode_batch_sequences,
        ),
        counter(
            "qwen2vl_decode_steps_during_prefill_total",
            "Decode steps run while a new request's vision tower or prefill was part-way done.",
            stats.decode_steps_during_prefill,
        ),
    ]
}

/// The encoder cache's lookups and evictions (counters), its bytes and entries (gauges).
fn encoder_cache_scalars(c: &EncoderCacheStats) -> [Scalar; 8] {
    let scalar = |name, kind, help, value| Scalar {
        name,
        kind,
        help,
        value,
    };
    [
        scalar(
            "qwen2vl_encoder_cache_hits_total",
            "counter",
            "Images and videos whose vision embeddings came from the encoder cache (vision tower skipped).",
            c.hits,
        ),
        scalar(
            "qwen2vl_encoder_cache_misses_total",
            "counter",
            "Images and videos looked up in the encoder cache and encoded by the vision tower.",
            c.misses,
        ),
        scalar(
            "qwen2vl_encoder_cache_decode_hits_total",
            "counter",
            "Images whose bytes were seen before: decoding and resizing skipped.",
            c.decode_hits,
        ),
        scalar(
            "qwen2vl_encoder_cache_decode_misses_total",
            "counter",
            "Images looked up by their bytes in the encoder cache and decoded.",
            c.decode_misses,
        ),
        scalar(
            "qwen2vl_encoder_cache_evictions_total",
            "counter",
            "Encoder cache entries removed to stay within its budget.",
            c.evictions,
        ),
        scalar(
            "qwen2vl_encoder_cache_bytes",
            "gauge",
            "Bytes held by the encoder cache.",
            c.bytes,
        ),
        scalar(
            "qwen2vl_encoder_cache_entries",
            "gauge",
            "Entries (embeddings and decoded images) in the encoder cache.",
            c.entries,
        ),
        scalar(
            "qwen2vl_encoder_cache_budget_bytes",
            "gauge",
            "The encoder cache's budget in bytes (--encoder-cache-mb; 0: off).",
            c.budget_bytes,
        ),
    ]
}

/// The prefix cache's lookups, reused tokens and evictions (counters), its bytes and
/// blocks (gauges).
fn prefix_cache_scalars(c: &PrefixCacheStats) -> [Scalar; 7] {
    let scalar = |name, kind, help, value| Scalar {
        name,
        kind,
        help,
        value,
    };
    [
        scalar(
            "qwen2vl_prefix_cache_hits_total",
            "counter",
            "Requests whose prompt began with positions held by the prefix cache.",
            c.hits,
        ),
        scalar(
            "qwen2vl_prefix_cache_misses_total",
            "counter",
            "Requests looked up in the prefix cache that reused nothing.",
            c.misses,
        ),
        scalar(
            "qwen2vl_prefix_cache_cached_tokens_total",
            "counter",
            "Prompt tokens whose keys and values were copied from the prefix cache instead of computed.",
            c.cached_tokens,
        ),
        scalar(
            "qwen2vl_prefix_cache_evictions_total",
            "counter",
            "Prefix cache blocks removed to stay within its budget.",
            c.evictions,
        ),
        scalar(
            "qwen2vl_prefix_cache_bytes",
            "gauge",
            "Bytes held by the prefix cache.",
            c.bytes,
        ),
        scalar(
            "qwen2vl_prefix_cache_blocks",
            "gauge",
            "Blocks of 16 positions held by the prefix cache.",
            c.blocks,
        ),
        scalar(
            "qwen2vl_prefix_cache_budget_bytes",
            "gauge",
            "The prefix cache's budget in bytes (--prefix-cache-mb; 0: off).",
            c.budget_bytes,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request(200);
        m.request(200);
        m.request(400);
        m.tokens(10, 5);
        m.ttft(0.03);
        m.latency(0.3);
        m.latency(7.0);
        let t = m.render(BackendStats {
            queued: 3,
            running: 2,
            kv_tokens_used: 100,
            kv_budget_tokens: 4096,
            decode_steps: 9,
            decode_batch_sequences: 14,
            decode_steps_during_prefill: 4,
            preprocessing: 1,
            preprocess_threads_abandoned: 2,
            encoder_cache: EncoderCacheStats {
                hits: 5,
                misses: 2,
                decode_hits: 4,
                decode_misses: 3,
                evictions: 1,
                bytes: 4096,
                entries: 3,
                budget_bytes: 1 << 29,
            },
            prefix_cache: PrefixCacheStats {
                hits: 6,
                misses: 1,
                cached_tokens: 320,
                evictions: 2,
                bytes: 8192,
                blocks: 5,
                budget_bytes: 1 << 30,
            },
        });
        for (line, kind) in [
            ("qwen2vl_encoder_cache_hits_total 5", "counter"),
            ("qwen2vl_encoder_cache_misses_total 2", "counter"),
            ("qwen2vl_encoder_cache_decode_hits_total 4", "counter"),
            ("qwen2vl_encoder_cache_decode_misses_total 3", "counter"),
            ("qwen2vl_encoder_cache_evictions_total 1", "counter"),
            ("qwen2vl_encoder_cache_bytes 4096", "gauge"),
            ("qwen2vl_encoder_cache_entries 3", "gauge"),
            ("qwen2vl_encoder_cache_budget_bytes 536870912", "gauge"),
            ("qwen2vl_prefix_cache_hits_total 6", "counter"),
            ("qwen2vl_prefix_cache_misses_total 1", "counter"),
            ("qwen2vl_prefix_cache_cached_tokens_total 320", "counter"),
            ("qwen2vl_prefix_cache_evictions_total 2", "counter"),
            ("qwen2vl_prefix_cache_bytes 8192", "gauge"),
            ("qwen2vl_prefix_cache_blocks 5", "gauge"),
            ("qwen2vl_prefix_cache_budget_bytes 1073741824", "gauge"),
        ] {
            let name = line.split(' ').next().unwrap_or_default();
            assert!(
                t.contains(&format!("# TYPE {name} {kind}\n{line}\n")),
                "{name}: {t}"
            );
        }
        assert!(t.contains(
            "# TYPE qwen2vl_preprocessing_requests gauge\nqwen2vl_preprocessing_requests 1\n"
        ));
        assert!(t.contains("qwen2vl_preprocess_threads_abandoned 2\n"));
        assert!(
            t.contains("qwen2vl_requests_total{status=\"200\"} 2\n"),
            "{t}"
        );
        assert!(t.contains("qwen2vl_requests_total{status=\"400\"} 1\n"));
        assert!(t.contains("qwen2vl_prompt_tokens_total 10\n"));
        assert!(t.contains("qwen2vl_completion_tokens_total 5\n"));
        assert!(t.contains("qwen2vl_queue_depth 3\n"));
        assert!(t.contains("qwen2vl_running_sequences 2\n"));
        assert!(t.contains(
            "# TYPE qwen2vl_kv_cache_tokens_used gauge\nqwen2vl_kv_cache_tokens_used 100\n"
        ));
        assert!(t.contains("qwen2vl_kv_cache_tokens_budget 4096\n"));
        assert!(
            t.contains("# TYPE qwen2vl_decode_steps_total counter\nqwen2vl_decode_steps_total 9\n")
        );
        assert!(t.contains("qwen2vl_decode_batch_sequences_total 14\n"));
        assert!(t.contains("qwen2vl_decode_steps_during_prefill_total 4\n"));
        assert!(t.contains("qwen2vl_time_to_first_token_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(t.contains("qwen2vl_time_to_first_token_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(t.contains("qwen2vl_request_duration_seconds_bucket{le=\"5\"} 1\n"));
        assert!(t.contains("qwen2vl_request_duration_seconds_bucket{le=\"10\"} 2\n"));
        assert!(t.contains("qwen2vl_request_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains("qwen2vl_request_duration_seconds_count 2\n"));
    }
}
