//! `cargo bench -p kohaku-timestream`: mapping a batch to Timestream records and splitting it into
//! WriteRecords requests (everything before the network).

use kohaku_sink::testkit::sample;
use kohaku_timestream::mapping;

fn main() {
    divan::main();
}

#[divan::bench]
fn plan_and_split_5000_objects(bencher: divan::Bencher) {
    let batch = sample::batch((0..100).map(|i| sample::report(sample::connection(i), 1.0e12, 50)));
    bencher
        .counter(divan::counter::ItemsCount::new(batch.row_count()))
        .bench_local(|| {
            let requests =
                mapping::split(mapping::plan(&batch), mapping::limits::RECORDS_PER_WRITE);
            divan::black_box(requests.len())
        });
}
