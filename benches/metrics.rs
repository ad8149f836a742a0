//! What recording metrics costs per message (criterion).
//!
//! ```sh
//! cargo bench --bench metrics
//! ```
//!
//! Per message the dispatcher increments its `Stats` atomics and, through the
//! `metrics` facade, handles registered once per route: `consumed` when the
//! message arrives, `handled` and the `messaging.process.duration` histogram
//! (two clock reads) when it is done. The cases:
//!
//! - `metrics/stats_only`: the two atomic increments alone, as before metrics;
//! - `metrics/no_recorder`: the same with the facade's handles and the clock
//!   reads, no recorder installed (every handle a no-op);
//! - `metrics/prometheus`: the same with `metrics-exporter-prometheus`'s
//!   recorder installed, as `examples/metrics.rs` runs it.
//!
//! The cost of metrics is the difference to `stats_only`. The recorder is
//! process-wide, so the recorder case runs last.

// `criterion_group!` defines a public function without docs.
#![allow(missing_docs)]

use std::{
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use criterion::{criterion_group, criterion_main, Criterion};
use metrics::{counter, histogram, Counter, Histogram};
use metrics_exporter_prometheus::PrometheusBuilder;
use tower_mqtt::metrics as names;

/// The handles one route registers, as the dispatcher does.
struct Route {
    consumed: Counter,
    handled: Counter,
    duration: Histogram,
}

impl Route {
    fn register() -> Self {
        let route = "sensors/+/temperature";
        Self {
            consumed: counter!(names::CONSUMED_MESSAGES, names::SYSTEM => "mqtt", names::ROUTE => route),
            handled: counter!(names::HANDLED_MESSAGES, names::SYSTEM => "mqtt", names::ROUTE => route),
            duration: histogram!(names::PROCESS_DURATION, names::SYSTEM => "mqtt", names::ROUTE => route),
        }
    }
}

#[derive(Default)]
struct Stats {
    received: AtomicU64,
    handled: AtomicU64,
}

fn per_message(c: &mut Criterion) {
    let stats = Stats::default();
    let mut group = c.benchmark_group("metrics");
    group.bench_function("stats_only", |b| {
        b.iter(|| {
            stats.received.fetch_add(1, Ordering::Relaxed);
            black_box(&stats);
            stats.handled.fetch_add(1, Ordering::Relaxed);
        });
    });
    let route = Route::register();
    group.bench_function("no_recorder", |b| {
        b.iter(|| {
            stats.received.fetch_add(1, Ordering::Relaxed);
            route.consumed.increment(1);
            let started = Instant::now();
            black_box(&stats);
            stats.handled.fetch_add(1, Ordering::Relaxed);
            route.handled.increment(1);
            route.duration.record(started.elapsed());
        });
    });
    PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this bench");
    let route = Route::register();
    group.bench_function("prometheus", |b| {
        b.iter(|| {
            stats.received.fetch_add(1, Ordering::Relaxed);
            route.consumed.increment(1);
            let started = Instant::now();
            black_box(&stats);
            stats.handled.fetch_add(1, Ordering::Relaxed);
            route.handled.increment(1);
            route.duration.record(started.elapsed());
        });
    });
    group.finish();
}

criterion_group!(benches, per_message);
criterion_main!(benches);
