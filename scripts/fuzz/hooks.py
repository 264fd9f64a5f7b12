"""Schemathesis hooks for scripts/fuzz-api.sh.

A waiting acquire blocks until the lock is free or its wait ends, and the fuzzer's holders never
release (their TTLs run up to 24 h): a generated `wait_ms` of minutes would hold a request open
past any sensible timeout. Valid waits over 1 s are clamped to 1 s; invalid ones (over the
documented 1 h, negative, not integers) are left as they are, so negative tests still send them.

One acquire rule OpenAPI 3.0 cannot state across fields: a shared lock takes no limit (the server
answers 400, as documented on `mode`). A valid limit above 1 beside `"mode": "shared"` is dropped;
invalid limits are left for the negative tests. A value's limit is 4096 bytes, which `maxLength`
(characters) cannot state: a longer string within maxLength is cut to its first 1024 characters
(at most 4096 bytes).
"""

import schemathesis

MAX_WAIT_MS = 3_600_000


def _clamp(obj):
    if isinstance(obj, dict):
        wait = obj.get("wait_ms")
        if isinstance(wait, int) and not isinstance(wait, bool) and 1_000 < wait <= MAX_WAIT_MS:
            obj["wait_ms"] = 1_000
        limit = obj.get("limit")
        valid_limit = isinstance(limit, int) and not isinstance(limit, bool) and 1 < limit <= 10_000
        if obj.get("mode") == "shared" and valid_limit:
            obj["limit"] = None
        value = obj.get("value")
        if isinstance(value, str) and len(value.encode("utf-8", "surrogatepass")) > 4096 >= len(value):
            obj["value"] = value[:1024]


@schemathesis.hook
def map_body(ctx, body):
    _clamp(body)
    if isinstance(body, dict) and isinstance(body.get("ops"), list):
        for op in body["ops"]:
            _clamp(op)
    return body


SORTED = ("held_for", "waiters")


@schemathesis.hook
def filter_query(ctx, query):
    """One rule of GET /v1/locks that OpenAPI 3.0 cannot state: with sort=held_for or waiters,
    `after` is the cursor the previous page of that sort answered (`SORT:VALUE:KEY`), and anything
    else is refused with 400 (documented in the parameter's description). Such a pair is left
    out rather than reported as a valid request refused."""
    if not isinstance(query, dict):
        return True
    sort, after = query.get("sort"), query.get("after")
    if sort in SORTED and isinstance(after, str) and after:
        parts = after.split(":", 2)
        return len(parts) == 3 and parts[0] == sort and parts[1].isdigit()
    return True


@schemathesis.hook
def map_query(ctx, query):
    """GET /v1/events without `since` is a server-sent event stream that never ends: each such
    request would be read until the request timeout. The fuzzer asks for the JSON page instead
    (`since=0`: every buffered event); the stream itself is tested by tests/web.rs and
    tests/history.rs."""
    operation = getattr(ctx, "operation", None)
    if operation is not None and getattr(operation, "path", None) == "/v1/events":
        if query is None:
            query = {}
        if isinstance(query, dict) and not query.get("since"):
            query["since"] = "0"
    return query
