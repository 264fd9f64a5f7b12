//! Who may do what: bearer tokens with scopes by operation and key prefix.
//!
//! Token file: one token per line, optionally followed by scopes (whitespace-separated; `#` starts
//! a comment):
//!
//! ```text
//! # token            scopes
//! s3cr3t-ci          lock:deploy/ read:*
//! s3cr3t-dashboard   read:*
//! s3cr3t-ops         admin:*
//! s3cr3t-legacy                         # no scopes = lock:* read:*
//! ```
//!
//! `lock:P` allows acquire, renew, release and status of keys starting with P; `read:P` status,
//! list, waiters and events of keys under P; `admin:P` force-release under P. `P` is a literal
//! prefix (a trailing `*` is the same as none; `*` alone is every key). Tokens of the separate
//! admin file get `admin:*`, or the narrower `admin:P` scopes their line names. Deny by default: every operation is checked on its own key, batches
//! op by op. Presented tokens are compared in constant time against every known one (SHA-256
//! digests, so lengths do not leak either); logs name a token by its file and line, never its text.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use subtle::ConstantTimeEq;

use crate::Error;

/// An operation class a scope allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Acquire, renew, release (and status) of a key.
    Lock,
    /// Status, list, waiters, events.
    Read,
    /// Force-release.
    Admin,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Lock => "lock",
            Action::Read => "read",
            Action::Admin => "admin",
        }
    }
}

/// One scope: an action on keys starting with `prefix` (`""`: every key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// What it allows.
    pub action: Action,
    /// Which keys.
    pub prefix: String,
}

impl Scope {
    /// Parses `lock:P`, `read:P` or `admin:P`.
    pub fn parse(text: &str) -> Result<Scope, String> {
        let (action, prefix) = text.split_once(':').ok_or_else(|| format!("scope {text:?} has no ':'"))?;
        let action = match action {
            "lock" => Action::Lock,
            "read" => Action::Read,
            "admin" => Action::Admin,
            other => return Err(format!("unknown scope kind {other:?} (lock, read or admin)")),
        };
        let prefix = prefix.strip_suffix('*').unwrap_or(prefix);
        if prefix.contains('*') {
            return Err(format!("scope {text:?}: '*' may only end a prefix"));
        }
        Ok(Scope { action, prefix: prefix.to_owned() })
    }

    fn allows(&self, action: Action, key: &str) -> bool {
        // A lock scope also lets its holder read the status of its keys.
        let action_ok = self.action == action || (self.action == Action::Lock && action == Action::Read);
        action_ok && key.starts_with(&self.prefix)
    }
}

/// What one token may do, and where it came from (for logs).
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None` when auth is off: everything but admin operations is allowed.
    scopes: Option<Vec<Scope>>,
    /// `file:line` of the token, for logs.
    pub source: String,
    /// The digest of the token this caller presented (none when auth is off and it showed none
    /// that is known), to look it up again after the files are re-read.
    digest: Option<[u8; 32]>,
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forbidden {
    /// The message for the caller.
    pub message: String,
}

impl Caller {
    /// The caller when auth is off.
    pub fn anyone() -> Caller {
        Caller { scopes: None, source: "no auth".into(), digest: None }
    }

    /// Whether no known token stands behind the call (auth is off and the token, if any, is
    /// nobody's).
    pub fn is_anonymous(&self) -> bool {
        self.scopes.is_none()
    }

    /// Whether the caller may do `action` on `key`. With auth off, every action but admin.
    pub fn may(&self, action: Action, key: &str) -> bool {
        match &self.scopes {
            None => action != Action::Admin,
            Some(scopes) => scopes.iter().any(|s| s.allows(action, key)),
        }
    }

    /// `Ok` when the caller may do `action` on `key`, else the refusal (logged by its source).
    pub fn check(&self, action: Action, key: &str) -> Result<(), Forbidden> {
        if self.may(action, key) {
            return Ok(());
        }
        tracing::info!(token = %self.source, action = action.name(), key, "refused: outside the token's scopes");
        Err(Forbidden {
            message: format!(
                "this token may not {} {key:?} (no {}: scope covers it)",
                verb(action),
                action.name()
            ),
        })
    }

    /// The key prefixes the caller may read (`None`: all keys).
    pub fn readable_prefixes(&self) -> Option<Vec<&str>> {
        let scopes = self.scopes.as_ref()?;
        let prefixes: Vec<&str> = scopes
            .iter()
            .filter(|s| matches!(s.action, Action::Read | Action::Lock))
            .map(|s| s.prefix.as_str())
            .collect();
        if prefixes.contains(&"") {
            None
        } else {
            Some(prefixes)
        }
    }
}

fn verb(action: Action) -> &'static str {
    match action {
        Action::Lock => "lock",
        Action::Read => "read",
        Action::Admin => "force-release",
    }
}

/// Where a `#` comment starts in a token-file line: at its start or after whitespace.
fn comment_start(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    (0..bytes.len()).find(|&i| bytes[i] == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()))
}

