//! The served OpenAPI document (`openapi.json`) against the types the server and the client
//! really use ([`distlock::wire`], [`distlock::ErrorCode`]): every error code is in the spec's
//! code enum, and every wire body has exactly the properties of its schema. The spec is written
//! by hand, so a renamed field or a new code fails here until the spec says the same.

use std::collections::BTreeSet;
use std::time::Duration;

use distlock::wire::{
    AcquireBody, BatchAnswer, BatchBody, BatchOp, BatchResult, ErrorBody, ErrorDetail, Event, EventKind,
    EventPage, ForceReleased, Health, Info, LeaseBody, LockInfo, LockPage, ProclaimBody, ReleaseBody,
    Released, RenewBody, Span, SpanEnd, SpanKind, Timeline, WaiterInfo, Waiters,
};
use distlock::{ErrorCode, LockMode};
use serde::Serialize;
use serde_json::Value;

fn spec() -> Value {
    serde_json::from_str(super::OPENAPI).expect("openapi.json is JSON")
}

/// The schema `name` of `components.schemas`.
fn schema<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec.pointer(&format!("/components/schemas/{name}")).unwrap_or_else(|| panic!("no schema {name}"))
}

/// The property names of a schema: its own and those of the schemas it is made of
/// (`$ref`, `oneOf`, `anyOf`, `allOf`).
fn properties(spec: &Value, schema: &Value) -> BTreeSet<String> {
    if let Some(name) = schema.get("$ref").and_then(Value::as_str) {
        return properties(spec, self::schema(spec, name.trim_start_matches("#/components/schemas/")));
    }
    let mut names: BTreeSet<String> = schema
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect();
    for part in ["oneOf", "anyOf", "allOf"] {
        for sub in schema.get(part).and_then(Value::as_array).into_iter().flatten() {
            names.extend(properties(spec, sub));
        }
    }
    names
}

/// The field names `samples` are written with (every optional field set in at least one).
fn fields<T: Serialize>(samples: &[T]) -> BTreeSet<String> {
    samples
        .iter()
        .flat_map(|s| match serde_json::to_value(s).unwrap() {
            Value::Object(map) => map.into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
            other => panic!("not an object: {other}"),
        })
        .collect()
}

fn same<T: Serialize>(spec: &Value, schema_name: &str, samples: &[T]) {
    assert_eq!(
        fields(samples),
        properties(spec, schema(spec, schema_name)),
        "{} against the schema {schema_name}",
        std::any::type_name::<T>()
    );
}

#[test]
fn every_error_code_is_in_the_spec() {
    let spec = spec();
    let codes = spec
        .pointer("/components/schemas/Error/properties/error/properties/code/enum")
        .and_then(Value::as_array)
        .expect("the Error schema's code enum");
    let in_spec: BTreeSet<&str> = codes.iter().filter_map(Value::as_str).collect();
    let in_code: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(in_spec, in_code);
}

