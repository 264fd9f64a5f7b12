//! What the value of a key in a lock's queue says, and who of a queue holds the lock.
//!
//! A key's value is one of:
//! - `<holder>\n<secret>`: an exclusive lock (limit 1) that publishes nothing — the form every
//!   version of this backend has written for a plain lock, kept so that older versions read it;
//! - `<holder>\n<mode><limit>[=<value>]\n<secret>`: a semaphore permit (`x` and its limit), a
//!   shared lock (`s1`), or any lease that publishes a value (`=` and the value with `%` and
//!   newlines percent-encoded, so the value stays on its line);
//! - anything else — the empty value of `etcdctl lock` and Go's `concurrency.Mutex` — is an
//!   exclusive lock of limit 1 whose holder label is the whole value.
//!
//! Who holds: the longest run of keys from the front of the queue (lowest create revision first)
//! in which every key is granted by [`granted`] given the keys ahead of it. Keys only ever leave
//! the front part of a queue (a new key has a higher revision than every key there), so a key
//! once granted stays granted until it goes.

use crate::types::LockMode;

/// How a key holds (or waits for) its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Kind {
    /// A shared (read) lock; otherwise exclusive (a lock, or a permit of a semaphore).
    pub shared: bool,
    /// The permits of the semaphore it belongs to (1: a lock; always 1 when shared).
    pub limit: u32,
}

impl Kind {
    /// The kind a caller asks for.
    pub fn of(mode: LockMode, limit: u32) -> Kind {
        Kind { shared: mode == LockMode::Shared, limit: limit.max(1) }
    }

    /// A plain exclusive lock: the only kind `etcdctl lock` and Go's `Mutex` take.
    const LOCK: Kind = Kind { shared: false, limit: 1 };

    /// Whether keys of this kind can be held together (status lists them all).
    pub fn many(self) -> bool {
        self.shared || self.limit > 1
    }
}

/// A key's value, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Meta {
    pub holder: String,
    pub kind: Kind,
    /// What the lease publishes (a leader's value).
    pub value: Option<String>,
}

/// The value to store for a key (see the module documentation).
pub(super) fn encode_value(holder: &str, secret: &str, kind: Kind, value: Option<&str>) -> String {
    if kind == Kind::LOCK && value.is_none() {
        return format!("{holder}\n{secret}");
    }
    let mode = if kind.shared { 's' } else { 'x' };
    let published = match value {
        Some(v) => format!("={}", escape(v)),
        None => String::new(),
    };
    format!("{holder}\n{mode}{}{published}\n{secret}", kind.limit)
}

/// Reads a key's value; a value this backend did not write is an exclusive lock held by the whole
/// value (`etcdctl lock` writes none).
pub(super) fn parse(value: &[u8]) -> Meta {
    let text = String::from_utf8_lossy(value);
    let foreign = || Meta { holder: text.clone().into_owned(), kind: Kind::LOCK, value: None };
    let mut lines = text.splitn(3, '\n');
    let (Some(holder), Some(second)) = (lines.next(), lines.next()) else { return foreign() };
    let Some(_secret) = lines.next() else {
        // `<holder>\n<secret>`: a plain lock.
        return Meta { holder: holder.to_owned(), kind: Kind::LOCK, value: None };
    };
    match parse_kind(second) {
        Some((kind, value)) => Meta { holder: holder.to_owned(), kind, value },
        None => foreign(),
    }
}

/// The secret a key's value carries (its last line), if any.
pub(super) fn secret(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value).ok()?.rsplit_once('\n').map(|(_, secret)| secret)
}

/// `x3`, `s1`, `x1=addr`: the kind, and the published value.
fn parse_kind(line: &str) -> Option<(Kind, Option<String>)> {
    let (head, value) = match line.split_once('=') {
        Some((head, value)) => (head, Some(unescape(value))),
        None => (line, None),
    };
    let shared = match head.as_bytes().first()? {
        b's' => true,
        b'x' => false,
        _ => return None,
    };
    let limit: u32 = head.get(1..)?.parse().ok().filter(|n| *n >= 1)?;
    Some((Kind { shared, limit }, value))
}

