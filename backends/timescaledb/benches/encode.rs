//! `cargo bench -p kohaku-timescaledb`: encoding rows for COPY, the CPU side of the write path
//! (the database side is measured by `./scripts/bench` and `./scripts/bench-postgres`).

use kohaku_sink::testkit::sample;

fn main() {
    divan::main();
}

#[divan::bench]
fn encode_5000_copy_rows(bencher: divan::Bencher) {
    let batch = sample::batch((0..100).map(|i| sample::report(sample::connection(i), 1.0e12, 50)));
    let mut buffer = Vec::with_capacity(4 << 20);
    bencher
        .counter(divan::counter::ItemsCount::new(batch.row_count()))
        .bench_local(|| {
            buffer.clear();
            for row in batch.rows() {
                kohaku_timescaledb::encode_copy_row(&mut buffer, row.report, row.object);
            }
            divan::black_box(buffer.len())
        });
}
