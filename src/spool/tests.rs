use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use kohaku_sink::OffsetDateTime;
use tokio::sync::watch;

use super::*;
#[path = "../../tests/common/support.rs"]
mod support;
use std::io::Write;
use support::SmallFilesystem;
use writer::{Message, Writer};

fn body(seed: u64, objects: usize) -> Bytes {
    let stats: Vec<String> = (0..objects)
        .map(|i| {
            format!(
                r#"{{"id":"OT{i}","type":"outbound-rtp","timestamp":{}.5}}"#,
                1_753_423_611_000u64 + seed
            )
        })
        .collect();
    let connection_id = format!("{:0>26}", format!("C{seed}"));
    Bytes::from(format!(
        r#"{{"type":"connection.user-agent","timestamp":"2025-07-25T06:06:51.592776Z","label":"WebRTC SFU Sora","version":"2025.2.1","node_name":"sora@127.0.0.1","role":"sendrecv","simulcast":false,"spotlight":false,"channel_id":"sora","session_id":"7N8FP3M0ZH2ASBCDPHRGS2HYB8","client_id":"{connection_id}","connection_id":"{connection_id}","stats":[{}]}}"#,
        stats.join(",")
    ))
}

/// A batch limit of `rows` stats objects, whatever their size.
fn rows(rows: usize) -> BatchLimit {
    BatchLimit {
        rows,
        bytes: usize::MAX,
    }
}

fn options(dir: &Path, max_bytes: u64) -> SpoolOptions {
    SpoolOptions {
        dir: dir.to_path_buf(),
        max_bytes,
        fsync: FsyncPolicy::Always,
    }
}

/// Everything the reader yields until it has caught up, acknowledging each batch. Returns the
/// connection ids in order.
async fn drain(reader: &mut SpoolReader) -> Vec<String> {
    drain_batches(reader, rows(7))
        .await
        .iter()
        .flatten()
        .map(|report| report.connection.connection_id.clone())
        .collect()
}

/// Every batch the reader yields within `limit` until it has caught up, acknowledging each.
async fn drain_batches(
    reader: &mut SpoolReader,
    limit: BatchLimit,
) -> Vec<Vec<Arc<kohaku_sink::Report>>> {
    let (_closing, mut closing_rx) = watch::channel(false);
    let mut batches = Vec::new();
    while let Ok(Some(next)) = tokio::time::timeout(
        Duration::from_millis(300),
        reader.next_batch(limit, Duration::from_millis(5), &mut closing_rx),
    )
    .await
    {
        batches.push(next.batch.reports().to_vec());
        reader.ack(next.end).await;
    }
    batches
}

fn readers<const N: usize>(spool: &Spool, sinks: [&str; N]) -> [SpoolReader; N] {
    match spool.readers(&sinks).try_into() {
        Ok(readers) => readers,
        Err(_) => unreachable!("one reader per sink"),
    }
}

fn ids(seeds: std::ops::Range<u64>) -> Vec<String> {
    seeds
        .map(|seed| format!("{:0>26}", format!("C{seed}")))
        .collect()
}

#[tokio::test]
async fn every_sink_reads_every_report_once_and_delivered_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&options(dir.path(), 64 * 1024)).unwrap();
    let appender = spool.appender();
    let [mut fast, mut slow] = readers(&spool, ["fast", "slow"]);
    for seed in 0..60 {
        appender
            .append(OffsetDateTime::now_utc(), Protocol::Exporter, body(seed, 3))
            .await
            .unwrap();
    }
    let status = spool.monitor().status();
    assert!(status.segments > 3, "small segments rotate: {status:?}");

    assert_eq!(drain(&mut fast).await, ids(0..60));
    assert!(
        spool.monitor().status().segments > 3,
        "the slow sink still needs every segment"
    );
    assert_eq!(drain(&mut slow).await, ids(0..60));
    let status = spool.monitor().status();
    assert_eq!(
        status.segments, 1,
        "only the active segment is left: {status:?}"
    );
    assert_eq!(status.oldest_unsent_seconds["slow"], 0.0);
}