/// One known token: the digest of its text and its rights.
#[derive(Debug)]
struct Entry {
    digest: [u8; 32],
    caller: Caller,
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The tokens of the token files, as last read.
#[derive(Debug, Default)]
pub struct TokenTable {
    entries: Vec<Entry>,
    /// Whether the API needs a token (a token file was given).
    required: bool,
}

/// The outcome of looking up a request's token.
pub enum Lookup {
    /// A known token, or auth is off.
    Caller(Caller),
    /// No token, or one nobody knows.
    Unknown,
}

impl TokenTable {
    /// Reads the token file (`auth`, scopes as in the module doc) and the admin file (`admin`,
    /// every token `admin:*`). Refuses a file with an unknown scope or no token, naming the line.
    pub fn read(auth: Option<&Path>, admin: Option<&Path>) -> crate::Result<TokenTable> {
        let mut table = TokenTable { entries: Vec::new(), required: auth.is_some() };
        for (path, admin_file) in [(auth, false), (admin, true)] {
            let Some(path) = path else { continue };
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::File(format!("reading {}: {e}", path.display())))?;
            let mut read = 0;
            for (i, line) in text.lines().enumerate() {
                // `#` starts a comment at the start of a line or after whitespace; inside a token
                // it is part of the token.
                let line = comment_start(line).map_or(line, |i| &line[..i]);
                let mut fields = line.split_whitespace();
                let Some(token) = fields.next() else { continue };
                let source = format!("{}:{}", path.display(), i + 1);
                let mut scopes = fields
                    .map(Scope::parse)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::File(format!("{source}: {e}")))?;
                if admin_file {
                    // An admin-file line may narrow itself (`ops admin:deploy/`); others get
                    // `admin:*`. Only admin scopes count there.
                    if scopes.iter().any(|s| s.action != Action::Admin) {
                        return Err(Error::File(format!(
                            "{source}: the admin token file takes only admin: scopes"
                        )));
                    }
                    if scopes.is_empty() {
                        scopes = vec![Scope { action: Action::Admin, prefix: String::new() }];
                    }
                } else if scopes.is_empty() {
                    scopes = vec![
                        Scope { action: Action::Lock, prefix: String::new() },
                        Scope { action: Action::Read, prefix: String::new() },
                    ];
                }
                table.add(token, scopes, source);
                read += 1;
            }
            if read == 0 {
                return Err(Error::File(format!("{} holds no tokens", path.display())));
            }
        }
        Ok(table)
    }

    /// Adds `token` with `scopes`; a token named twice (in both files) gets both sets.
    fn add(&mut self, token: &str, scopes: Vec<Scope>, source: String) {
        let d = digest(token);
        if let Some(e) = self.entries.iter_mut().find(|e| bool::from(e.digest.ct_eq(&d))) {
            if let Some(s) = e.caller.scopes.as_mut() {
                s.extend(scopes);
            }
            return;
        }
        self.entries
            .push(Entry { digest: d, caller: Caller { scopes: Some(scopes), source, digest: Some(d) } });
    }

    /// The caller a request's bearer token (if any) stands for.
    pub fn lookup(&self, bearer: Option<&str>) -> Lookup {
        self.lookup_digest(bearer.map(digest))
    }

    /// What `caller` may do under the tokens in force now: a long-lived request (an event stream)
    /// asks again after the files were re-read, and ends when its token is gone.
    pub fn recheck(&self, caller: &Caller) -> Lookup {
        self.lookup_digest(caller.digest)
    }

    fn lookup_digest(&self, presented: Option<[u8; 32]>) -> Lookup {
        let found = presented.and_then(|d| {
            // Compare with every entry, without stopping at a match.
            let mut found = None;
            for e in &self.entries {
                if bool::from(e.digest.ct_eq(&d)) {
                    found = Some(&e.caller);
                }
            }
            found
        });
        match (found, self.required) {
            (Some(c), true) => Lookup::Caller(c.clone()),
            // Auth off: an admin token keeps what anyone may do, plus its admin scopes.
            (Some(c), false) => {
                let mut scopes = vec![
                    Scope { action: Action::Lock, prefix: String::new() },
                    Scope { action: Action::Read, prefix: String::new() },
                ];
                scopes.extend(c.scopes.iter().flatten().cloned());
                Lookup::Caller(Caller { scopes: Some(scopes), source: c.source.clone(), digest: c.digest })
            }
            // Auth off: anyone may use the API.
            (None, false) => Lookup::Caller(Caller::anyone()),
            (None, true) => Lookup::Unknown,
        }
    }

    /// Whether a token file is in force.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Whether any token may force-release.
    pub fn any_admin(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.caller.scopes.as_ref().is_some_and(|s| s.iter().any(|s| s.action == Action::Admin)))
    }
}

