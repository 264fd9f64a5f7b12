//! What happened on this server lately, kept for whoever arrives later: the last N events
//! (`--event-history`), a timeline of holdings and waits per key for up to an hour, and grant and
//! hand-off wait series for the last 15 minutes. A web page that opens after the fact, or a script
//! asking `GET /v1/events?since=…`, still sees what just happened.
//!
//! Everything here is bounded:
//! - the events: a ring of the last `capacity` events ([`EVENT_BYTES`] each, plus the text of
//!   each distinct key and holder label once);
//! - the timeline: closed spans (a holding from grant to its end, a wait from queueing to its end)
//!   for [`TIMELINE_KEEP_MS`], in two rings of at most [`MAX_CLOSED_SPANS`] each, one for spans of
//!   [`LONG_SPAN_MS`] or more and one for shorter ones, so a burst of brief locks cannot push a
//!   deploy's minutes-long holding out; open spans, at most [`MAX_OPEN_SPANS`] holdings and as many
//!   waits ([`SPAN_BYTES`] each);
//! - the series: [`SERIES_BUCKETS`] buckets of [`SERIES_BUCKET_MS`], each a grant count and a
//!   histogram of hand-off waits.
//!
//! Pure and synchronous: time is passed in, so the tests drive it by hand. [`crate::events`] keeps
//! one behind a mutex and fans its changes out to the live streams.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use distlock::wire;
use serde::{Serialize, Serializer};

use crate::events::{Event, EventKind};

/// How long closed spans are kept (the page's widest zoom).
pub const TIMELINE_KEEP_MS: u64 = 60 * 60 * 1000;
/// What the page opens on, and what the history of busy keys is measured over.
pub const TIMELINE_WINDOW_MS: u64 = 15 * 60 * 1000;
/// Spans at least this long go to the ring of long spans.
pub const LONG_SPAN_MS: u64 = 1_000;
/// Most closed spans kept in each of the two rings (long and brief).
pub const MAX_CLOSED_SPANS: usize = 50_000;
/// Most open holdings tracked, and most open waits.
pub const MAX_OPEN_SPANS: usize = 100_000;
/// Width of one series bucket.
pub const SERIES_BUCKET_MS: u64 = 10_000;
/// Series buckets kept: 15 minutes.
pub const SERIES_BUCKETS: usize = 90;
/// Bytes one buffered event takes, besides the text of its key and holder label (kept once per
/// distinct string).
pub const EVENT_BYTES: usize = std::mem::size_of::<Event>();
/// Bytes one span takes, likewise.
pub const SPAN_BYTES: usize = std::mem::size_of::<Span>();
/// Keys whose spans a new subscriber gets at once: this many with the longest open holdings and
/// as many of the busiest in the last [`TIMELINE_WINDOW_MS`] (others: `GET /v1/locks/{key}/timeline`).
pub const HISTORY_KEYS: usize = 20;
/// Most spans of one key sent at once (the newest).
pub const SPANS_PER_KEY: usize = 1_000;
/// Most events a new subscriber gets at once (the newest; all of them at the default
/// `--event-history`); older ones are there for `GET /v1/events?since=…`.
pub const HISTORY_EVENTS: usize = 10_000;

/// What happened, as the server saw it: the input of [`History::record`].
#[derive(Debug, Clone, Copy)]
pub struct Note<'a> {
    /// What happened.
    pub kind: EventKind,
    /// The lock.
    pub key: &'a str,
    /// The holder label (of the lease, or of the waiting caller), where known.
    pub holder: Option<&'a str>,
    /// The lease's fencing token, where known.
    pub fencing_token: Option<u64>,
    /// A fingerprint of the lease id (never the id), which ties a release or a lost lease to its
    /// grant; 0 when unknown.
    pub lease: u64,
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: u64,
}

pub use distlock::wire::{SpanEnd, SpanKind};

/// The end an event of `kind` puts to a holding.
fn end_of_hold(kind: EventKind) -> Option<SpanEnd> {
    match kind {
        EventKind::Release => Some(SpanEnd::Release),
        EventKind::Expiry => Some(SpanEnd::Expiry),
        EventKind::Lost => Some(SpanEnd::Lost),
        EventKind::ForceRelease => Some(SpanEnd::ForceRelease),
        _ => None,
    }
}