#[tokio::test]
async fn a_restart_resumes_each_sink_at_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(&options(dir.path(), 1 << 20)).unwrap();
        let appender = spool.appender();
        let [mut done, _behind] = readers(&spool, ["done", "behind"]);
        for seed in 0..10 {
            appender
                .append(OffsetDateTime::now_utc(), Protocol::Exporter, body(seed, 2))
                .await
                .unwrap();
        }
        assert_eq!(drain(&mut done).await, ids(0..10));
        spool.close_writer().await;
    }
    let spool = Spool::open(&options(dir.path(), 1 << 20)).unwrap();
    let appender = spool.appender();
    appender
        .append(OffsetDateTime::now_utc(), Protocol::Exporter, body(10, 2))
        .await
        .unwrap();
    let [mut done, mut behind] = readers(&spool, ["done", "behind"]);
    assert_eq!(drain(&mut done).await, ids(10..11));
    assert_eq!(drain(&mut behind).await, ids(0..11));
}

#[tokio::test]
async fn a_full_spool_refuses_until_the_sinks_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&options(dir.path(), 16 * 1024)).unwrap();
    let appender = spool.appender();
    let [mut reader] = readers(&spool, ["only"]);
    let mut accepted = 0;
    let refused = loop {
        match appender
            .append(
                OffsetDateTime::now_utc(),
                Protocol::Exporter,
                body(accepted, 4),
            )
            .await
        {
            Ok(()) => accepted += 1,
            Err(err) => break err,
        }
        assert!(accepted < 1000, "the spool never filled");
    };
    assert_eq!(
        refused,
        AppendError::Full {
            max_bytes: 16 * 1024
        }
    );
    assert!(spool.monitor().status().bytes <= 16 * 1024);
    assert_eq!(drain(&mut reader).await, ids(0..accepted));
    appender
        .append(
            OffsetDateTime::now_utc(),
            Protocol::Exporter,
            body(accepted, 4),
        )
        .await
        .expect("room again once the reader has passed the segments");
}

#[tokio::test]
async fn one_directory_one_kohaku() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Spool::open(&options(dir.path(), 1 << 20)).unwrap();
    let second = Spool::open(&options(dir.path(), 1 << 20));
    assert!(
        matches!(second, Err(SpoolError::Locked(_))),
        "{:?}",
        second.err()
    );
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_the_intact_records_replayed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut spool = Spool::open(&options(dir.path(), 1 << 20)).unwrap();
        let appender = spool.appender();
        for seed in 0..5 {
            appender
                .append(OffsetDateTime::now_utc(), Protocol::Exporter, body(seed, 2))
                .await
                .unwrap();
        }
        spool.close_writer().await;
    }
    let segment = segment_path(dir.path(), 1);
    let length = std::fs::metadata(&segment).unwrap().len();
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.set_len(length - 10).unwrap();

    let spool = Spool::open(&options(dir.path(), 1 << 20)).unwrap();
    let [mut reader] = readers(&spool, ["sink"]);
    assert_eq!(drain(&mut reader).await, ids(0..4));
}

#[tokio::test]
async fn a_segment_from_another_format_stops_start_up_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(segment_path(dir.path(), 3), b"NOTASPOOLFILE").unwrap();
    let err = Spool::open(&options(dir.path(), 1 << 20))
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("00000000000000000003.seg"),
        "{err}"
    );
}

/// A stats-webhook body as Sora sends it, typed by its header only (no `type` member): replay
/// must parse it as a webhook, which the protocol byte of its record says.
fn webhook_body(seed: u64) -> Bytes {
    let connection_id = format!("{:0>26}", format!("W{seed}"));
    Bytes::from(format!(
        r#"{{"id":"NKSZER34ZN5J77HTVNQP1FWJ1W","timestamp":"2025-07-25T06:06:51.592776Z","label":"WebRTC SFU Sora","version":"2025.2.1","node_name":"sora@127.0.0.1","role":"sendrecv","simulcast":false,"spotlight":false,"channel_id":"sora","session_id":"7N8FP3M0ZH2ASBCDPHRGS2HYB8","client_id":"{connection_id}","connection_id":"{connection_id}","group_id":"G{seed}","stats":[{{"id":"D1","type":"data-channel","timestamp":1753423611556.5}}]}}"#
    ))
}

