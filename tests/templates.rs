//! Templates as API objects (issue 12), on the backend the run targets:
//! the built-in template is registered (global, `tmpl_default`, also
//! reachable as `base`), a create names a template by id or name, and the
//! registry's errors (unknown, built-in delete) are clear.

use reqwest::{Method, StatusCode};
use sandforge_tests::Daemon;
use serde_json::{json, Value};

#[tokio::test]
async fn the_builtin_template_is_listed_and_reachable_by_id_name_and_alias() {
    let d = Daemon::start().await;
    let (s, list) = d.call(Method::GET, "/v1/templates", None).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let default = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "default")
        .cloned()
        .unwrap_or_else(|| panic!("no default template in {list}"));
    assert_eq!(default["id"], "tmpl_default");
    assert_eq!(default["status"], "ready");
    assert_eq!(default["builtin"], true);
    assert_eq!(default["aliases"], json!(["base"]));
    assert_eq!(default["source"]["type"], "builtin");
    assert!(
        default["size_bytes"].as_u64().unwrap() > 100 << 20,
        "{default}"
    );
    // Seed 002's paths too.
    for path in [
        "/templates/tmpl_default",
        "/v1/templates/default",
        "/v1/templates/base",
    ] {
        let (s, t) = d.call(Method::GET, path, None).await;
        assert_eq!(
            (s, &t["id"]),
            (StatusCode::OK, &json!("tmpl_default")),
            "{path}: {t}"
        );
    }
    // Another organization sees the built-in one too.
    let other = d.token_for("other-org");
    let (s, t) = d
        .call_as(&other, Method::GET, "/v1/templates/base", None)
        .await;
    assert_eq!((s, &t["id"]), (StatusCode::OK, &json!("tmpl_default")));

    // A create by id, by name and by alias: all the default template.
    for body in [
        json!({"template_id": "tmpl_default"}),
        json!({"template": "base"}),
        json!({"template": "default"}),
    ] {
        let sb: Value = d.create(body.clone()).await;
        let id = sb["id"].as_str().unwrap();
        assert_eq!(sb["template"], "default", "{body}: {sb}");
        assert_eq!(d.sh_ok(id, "test -x /bin/bash && echo ok").await, "ok\n");
        d.destroy(id).await;
    }

    // Errors.
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"template": "nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["field"], "template");
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"template_id": "tmpl_nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = d.call(Method::GET, "/v1/templates/tmpl_nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = d.call(Method::DELETE, "/v1/templates/default", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = d.call(Method::GET, "/v1/templates", None).await;
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == "tmpl_default"),
        "{s} {v}"
    );
}
