//! File tests: put/get/head/ls, read windows, path rules, limits.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn files_roundtrip() {
    let h = start().await;
    let file = h.path("new/sub dir/a+b.txt");
    let q = format!("path={}&mode=0600", enc(&file));
    let resp = h.files(Method::PUT, &q, full("hello\nworld\n")).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "hello\nworld\n");

    let resp = h
        .files(Method::HEAD, &format!("path={}", enc(&file)), empty())
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[HDR_FILE_SIZE], "12");
    assert_eq!(resp.headers()[HDR_FILE_MODE], "0600");
    assert_eq!(resp.headers()[HDR_FILE_ISDIR], "false");
    let resp = h
        .files(
            Method::HEAD,
            &format!("path={}", enc(&h.path("new"))),
            empty(),
        )
        .await;
    assert_eq!(resp.headers()[HDR_FILE_ISDIR], "true");
    assert_eq!(resp.headers()[HDR_FILE_MODE], "0755");

    let resp = h
        .files(Method::GET, &format!("path={}", enc(&file)), empty())
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[HDR_FILE_SIZE], "12");
    assert_eq!(resp.headers()["content-length"], "12");
    assert!(resp.headers().get(HDR_TRUNCATED).is_none());
    assert_eq!(body_bytes(resp).await, "hello\nworld\n");

    // Overwrite: default mode 0644, new content, no temp files left behind.
    let resp = h
        .files(Method::PUT, &format!("path={}", enc(&file)), full("v2"))
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = h
        .files(Method::HEAD, &format!("path={}", enc(&file)), empty())
        .await;
    assert_eq!(resp.headers()[HDR_FILE_MODE], "0644");
    let resp = h
        .files(Method::GET, &format!("path={}", enc(&file)), empty())
        .await;
    assert_eq!(body_bytes(resp).await, "v2");

    // A bigger file streams both ways intact.
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let bigpath = h.path("new/big.bin");
    let resp = h
        .files(
            Method::PUT,
            &format!("path={}", enc(&bigpath)),
            full(big.clone()),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = h
        .files(Method::GET, &format!("path={}", enc(&bigpath)), empty())
        .await;
    assert_eq!(resp.headers()[HDR_FILE_SIZE], "5000000");
    assert!(body_bytes(resp).await == big);

    // Listing: sorted, lstat (a symlink to a directory is not a directory).
    std::os::unix::fs::symlink("/tmp", h.path("new/link")).unwrap();
    let resp = h
        .files(
            Method::GET,
            &format!("path={}&ls=true", enc(&h.path("new"))),
            empty(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let entries: Vec<DirEntry> = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["big.bin", "link", "sub dir"]);
    assert_eq!(
        (entries[0].size, entries[0].is_dir, entries[0].mode.as_str()),
        (5_000_000, false, "0644")
    );
    assert!(!entries[1].is_dir);
    assert!(entries[2].is_dir);
    assert!(entries[0].mtime > 1_600_000_000);
    assert!(entries.iter().all(|e| !e.truncated));
}

#[tokio::test(flavor = "multi_thread")]
async fn files_truncation() {
    let h = start().await;
    let file = h.path("lines.txt");
    std::fs::write(&file, "l1\nl2\nl3\nl4\n").unwrap();
    let get = |extra: &'static str| {
        let q = format!("path={}{extra}", enc(&file));
        let h = &h;
        async move {
            let resp = h.files(Method::GET, &q, empty()).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()[HDR_FILE_SIZE], "12");
            let truncated = resp
                .headers()
                .get(HDR_TRUNCATED)
                .is_some_and(|v| v == "true");
            let has_len = resp.headers().contains_key("content-length");
            assert_ne!(
                truncated, has_len,
                "content-length exactly when not truncated"
            );
            let body = body_bytes(resp).await;
            (String::from_utf8(body.to_vec()).unwrap(), truncated)
        }
    };
    assert_eq!(get("").await, ("l1\nl2\nl3\nl4\n".into(), false));
    assert_eq!(get("&offset=2&limit=2").await, ("l2\nl3\n".into(), true));
    assert_eq!(get("&offset=3").await, ("l3\nl4\n".into(), true));
    assert_eq!(get("&limit=1").await, ("l1\n".into(), true));
    assert_eq!(get("&max_bytes=4").await, ("l1\nl".into(), true));
    assert_eq!(
        get("&offset=2&limit=3&max_bytes=4").await,
        ("l2\nl".into(), true)
    );
    assert_eq!(
        get("&offset=4&limit=5&max_bytes=100").await,
        ("l4\n".into(), true)
    );
    assert_eq!(get("&limit=100").await, ("l1\nl2\nl3\nl4\n".into(), false));
    assert_eq!(
        get("&max_bytes=12").await,
        ("l1\nl2\nl3\nl4\n".into(), false)
    );
    assert_eq!(get("&offset=9").await, ("".into(), true));
}