/// One bar (or mark) on the timeline. Compact on purpose ([`SPAN_BYTES`]): 0 stands for an
/// unknown token, lease or end time, `u32::MAX` for no wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Unique within this server's run; a later version of a span (it ended, or its end became
    /// known) carries the same id.
    pub id: u64,
    /// The lock.
    pub key: Arc<str>,
    /// The holder label (of the lease or the waiter).
    pub holder: Option<Arc<str>>,
    /// The fencing token of a holding; 0 when unknown.
    pub fencing_token: u64,
    /// When it began, ms since the Unix epoch.
    pub start_ms: u64,
    /// When it ended; 0 while open.
    pub end_ms: u64,
    /// Fingerprint of the lease id; 0 when unknown. Never serialized.
    lease: u64,
    /// How long the holder waited in the queue before this holding, in ms; `u32::MAX` when it
    /// did not queue (or the wait was not seen).
    waited_ms: u32,
    /// Holding, wait or mark.
    pub kind: SpanKind,
    /// How it ended, once it has.
    pub end: Option<SpanEnd>,
}

impl Span {
    /// How long the holder waited before this holding, when it queued.
    pub fn waited_ms(&self) -> Option<u64> {
        (self.waited_ms != u32::MAX).then_some(u64::from(self.waited_ms))
    }

    fn len_ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        wire::Span {
            id: self.id,
            key: &*self.key,
            kind: self.kind,
            holder: self.holder.as_deref(),
            fencing_token: (self.fencing_token != 0).then_some(self.fencing_token),
            start_ms: self.start_ms,
            end_ms: (self.end_ms != 0).then_some(self.end_ms),
            end: self.end,
            waited_ms: self.waited_ms(),
        }
        .serialize(s)
    }
}

/// Strings kept once however many events and spans name them; unused ones are swept now and then.
#[derive(Debug, Default)]
struct Interner {
    set: HashSet<Arc<str>>,
    sweep_at: usize,
}

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= self.sweep_at.max(4096) {
            // Only the set itself still holds these.
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.sweep_at = self.set.len() * 2;
        }
        let a: Arc<str> = Arc::from(s);
        self.set.insert(a.clone());
        a
    }
}

/// One series bucket: grants and hand-off waits in [`SERIES_BUCKET_MS`].
#[derive(Debug, Clone)]
struct Bucket {
    /// `at_ms / SERIES_BUCKET_MS` of the bucket.
    index: u64,
    grants: u32,
    /// Hand-off waits by [`wait_class`].
    waits: [u32; WAIT_CLASSES],
}

/// Wait histogram classes: four per doubling from 1 ms, up to about 4.6 hours.
const WAIT_CLASSES: usize = 4 * 24 + 1;

/// The class of a wait of `ms`: 0 below 1 ms, then four per doubling.
fn wait_class(ms: u64) -> usize {
    if ms < 1 {
        return 0;
    }
    let c = ((ms as f64).log2() * 4.0).floor() as usize + 1;
    c.min(WAIT_CLASSES - 1)
}

/// The upper bound in ms of a wait class.
fn class_upper(c: usize) -> f64 {
    if c == 0 {
        1.0
    } else {
        2f64.powf(c as f64 / 4.0)
    }
}

/// The series of the last [`SERIES_BUCKETS`] buckets, oldest first, as sent to the page.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesView {
    /// Width of a bucket.
    pub bucket_ms: u64,
    /// Start of the first bucket, ms since the Unix epoch.
    pub from_ms: u64,
    /// Grants in each bucket.
    pub grants: Vec<u32>,
    /// Grants that waited in the queue (hand-offs), in each bucket.
    pub handoffs: Vec<u32>,
    /// Median hand-off wait in each bucket (ms; upper bound of its class, within 19 %), `null`
    /// without hand-offs.
    pub wait_p50_ms: Vec<Option<u64>>,
    /// 99th percentile of the hand-off waits, likewise.
    pub wait_p99_ms: Vec<Option<u64>>,
}

