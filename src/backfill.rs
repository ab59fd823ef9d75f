//! `kohaku migrate --summaries`: gives the reports stored before Kohaku kept per-report summaries
//! theirs, read back from the stored objects.

use std::sync::Arc;

use kohaku_sink::{Report, SinkError, StatsBatch, StatsSink};

/// Reports written per batch: one transaction each on the SQL backends.
const REPORTS_PER_WRITE: usize = 1_000;

/// What [`backfill_summaries`] went through so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Backfilled {
    pub connections: u64,
    pub reports: u64,
}

/// Reads every connection's stored reports back from `sink`, one connection at a time, and writes
/// their summaries alone (the objects are stored already; the sink's write is idempotent, so a
/// summary already there stays as it is and running it again adds nothing). A summary made this
/// way counts the objects stored, not those received: `stats_objects_unchanged` is 0 and, with
/// `skip_unchanged` on, the descriptive figures (codec, candidate types) come from the reports
/// that stored those objects. `progress` is called after each connection.
pub async fn backfill_summaries(
    sink: &dyn StatsSink,
    mut progress: impl FnMut(&Backfilled),
) -> Result<Backfilled, SinkError> {
    let mut done = Backfilled::default();
    let mut after: Option<String> = None;
    while let Some((connection_id, reports)) = sink.stored_reports_after(after.as_deref()).await? {
        let reports: Vec<Arc<Report>> = reports
            .into_iter()
            .map(|mut report| {
                let objects: Vec<&kohaku_sink::StatsObject> = report.stats.iter().collect();
                let summary = crate::sora::summarize(&objects);
                report.set_summary(summary);
                report.stats.clear();
                Arc::new(report)
            })
            .collect();
        for chunk in reports.chunks(REPORTS_PER_WRITE) {
            sink.write(&StatsBatch::new(chunk.to_vec())).await?;
        }
        done.connections += 1;
        done.reports += reports.len() as u64;
        progress(&done);
        after = Some(connection_id);
    }
    Ok(done)
}
