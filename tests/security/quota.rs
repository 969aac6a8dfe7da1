//! Item 8 of issue 11: the quota race. Concurrent creates in one
//! organization must never hold more than `max_sandboxes_per_org` live
//! sandboxes (before, 100 concurrent creates all got 201 with a limit of
//! 64), concurrent creates under one name get exactly one sandbox, and a
//! fork from a snapshot counts against the same quota.

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use sandforge_tests::{vm, Attempts, Daemon};
use serde_json::{json, Value};

async fn creates(d: &Daemon, bodies: Vec<Value>) -> Vec<(StatusCode, Value)> {
    join_all(
        bodies
            .into_iter()
            .map(|b| d.call(Method::POST, "/v1/sandboxes", Some(b))),
    )
    .await
}

async fn live(d: &Daemon) -> Vec<String> {
    {
        let (s, v) = d.call(Method::GET, "/v1/sandboxes", None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let list = v
            .get("sandboxes")
            .or(Some(&v))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        list.iter()
            .filter(|s| s["status"] != "destroyed")
            .filter_map(|s| s["id"].as_str().map(String::from))
            .collect()
    }
}

#[tokio::test]
async fn concurrent_creates_never_exceed_the_quota_or_share_a_name() {
    let limit: usize = if vm() { 2 } else { 5 };
    let d = Daemon::start_with_config(&[], &format!("max_sandboxes_per_org: {limit}")).await;
    let mut a = Attempts::new("quota: concurrent creates beyond the limit");

    let answers = creates(&d, vec![json!({"network": "offline"}); 100]).await;
    let created: Vec<String> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .filter_map(|(_, v)| v["id"].as_str().map(String::from))
        .collect();
    a.record(
        created.len() <= limit,
        format!(
            "{} of 100 creates got 201 with a limit of {limit}",
            created.len()
        ),
    );
    for (s, v) in answers.iter().filter(|(s, _)| *s != StatusCode::CREATED) {
        a.record(
            *s == StatusCode::TOO_MANY_REQUESTS && v["error"]["code"] == "quota_exceeded",
            format!("a refused create answered {s} {v}"),
        );
    }
    assert_eq!(created.len(), limit, "the quota itself must admit {limit}");
    let now_live = live(&d).await;
    a.record(
        now_live.len() <= limit,
        format!("{} live sandboxes listed", now_live.len()),
    );

    // A fork from a snapshot is a create too.
    let (s, snap) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{}/snapshots", created[0]),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{snap}");
    let forks = creates(
        &d,
        vec![json!({"snapshot_id": snap["id"], "isolation": sandforge_tests::isolation()}); 4],
    )
    .await;
    for (s, v) in &forks {
        a.record(
            *s == StatusCode::TOO_MANY_REQUESTS,
            format!("a fork beyond the quota answered {s} {v}"),
        );
    }
    for id in created.iter().chain(
        forks
            .iter()
            .filter_map(|(s, v)| {
                (*s == StatusCode::CREATED)
                    .then(|| v["id"].as_str())
                    .flatten()
            })
            .map(String::from)
            .collect::<Vec<_>>()
            .iter(),
    ) {
        d.destroy(id).await;
    }

    // One name, many concurrent creates: exactly one sandbox.
    let answers = creates(&d, vec![json!({"network": "offline", "name": "twin"}); 20]).await;
    let twins: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .map(|(_, v)| v)
        .collect();
    a.record(
        twins.len() == 1,
        format!("{} sandboxes named 'twin'", twins.len()),
    );
    for (s, v) in answers.iter().filter(|(s, _)| *s != StatusCode::CREATED) {
        a.record(
            *s == StatusCode::CONFLICT && v["error"]["field"] == "name",
            format!("a duplicate name answered {s} {v}"),
        );
    }
    for v in twins {
        d.destroy(v["id"].as_str().unwrap()).await;
    }
    a.finish();
}