/// The last events, the timeline and the series. See the module documentation.
#[derive(Debug)]
pub struct History {
    capacity: usize,
    events: VecDeque<Event>,
    next_event: u64,
    next_span: u64,
    open_holds: HashMap<Arc<str>, Span>,
    open_waits: HashMap<Arc<str>, VecDeque<Span>>,
    open_wait_count: usize,
    /// Holdings just closed as [`SpanEnd::Unseen`] by the next grant: their real end (a release or
    /// force-release answered after the hand-off it caused) may still arrive.
    unseen: HashMap<Arc<str>, (u64, u64)>,
    long: VecDeque<Span>,
    brief: VecDeque<Span>,
    /// Newest end of a span dropped for room rather than age: before it, spans may be missing.
    cut_ms: u64,
    /// Holdings and waits not tracked because [`MAX_OPEN_SPANS`] were open.
    untracked: u64,
    series: VecDeque<Bucket>,
    strings: Interner,
}

/// Everything a new subscriber gets first.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// The newest [`HISTORY_EVENTS`] buffered events it may read, oldest first.
    pub events: Vec<Event>,
    /// Open and closed spans of the busiest and longest-held keys it may read.
    pub spans: Vec<Span>,
    /// Grants and hand-off waits, server-wide.
    pub series: SeriesView,
    /// Events kept at most (`--event-history`).
    pub event_history: usize,
    /// Id of the oldest event still buffered (0 when none).
    pub oldest_event_id: u64,
    /// The timeline is complete from here on (ms since the Unix epoch): the later of an hour ago
    /// and the newest end dropped for room.
    pub timeline_from_ms: u64,
    /// Server time of the snapshot.
    pub now_ms: u64,
}

/// A page of `GET /v1/events?since=…`.
pub type EventPage = wire::EventPage<Event>;

/// Where `GET /v1/events?since=…` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// After this event id.
    Id(u64),
    /// At or after this time, ms since the Unix epoch.
    Time(u64),
}

impl History {
    /// Keeps the last `capacity` events (at least 1).
    pub fn new(capacity: usize) -> History {
        let capacity = capacity.max(1);
        History {
            capacity,
            events: VecDeque::with_capacity(capacity.min(16_384)),
            next_event: 1,
            next_span: 1,
            open_holds: HashMap::new(),
            open_waits: HashMap::new(),
            open_wait_count: 0,
            unseen: HashMap::new(),
            long: VecDeque::new(),
            brief: VecDeque::new(),
            cut_ms: 0,
            untracked: 0,
            series: VecDeque::with_capacity(SERIES_BUCKETS),
            strings: Interner::default(),
        }
    }