#[tokio::test]
async fn webhook_records_and_segments_of_the_first_format_replay_after_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    // What an older Kohaku left: a segment of the first format holding two exporter bodies.
    let mut old = record::SEGMENT_MAGIC_V1.to_vec();
    old.extend(record::encode_v1(OffsetDateTime::now_utc(), &body(1, 2)));
    old.extend(record::encode_v1(OffsetDateTime::now_utc(), &body(2, 2)));
    std::fs::write(dir.path().join(format!("{:020}.seg", 1)), &old).unwrap();

    let spool = Spool::open(&options(dir.path(), 64 * 1024)).unwrap();
    let appender = spool.appender();
    appender
        .append(
            OffsetDateTime::now_utc(),
            Protocol::Webhook,
            webhook_body(3),
        )
        .await
        .unwrap();
    appender
        .append(OffsetDateTime::now_utc(), Protocol::Exporter, body(4, 1))
        .await
        .unwrap();
    let [mut reader] = readers(&spool, ["only"]);
    let reports: Vec<_> = drain_batches(&mut reader, rows(100))
        .await
        .into_iter()
        .flatten()
        .collect();
    let seen: Vec<(String, Option<String>, usize)> = reports
        .iter()
        .map(|report| {
            (
                report.connection.connection_id.clone(),
                report.connection.group_id.clone(),
                report.stats.len(),
            )
        })
        .collect();
    let id = |prefix: &str, seed: u64| format!("{:0>26}", format!("{prefix}{seed}"));
    assert_eq!(
        seen,
        vec![
            (id("C", 1), None, 2),
            (id("C", 2), None, 2),
            (id("W", 3), Some("G3".to_owned()), 1),
            (id("C", 4), None, 1),
        ]
    );
}

fn segment_bytes_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".seg"))
        .map(|entry| entry.metadata().unwrap().len())
        .sum()
}

/// Six requests at a time into a spool on a filesystem that fills up: exactly the reports answered
/// `Ok` are in the spool after a restart, each once; the failure shows in the status; the byte
/// count matches the files; and once space is freed, appends succeed again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_exactly_what_was_not_written_and_the_spool_recovers() {
    let Some(filesystem) = SmallFilesystem::mount(192 * 1024) else {
        return;
    };
    let spool_dir = filesystem.path().join("spool");
    let filler = filesystem.path().join("filler");
    std::fs::write(&filler, vec![0u8; 64 * 1024]).unwrap();
    // Segments of 16 KiB: the disk fills while segments are being started, mid-group.
    let options = options(&spool_dir, 256 * 1024);
    let spool = Spool::open(&options).unwrap();
    let appender = spool.appender();

    let next_seed = Arc::new(AtomicU64::new(0));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (appender, next_seed, acknowledged) = (
            appender.clone(),
            Arc::clone(&next_seed),
            Arc::clone(&acknowledged),
        );
        senders.spawn(async move {
            let mut refused = 0;
            for _ in 0..2_000 {
                let seed = next_seed.fetch_add(1, Ordering::SeqCst);
                match appender
                    .append(
                        OffsetDateTime::now_utc(),
                        Protocol::Exporter,
                        body(seed, 40),
                    )
                    .await
                {
                    Ok(()) => lock(&acknowledged).push(seed),
                    Err(AppendError::Write(_)) => refused += 1,
                    Err(other) => panic!("unexpected {other}"),
                }
                if refused >= 5 {
                    break;
                }
            }
            refused
        });
    }
    let mut refused = 0;
    while let Some(joined) = senders.join_next().await {
        refused += joined.unwrap();
    }
    assert!(refused > 0, "the filesystem never filled");
    let status = spool.monitor().status();
    assert!(status.write_error.is_some(), "{status:?}");
    assert_eq!(
        spool.bytes(),
        segment_bytes_on_disk(&spool_dir),
        "the byte count is what the segments hold: no failed write counted, none left behind"
    );

    // Space comes back: the spool takes reports again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    for _ in 0..5 {
        let seed = next_seed.fetch_add(1, Ordering::SeqCst);
        appender
            .append(
                OffsetDateTime::now_utc(),
                Protocol::Exporter,
                body(seed, 40),
            )
            .await
            .expect("appends succeed once there is space");
        lock(&acknowledged).push(seed);
    }
    assert_eq!(spool.monitor().status().write_error, None);
    let mut spool = spool;
    spool.close_writer().await;
    drop(spool);

    // After a restart, exactly the acknowledged reports are there, each once.
    let spool = Spool::open(&options).unwrap();
    let [mut reader] = readers(&spool, ["check"]);
    let read = drain(&mut reader).await;
    let mut expected = ids(0..0);
    let mut seeds = lock(&acknowledged).clone();
    seeds.sort_unstable();
    for seed in seeds {
        expected.push(format!("{:0>26}", format!("C{seed}")));
    }
    let mut sorted = read.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted.len(), read.len());
    assert_eq!(sorted, expected, "acknowledged = spooled, each once");
}

