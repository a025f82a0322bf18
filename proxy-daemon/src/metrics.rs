//! Metrics for `GET /metrics` (Prometheus text format, encoded by `prometheus-client`).
//!
//! The request path must not pay for them: each worker counts into its own
//! [`WorkerStats`] (atomics and one uncontended lock, touched only by that worker), and
//! the scrape adds the workers up. Everything else (tunnels, the fast path's kernel
//! counters, descriptors) is read at scrape time from where it already lives.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Upper bounds (seconds) of the request duration histogram's buckets.
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Requests by (target port, or 0 when none was routed; status class 1–5, or 0 when
    /// no status was sent).
    requests: Mutex<HashMap<(u16, u8), u64>>,
    /// Cumulative counts per duration bucket, then the +Inf count.
    duration_buckets: [AtomicU64; DURATION_BUCKETS.len()],
    duration_count: AtomicU64,
    duration_sum_micros: AtomicU64,
    connect_failures: AtomicU64,
    retries: AtomicU64,
    pool_idle: AtomicI64,
    /// Ticks once a second while the worker's event loop runs (the watchdog reads it).
    pub heartbeat: AtomicU64,
}

thread_local! {
    static STATS: RefCell<Option<Arc<WorkerStats>>> = const { RefCell::new(None) };
}

fn with_stats(f: impl FnOnce(&WorkerStats)) {
    STATS.with(|s| {
        if let Some(s) = &*s.borrow() {
            f(s)
        }
    });
}

/// Registers the current thread as a worker whose counters the scrape adds up.
pub fn register_worker() -> Arc<WorkerStats> {
    let stats = Arc::new(WorkerStats::default());
    STATS.with(|s| *s.borrow_mut() = Some(stats.clone()));
    global().workers.lock().unwrap().push(stats.clone());
    stats
}

/// One request answered: its target port (if routed), the status sent (0: none).
pub fn request(port: Option<u16>, status: u16, duration: Duration) {
    with_stats(|s| {
        let class = if (100..600).contains(&status) {
            (status / 100) as u8
        } else {
            0
        };
        *s.requests
            .lock()
            .unwrap()
            .entry((port.unwrap_or(0), class))
            .or_default() += 1;
        let secs = duration.as_secs_f64();
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                s.duration_buckets[i].fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        s.duration_count.fetch_add(1, Ordering::Relaxed);
        s.duration_sum_micros
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    });
}

pub fn connect_failed() {
    with_stats(|s| {
        s.connect_failures.fetch_add(1, Ordering::Relaxed);
    });
}

pub fn retried() {
    with_stats(|s| {
        s.retries.fetch_add(1, Ordering::Relaxed);
    });
}

/// The worker's pool grew or shrank by `delta` idle connections.
pub fn pool_idle(delta: i64) {
    with_stats(|s| {
        s.pool_idle.fetch_add(delta, Ordering::Relaxed);
    });
}

/// Each worker's heartbeat counter, in registration order.
pub fn heartbeats() -> Vec<u64> {
    global()
        .workers
        .lock()
        .unwrap()
        .iter()
        .map(|w| w.heartbeat.load(Ordering::Relaxed))
        .collect()
}

/// A source of metrics read at scrape time (the tunnels, the fast path…).
pub trait Source: Send + Sync + 'static {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error>;
}

#[derive(Default)]
pub struct Global {
    workers: Mutex<Vec<Arc<WorkerStats>>>,
    sources: Mutex<Vec<Box<dyn Source>>>,
}

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("metrics::Global")
    }
}

pub fn global() -> &'static Global {
    static GLOBAL: OnceLock<Global> = OnceLock::new();
    GLOBAL.get_or_init(Global::default)
}

/// Adds a source read at every scrape.
pub fn add_source(source: impl Source) {
    global().sources.lock().unwrap().push(Box::new(source));
}

/// The whole exposition, `text/plain; version=0.0.4`.
pub fn render() -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("project_ingress_proxy");
    registry.register_collector(Box::new(Scrape));
    let mut out = String::new();
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct Scrape;

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let g = global();
        let workers = g.workers.lock().unwrap().clone();
        let mut requests: HashMap<(u16, u8), u64> = HashMap::new();
        let mut buckets = [0u64; DURATION_BUCKETS.len()];
        let (mut count, mut sum, mut failures, mut retries, mut idle) = (0, 0, 0, 0, 0i64);
        for w in &workers {
            for (k, v) in w.requests.lock().unwrap().iter() {
                *requests.entry(*k).or_default() += v;
            }
            for (b, a) in buckets.iter_mut().zip(&w.duration_buckets) {
                *b += a.load(Ordering::Relaxed);
            }
            count += w.duration_count.load(Ordering::Relaxed);
            sum += w.duration_sum_micros.load(Ordering::Relaxed);
            failures += w.connect_failures.load(Ordering::Relaxed);
            retries += w.retries.load(Ordering::Relaxed);
            idle += w.pool_idle.load(Ordering::Relaxed);
        }

        let mut m = encoder.encode_descriptor(
            "requests",
            "Requests answered, by status class (none: no status sent) and target port (none: not routed)",
            None,
            MetricType::Counter,
        )?;
        let mut entries: Vec<_> = requests.into_iter().collect();
        entries.sort_unstable();
        for ((port, class), n) in entries {
            let class = match class {
                0 => "none".to_owned(),
                c => format!("{c}xx"),
            };
            let port = if port == 0 {
                "none".to_owned()
            } else {
                port.to_string()
            };
            let labels = [("class", class), ("port", port)];
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }

        // Per-bucket counts (the encoder accumulates them); the last bucket holds what
        // no bound covered.
        let within: u64 = buckets.iter().sum();
        let histogram: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .zip(buckets)
            .chain([(f64::INFINITY, count.saturating_sub(within))])
            .collect();
        encoder
            .encode_descriptor(
                "request_duration_seconds",
                "Time from a complete request head to the end of its response",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(sum as f64 / 1e6, count, &histogram, None)?;

        counter(
            &mut encoder,
            "upstream_connect_failures",
            "Upstream connections that could not be opened (the client got 502)",
            failures,
        )?;
        counter(
            &mut encoder,
            "upstream_retries",
            "Requests sent again on a new connection after a pooled one was found closed",
            retries,
        )?;
        gauge(
            &mut encoder,
            "upstream_pool_idle_connections",
            "Idle keep-alive upstream connections in the pools",
            idle.max(0),
        )?;

        for source in g.sources.lock().unwrap().iter() {
            source.encode(&mut encoder)?;
        }
        Ok(())
    }
}

pub fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

pub fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}