    /// Events kept at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records `note`: buffers its event (returned, with its id and what the timeline adds: the
    /// holder and token of a release, how long the lease was held or the caller waited) and puts
    /// the spans it opened or closed in `changed`.
    pub fn record(&mut self, note: Note<'_>, changed: &mut Vec<Span>) -> Event {
        let t = note.at_ms;
        let key = self.strings.get(note.key);
        let mut holder = note.holder.filter(|h| !h.is_empty()).map(|h| self.strings.get(h));
        let mut token = note.fencing_token.filter(|t| *t != 0);
        let (mut held_ms, mut waited_ms) = (None, None);
        match note.kind {
            EventKind::Grant => {
                if let Some(old) = self.open_holds.remove(&key) {
                    // The grant came before the end of the previous holding reached us.
                    self.unseen.insert(key.clone(), (old.id, old.lease));
                    if self.unseen.len() > 4096 {
                        self.unseen.clear();
                    }
                    self.close(old, SpanEnd::Unseen, t, changed);
                }
                let mut waited = u32::MAX;
                if let Some(wait) = self.take_wait(&key, holder.as_deref()) {
                    let w = t.saturating_sub(wait.start_ms);
                    waited = u32::try_from(w).unwrap_or(u32::MAX - 1);
                    waited_ms = Some(w);
                    self.close(wait, SpanEnd::Granted, t, changed);
                }
                self.count_grant(t, waited_ms);
                let span = Span {
                    id: self.span_id(),
                    key: key.clone(),
                    holder: holder.clone(),
                    fencing_token: token.unwrap_or(0),
                    start_ms: t,
                    end_ms: 0,
                    lease: note.lease,
                    waited_ms: waited,
                    kind: SpanKind::Hold,
                    end: None,
                };
                if self.open_holds.len() < MAX_OPEN_SPANS {
                    changed.push(span.clone());
                    self.open_holds.insert(key.clone(), span);
                } else {
                    self.untracked += 1;
                }
            }
            EventKind::Release | EventKind::Expiry | EventKind::Lost | EventKind::ForceRelease => {
                let end = end_of_hold(note.kind).unwrap_or(SpanEnd::Release);
                let matches = |s: &Span| note.lease == 0 || s.lease == 0 || s.lease == note.lease;
                if let Some(open) = self.open_holds.get(&key).filter(|s| matches(s)) {
                    let open = open.clone();
                    self.open_holds.remove(&key);
                    holder = holder.or_else(|| open.holder.clone());
                    token = token.or((open.fencing_token != 0).then_some(open.fencing_token));
                    held_ms = Some(t.saturating_sub(open.start_ms));
                    self.close(open, end, t, changed);
                } else if let Some(span) = self.amend_unseen(&key, note.lease, end) {
                    holder = holder.or_else(|| span.holder.clone());
                    token = token.or((span.fencing_token != 0).then_some(span.fencing_token));
                    held_ms = Some(span.len_ms());
                    changed.push(span);
                } else if end != SpanEnd::Release || holder.is_some() {
                    // The end of a holding that began before this server saw it (restored from
                    // disk, or granted before the open holdings were full).
                    let mark = Span {
                        id: self.span_id(),
                        key: key.clone(),
                        holder: holder.clone(),
                        fencing_token: token.unwrap_or(0),
                        start_ms: t,
                        end_ms: t,
                        lease: note.lease,
                        waited_ms: u32::MAX,
                        kind: SpanKind::Mark,
                        end: Some(end),
                    };
                    changed.push(mark.clone());
                    self.keep(mark);
                }
            }
            EventKind::Wait => {
                if self.open_wait_count < MAX_OPEN_SPANS {
                    let span = Span {
                        id: self.span_id(),
                        key: key.clone(),
                        holder: holder.clone(),
                        fencing_token: 0,
                        start_ms: t,
                        end_ms: 0,
                        lease: 0,
                        waited_ms: u32::MAX,
                        kind: SpanKind::Wait,
                        end: None,
                    };
                    changed.push(span.clone());
                    self.open_waits.entry(key.clone()).or_default().push_back(span);
                    self.open_wait_count += 1;
                } else {
                    self.untracked += 1;
                }
            }
            EventKind::WaitTimeout | EventKind::WaitCancelled => {
                if let Some(wait) = self.take_wait(&key, holder.as_deref()) {
                    waited_ms = Some(t.saturating_sub(wait.start_ms));
                    let end = if note.kind == EventKind::WaitTimeout {
                        SpanEnd::Timeout
                    } else {
                        SpanEnd::Cancelled
                    };
                    self.close(wait, end, t, changed);
                }
            }
        }
        let event = Event {
            id: self.next_event,
            kind: note.kind,
            key,
            holder,
            fencing_token: token,
            at_ms: t,
            held_ms,
            waited_ms,
        };
        self.next_event += 1;
        if self.events.len() >= self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(event.clone());
        event
    }

    fn span_id(&mut self) -> u64 {
        let id = self.next_span;
        self.next_span += 1;
        id
    }

    /// The first open wait on `key` by `holder` (the queue is first come, first served).
    fn take_wait(&mut self, key: &Arc<str>, holder: Option<&str>) -> Option<Span> {
        let queue = self.open_waits.get_mut(key)?;
        let at = queue.iter().position(|w| w.holder.as_deref() == holder)?;
        let wait = queue.remove(at);
        if queue.is_empty() {
            self.open_waits.remove(key);
        }
        if wait.is_some() {
            self.open_wait_count -= 1;
        }
        wait
    }

    /// Ends `span` at `t` and keeps it.
    fn close(&mut self, mut span: Span, end: SpanEnd, t: u64, changed: &mut Vec<Span>) {
        span.end_ms = t.max(span.start_ms);
        span.end = Some(end);
        changed.push(span.clone());
        self.keep(span);
    }

    /// Gives a holding closed as [`SpanEnd::Unseen`] its real end, if it is the lease `lease`.
    fn amend_unseen(&mut self, key: &Arc<str>, lease: u64, end: SpanEnd) -> Option<Span> {
        let (id, fp) = *self.unseen.get(key)?;
        if lease != 0 && fp != 0 && lease != fp {
            return None;
        }
        self.unseen.remove(key);
        for ring in [&mut self.brief, &mut self.long] {
            if let Some(span) = ring.iter_mut().rev().take(4096).find(|s| s.id == id) {
                span.end = Some(end);
                return Some(span.clone());
            }
        }
        None
    }