/// The records intact in a segment file.
fn records_in(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap_or_default();
    if bytes.len() < SEGMENT_MAGIC.len() {
        return 0;
    }
    record::scan(&bytes[SEGMENT_MAGIC.len()..], record::Format::V2)
        .0
        .len()
}

/// One group of six appends, queued before the writer runs, whose fourth needs a new segment, on
/// a filesystem with no room left: none may be answered `Ok` unless its record is on disk. (The
/// writer once started the new segment by writing the group's pending records as a side effect;
/// when that write failed, only the fourth request learnt of it and the first three got `Ok`.)
#[test]
fn a_request_is_acknowledged_only_for_its_own_written_bytes() {
    let Some(filesystem) = SmallFilesystem::mount(64 * 1024) else {
        return;
    };
    let dir = filesystem.path().to_path_buf();
    let file = create_segment(&dir, 1).unwrap();
    // Whatever room is left, fill it.
    let mut filler = File::create(dir.join("filler")).unwrap();
    while filler.write_all(&[0u8; 1024]).is_ok() {}
    let _ = filler.sync_all();

    let (committed, _) = watch::channel(Position {
        segment: 1,
        offset: HEADER_LEN,
    });
    let shared = Arc::new(Shared {
        dir: dir.clone(),
        max_bytes: 1 << 20,
        bytes: AtomicU64::new(HEADER_LEN),
        segments: Mutex::new(BTreeSet::from([1])),
        committed,
        sinks: Mutex::new(BTreeMap::new()),
        write_error: Mutex::new(None),
        parsed: Mutex::new(ParsedCache::default()),
    });
    let writer = Writer {
        shared: Arc::clone(&shared),
        fsync: FsyncPolicy::Always,
        segment_bytes: 8 * 1024,
        file,
        position: Position {
            segment: 1,
            offset: HEADER_LEN,
        },
        written_end: HEADER_LEN,
        unsynced: false,
        broken: false,
        buffer: Vec::new(),
    };
    let (sender, receiver) = std_mpsc::channel();
    let mut answers = Vec::new();
    for seed in 0..6 {
        let body = body(seed, 40);
        let reserved = record::encoded_len(body.len()) as u64;
        shared.bytes.fetch_add(reserved, Ordering::SeqCst);
        let (done, answer) = oneshot::channel();
        sender
            .send(Message::Append {
                received_at: OffsetDateTime::now_utc(),
                protocol: Protocol::Exporter,
                body,
                parsed: None,
                reserved,
                done,
            })
            .unwrap();
        answers.push(answer);
    }
    let (closed, _) = oneshot::channel();
    sender.send(Message::Close(closed)).unwrap();
    writer.run(receiver);

    let acknowledged = answers
        .into_iter()
        .filter_map(|answer| answer.blocking_recv().ok())
        .filter(Result::is_ok)
        .count();
    let on_disk = records_in(&segment_path(&dir, 1)) + records_in(&segment_path(&dir, 2));
    assert!(on_disk < 6, "the filesystem had no room");
    assert_eq!(acknowledged, on_disk, "Ok only for records on disk");
    assert!(lock(&shared.write_error).is_some());
    assert_eq!(
        shared.bytes.load(Ordering::SeqCst),
        segment_bytes_on_disk(&dir),
        "nothing counted that is not on disk"
    );
}

