//! `[pipeline] skip_unchanged`: a stats object is dropped when its content, `timestamp` aside,
//! equals what was last accepted for the same `(connection_id, id)` at an earlier time.
//!
//! One decision for every sink, taken where a report enters the pipeline (before the queue or
//! the spool): the sinks then store the same rows, and the cache is kept once, not once per sink.
//!
//! The cache is a fixed table of `entries` slots in sets of [`WAYS`], [`ENTRY_BYTES`] bytes
//! each, allocated once: whatever the number of connections, it never grows. A key that finds no
//! slot (never seen, or evicted by others) is stored, so a miss costs at most one stored repeat,
//! never a lost change. Neither is a report that is older than what the cache holds (reports of
//! one connection can arrive out of order): only a strictly later object can be found unchanged,
//! and an older one never updates the slot. After a restart the cache is empty: the first object
//! of every key is stored again.

use std::sync::{Arc, Mutex};

use kohaku_sink::Report;

use crate::metrics::Metrics;
use crate::sync::lock;

/// Slots per set: a key may sit in any of them, so that two busy keys hashing to one set do not
/// evict each other.
pub const WAYS: usize = 4;
/// Bytes one cache entry takes: the key's hash, the object's time and its content's hash.
pub const ENTRY_BYTES: usize = std::mem::size_of::<Slot>();

/// Which stats types are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipTypes {
    All,
    Only(Vec<String>),
}

impl SkipTypes {
    fn covers(&self, rtc_type: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(types) => types.iter().any(|t| t == rtc_type),
        }
    }
}

/// One remembered object. `key == 0` is an empty slot (a real key hashing to 0 is stored as 1).
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: u64,
    timestamp: f64,
    content: u64,
}

struct Cache {
    sets: Vec<[Slot; WAYS]>,
    used: usize,
}

/// The stage: shared by every intake of one pipeline.
pub struct SkipUnchanged {
    types: SkipTypes,
    cache: Mutex<Cache>,
    metrics: Arc<Metrics>,
}

impl SkipUnchanged {
    /// A cache of at least `entries` slots (rounded up to whole sets).
    pub fn new(types: SkipTypes, entries: usize, metrics: Arc<Metrics>) -> Self {
        let sets = entries.div_ceil(WAYS).max(1);
        metrics
            .skip_cache_capacity
            .set(i64::try_from(sets * WAYS).unwrap_or(i64::MAX));
        Self {
            types,
            cache: Mutex::new(Cache {
                sets: vec![[Slot::default(); WAYS]; sets],
                used: 0,
            }),
            metrics,
        }
    }

    /// Drops from `report` the objects found unchanged. What it keeps is remembered only once
    /// [`SkipUnchanged::remember`] is given the returned list, after the report was accepted: a
    /// report answered 503 (and perhaps never sent again) must not make its objects look stored.
    pub fn filter(&self, report: &mut Report) -> Kept {
        let connection_id = report.connection.connection_id.as_str();
        // Hashed before the cache is locked, so that the lock is held for the lookups alone.
        let entries: Vec<Option<Slot>> = report
            .stats
            .iter()
            .map(|object| {
                self.types.covers(&object.rtc_type).then(|| Slot {
                    key: key_hash(connection_id, &object.rtc_id),
                    timestamp: object.rtc_timestamp,
                    content: content_hash(object.rtc_data.get()),
                })
            })
            .collect();
        let unchanged: Vec<bool> = {
            let cache = lock(&self.cache);
            entries
                .iter()
                .map(|entry| entry.as_ref().is_some_and(|entry| cache.unchanged(entry)))
                .collect()
        };
        // Counted once per type and report, not once per object. What is dropped is kept aside
        // in the report, with its place, for the report's summary.
        let mut skipped: Vec<(String, u64)> = Vec::new();
        if unchanged.iter().any(|unchanged| *unchanged) {
            let objects = std::mem::replace(
                &mut report.stats,
                Vec::with_capacity(unchanged.iter().filter(|unchanged| !**unchanged).count()),
            );
            for (index, (object, unchanged)) in objects.into_iter().zip(&unchanged).enumerate() {
                if !*unchanged {
                    report.stats.push(object);
                    continue;
                }
                match skipped
                    .iter_mut()
                    .find(|(kind, _)| *kind == object.rtc_type)
                {
                    Some((_, count)) => *count += 1,
                    None => skipped.push((object.rtc_type.clone(), 1)),
                }
                report.unchanged.push((index, object));
            }
        }
        for (kind, count) in skipped {
            self.metrics.count_unchanged(&kind, count);
        }
        let kept = entries
            .into_iter()
            .zip(unchanged)
            .filter_map(|(entry, unchanged)| entry.filter(|_| !unchanged))
            .collect();
        Kept(kept)
    }

    /// Remembers what an accepted report kept.
    pub fn remember(&self, kept: Kept) {
        let mut cache = lock(&self.cache);
        let evictions = kept
            .0
            .into_iter()
            .filter(|entry| cache.record(*entry))
            .count();
        self.metrics
            .skip_cache_entries
            .set(i64::try_from(cache.used).unwrap_or(i64::MAX));
        drop(cache);
        if evictions > 0 {
            self.metrics.skip_cache_evictions.inc_by(evictions as u64);
        }
    }
}

/// What [`SkipUnchanged::filter`] kept, to remember once the report is accepted.
#[must_use]
pub struct Kept(Vec<Slot>);

