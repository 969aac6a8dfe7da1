//! Sandbox networking through the real API, on whichever backend the run
//! targets: egress policies (allow_all, deny_all, allow_cidrs + allow_ports,
//! deny_cidrs before allows, a live PATCH), domain allowlists at the DNS
//! and IP level, the destinations no policy opens (the supervisor's API,
//! the host's addresses, other sandboxes, link-local metadata), and that
//! create/destroy cycles and a crash leave no link or rule behind.
//!
//! The "internet" is a network namespace this test makes, joined to the
//! host by a veth pair, with HTTP servers on addresses in 198.18.0.0/15
//! (the benchmarking range). No packet leaves this machine.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sandforge_tests::{net_names, scratch_dir, sigkill, test_subnet, Daemon};
use serde_json::{json, Value};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fake internet: netns `sfi-<pid>-<n>`, host end `198.18.<x>.1/24`,
/// hosts `.2` and `.3`, HTTP on ports 8080 and 9090 (serving `hello.txt`).
struct Internet {
    ns: String,
    net: String,
    host_if: String,
    servers: Vec<Child>,
    _www: tempfile::TempDir,
    /// Policy routing rules to remove (`ip rule del ...` arguments).
    rules: Vec<String>,
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Internet {
    fn new() -> Internet {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let ns = format!("sfi-{pid}-{n}");
        let x = (pid * 7 + n * 13) % 250 + 2;
        let net = format!("198.18.{x}");
        let host_if = format!("tin{}", (pid * 10 + n) % 100_000);
        sh(&format!(
            "ip netns add {ns} && ip link add {host_if} type veth peer name eth0 netns {ns} && \
             ip addr add {net}.1/24 dev {host_if} && ip link set {host_if} up && \
             ip -n {ns} addr add {net}.2/24 dev eth0 && ip -n {ns} addr add {net}.3/24 dev eth0 && \
             ip -n {ns} link set eth0 up && ip -n {ns} link set lo up"
        ));
        let www = scratch_dir("sf-www-");
        std::fs::write(www.path().join("hello.txt"), "hello from the internet\n").unwrap();
        let servers = [8080, 9090]
            .iter()
            .map(|port| {
                Command::new("ip")
                    .args(["netns", "exec", &ns, "python3", "-m", "http.server"])
                    .arg(port.to_string())
                    .args(["--bind", "0.0.0.0", "--directory"])
                    .arg(www.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let i = Internet {
            ns,
            net,
            host_if,
            servers,
            _www: www,
            rules: vec![],
        };
        // Reachable from the host before any sandbox tries.
        for port in [8080, 9090] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect_timeout(
                &format!("{}:{port}", i.ip()).parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "test server {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        i
    }

    /// The first host (`.2`).
    fn ip(&self) -> String {
        format!("{}.2", self.net)
    }

    /// The second host (`.3`).
    fn ip2(&self) -> String {
        format!("{}.3", self.net)
    }
}

impl Internet {
    /// Make this namespace also the cloud metadata service
    /// (169.254.169.254:80) for packets from `subnet` only (a policy
    /// route, so the host's own traffic is untouched): if a sandbox ever
    /// got a packet past the supervisor's rules, it would land here, not
    /// leave the machine.
    fn serve_metadata_to(&mut self, subnet: &str) {
        let table = 2000 + NEXT.fetch_add(1, Ordering::SeqCst);
        sh(&format!(
            "ip -n {ns} addr add 169.254.169.254/32 dev eth0 && \
             ip route add 169.254.169.254/32 dev {hif} table {table} && \
             ip rule add from {subnet} to 169.254.169.254 table {table}",
            ns = self.ns,
            hif = self.host_if
        ));
        self.rules
            .push(format!("from {subnet} to 169.254.169.254 table {table}"));
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "python3",
                "-m",
                "http.server",
                "80",
            ])
            .args(["--bind", "169.254.169.254"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(server);
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for r in &self.rules {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ip rule del {r}; ip route flush table {}",
                    r.rsplit(' ').next().unwrap_or("0")
                ))
                .status();
        }
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Run a python3 program in the sandbox (20 s limit): whether it exited 0,
/// and its output.
async fn python(d: &Daemon, id: &str, program: &str) -> (bool, String) {
    let cmd = format!("python3 -c \"{program}\" 2>&1");
    let (_, v) = d
        .execute(id, json!({"command": cmd, "timeout_seconds": 20}))
        .await;
    let out = v["stdout"].as_str().unwrap_or_default().to_string();
    (v["exit_code"] == 0, out)
}

/// Fetch `url` from inside the sandbox (3 s timeout): the body, or None.
async fn fetch(d: &Daemon, id: &str, url: &str) -> Option<String> {
    let py = format!(
        "import urllib.request\nprint(urllib.request.urlopen('{url}', timeout=3).read().decode(), end='')"
    );
    let (ok, out) = python(d, id, &py).await;
    ok.then_some(out)
}

/// Whether a TCP connection from the sandbox to `host:port` succeeds.
async fn connects(d: &Daemon, id: &str, host: &str, port: u16) -> bool {
    let py =
        format!("import socket\nsocket.create_connection(('{host}', {port}), timeout=2).close()");
    python(d, id, &py).await.0
}

async fn create_net(d: &Daemon, egress: Value) -> Value {
    d.create(json!({"network": "nat", "egress": egress})).await
}

#[tokio::test]
async fn egress_policies_hold_on_a_test_internet() {
    let mut net = Internet::new();
    let d = Daemon::start().await;
    net.serve_metadata_to(&test_subnet(d.port));
    let url = format!("http://{}:8080/hello.txt", net.ip());
    let url_9090 = format!("http://{}:9090/hello.txt", net.ip());

    let open = create_net(&d, json!({"mode": "allow_all"})).await;
    let open_id = open["id"].as_str().unwrap();
    assert_eq!(open["network"], "nat");
    assert!(open["ip"].as_str().unwrap().starts_with("10."), "{open}");
    assert_eq!(
        fetch(&d, open_id, &url).await.as_deref(),
        Some("hello from the internet\n")
    );

    let closed = create_net(&d, json!({"mode": "deny_all"})).await;
    let closed_id = closed["id"].as_str().unwrap();
    assert_eq!(
        fetch(&d, closed_id, &url).await,
        None,
        "deny_all let it through"
    );

    let ports = create_net(
        &d,
        json!({"mode": "deny_all", "allow_cidrs": [format!("{}/32", net.ip())], "allow_ports": [8080]}),
    )
    .await;
    let ports_id = ports["id"].as_str().unwrap();
    assert!(
        fetch(&d, ports_id, &url).await.is_some(),
        "allowed port blocked"
    );
    assert_eq!(
        fetch(&d, ports_id, &url_9090).await,
        None,
        "other port open"
    );
    assert!(
        !connects(&d, ports_id, &net.ip2(), 8080).await,
        "other host open"
    );

    let deny_first = create_net(
        &d,
        json!({"mode": "deny_all", "allow_cidrs": [format!("{}.0/24", net.net)], "deny_cidrs": [net.ip()]}),
    )
    .await;
    let deny_id = deny_first["id"].as_str().unwrap();
    assert_eq!(
        fetch(&d, deny_id, &url).await,
        None,
        "deny_cidrs lost to allow"
    );
    assert!(
        connects(&d, deny_id, &net.ip2(), 8080).await,
        "the rest of the /24 is allowed"
    );

    // A live policy change.
    let (s, v) = d
        .call(
            Method::PATCH,
            &format!("/v1/sandboxes/{closed_id}"),
            Some(json!({"egress": {"mode": "allow_all"}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["egress"]["mode"], "allow_all");
    assert!(
        fetch(&d, closed_id, &url).await.is_some(),
        "PATCH did not open it"
    );
    for (body, field) in [
        (
            json!({"egress": {"mode": "allow_all", "allow_cidrs": ["300.1.1.1/8"]}}),
            "egress.allow_cidrs[0]",
        ),
        (json!({"egress": {"mode": "maybe"}}), "egress.mode"),
        (
            json!({"egress": {"mode": "deny_all", "allow_ports": [0]}}),
            "egress.allow_ports[0]",
        ),
    ] {
        let (s, v) = d
            .call(
                Method::PATCH,
                &format!("/v1/sandboxes/{closed_id}"),
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]["field"]
                .as_str()
                .unwrap()
                .starts_with(field.split('[').next().unwrap()),
            "{v}"
        );
    }

    // Never reachable, whatever the policy: the supervisor's API (on the
    // host end of the sandbox's own link, and on every host address), a
    // host service, another sandbox, link-local metadata.
    let host_svc = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let svc_port = host_svc.local_addr().unwrap().port();
    let gw = {
        let ip: std::net::Ipv4Addr = open["ip"].as_str().unwrap().parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(ip) - 1).to_string()
    };
    // Were the metadata address let through, it would reach the test's own
    // namespace, never the real network.
    let iface = {
        let (prefix, _) = net_names(d.port);
        let id = open_id.replace('_', "");
        format!("{prefix}{}", &id[id.len() - 11..])
    };
    let route = Command::new("ip")
        .args(["route", "get", "169.254.169.254", "from"])
        .arg(open["ip"].as_str().unwrap())
        .args(["iif", &iface])
        .output()
        .unwrap();
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(route.contains(&net.host_if), "{route}");
    for (host, port) in [
        (gw.as_str(), d.port),
        (gw.as_str(), svc_port),
        (&format!("{}.1", net.net), svc_port),
        ("169.254.169.254", 80),
        (ports["ip"].as_str().unwrap(), 22),
    ] {
        assert!(
            !connects(&d, open_id, host, port).await,
            "reached {host}:{port} from an allow_all sandbox"
        );
    }
    // While from the host the service is there.
    assert!(std::net::TcpStream::connect(("127.0.0.1", svc_port)).is_ok());
    for id in [open_id, closed_id, ports_id, deny_id] {
        d.destroy(id).await;
    }
}

#[tokio::test]
async fn a_domain_allowlist_holds_at_dns_and_ip_level() {
    let net = Internet::new();
    let extra = format!(
        "dns_hosts: {{allowed.test: {}, other.test: {}}}",
        net.ip(),
        net.ip2()
    );
    let d = Daemon::start_with_config(&[], &extra).await;
    let sb = d
        .create(json!({"network": "nat", "network_policy": {"enabled": true, "allowed_domains": ["allowed.test"]}}))
        .await;
    let id = sb["id"].as_str().unwrap();
    assert_eq!(sb["egress"]["allowed_domains"], json!(["allowed.test"]));
    let resolved = d.sh(id, "getent hosts allowed.test").await;
    assert_eq!(resolved["exit_code"], 0, "{resolved}");
    assert!(resolved["stdout"].as_str().unwrap().contains(&net.ip()));
    assert!(fetch(&d, id, "http://allowed.test:8080/hello.txt")
        .await
        .is_some());
    // The other name does not resolve, and its address is not reachable
    // when hard-coded.
    let other = d.sh(id, "getent hosts other.test").await;
    assert_ne!(other["exit_code"], 0, "{other}");
    assert_eq!(
        fetch(&d, id, &format!("http://{}:8080/hello.txt", net.ip2())).await,
        None
    );
    // blocked_domains refuses a name even when everything else is open.
    let (s, v) = d
        .call(
            Method::PATCH,
            &format!("/v1/sandboxes/{id}"),
            Some(json!({"egress": {"mode": "allow_all", "blocked_domains": ["other.test"]}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_ne!(d.sh(id, "getent hosts other.test").await["exit_code"], 0);
    assert_eq!(d.sh(id, "getent hosts allowed.test").await["exit_code"], 0);
    d.destroy(id).await;
}

fn links_with(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

fn ruleset(table: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn nothing_accumulates_over_create_destroy_cycles_or_a_crash() {
    let mut d = Daemon::start().await;
    let (prefix, table) = net_names(d.port);
    let links_before = links_with(&prefix);
    let rules_before = ruleset(&table);
    assert!(rules_before.contains("chain forward"), "{rules_before}");
    let cycles: usize = std::env::var("SANDFORGE_LEAK_CYCLES").map_or(10, |v| v.parse().unwrap());
    for i in 0..cycles {
        let egress = if i % 2 == 0 {
            json!({"mode": "allow_all"})
        } else {
            json!({"mode": "deny_all", "allow_cidrs": ["198.18.0.0/15"], "allowed_domains": ["example.test"]})
        };
        let id = create_net(&d, egress).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(links_with(&prefix).len(), links_before.len() + 1);
        d.destroy(&id).await;
    }
    assert_eq!(links_with(&prefix), links_before);
    assert_eq!(ruleset(&table), rules_before);

    // A crash: the daemon dies, its sandbox dies while it is down, and a
    // stray link of ours appears. The restart fails the sandbox; destroy
    // and the start's reconciliation leave nothing.
    let id = create_net(&d, json!({"mode": "allow_all"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = d.sandbox_pid(&id);
    d.kill9();
    sigkill(pid);
    let stray = format!("{prefix}{}", "x".repeat(11));
    sh(&format!(
        "ip link add {stray} type veth peer name {prefix}yyyyyyyyyyy"
    ));
    d.restart().await;
    d.wait_status(&id, "failed").await;
    assert!(!links_with(&prefix).contains(&stray), "stray link kept");
    d.destroy(&id).await;
    assert_eq!(links_with(&prefix), links_before);
    assert_eq!(ruleset(&table), rules_before);
}

#[tokio::test]
async fn a_subnet_that_overlaps_a_host_route_is_refused() {
    // The test internet's /24 is a host route now: a daemon told to use it
    // for sandboxes refuses to start, naming the key (a config wrong for
    // this host, not a host without networking).
    let net = Internet::new();
    let (status, stderr) = Daemon::refused(&format!("network_subnet: {}.0/24", net.net));
    assert!(!status.success(), "{status}");
    assert!(
        stderr.contains("config: network_subnet") && stderr.contains("overlaps the host route"),
        "{stderr}"
    );
}