#[test]
fn every_wire_body_has_the_properties_of_its_schema() {
    let spec = spec();
    let lease_id = || "9f1c".to_owned();
    same(
        &spec,
        "AcquireRequest",
        &[AcquireBody {
            ttl_ms: Some(1),
            wait_ms: Some(0),
            holder: Some("h".into()),
            limit: Some(2),
            mode: Some(LockMode::Shared),
            value: Some("10.0.0.7:8080".into()),
        }],
    );
    same(&spec, "RenewRequest", &[RenewBody { lease_id: lease_id(), ttl_ms: Some(1) }]);
    same(&spec, "ReleaseRequest", &[ReleaseBody { lease_id: lease_id() }]);
    same(&spec, "ProclaimRequest", &[ProclaimBody { lease_id: lease_id(), value: "v".into() }]);
    let lease =
        LeaseBody { key: "k".into(), lease_id: lease_id(), fencing_token: 1, ttl_ms: 1, waited_ms: 0 };
    same(&spec, "Lease", &[lease]);
    same(&spec, "Released", &[Released { key: "k".into(), released: true }]);
    let forced = ForceReleased { key: "k".into(), released: true, holder: "h".into(), fencing_token: 1 };
    same(&spec, "ForceReleased", &[forced]);
    let info = Info {
        store: "embedded".into(),
        version: "0".into(),
        uptime_s: 0,
        leases: None,
        waiters: None,
        grants_total: 0,
        auth: false,
        force_release: false,
    };
    same(&spec, "Info", &[info]);
    let health = |status: &str, store: Option<&str>, error: Option<&str>| Health {
        status: status.into(),
        store: store.map(Into::into),
        error: error.map(Into::into),
    };
    let answer = |path: &str, status: &str| {
        properties(
            &spec,
            &spec["paths"][path]["get"]["responses"][status]["content"]["application/json"]["schema"],
        )
    };
    assert_eq!(fields(&[health("ok", Some("embedded"), None)]), answer("/healthz", "200"));
    assert_eq!(fields(&[health("unavailable", Some("redis"), Some("down"))]), answer("/healthz", "503"));
    assert_eq!(fields(&[health("ok", None, None)]), answer("/livez", "200"));
    let info = LockInfo {
        held_for: Some(Duration::ZERO),
        ttl: Some(Duration::ZERO),
        limit: Some(2),
        mode: Some(LockMode::Shared),
        holders: vec![distlock::HolderInfo {
            holder: "h".into(),
            fencing_token: 1,
            expires_in: Duration::ZERO,
        }],
        value: Some("10.0.0.7:8080".into()),
        ..LockInfo::free("k", 0)
    };
    same(&spec, "LockInfo", std::slice::from_ref(&info));
    same(&spec, "Holder", &info.holders);
    same(&spec, "LockList", &[LockPage::default()]);
    let waiter = WaiterInfo { holder: "h".into(), waiting: Duration::ZERO };
    same(&spec, "Waiter", std::slice::from_ref(&waiter));
    same(&spec, "WaiterList", &[Waiters { key: "k".into(), waiters: vec![waiter] }]);
    let detail = ErrorDetail {
        code: "lock_held".into(),
        message: "m".into(),
        holder: Some("h".into()),
        limit: Some(2),
    };
    same(&spec, "Error", &[ErrorBody { error: detail.clone() }]);
    assert_eq!(fields(&[detail]), properties(&spec, &schema(&spec, "Error")["properties"]["error"]));
    let ops = [
        BatchOp::Acquire {
            key: "k".into(),
            ttl_ms: Some(1),
            wait_ms: Some(0),
            holder: Some("h".into()),
            limit: Some(2),
            mode: Some(LockMode::Shared),
            value: Some("v".into()),
        },
        BatchOp::Renew { key: "k".into(), lease_id: lease_id(), ttl_ms: Some(1) },
        BatchOp::Release { key: "k".into(), lease_id: lease_id() },
    ];
    // BatchOp is any object in the spec (each operation is read alone, a malformed one fails in
    // its own result); its three shapes are the schemas BatchAcquire, BatchRenew, BatchRelease.
    let shapes: BTreeSet<String> = ["BatchAcquire", "BatchRenew", "BatchRelease"]
        .iter()
        .flat_map(|name| properties(&spec, schema(&spec, name)))
        .collect();
    assert_eq!(fields(&ops), shapes, "distlock::wire::BatchOp against BatchAcquire/Renew/Release");
    same(&spec, "BatchRequest", &[BatchBody::<BatchOp> { ops: Vec::new() }]);
    let result = || BatchResult { status: 200, body: serde_json::value::to_raw_value(&()).unwrap() };
    same(&spec, "BatchResult", &[result()]);
    same(&spec, "BatchResults", &[BatchAnswer { results: vec![result()] }]);
}

/// The web page's data: the events of the live stream and of `GET /v1/events?since=`, and a
/// key's timeline, with every optional field set. Each enum's names are the schema's enum.
#[test]
fn the_web_pages_data_has_the_properties_of_its_schemas() {
    let spec = spec();
    let event = Event {
        id: 1,
        kind: EventKind::Grant,
        key: "k".to_string(),
        holder: Some("h".into()),
        fencing_token: Some(1),
        at_ms: 1,
        held_ms: Some(1),
        waited_ms: Some(1),
    };
    same(&spec, "Event", std::slice::from_ref(&event));
    let page = EventPage {
        events: vec![event],
        next: 1,
        more: false,
        missed: false,
        oldest_id: 1,
        event_history: 1,
    };
    same(&spec, "EventPage", &[page]);
    let span = Span {
        id: 1,
        key: "k".to_string(),
        kind: SpanKind::Hold,
        holder: Some("h".into()),
        fencing_token: Some(1),
        start_ms: 1,
        end_ms: Some(2),
        end: Some(SpanEnd::Release),
        waited_ms: Some(1),
    };
    same(&spec, "Span", std::slice::from_ref(&span));
    same(
        &spec,
        "Timeline",
        &[Timeline { key: "k".into(), spans: vec![span], timeline_from_ms: 0, now_ms: 1 }],
    );

    let names =
        |v: Vec<Value>| v.iter().filter_map(|v| v.as_str().map(String::from)).collect::<BTreeSet<_>>();
    let spec_enum = |pointer: &str| {
        names(
            spec.pointer(pointer)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_else(|| panic!("no enum {pointer}")),
        )
    };
    let ours = |values: Vec<Value>| names(values);
    use EventKind as K;
    let kinds = [
        K::Grant,
        K::Release,
        K::Expiry,
        K::Lost,
        K::Wait,
        K::WaitTimeout,
        K::ForceRelease,
        K::WaitCancelled,
    ];
    assert_eq!(
        ours(kinds.iter().map(|k| serde_json::to_value(k).unwrap()).collect()),
        spec_enum("/components/schemas/Event/properties/kind/enum")
    );
    let spans = [SpanKind::Hold, SpanKind::Wait, SpanKind::Mark];
    assert_eq!(
        ours(spans.iter().map(|k| serde_json::to_value(k).unwrap()).collect()),
        spec_enum("/components/schemas/Span/properties/kind/enum")
    );
    use SpanEnd as E;
    let ends =
        [E::Release, E::Expiry, E::Lost, E::ForceRelease, E::Unseen, E::Granted, E::Timeout, E::Cancelled];
    assert_eq!(
        ours(ends.iter().map(|k| serde_json::to_value(k).unwrap()).collect()),
        spec_enum("/components/schemas/Span/properties/end/enum")
    );
}