#[tokio::test(flavor = "multi_thread")]
async fn files_errors() {
    let h = start().await;
    let q = |p: &str| format!("path={}", enc(p));
    for bad in ["relative/path", "/", "/tmp/../etc/passwd", ""] {
        let resp = h.files(Method::GET, &q(bad), empty()).await;
        assert_eq!(
            error_of(resp).await,
            (StatusCode::BAD_REQUEST, "invalid_path".into()),
            "{bad}"
        );
    }
    // A symlink to a magic link must not be a way out of the sandbox root.
    std::os::unix::fs::symlink("/proc/self/root", h.path("escape")).unwrap();
    let through = h.path("escape/etc/hostname");
    let resp = h.files(Method::GET, &q(&through), empty()).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "path_escape".into())
    );
    let resp = h
        .files(Method::GET, &q("/proc/self/root/etc/hostname"), empty())
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "path_escape".into())
    );
    let resp = h.files(Method::HEAD, &q(&h.path("escape")), empty()).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = h
        .files(Method::PUT, &q(&h.path("escape/tmp/x")), full("x"))
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "path_escape".into())
    );

    let missing = h.path("missing.txt");
    let resp = h.files(Method::GET, &q(&missing), empty()).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    let resp = h.files(Method::HEAD, &q(&missing), empty()).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = h
        .files(Method::GET, &format!("{}&ls=true", q(&missing)), empty())
        .await;
    assert_eq!(error_of(resp).await.0, StatusCode::NOT_FOUND);

    std::fs::create_dir(h.path("d")).unwrap();
    std::fs::write(h.path("f"), "x").unwrap();
    let resp = h.files(Method::GET, &q(&h.path("d")), empty()).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "is_directory".into())
    );
    let resp = h
        .files(
            Method::GET,
            &format!("{}&ls=true", q(&h.path("f"))),
            empty(),
        )
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "not_directory".into())
    );
    let resp = h.files(Method::PUT, &q(&h.path("d")), full("x")).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "is_directory".into())
    );
    let resp = h
        .files(Method::PUT, &q(&h.path("f/below")), full("x"))
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "not_directory".into())
    );
    let resp = h
        .files(
            Method::PUT,
            &format!("{}&mode=0999", q(&h.path("m"))),
            full("x"),
        )
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "bad_request".into())
    );
    let resp = h.files(Method::DELETE, &q(&h.path("f")), empty()).await;
    assert_eq!(error_of(resp).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_no_temp_files(&h.dir);
}

fn assert_no_temp_files(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.contains(".sf-tmp-"), "temp file left behind: {name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn files_upload_too_large() {
    let h = start().await;
    let target = h.path("huge.bin");
    let chunk = Bytes::from(vec![7u8; 1 << 20]);
    let chunks = (MAX_FILE_BYTES / (1 << 20) + 1) as usize;
    let body =
        StreamBody::new(stream::iter((0..chunks).map(move |_| {
            Ok::<_, io::Error>(http_body::Frame::data(chunk.clone()))
        })));
    let resp = h
        .files(Method::PUT, &format!("path={}", enc(&target)), body.boxed())
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large".into())
    );
    assert!(!Path::new(&target).exists());
    assert_no_temp_files(&h.dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn files_listing_is_capped() {
    let h = start().await;
    let dir = h.dir.join("many");
    std::fs::create_dir(&dir).unwrap();
    let n = MAX_LIST_ENTRIES + 5;
    for i in 0..n {
        std::fs::File::create(dir.join(format!("f{i:06}"))).unwrap();
    }
    let resp = h
        .files(
            Method::GET,
            &format!("path={}&ls=1", enc(dir.to_str().unwrap())),
            empty(),
        )
        .await;
    let entries: Vec<DirEntry> = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    assert_eq!(entries.len(), MAX_LIST_ENTRIES + 1);
    assert_eq!(entries[0].name, "f000000");
    assert_eq!(
        entries[MAX_LIST_ENTRIES - 1].name,
        format!("f{:06}", MAX_LIST_ENTRIES - 1)
    );
    let last = entries.last().unwrap();
    assert!(last.truncated);
    assert_eq!(
        (last.name.as_str(), last.total, last.size),
        ("...", Some(n as u64), n as u64)
    );
}