    /// Puts a closed span in its ring, dropping what is over an hour old or over the cap.
    fn keep(&mut self, span: Span) {
        let ring = if span.len_ms() >= LONG_SPAN_MS { &mut self.long } else { &mut self.brief };
        let horizon = span.end_ms.saturating_sub(TIMELINE_KEEP_MS);
        while ring.front().is_some_and(|s| s.end_ms < horizon) {
            ring.pop_front();
        }
        if ring.len() >= MAX_CLOSED_SPANS {
            if let Some(old) = ring.pop_front() {
                self.cut_ms = self.cut_ms.max(old.end_ms);
            }
        }
        ring.push_back(span);
    }

    fn count_grant(&mut self, t: u64, waited_ms: Option<u64>) {
        let index = t / SERIES_BUCKET_MS;
        let bucket = match self.series.back_mut() {
            Some(b) if b.index == index => b,
            // A clock that went back: count it in the newest bucket.
            Some(b) if b.index > index => b,
            _ => {
                if self.series.len() >= SERIES_BUCKETS {
                    self.series.pop_front();
                }
                self.series.push_back(Bucket { index, grants: 0, waits: [0; WAIT_CLASSES] });
                let Some(b) = self.series.back_mut() else { return };
                b
            }
        };
        bucket.grants = bucket.grants.saturating_add(1);
        if let Some(w) = waited_ms {
            let c = wait_class(w);
            bucket.waits[c] = bucket.waits[c].saturating_add(1);
        }
    }

    /// The last [`SERIES_BUCKETS`] buckets up to `now_ms`, oldest first (empty buckets as zeros).
    pub fn series(&self, now_ms: u64) -> SeriesView {
        let last = now_ms / SERIES_BUCKET_MS;
        let first = last.saturating_sub(SERIES_BUCKETS as u64 - 1);
        let n = (last - first + 1) as usize;
        let mut view = SeriesView {
            bucket_ms: SERIES_BUCKET_MS,
            from_ms: first * SERIES_BUCKET_MS,
            grants: vec![0; n],
            handoffs: vec![0; n],
            wait_p50_ms: vec![None; n],
            wait_p99_ms: vec![None; n],
        };
        for b in self.series.iter().filter(|b| b.index >= first && b.index <= last) {
            let i = (b.index - first) as usize;
            view.grants[i] = b.grants;
            let total: u64 = b.waits.iter().map(|&c| u64::from(c)).sum();
            view.handoffs[i] = u32::try_from(total).unwrap_or(u32::MAX);
            view.wait_p50_ms[i] = quantile(&b.waits, total, 0.5);
            view.wait_p99_ms[i] = quantile(&b.waits, total, 0.99);
        }
        view
    }

    /// What a new subscriber that may read the keys `may_read` allows gets first.
    pub fn snapshot(&self, may_read: &dyn Fn(&str) -> bool, now_ms: u64) -> Snapshot {
        let mut events: Vec<Event> =
            self.events.iter().rev().filter(|e| may_read(&e.key)).take(HISTORY_EVENTS).cloned().collect();
        events.reverse();
        let window = now_ms.saturating_sub(TIMELINE_WINDOW_MS);
        // The longest-held keys now, and the busiest of the window.
        let mut longest: Vec<&Span> = self.open_holds.values().filter(|s| may_read(&s.key)).collect();
        longest.sort_unstable_by_key(|s| (s.start_ms, s.id));
        let mut chosen: HashSet<&str> = longest.iter().take(HISTORY_KEYS).map(|s| &*s.key).collect();
        let mut busy: HashMap<&str, u32> = HashMap::new();
        for s in self.closed_newest_first().take_while(|s| s.end_ms >= window) {
            *busy.entry(&*s.key).or_default() += 1;
        }
        for (k, q) in &self.open_waits {
            *busy.entry(&**k).or_default() += q.len() as u32;
        }
        let mut busy: Vec<(&str, u32)> = busy.into_iter().filter(|(k, _)| may_read(k)).collect();
        busy.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        chosen.extend(busy.iter().take(HISTORY_KEYS).map(|(k, _)| *k));
        let mut spans = Vec::new();
        let mut per_key: HashMap<&str, usize> = HashMap::new();
        let open = self.open_holds.values().chain(self.open_waits.values().flatten());
        for s in open.chain(self.closed_newest_first()) {
            if chosen.contains(&*s.key) {
                let n = per_key.entry(&*s.key).or_default();
                if *n < SPANS_PER_KEY {
                    *n += 1;
                    spans.push(s.clone());
                }
            }
        }
        spans.sort_unstable_by_key(|s| (s.start_ms, s.id));
        Snapshot {
            events,
            spans,
            series: self.series(now_ms),
            event_history: self.capacity,
            oldest_event_id: self.events.front().map_or(0, |e| e.id),
            timeline_from_ms: self.timeline_from(now_ms),
            now_ms,
        }
    }