fn escape(value: &str) -> String {
    value.replace('%', "%25").replace('\n', "%0A")
}

/// The inverse of [`escape`], read left to right (so `%250A` is `%0A`, not a newline).
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("%25") {
            out.push('%');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("%0A") {
            out.push('\n');
            rest = after;
        } else {
            out.push('%');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Whether a key of kind `me` holds its lock with `ahead` (the kinds of the keys before it, in
/// queue order) still there — etcd's `rwmutex` recipe extended to semaphores: a shared key holds
/// when no exclusive key is ahead (a reader waits for the last writer before it); an exclusive
/// key holds when only exclusive keys are ahead and fewer than the smallest limit among them and
/// itself (a lock, limit 1: when it is first; a permit of N: when fewer than N are ahead). Two
/// callers that raced with different limits are thus held to the smaller, never more.
pub(super) fn granted(ahead: impl IntoIterator<Item = Kind>, me: Kind) -> bool {
    let mut count = 0usize;
    let mut least = me.limit;
    for k in ahead {
        if me.shared {
            if !k.shared {
                return false;
            }
            continue;
        }
        if k.shared {
            return false;
        }
        count += 1;
        least = least.min(k.limit);
    }
    me.shared || count < least as usize
}

/// How many keys at the front of a queue (kinds in queue order) hold the lock.
pub(super) fn holders(queue: &[Kind]) -> usize {
    (0..queue.len()).find(|&i| !granted(queue[..i].iter().copied(), queue[i])).unwrap_or(queue.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const X1: Kind = Kind { shared: false, limit: 1 };
    const X3: Kind = Kind { shared: false, limit: 3 };
    const S: Kind = Kind { shared: true, limit: 1 };

    #[test]
    fn values_round_trip_and_plain_locks_keep_the_old_form() {
        assert_eq!(encode_value("h", "s3cr3t", X1, None), "h\ns3cr3t");
        assert_eq!(parse(b"h\ns3cr3t"), Meta { holder: "h".into(), kind: X1, value: None });
        for (kind, value) in [(X3, None), (S, None), (X1, Some("a%0A\nb=c%")), (X3, Some(""))] {
            let stored = encode_value("host-1", "abc", kind, value);
            assert_eq!(secret(stored.as_bytes()), Some("abc"), "{stored:?}");
            let meta = parse(stored.as_bytes());
            assert_eq!((meta.holder.as_str(), meta.kind, meta.value.as_deref()), ("host-1", kind, value));
        }
    }

    #[test]
    fn foreign_values_are_exclusive_locks() {
        assert_eq!(parse(b""), Meta { holder: String::new(), kind: X1, value: None });
        assert_eq!(parse(b"a\nq9\nb").kind, X1, "an unknown kind line");
        assert_eq!(parse(b"a\nx0\nb").kind, X1, "limit 0 is not ours");
    }

    #[test]
    fn who_holds() {
        assert_eq!(holders(&[X3, X3, X3, X3]), 3, "a semaphore: the first N");
        assert_eq!(holders(&[X1, X1]), 1, "a lock: the first");
        assert_eq!(holders(&[S, S, X1, S]), 2, "readers up to the first writer");
        assert_eq!(holders(&[X1, S, S]), 1, "a writer alone; readers wait for it");
        assert_eq!(holders(&[X3, S]), 1, "a reader waits for a permit ahead");
        assert_eq!(holders(&[S, X3]), 1, "a permit waits for a reader ahead");
        assert_eq!(holders(&[X3, X1, X3]), 1, "an `etcdctl lock` key holds alone");
        assert_eq!(holders(&[X3, Kind { shared: false, limit: 2 }, X3]), 2, "the smaller limit");
        assert_eq!(holders(&[]), 0);
    }
}
