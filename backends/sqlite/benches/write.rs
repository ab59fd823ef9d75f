//! `cargo bench -p kohaku-sqlite`: one batch of 5,000 stats rows (Kohaku's default batch) into a
//! fresh database file, the whole write path: row encoding, the prepared inserts, the commit.

use kohaku_sink::testkit::sample;
use kohaku_sink::StatsSink;
use kohaku_sqlite::{Config, SqliteSink};

fn main() {
    divan::main();
}

#[divan::bench(sample_count = 20)]
fn write_5000_rows(bencher: divan::Bencher) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    // 100 reports of 50 objects: new rows every iteration, so none is skipped as a duplicate.
    let mut seed = 0u64;
    bencher
        .counter(divan::counter::ItemsCount::new(5_000usize))
        .with_inputs(|| {
            seed += 1;
            let dir = tempfile::tempdir().expect("temp dir");
            let sink = SqliteSink::open(&Config::at(dir.path().join("bench.db"))).expect("open");
            runtime.block_on(sink.migrate()).expect("migrate");
            let batch = sample::batch(
                (0..100).map(|i| sample::report(sample::connection(seed * 1_000 + i), 1.0e12, 50)),
            );
            (dir, sink, batch)
        })
        .bench_local_values(|(dir, sink, batch)| {
            let written = runtime.block_on(sink.write(&batch)).expect("write");
            assert_eq!(written.written, 5_000);
            drop(dir);
        });
}