    /// The later of an hour before `now_ms` and the newest end dropped for room.
    pub fn timeline_from(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(TIMELINE_KEEP_MS).max(self.cut_ms)
    }

    /// Closed spans, the newest end first (the two rings merged).
    fn closed_newest_first(&self) -> impl Iterator<Item = &Span> {
        let (mut a, mut b) = (self.long.iter().rev().peekable(), self.brief.iter().rev().peekable());
        std::iter::from_fn(move || match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.end_ms >= y.end_ms => a.next(),
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => None,
        })
    }

    /// The spans of `key` (open ones, and closed ones ending at or after `from_ms`), at most
    /// `limit` of the newest, in start order.
    pub fn spans_of(&self, key: &str, from_ms: u64, limit: usize) -> Vec<Span> {
        let mut spans: Vec<Span> = self.open_holds.get(key).into_iter().cloned().collect();
        spans.extend(self.open_waits.get(key).into_iter().flatten().cloned());
        spans.extend(
            self.closed_newest_first()
                .take_while(|s| s.end_ms >= from_ms)
                .filter(|s| &*s.key == key)
                .take(limit.saturating_sub(spans.len()))
                .cloned(),
        );
        spans.sort_unstable_by_key(|s| (s.start_ms, s.id));
        spans
    }

    /// Buffered events after `since` that `may_read` allows, at most `limit`, oldest first.
    pub fn events_since(&self, since: Since, limit: usize, may_read: &dyn Fn(&str) -> bool) -> EventPage {
        let oldest_id = self.events.front().map_or(0, |e| e.id);
        let (start, missed) = match since {
            // A cursor past the newest id comes from an earlier run of the server (ids start again
            // at 1 after a restart): everything buffered is new to the caller, and some was missed.
            Since::Id(id) if id >= self.next_event => (0, true),
            Since::Id(id) => {
                // Ids are consecutive: the first event after `id` is at this offset.
                let offset = id.saturating_add(1).saturating_sub(oldest_id.max(1));
                let missed = self.events.front().is_some_and(|e| e.id > id.saturating_add(1))
                    || (self.events.is_empty() && self.next_event > id.saturating_add(1));
                (usize::try_from(offset).unwrap_or(usize::MAX).min(self.events.len()), missed)
            }
            Since::Time(ms) => {
                let at = self.events.partition_point(|e| e.at_ms < ms);
                // Events at or after `ms` were dropped when the oldest kept is itself after it.
                let missed = at == 0 && self.events.front().is_some_and(|e| e.at_ms > ms) && oldest_id > 1;
                (at, missed)
            }
        };
        let mut events = Vec::new();
        let mut more = false;
        for e in self.events.range(start..).filter(|e| may_read(&e.key)) {
            if events.len() >= limit {
                more = true;
                break;
            }
            events.push(e.clone());
        }
        // Nothing readable after the cursor: continue from the newest event.
        let next = events.last().or(self.events.back()).map_or(0, |e| e.id);
        EventPage { events, next, more, missed, oldest_id, event_history: self.capacity }
    }

    /// Open holdings and waits tracked now, closed spans kept, and opens not tracked for room.
    pub fn span_counts(&self) -> (usize, usize, u64) {
        (self.open_holds.len() + self.open_wait_count, self.long.len() + self.brief.len(), self.untracked)
    }
}