#[tokio::test]
async fn a_backlog_of_large_reports_is_read_in_batches_cut_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&options(dir.path(), 16 << 20)).unwrap();
    let appender = spool.appender();
    for seed in 0..10 {
        appender
            .append(
                OffsetDateTime::now_utc(),
                Protocol::Exporter,
                body(seed, 40),
            )
            .await
            .unwrap();
    }
    let one_report = crate::budget::report_bytes(
        &crate::sora::parse_report(&body(0, 40), OffsetDateTime::now_utc()).unwrap(),
    );
    let [mut reader] = readers(&spool, ["only"]);
    let (_closing, mut closing_rx) = watch::channel(false);
    let limit = BatchLimit {
        rows: 10_000,
        bytes: 3 * one_report,
    };
    let sizes: Vec<usize> = drain_batches(&mut reader, limit)
        .await
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 10);
    assert!(sizes.iter().all(|size| *size <= 3), "{sizes:?}");
    // A report larger than the whole limit still goes, alone.
    let limit = BatchLimit {
        rows: 10_000,
        bytes: 1,
    };
    appender
        .append(OffsetDateTime::now_utc(), Protocol::Exporter, body(11, 40))
        .await
        .unwrap();
    let next = reader
        .next_batch(limit, Duration::from_millis(5), &mut closing_rx)
        .await
        .unwrap();
    assert_eq!(next.batch.reports().len(), 1);
}

/// The handler's parsed report reaches every reader as it is, not parsed again; beyond the
/// spool's share of memory the oldest are forgotten and parsed from the body, and what every sink
/// has passed is let go.
#[tokio::test]
async fn readers_take_the_handlers_parsed_reports_within_their_memory() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&options(dir.path(), 1 << 20)).unwrap();
    let appender = spool.appender();
    let [mut first, mut second] = readers(&spool, ["first", "second"]);
    let parse = |seed| {
        let body = body(seed, 3);
        let report =
            crate::sora::parse_spooled(Protocol::Exporter, &body, OffsetDateTime::now_utc())
                .unwrap();
        (body, Arc::new(report))
    };
    let one_report = crate::budget::report_bytes(&parse(0).1) as u64;
    spool.keep_parsed(one_report * 3);
    let mut sent = Vec::new();
    for seed in 0..5 {
        let (body, report) = parse(seed);
        appender
            .append_parsed(Protocol::Exporter, body, Arc::clone(&report))
            .await
            .unwrap();
        sent.push(report);
    }
    assert!(lock(&spool.shared.parsed).bytes() <= one_report * 3);
    for reader in [&mut first, &mut second] {
        let read: Vec<_> = drain_batches(reader, rows(100)).await.concat();
        assert_eq!(read.len(), 5);
        let shared: Vec<bool> = read
            .iter()
            .zip(&sent)
            .map(|(read, sent)| Arc::ptr_eq(read, sent))
            .collect();
        // The two oldest did not fit and were parsed again, equal to what was sent.
        assert_eq!(shared, [false, false, true, true, true]);
        for (read, sent) in read.iter().zip(&sent) {
            assert_eq!(read.connection, sent.connection);
            assert_eq!(read.received_at, sent.received_at);
            let objects = |report: &kohaku_sink::Report| -> Vec<String> {
                report
                    .stats
                    .iter()
                    .map(|o| o.rtc_data.get().to_owned())
                    .collect()
            };
            assert_eq!(objects(read), objects(sent));
        }
    }
    assert_eq!(
        lock(&spool.shared.parsed).bytes(),
        0,
        "every sink has passed them"
    );
}
