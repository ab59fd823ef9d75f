//! Reports the handlers have already parsed, kept by their place in the spool so that the sinks'
//! readers take them instead of parsing the same body again. Bounded in bytes: when it is full the
//! oldest go first (a reader far behind, such as one whose sink is down, is the one that misses
//! and parses), and an entry goes once every sink has read past it.

use std::collections::BTreeMap;
use std::sync::Arc;

use kohaku_sink::Report;

use super::Position;
use crate::budget::report_bytes;

#[derive(Default)]
pub(super) struct ParsedCache {
    max_bytes: u64,
    bytes: u64,
    entries: BTreeMap<Position, (Arc<Report>, u64)>,
}

impl ParsedCache {
    /// Zero keeps nothing (every reader parses).
    pub(super) fn set_max_bytes(&mut self, max_bytes: u64) {
        self.max_bytes = max_bytes;
        self.shrink_to(max_bytes);
    }

    pub(super) fn insert(&mut self, at: Position, report: Arc<Report>) {
        let size = report_bytes(&report) as u64;
        if size > self.max_bytes {
            return;
        }
        self.shrink_to(self.max_bytes - size);
        self.bytes += size;
        if let Some((_, replaced)) = self.entries.insert(at, (report, size)) {
            self.bytes -= replaced;
        }
    }

    pub(super) fn get(&self, at: Position) -> Option<Arc<Report>> {
        self.entries.get(&at).map(|(report, _)| Arc::clone(report))
    }

    /// Drops what every reader has passed.
    pub(super) fn forget_before(&mut self, at: Position) {
        let kept = self.entries.split_off(&at);
        let forgotten = std::mem::replace(&mut self.entries, kept);
        self.bytes -= forgotten.values().map(|(_, size)| size).sum::<u64>();
    }

    fn shrink_to(&mut self, max_bytes: u64) {
        while self.bytes > max_bytes {
            let Some((_, (_, size))) = self.entries.pop_first() else {
                self.bytes = 0;
                return;
            };
            self.bytes -= size;
        }
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }
}