/// The token table of a running server, re-read from its files on demand (SIGHUP).
#[derive(Debug)]
pub struct Auth {
    table: RwLock<Arc<TokenTable>>,
    files: (Option<PathBuf>, Option<PathBuf>),
}

impl Auth {
    /// Reads the files once; fails (the server does not start) when they are wrong.
    pub fn open(auth: Option<PathBuf>, admin: Option<PathBuf>) -> crate::Result<Auth> {
        let table = TokenTable::read(auth.as_deref(), admin.as_deref())?;
        Ok(Auth { table: RwLock::new(Arc::new(table)), files: (auth, admin) })
    }

    /// The tokens in force. (A writer that panicked cannot leave the table half-written: it
    /// only swaps an `Arc`; so a poisoned lock still holds a whole table, never "auth off".)
    pub fn table(&self) -> Arc<TokenTable> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the files; on an error the tokens in force stay and the error is returned.
    pub fn reload(&self) -> crate::Result<()> {
        let table = TokenTable::read(self.files.0.as_deref(), self.files.1.as_deref())?;
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table);
        }
        Ok(())
    }

    /// Re-reads the files on every SIGHUP until the process ends (errors are logged; the old
    /// tokens stay in force).
    pub fn reload_on_sighup(self: Arc<Self>) {
        if self.files.0.is_none() && self.files.1.is_none() {
            return;
        }
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: token files will not be re-read");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match self.reload() {
                    Ok(()) => tracing::info!("token files re-read"),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "token files not re-read; the old tokens stay")
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> TokenTable {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(&p, text).unwrap();
        TokenTable::read(Some(&p), None).unwrap()
    }

    fn caller(t: &TokenTable, token: &str) -> Caller {
        match t.lookup(Some(token)) {
            Lookup::Caller(c) => c,
            Lookup::Unknown => panic!("{token} unknown"),
        }
    }

    #[test]
    fn scopes_by_prefix_and_action() {
        let t = table("# comment\nci lock:deploy/ read:*\ndash read:*\nops admin:*\nlegacy   # all\nnarrow read:a* lock:b/\n");
        let ci = caller(&t, "ci");
        assert!(
            ci.may(Action::Lock, "deploy/web")
                && !ci.may(Action::Lock, "db/x")
                && ci.may(Action::Read, "db/x")
        );
        assert!(!ci.may(Action::Admin, "deploy/web"));
        let dash = caller(&t, "dash");
        assert!(dash.may(Action::Read, "x") && !dash.may(Action::Lock, "x"));
        let ops = caller(&t, "ops");
        assert!(ops.may(Action::Admin, "x") && !ops.may(Action::Lock, "x") && !ops.may(Action::Read, "x"));
        let legacy = caller(&t, "legacy");
        assert!(
            legacy.may(Action::Lock, "x") && legacy.may(Action::Read, "x") && !legacy.may(Action::Admin, "x")
        );
        let narrow = caller(&t, "narrow");
        assert_eq!(narrow.readable_prefixes(), Some(vec!["a", "b/"]));
        assert!(narrow.may(Action::Read, "b/1"), "a lock scope reads its own keys");
        assert!(matches!(t.lookup(Some("nobody")), Lookup::Unknown));
        assert!(matches!(t.lookup(None), Lookup::Unknown));
        assert!(t.any_admin());
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(&p, "good\nbad write:x\n").unwrap();
        let e = format!("{:#}", TokenTable::read(Some(&p), None).unwrap_err());
        assert!(e.contains(":2") && e.contains("write"), "{e}");
        std::fs::write(&p, "# nothing\n").unwrap();
        assert!(TokenTable::read(Some(&p), None).is_err());
        std::fs::write(&p, "t lock:a*b\n").unwrap();
        assert!(TokenTable::read(Some(&p), None).is_err());
    }

    #[test]
    fn a_hash_inside_a_token_is_part_of_it() {
        let t = table("Xy#9secret lock:a/  # comment\n#whole line\n");
        assert!(matches!(t.lookup(Some("Xy")), Lookup::Unknown));
        assert!(caller(&t, "Xy#9secret").may(Action::Lock, "a/1"));
    }

    #[test]
    fn admin_file_lines_may_narrow_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, admin) = (dir.path().join("tokens"), dir.path().join("admins"));
        std::fs::write(&auth, "user\n").unwrap();
        std::fs::write(&admin, "ops admin:deploy/\nroot\n").unwrap();
        let t = TokenTable::read(Some(&auth), Some(&admin)).unwrap();
        assert!(
            caller(&t, "ops").may(Action::Admin, "deploy/x") && !caller(&t, "ops").may(Action::Admin, "db/x")
        );
        assert!(caller(&t, "root").may(Action::Admin, "db/x"));
        std::fs::write(&admin, "ops lock:*\n").unwrap();
        assert!(TokenTable::read(Some(&auth), Some(&admin)).is_err());
    }

    #[test]
    fn a_token_in_both_files_gets_both() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, admin) = (dir.path().join("tokens"), dir.path().join("admins"));
        std::fs::write(&auth, "user\nboth\n").unwrap();
        std::fs::write(&admin, "both\n").unwrap();
        let t = TokenTable::read(Some(&auth), Some(&admin)).unwrap();
        let both = caller(&t, "both");
        assert!(both.may(Action::Lock, "k") && both.may(Action::Admin, "k"));
        assert!(!caller(&t, "user").may(Action::Admin, "k"));
    }

    #[test]
    fn auth_off_allows_all_but_admin() {
        let t = TokenTable::default();
        let c = caller(&t, "anything");
        assert!(c.may(Action::Lock, "k") && !c.may(Action::Admin, "k"));
    }
}
