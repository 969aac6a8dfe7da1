//! Templates benchmark (issue 12): an OCI image pulled from a real
//! registry (Debian's `docker-registry` on loopback) into a template,
//! against `skopeo copy` of the same image to a local OCI layout (the
//! download alone, no unpacking: the floor); create → first exec from the
//! pulled template against the built-in one; and the bytes a second
//! template that shares the base layer adds to the blob store. Where the
//! host has the microVM guest, also microVM create → first exec from a
//! pulled template on its first use (the create derives its ext4 image;
//! the derivation's own time, from the build log, on the next row) and
//! with the image cached, against the built-in template.
//!
//! The image is the default template's rootfs as one gzip layer, every
//! entry owned by root (the tree on disk is already shifted for the user
//! namespace; the daemon shifts the image's ids again when it unpacks). Timings are reported,
//! never asserted. `BENCH_TEMPLATE_N` runs per row (default 3).

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sandforge_tests::bench::print_table;
use sandforge_tests::oci::{layer, layer_from_dir_as_root, push_image, Registry, E};
use sandforge_tests::{scratch_dir, Daemon};
use serde_json::json;

const ROOTFS: &str = "/var/cache/sandforge/templates/default/rootfs";
/// Present when scripts/build-guest.sh made the microVM guest.
const GUEST: &str = "/var/cache/sandforge/guest/guest.json";
/// See the pull loop.
const INODE_COOLDOWN: Duration = Duration::from_secs(35);

async fn pull(d: &Daemon, name: &str, image: &str) -> String {
    let (s, t) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": name, "image": image})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    loop {
        let (_, t) = d
            .call(Method::GET, &format!("/v1/templates/{id}"), None)
            .await;
        match t["status"].as_str() {
            Some("building") => tokio::time::sleep(Duration::from_millis(20)).await,
            Some("ready") => return id,
            _ => panic!("pull failed: {t}"),
        }
    }
}

async fn first_exec(d: &Daemon, template: &str) -> String {
    let id = d
        .create_id(json!({"template": template, "network": "offline"}))
        .await;
    d.sh_ok(&id, "true").await;
    id
}

/// Create → first exec on a microVM; the sandbox is destroyed after.
async fn vm_first_exec(d: &Daemon, template: &str) -> Duration {
    let t = Instant::now();
    let id = d
        .create_id(json!({"template": template, "network": "offline", "isolation": "microvm"}))
        .await;
    d.sh_ok(&id, "true").await;
    let took = t.elapsed();
    d.destroy(&id).await;
    took
}

