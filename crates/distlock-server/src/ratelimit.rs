//! `--rate-limit N/s`: a token bucket per caller in front of the `/v1/*` API. Over the limit a
//! request is answered at once with 429 `limit_exceeded` and `Retry-After`, before it reaches
//! auth or the store.
//!
//! The caller is the bearer token when the server checks tokens (the `Authorization` header's
//! value, kept only as a keyed hash and never logged), else the client's IP address. Each bucket
//! holds up to 2N requests and refills at N per second. `/healthz`, `/metrics` and the web page
//! are not limited. A batch counts as one request.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use distlock::ErrorCode;

use crate::http::ApiError;

/// Buckets kept before full ones (callers quiet long enough to be back at the burst) are swept.
const SWEEP_AT: usize = 10_000;
/// Most buckets: past it (after a sweep) new callers share one bucket, so a flood of made-up
/// tokens cannot grow memory without bound (callers that already have a bucket keep it).
const MAX_BUCKETS: usize = 100_000;

/// Requests per second allowed to one caller (`--rate-limit`), written `N/s` or `N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Refill rate, requests per second; the burst is twice this.
    pub per_second: u32,
}

impl FromStr for RateLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<RateLimit, String> {
        let n = s.trim().strip_suffix("/s").unwrap_or(s.trim());
        match n.parse::<u32>() {
            Ok(per_second) if per_second > 0 => Ok(RateLimit { per_second }),
            _ => Err(format!("{s:?} is not a rate like 100/s (requests per second, more than 0)")),
        }
    }
}

/// Whose bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Caller {
    /// A keyed hash of the `Authorization` header (the token itself is not kept).
    Token(u64),
    Ip(IpAddr),
    /// Every new caller while [`MAX_BUCKETS`] are in use shares this one.
    Overflow,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of every caller.
pub struct Limiter {
    rate: f64,
    burst: f64,
    /// Key callers by token (auth on) rather than by IP.
    by_token: bool,
    hasher: RandomState,
    buckets: Mutex<(HashMap<Caller, Bucket>, Instant)>,
}

impl Limiter {
    /// A limiter allowing `limit` per second per caller with a burst of twice that; `by_token`
    /// when the server checks bearer tokens.
    pub fn new(limit: RateLimit, by_token: bool) -> Limiter {
        let rate = f64::from(limit.per_second);
        Limiter {
            rate,
            burst: 2.0 * rate,
            by_token,
            hasher: RandomState::new(),
            buckets: Mutex::new((HashMap::new(), Instant::now())),
        }
    }

    /// Takes one request from `caller`'s bucket: `Ok` if there was one, else how long until
    /// there is.
    fn take(&self, caller: Caller, now: Instant) -> Result<(), Duration> {
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (buckets, swept) = &mut *guard;
        let mut caller = caller;
        if !buckets.contains_key(&caller) && buckets.len() >= SWEEP_AT {
            if now.duration_since(*swept) >= Duration::from_secs(1) {
                let (rate, burst) = (self.rate, self.burst);
                buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
                *swept = now;
            }
            if buckets.len() >= MAX_BUCKETS {
                caller = Caller::Overflow;
            }
        }
        let bucket = buckets.entry(caller).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    fn caller(&self, req: &Request) -> Caller {
        if self.by_token {
            if let Some(value) = req.headers().get(header::AUTHORIZATION) {
                return Caller::Token(self.hasher.hash_one(value.as_bytes()));
            }
        }
        match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => Caller::Ip(addr.ip()),
            None => Caller::Ip(Ipv4Addr::UNSPECIFIED.into()),
        }
    }
}

/// `router` with the limiter in front of it.
pub fn layer(router: Router, limiter: Arc<Limiter>) -> Router {
    router.layer(middleware::from_fn_with_state(limiter, limit))
}

async fn limit(State(limiter): State<Arc<Limiter>>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    match limiter.take(limiter.caller(&req), Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            metrics::counter!("distlock_rate_limited_total").increment(1);
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let message = format!(
                "rate limit of {}/s (burst {}) exceeded; retry after {secs} s",
                limiter.rate, limiter.burst
            );
            let mut response = ApiError::new(ErrorCode::LimitExceeded, message).into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!("100/s".parse(), Ok(RateLimit { per_second: 100 }));
        assert_eq!("7".parse(), Ok(RateLimit { per_second: 7 }));
        for bad in ["0/s", "-1/s", "x", "10/m", ""] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn burst_of_twice_the_rate_then_the_rate() {
        let limiter = Limiter::new(RateLimit { per_second: 10 }, false);
        let caller = Caller::Ip(Ipv4Addr::LOCALHOST.into());
        let start = Instant::now();
        let granted = (0..100).filter(|_| limiter.take(caller, start).is_ok()).count();
        assert_eq!(granted, 20, "the burst is 2N");
        let wait = limiter.take(caller, start).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100), "{wait:?}");
        // One second later, ten more (the rate), and not eleven.
        let later = start + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| limiter.take(caller, later).is_ok()).count(), 10);
        // Other callers have buckets of their own.
        assert!(limiter.take(Caller::Ip(Ipv4Addr::BROADCAST.into()), later).is_ok());
    }

    #[test]
    fn buckets_stay_bounded() {
        let limiter = Limiter::new(RateLimit { per_second: 1 }, true);
        let now = Instant::now();
        for i in 0..(MAX_BUCKETS as u64 + 10) {
            let _ = limiter.take(Caller::Token(i), now);
        }
        let len = limiter.buckets.lock().unwrap().0.len();
        assert!(len <= MAX_BUCKETS + 1, "{len}");
    }
}
