//! Bad input answers 4xx with `{"error":{"code","message"}}` naming the
//! field; never a 500, never a hang.

use std::io::{Read, Write};

use reqwest::{Method, StatusCode};
use sandforge_tests::{Daemon, TOKEN};
use serde_json::{json, Value};

fn assert_error(status: StatusCode, v: &Value, want: StatusCode, code: &str, mentions: &str) {
    assert_eq!(status, want, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(mentions),
        "message {msg:?} should mention {mentions:?}"
    );
}

#[tokio::test]
async fn create_rejects_bad_bodies() {
    let d = Daemon::start().await;
    let cases: Vec<(Value, StatusCode, &str, &str)> = vec![
        (
            json!({"cpu": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "cpu",
        ),
        (
            json!({"cpu": 1000}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "cpu",
        ),
        (
            json!({"cpu": 1, "cpus": 2}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "cpus",
        ),
        (
            json!({"memory_mb": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "memory_mb",
        ),
        (
            json!({"memory_mb": "lots"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "memory_mb",
        ),
        (
            json!({"memory_mb": -5}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "memory_mb",
        ),
        (
            json!({"network": "wifi"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "network",
        ),
        (
            json!({"bogus": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "bogus",
        ),
        (
            json!({"name": "../x"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "name",
        ),
        (
            json!({"env": {"1X": "y"}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "env.1X",
        ),
        (
            json!({"template": "nope"}),
            StatusCode::NOT_FOUND,
            "template_not_found",
            "template",
        ),
        (
            json!({"isolation": "vmware"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "isolation",
        ),
        (
            json!({"mounts": [{"host_path": "/etc", "guest_path": "/w"}]}),
            StatusCode::FORBIDDEN,
            "forbidden",
            "mounts[0].host_path",
        ),
        (
            json!({"mounts": [{"host_path": "/no/such/dir", "guest_path": "/w"}]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "mounts[0].host_path",
        ),
        (
            json!({"mounts": [{"host_path": "/tmp", "guest_path": "relative"}]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "mounts[0].guest_path",
        ),
        (
            json!({"mounts": [{"host_path": "/tmp", "guest_path": "/proc/x"}]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "mounts[0].guest_path",
        ),
        (
            json!([1, 2]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body",
        ),
        (
            json!({"disk_mb": 10}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "disk_mb",
        ),
        (
            json!({"isolation": "container", "disk_mb": 300000}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "disk_mb",
        ),
        (
            // Smaller than the template's image (about 1 GB).
            json!({"isolation": "microvm", "disk_mb": 300}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "disk_mb",
        ),
        (
            json!({"isolation": "hypervisor"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "isolation",
        ),
    ];
    for (body, status, code, mentions) in cases {
        let (s, v) = d
            .call(Method::POST, "/v1/sandboxes", Some(body.clone()))
            .await;
        assert_error(s, &v, status, code, mentions);
    }
    // Not JSON at all, and JSON under the wrong media type.
    let r = d
        .req(Method::POST, "/v1/sandboxes")
        .header("content-type", "application/json")
        .body("{\"cpu\": ")
        .send()
        .await
        .unwrap();
    let (s, v) = (r.status(), r.json::<Value>().await.unwrap());
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_json", "JSON");
    let r = d
        .req(Method::POST, "/v1/sandboxes")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (s, v) = (r.status(), r.json::<Value>().await.unwrap());
    assert_error(
        s,
        &v,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "Content-Type",
    );
    // Nothing was created by any of it.
    let (_, list) = d
        .call(Method::GET, "/v1/sandboxes?status=failed", None)
        .await;
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn exec_and_lookup_errors() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    let exec = |body: Value, path: &'static str| {
        let d = &d;
        let id = id.clone();
        async move {
            d.call(
                Method::POST,
                &format!("/v1/sandboxes/{id}/{path}"),
                Some(body),
            )
            .await
        }
    };
    let (s, v) = exec(json!({}), "execute").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request", "command");
    let (s, v) = exec(
        json!({"command": "true", "timeout_seconds": 301}),
        "execute",
    )
    .await;
    assert_error(
        s,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "timeout_seconds",
    );
    let (s, v) = exec(json!({"command": "true", "timeout_seconds": 0}), "execute").await;
    assert_error(
        s,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "timeout_seconds",
    );
    let (s, v) = exec(json!({"command": "true", "cwd": "tmp"}), "execute").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request", "cwd");
    let (s, v) = exec(json!({"command": 5}), "execute").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request", "command");
    let (s, v) = exec(json!({"cmd": []}), "exec").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request", "cmd");
    let (s, v) = exec(json!({"cmd": "echo hi"}), "exec").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request", "cmd");

    let (s, v) = d.call(Method::GET, "/v1/sandboxes/sb_nope", None).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "sb_nope");
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes/sb_nope/execute",
            Some(json!({"command": "true"})),
        )
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "sb_nope");
    let (s, v) = d
        .call(Method::GET, "/v1/sandboxes?status=sideways", None)
        .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_request", "status");
    let (s, v) = d.call(Method::GET, "/v1/nothing-here", None).await;
    assert_error(
        s,
        &v,
        StatusCode::NOT_FOUND,
        "not_found",
        "/v1/nothing-here",
    );
    let (s, v) = d.call(Method::PATCH, "/v1/sandboxes", None).await;
    assert_error(
        s,
        &v,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "PATCH",
    );
    d.destroy(&id).await;
}

#[tokio::test]
async fn oversized_and_lengthless_uploads_are_refused_without_reading_them() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    // A raw request that announces 200 MB and sends nothing: the answer must
    // come at once from the headers alone.
    let raw = |head: String| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let resp = raw(format!(
        "PUT /v1/sandboxes/{id}/files?path=/tmp/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 200000000\r\n\r\n"
    ));
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("too_large"), "{resp}");
    let resp = raw(format!(
        "PUT /v1/sandboxes/{id}/files?path=/tmp/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ));
    assert!(resp.starts_with("HTTP/1.1 411"), "{resp}");
    assert!(resp.contains("length_required"), "{resp}");
    d.destroy(&id).await;
}

/// A config with one bad key makes `sandforge serve` exit non-zero before
/// it listens, with a message naming the key (issue 11, item 14).
#[tokio::test]
async fn an_invalid_config_refuses_to_start_naming_the_key() {
    for (bad, key) in [
        ("network_prefix: q163", "network_prefix"),
        ("network_subnet: 10.1.2.0/30", "network_subnet"),
        ("nft_table: \"t; flush ruleset\"", "nft_table"),
        ("dns_upstream: not-an-address", "dns_upstream"),
        ("pids_limit: lots", "pids_limit"),
        ("monitor_interval_secs: 0", "monitor_interval_secs"),
        ("max_connections: -3", "max_connections"),
        ("publish_listen: localhost", "publish_listen"),
        (
            "listen: 127.0.0.1:9\npublish_listen: 127.0.0.1:9",
            "publish_listen",
        ),
        ("default_network: wifi", "default_network"),
        ("template_dir: relative", "template_dir"),
        ("vm_uid_base: 7", "vm_uid_base"),
        ("lifecycle_interval_ms: 0", "lifecycle_interval_ms"),
        ("dns_hosts: {\"no such name\": 10.0.0.1}", "dns_hosts"),
    ] {
        let (status, stderr) = Daemon::refused(bad);
        assert!(!status.success(), "{bad}: exited with {status}");
        assert!(
            stderr.contains(&format!("config: {key}")),
            "{bad}: stderr should name {key}: {stderr}"
        );
    }
}

/// A daemon on a host without sandbox networking runs offline sandboxes,
/// but a create or PATCH asking for a network answers 400
/// `network_unavailable` naming the field, never 201 with an offline
/// sandbox (issue 11, item 14).
#[tokio::test]
async fn without_networking_asking_for_it_is_refused_naming_the_field() {
    let d = Daemon::start_with_env(&[], "", &[("SANDFORGE_NETWORK_UNAVAILABLE", "1")]).await;
    assert!(
        d.log().contains("sandbox networking unavailable"),
        "{}",
        d.log()
    );
    let policy = json!({"mode": "deny_all", "allow_cidrs": ["1.1.1.1/32"]});
    let seed3 = json!({"enabled": true, "allowed_domains": ["example.com"]});
    for (body, field) in [
        (json!({"network": "nat"}), "network"),
        (json!({"egress": policy}), "egress"),
        (json!({"network_policy": seed3}), "network_policy"),
        (json!({"network": "nat", "egress": policy}), "network"),
    ] {
        let (s, v) = d
            .call(Method::POST, "/v1/sandboxes", Some(body.clone()))
            .await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "network_unavailable", field);
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    let (_, list) = d.call(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // A create that does not ask gets an offline sandbox; a policy for it is
    // refused naming the spelling used.
    let sb = d.create(json!({})).await;
    assert_eq!(sb["network"], "offline", "{sb}");
    let id = sb["id"].as_str().unwrap();
    for (body, field) in [
        (json!({"egress": policy}), "egress"),
        (json!({"network_policy": seed3}), "network_policy"),
    ] {
        let (s, v) = d
            .call(Method::PATCH, &format!("/v1/sandboxes/{id}"), Some(body))
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        assert_eq!(v["error"]["field"], field, "{v}");
    }
    d.destroy(id).await;
}
