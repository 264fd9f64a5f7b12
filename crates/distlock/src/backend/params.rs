//! The parameters of a backend URL (`…?name=value&name=value`), read with one rule for every
//! backend: a name the backend does not know, a name without a value and a name given twice are
//! each [`Error::InvalidInput`], naming the parameter (and, for an unknown one, the names the
//! backend knows). Values are taken as written (no percent-decoding), and never echoed back in a
//! message unless they fail to parse: a URL may carry a token or a password.

use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// The parameters of one URL, checked against the names its backend knows.
#[derive(Debug)]
pub(crate) struct Params<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Params<'a> {
    /// Splits `url` at its `?` and reads the query; returns the part before it and the
    /// parameters.
    pub(crate) fn split(url: &'a str, known: &[&str]) -> Result<(&'a str, Params<'a>)> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        Ok((base, Params::parse(query, known)?))
    }

    /// Reads `query` (what follows the `?`) for a backend whose parameters are `known`.
    pub(crate) fn parse(query: &'a str, known: &[&str]) -> Result<Params<'a>> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !known.contains(&name) {
                let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
                return Err(Error::InvalidInput(format!(
                    "unknown URL parameter {name:?}; this backend knows: {known}"
                )));
            }
            if value.is_empty() {
                return Err(Error::InvalidInput(format!("URL parameter {name} has no value ({name}=…)")));
            }
            if pairs.iter().any(|(n, _)| *n == name) {
                return Err(Error::InvalidInput(format!("URL parameter {name} is given more than once")));
            }
            pairs.push((name, value));
        }
        Ok(Params { pairs })
    }

    /// The value of `name`, if given.
    pub(crate) fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// The value of `name` as an owned string, if given.
    pub(crate) fn string(&self, name: &str) -> Option<String> {
        self.get(name).map(str::to_owned)
    }

    /// The value of `name` as a duration above zero (`2s`, `500ms`, `7days`), if given.
    pub(crate) fn duration(&self, name: &str) -> Result<Option<Duration>> {
        self.get(name)
            .map(|v| {
                humantime::parse_duration(v).ok().filter(|d| !d.is_zero()).ok_or_else(|| {
                    Error::InvalidInput(format!("{name}={v:?} is not a duration like 2s or 500ms"))
                })
            })
            .transpose()
    }

    /// The value of `name` parsed as a `T` that `ok` accepts, if given; otherwise an error
    /// saying it must be `what`.
    pub(crate) fn value<T: FromStr>(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&T) -> bool,
    ) -> Result<Option<T>> {
        self.get(name)
            .map(|v| {
                v.parse::<T>()
                    .ok()
                    .filter(&ok)
                    .ok_or_else(|| Error::InvalidInput(format!("{name}={v:?} must be {what}")))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["prefix", "timeout"];

    fn invalid(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn known_parameters_are_read() {
        let p = Params::parse("prefix=a&timeout=500ms&", KNOWN).unwrap();
        assert_eq!(p.get("prefix"), Some("a"));
        assert_eq!(p.duration("timeout").unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(Params::parse("", KNOWN).unwrap().get("prefix"), None);
        let (base, p) = Params::split("redis://h:1/2?prefix=x", KNOWN).unwrap();
        assert_eq!((base, p.get("prefix")), ("redis://h:1/2", Some("x")));
    }

    #[test]
    fn an_unknown_parameter_is_refused_naming_it_and_the_known_ones() {
        let m = invalid(Params::parse("prefix=a&timout=2s", KNOWN));
        assert!(m.contains("\"timout\"") && m.contains("prefix, timeout"), "{m}");
        let m = invalid(Params::parse("x=1", &[]));
        assert!(m.contains("\"x\"") && m.contains("none"), "{m}");
    }

    #[test]
    fn an_empty_value_is_refused() {
        for query in ["prefix=", "prefix", "timeout=&prefix=a"] {
            let m = invalid(Params::parse(query, KNOWN));
            assert!(m.contains("has no value"), "{query}: {m}");
        }
    }

    #[test]
    fn a_repeated_parameter_is_refused() {
        let m = invalid(Params::parse("prefix=a&prefix=b", KNOWN));
        assert!(m.contains("prefix") && m.contains("more than once"), "{m}");
    }

    #[test]
    fn values_that_do_not_parse_are_refused_and_the_message_shows_them() {
        let p = Params::parse("timeout=0s&prefix=x", KNOWN).unwrap();
        assert!(invalid(p.duration("timeout")).contains("\"0s\""));
        let p = Params::parse("prefix=0.7", KNOWN).unwrap();
        let m = invalid(p.value::<f64>("prefix", "from 0 to 0.5", |f| (0.0..0.5).contains(f)));
        assert!(m.contains("prefix=\"0.7\" must be from 0 to 0.5"), "{m}");
    }

    /// Every backend's URL goes through the reader: the three rules hold for each scheme.
    #[tokio::test]
    async fn every_backend_url_follows_the_rules() {
        let mut urls = vec!["memory://?x=1".to_owned()];
        for (base, param) in [
            ("http://127.0.0.1:1", "timeout=2s"),
            ("redis://127.0.0.1:1", "prefix=p"),
            ("redis-cluster://127.0.0.1:1", "prefix=p"),
            ("redis-sentinel://127.0.0.1:1/m", "min_replicas=1"),
            ("redlock://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", "drift=0.02"),
            ("etcd://127.0.0.1:1", "prefix=p"),
        ] {
            let name = param.split('=').next().unwrap_or_default();
            urls.push(format!("{base}?{param}&bogus=1"));
            urls.push(format!("{base}?{name}="));
            urls.push(format!("{base}?{param}&{param}"));
        }
        for url in urls {
            let scheme = url.split("://").next().unwrap_or_default();
            if !crate::backend::SCHEMES.contains(&format!("{scheme}://")) {
                continue;
            }
            match crate::backend::open(&url).await {
                Err(Error::InvalidInput(m)) => {
                    assert!(
                        m.contains("bogus")
                            || m.contains("\"x\"")
                            || m.contains("no value")
                            || m.contains("more than once"),
                        "{url}: {m}"
                    )
                }
                Err(e) => panic!("{url}: expected InvalidInput, got {e}"),
                Ok(_) => panic!("{url}: opened"),
            }
        }
    }
}