/// How long the derivation of a template's microVM image took, from its
/// build log.
fn derive_time(d: &Daemon, id: &str) -> Duration {
    let log = std::fs::read_to_string(d.state_dir().join(format!("templates/{id}.log")))
        .unwrap_or_default();
    let ms = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "vm_image")
        .and_then(|e| e["took_ms"].as_u64())
        .expect("a vm_image event in the build log");
    Duration::from_millis(ms)
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let n: usize =
        std::env::var("BENCH_TEMPLATE_N").map_or(3, |v| v.parse().expect("BENCH_TEMPLATE_N"));
    let reg = Registry::start(false);
    let work = scratch_dir("sf-bench-img-");
    let t = Instant::now();
    let base = layer_from_dir_as_root(std::path::Path::new(ROOTFS));
    eprintln!(
        "image: the default template as one layer, {} MB gzip (built in {:?})",
        base.0.len() >> 20,
        t.elapsed()
    );
    push_image(&reg, work.path(), "base", "amd64", &[&base], json!({}));
    let extra = layer(&[
        E::Dir("app", 0),
        E::File("app/marker", "second template\n", 0),
    ]);
    push_image(
        &reg,
        work.path(),
        "derived",
        "amd64",
        &[&base, &extra],
        json!({}),
    );
    let image = format!("{}/test/base:latest", reg.host());

    let d = Daemon::start().await;
    let mut pulls = vec![];
    let mut last = String::new();
    for i in 0..=n {
        let t = Instant::now();
        let id = pull(&d, &format!("bench-{i}"), &image).await;
        let took = t.elapsed();
        if i > 0 {
            pulls.push(took);
        }
        if i < n {
            let (s, v) = d
                .call(Method::DELETE, &format!("/v1/templates/{id}"), None)
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
            // ext4 without a journal (as here) will not reuse an inode
            // freed in the last dirty_expire_centisecs (30 s) and scans
            // past every such inode at each create: right after deleting
            // a tree this size, the next one's 42k creates cost ~20 s of
            // kernel time. That is the filesystem, not the pull: wait it
            // out (untimed).
            tokio::time::sleep(INODE_COOLDOWN).await;
        } else {
            last = id;
        }
    }
    let mut skopeo = vec![];
    for i in 0..=n {
        let dest = work.path().join(format!("skopeo-{i}"));
        let t = Instant::now();
        let out = Command::new("skopeo")
            .args(["--insecure-policy", "copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{image}"))
            .arg(format!("oci:{}:t", dest.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i > 0 {
            skopeo.push(t.elapsed());
        }
        let _ = std::fs::remove_dir_all(dest);
    }

    // create → first exec: pulled vs built-in.
    let mut from_pulled = vec![];
    let mut from_default = vec![];
    for i in 0..=n {
        let t = Instant::now();
        let a = first_exec(&d, &last).await;
        let pa = t.elapsed();
        let t = Instant::now();
        let b = first_exec(&d, "default").await;
        let pb = t.elapsed();
        if i > 0 {
            from_pulled.push(pa);
            from_default.push(pb);
        }
        d.destroy(&a).await;
        d.destroy(&b).await;
    }

    // A second template sharing the base layer: what the blob store gains.
    let blobs = d.state_dir().join("images/blobs/sha256");
    let before = dir_bytes(&blobs);
    pull(
        &d,
        "derived",
        &format!("{}/test/derived:latest", reg.host()),
    )
    .await;
    let added = dir_bytes(&blobs) - before;
    println!(
        "blob store: {} MB for the first template; a second one sharing its base layer added {} bytes (its own layer and config)\n",
        before >> 20,
        added
    );

    // microVM: create → first exec from a pulled template, its first use
    // (the create derives the template's ext4 image) and with the image
    // cached, beside the built-in default (its image made by
    // scripts/build-guest.sh). A fresh template each round.
    let mut vm_rows = vec![];
    if std::path::Path::new(GUEST).is_file() {
        let (mut first, mut derive, mut cached, mut builtin) = (vec![], vec![], vec![], vec![]);
        for i in 0..=n {
            let id = pull(&d, &format!("vm-{i}"), &image).await;
            let f = vm_first_exec(&d, &id).await;
            let dt = derive_time(&d, &id);
            let c = vm_first_exec(&d, &id).await;
            let b = vm_first_exec(&d, "default").await;
            let (s, v) = d
                .call(Method::DELETE, &format!("/v1/templates/{id}"), None)
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
            if i > 0 {
                first.push(f);
                derive.push(dt);
                cached.push(c);
                builtin.push(b);
            }
        }
        vm_rows = vec![
            (
                "microVM create → first exec, pulled template, first use (derives its image)",
                first,
                Some(7),
            ),
            (
                "↳ of which deriving the ext4 image (id-mapped tree → mkfs.ext4 -d)",
                derive,
                None,
            ),
            (
                "microVM create → first exec, pulled template, image cached",
                cached,
                Some(7),
            ),
            (
                "↳ baseline: microVM create → first exec, built-in default",
                builtin,
                None,
            ),
        ];
    }

    let mut rows = vec![
        (
            "pull → ready, the default template as an image",
            pulls,
            Some(1),
        ),
        (
            "↳ baseline: `skopeo copy` to an OCI layout (download only)",
            skopeo,
            None,
        ),
        ("create → first exec, pulled template", from_pulled, Some(3)),
        (
            "↳ baseline: create → first exec, built-in default",
            from_default,
            None,
        ),
    ];
    rows.extend(vm_rows);
    print_table(&format!("N = {n} measured runs per row"), &rows);
}