impl Cache {
    fn set(&self, key: u64) -> usize {
        (key as usize) % self.sets.len()
    }

    /// Whether `entry` is a strictly later object of a remembered key with the same content.
    fn unchanged(&self, entry: &Slot) -> bool {
        self.sets[self.set(entry.key)].iter().any(|slot| {
            slot.key == entry.key
                && entry.timestamp > slot.timestamp
                && slot.content == entry.content
        })
    }

    /// Remembers `entry` unless what is remembered for its key is as new or newer. True when
    /// that evicted another key.
    fn record(&mut self, entry: Slot) -> bool {
        let index = self.set(entry.key);
        let set = &mut self.sets[index];
        if let Some(slot) = set.iter_mut().find(|slot| slot.key == entry.key) {
            if entry.timestamp > slot.timestamp {
                *slot = entry;
            }
            return false;
        }
        // An empty slot, else the one seen longest ago.
        let victim = set
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                (a.key != 0)
                    .cmp(&(b.key != 0))
                    .then(a.timestamp.total_cmp(&b.timestamp))
            })
            .map_or(0, |(index, _)| index);
        let evicted = set[victim].key != 0;
        if !evicted {
            self.used += 1;
        }
        set[victim] = entry;
        evicted
    }

    #[cfg(test)]
    fn decide(&mut self, key: u64, timestamp: f64, content: u64) -> (bool, bool) {
        let entry = Slot {
            key,
            timestamp,
            content,
        };
        if self.unchanged(&entry) {
            // As `filter`: a skipped object is not remembered.
            return (false, false);
        }
        (true, self.record(entry))
    }
}

fn key_hash(connection_id: &str, rtc_id: &str) -> u64 {
    hash(&[connection_id.as_bytes(), rtc_id.as_bytes()]).max(1)
}

/// The object's text without its top-level `timestamp` member's value.
fn content_hash(text: &str) -> u64 {
    let bytes = text.as_bytes();
    match crate::sora::timestamp_span(text) {
        Some(span) => hash(&[&bytes[..span.start], &bytes[span.end..]]),
        None => hash(&[bytes]),
    }
}

/// A fast 64-bit hash of `parts` (kept apart: `["ab", "c"]` is not `["a", "bc"]`): every 8 bytes
/// folded into the state by a 128-bit multiply, as wyhash does. It runs on every object of a
/// checked type, so it must cost little next to parsing; it is no defence against a sender who
/// crafts a collision, which could only hide that sender's own change.
fn hash(parts: &[&[u8]]) -> u64 {
    const SEED: u64 = 0x243f_6a88_85a3_08d3;
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
    let fold = |state: u64, word: u64| {
        let product = u128::from(state ^ word) * u128::from(MULTIPLIER);
        (product as u64) ^ ((product >> 64) as u64)
    };
    let mut state = SEED;
    for part in parts {
        let mut words = part.chunks_exact(8);
        for word in &mut words {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            state = fold(state, u64::from_le_bytes(bytes));
        }
        let rest = words.remainder();
        let mut bytes = [0u8; 8];
        bytes[..rest.len()].copy_from_slice(rest);
        state = fold(state, u64::from_le_bytes(bytes));
        state = fold(state, part.len() as u64);
    }
    fold(state, MULTIPLIER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_is_skipped_a_change_and_a_flip_back_are_kept() {
        let mut cache = Cache {
            sets: vec![[Slot::default(); WAYS]; 8],
            used: 0,
        };
        let (a, b) = (content_hash(r#"{"x":1}"#), content_hash(r#"{"x":2}"#));
        assert_eq!(cache.decide(7, 1.0, a), (true, false), "first: stored");
        assert_eq!(cache.decide(7, 2.0, a), (false, false), "repeat: skipped");
        assert_eq!(cache.decide(7, 3.0, b), (true, false), "change: stored");
        assert_eq!(cache.decide(7, 4.0, a), (true, false), "flip back: stored");
        assert_eq!(cache.decide(7, 3.5, a), (true, false), "older: stored");
        assert_eq!(
            cache.decide(7, 5.0, a),
            (false, false),
            "the older did not move it"
        );
    }

    #[test]
    fn the_timestamp_does_not_count_but_everything_else_does() {
        let base = content_hash(r#"{"id":"A","timestamp":1.5,"type":"codec","x":1}"#);
        assert_eq!(
            base,
            content_hash(r#"{"id":"A","timestamp":2000.25,"type":"codec","x":1}"#)
        );
        for changed in [
            r#"{"id":"A","timestamp":1.5,"type":"codec","x":null}"#,
            r#"{"id":"A","timestamp":1.5,"type":"codec","x":1,"y":0}"#,
            r#"{"id":"A","timestamp":1.5,"type":"codec","x":{"timestamp":1}}"#,
        ] {
            assert_ne!(base, content_hash(changed), "{changed}");
        }
    }

    #[test]
    fn the_table_never_grows_whatever_the_number_of_keys() {
        let mut cache = Cache {
            sets: vec![[Slot::default(); WAYS]; 16],
            used: 0,
        };
        let mut evictions = 0;
        for key in 1..=100_000u64 {
            let (keep, evicted) = cache.decide(key_hash(&key.to_string(), "X"), 1.0, 1);
            assert!(keep, "a key never seen is stored");
            evictions += u64::from(evicted);
        }
        assert_eq!(cache.sets.len(), 16);
        assert_eq!(cache.used, 16 * WAYS);
        assert_eq!(evictions, 100_000 - 16 * WAYS as u64);
    }
}
