//! What the metrics hooks cost per operation (issue 22: "metrics cost
//! nothing measurable"). Installs the Prometheus recorder as every daemon
//! and metrics-enabled mount does, then times the hooks one operation
//! runs: an in-flight gauge up and down, two clock reads, one latency
//! sample into a histogram and two counter increments (bytes, a cache
//! hit). Compare the result with the time of the fastest operation
//! bench.py measures.
//!
//! `cargo run --release -p avalon-proto --example metrics_cost [OPS]`

use metrics::{counter, gauge, histogram};
use std::time::Instant;

/// One operation's hooks, `n` times; returns ns per operation.
fn run(n: u64) -> f64 {
    let lat = histogram!("avalon_example_op_duration_seconds", "op" => "lookup");
    let bytes = counter!("avalon_example_bytes_total");
    let hits = counter!("avalon_example_cache_hits_total", "cache" => "attr");
    let in_flight = gauge!("avalon_example_in_flight");
    let start = Instant::now();
    for i in 0..n {
        in_flight.increment(1.0);
        let t = Instant::now();
        bytes.increment(i & 0xfff);
        hits.increment(1);
        lat.record(t.elapsed().as_secs_f64());
        in_flight.decrement(1.0);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let ops: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5_000_000);
    let handle = avalon_proto::metrics_http::install().expect("recorder");
    // The daemons drain histogram samples every few seconds; so does this.
    let h = handle.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        h.run_upkeep();
    });
    run(ops / 10); // warm-up
    println!("1 thread: {:.0} ns per operation", run(ops));
    let threads: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || run(ops)))
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        println!(
            "2 threads, thread {i}: {:.0} ns per operation",
            t.join().expect("thread")
        );
    }
    // The exposition still renders (what a scrape costs is not counted).
    assert!(handle
        .render()
        .contains("avalon_example_op_duration_seconds"));
}