/// The `q` quantile of a wait histogram holding `total` waits.
fn quantile(classes: &[u32], total: u64, q: f64) -> Option<u64> {
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (c, &n) in classes.iter().enumerate() {
        seen += u64::from(n);
        if seen >= rank {
            return Some(class_upper(c).round() as u64);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note<'a>(
        kind: EventKind,
        key: &'a str,
        holder: Option<&'a str>,
        token: Option<u64>,
        lease: u64,
        at_ms: u64,
    ) -> Note<'a> {
        Note { kind, key, holder, fencing_token: token, lease, at_ms }
    }

    fn all_spans(h: &History, key: &str) -> Vec<Span> {
        h.spans_of(key, 0, usize::MAX)
    }

    #[test]
    fn a_hand_off_makes_a_wait_and_two_holdings() {
        let mut h = History::new(100);
        let mut changed = Vec::new();
        let t0 = 1_000_000;
        h.record(note(EventKind::Grant, "k", Some("a"), Some(1), 11, t0), &mut changed);
        h.record(note(EventKind::Wait, "k", Some("b"), None, 0, t0 + 100), &mut changed);
        // The waiter's grant reaches the history before the release that caused it.
        let g = h.record(note(EventKind::Grant, "k", Some("b"), Some(2), 22, t0 + 2_000), &mut changed);
        assert_eq!(g.waited_ms, Some(1_900));
        let r = h.record(note(EventKind::Release, "k", None, None, 11, t0 + 2_001), &mut changed);
        assert_eq!((r.holder.as_deref(), r.fencing_token, r.held_ms), (Some("a"), Some(1), Some(2_000)));
        h.record(note(EventKind::Expiry, "k", Some("b"), Some(2), 22, t0 + 5_000), &mut changed);
        let spans = all_spans(&h, "k");
        let summary: Vec<_> = spans
            .iter()
            .map(|s| {
                (
                    s.kind,
                    s.holder.as_deref().map(str::to_owned),
                    s.fencing_token,
                    s.start_ms - t0,
                    s.end_ms - t0,
                    s.end,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (SpanKind::Hold, Some("a".into()), 1, 0, 2_000, Some(SpanEnd::Release)),
                (SpanKind::Wait, Some("b".into()), 0, 100, 2_000, Some(SpanEnd::Granted)),
                (SpanKind::Hold, Some("b".into()), 2, 2_000, 5_000, Some(SpanEnd::Expiry)),
            ]
        );
        assert_eq!(h.series(t0 + 5_000).handoffs.iter().sum::<u32>(), 1);
    }

    #[test]
    fn ends_without_a_seen_grant_are_marks_and_waits_end_by_holder() {
        let mut h = History::new(100);
        let mut c = Vec::new();
        h.record(note(EventKind::ForceRelease, "k", Some("x"), Some(9), 5, 10), &mut c);
        h.record(note(EventKind::Wait, "k", Some("p"), None, 0, 20), &mut c);
        h.record(note(EventKind::Wait, "k", Some("q"), None, 0, 30), &mut c);
        let e = h.record(note(EventKind::WaitTimeout, "k", Some("q"), None, 0, 90), &mut c);
        assert_eq!(e.waited_ms, Some(60));
        let spans = all_spans(&h, "k");
        assert_eq!(spans[0].kind, SpanKind::Mark);
        assert_eq!(spans[0].end, Some(SpanEnd::ForceRelease));
        assert_eq!((spans[1].holder.as_deref(), spans[1].end), (Some("p"), None));
        assert_eq!((spans[2].holder.as_deref(), spans[2].end), (Some("q"), Some(SpanEnd::Timeout)));
    }

    #[test]
    fn a_lost_lease_of_another_holder_does_not_end_the_current_holding() {
        let mut h = History::new(100);
        let mut c = Vec::new();
        h.record(note(EventKind::Grant, "k", Some("b"), Some(2), 22, 100), &mut c);
        h.record(note(EventKind::Lost, "k", None, None, 11, 200), &mut c);
        let spans = all_spans(&h, "k");
        assert_eq!(spans.iter().filter(|s| s.kind == SpanKind::Hold && s.end.is_none()).count(), 1);
        assert!(spans.iter().any(|s| s.kind == SpanKind::Mark && s.end == Some(SpanEnd::Lost)));
    }

    #[test]
    fn the_event_ring_keeps_the_last_n_and_pages_by_id_and_time() {
        let mut h = History::new(10);
        let mut c = Vec::new();
        for i in 0..25u64 {
            let key = if i % 2 == 0 { "a/x" } else { "b/y" };
            h.record(note(EventKind::Wait, key, Some("w"), None, 0, 1_000 + i), &mut c);
        }
        let all = |_: &str| true;
        let page = h.events_since(Since::Id(0), 100, &all);
        assert_eq!(page.events.len(), 10);
        assert_eq!((page.events[0].id, page.next, page.missed, page.oldest_id), (16, 25, true, 16));
        let page = h.events_since(Since::Id(20), 3, &all);
        assert_eq!(page.events.iter().map(|e| e.id).collect::<Vec<_>>(), vec![21, 22, 23]);
        assert!(page.more && !page.missed);
        let page = h.events_since(Since::Id(25), 3, &all);
        assert!(page.events.is_empty() && !page.more && !page.missed && page.next == 25);
        // A cursor from before a restart (past the newest id): all that is buffered, and missed.
        let page = h.events_since(Since::Id(900), 100, &all);
        assert_eq!((page.events.len(), page.missed, page.next), (10, true, 25));
        let page = h.events_since(Since::Time(1_020), 100, &all);
        assert_eq!(page.events.first().map(|e| e.id), Some(21));
        let only_a = |k: &str| k.starts_with("a/");
        let page = h.events_since(Since::Id(0), 100, &only_a);
        assert!(page.events.iter().all(|e| e.key.starts_with("a/")) && page.events.len() == 5);
    }

    #[test]
    fn memory_is_bounded_and_long_spans_survive_a_burst_of_brief_ones() {
        let mut h = History::new(1_000);
        let mut c = Vec::new();
        let t0 = 10_000_000;
        h.record(note(EventKind::Grant, "deploy/web", Some("ci"), Some(1), 1, t0), &mut c);
        h.record(note(EventKind::Release, "deploy/web", None, None, 1, t0 + 60_000), &mut c);
        for i in 0..(MAX_CLOSED_SPANS as u64 + 5_000) {
            let key = format!("load/{}", i % 64);
            let t = t0 + 60_000 + i / 10;
            h.record(note(EventKind::Grant, &key, Some("bench"), Some(i + 2), i + 2, t), &mut c);
            h.record(note(EventKind::Release, &key, None, None, i + 2, t), &mut c);
            c.clear();
        }
        let (open, closed, _) = h.span_counts();
        assert!(open == 0 && closed <= 2 * MAX_CLOSED_SPANS, "{open} {closed}");
        assert_eq!(h.events.len(), 1_000);
        let spans = all_spans(&h, "deploy/web");
        assert_eq!(spans.len(), 1, "the minute-long holding is still there");
        assert!(h.strings.set.len() < 200, "strings are kept once: {}", h.strings.set.len());
        println!("event {EVENT_BYTES} B, span {SPAN_BYTES} B");
        const { assert!(EVENT_BYTES <= 112 && SPAN_BYTES <= 96) };
    }

    #[test]
    fn the_snapshot_sends_the_longest_held_and_busiest_keys() {
        let mut h = History::new(100);
        let mut c = Vec::new();
        h.record(note(EventKind::Grant, "old", Some("o"), Some(1), 1, 1_000), &mut c);
        for i in 0..50u64 {
            let key = format!("k{i}");
            for j in 0..(i % 5 + 1) {
                let t = 2_000 + i * 100 + j * 10;
                h.record(note(EventKind::Grant, &key, None, Some(100 + i * 10 + j), 7, t), &mut c);
                h.record(note(EventKind::Release, &key, None, None, 7, t + 5), &mut c);
            }
        }
        let snap = h.snapshot(&|_| true, 10_000);
        let keys: HashSet<&str> = snap.spans.iter().map(|s| &*s.key).collect();
        assert!(keys.contains("old"));
        assert!(keys.contains("k4") && keys.contains("k49"), "the busiest keys are in");
        assert!(keys.len() <= 2 * HISTORY_KEYS);
        let none = h.snapshot(&|k| k == "nothing", 10_000);
        assert!(none.spans.is_empty() && none.events.is_empty());
    }
}
