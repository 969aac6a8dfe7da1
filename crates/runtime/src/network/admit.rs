//! Admitting the addresses the resolvers resolved for allowed domains into
//! the sandboxes' nftables sets (`dns_<slot>`), batched: one task for the
//! whole network collects the admissions of every sandbox and applies them
//! as one `nft -f` transaction at most every [`FLUSH_INTERVAL`], so a DNS
//! flood costs a few process spawns a second, not one per answer. The
//! first admission after a quiet spell is applied at once; each caller
//! waits for the transaction that carries its addresses (the answer is
//! only sent once the address is reachable).
//!
//! Owns the batching task and its queue ([`QUEUE`] admissions; a full
//! queue makes resolvers wait, never grows). Must not create or delete
//! sets: a batch naming a set that is gone (its sandbox was destroyed
//! meanwhile) is retried set by set so the others still get in.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::nft;

/// At most one transaction per this interval (a flood from every sandbox
/// together costs at most 20 `nft` runs a second).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Admissions waiting for a transaction, over all sandboxes.
pub const QUEUE: usize = 4096;
/// Admissions carried by one transaction.
const MAX_BATCH: usize = 1024;

struct Job {
    set: String,
    ips: Vec<Ipv4Addr>,
    ttl_secs: u32,
    done: oneshot::Sender<bool>,
}

/// A handle on the batching task (cheap to clone; the task ends when the
/// last handle is dropped).
#[derive(Clone)]
pub struct Admitter {
    tx: mpsc::Sender<Job>,
}

impl Admitter {
    /// Start the task that applies admissions to `inet <table>`.
    pub fn spawn(table: String) -> Admitter {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, table));
        Admitter { tx }
    }

    /// Add `ips` to `set` for `ttl_secs`; true once a transaction holding
    /// them succeeded.
    pub async fn admit(&self, set: String, ips: Vec<Ipv4Addr>, ttl_secs: u32) -> bool {
        let (done, wait) = oneshot::channel();
        let job = Job {
            set,
            ips,
            ttl_secs,
            done,
        };
        if self.tx.send(job).await.is_err() {
            return false;
        }
        wait.await.unwrap_or(false)
    }
}

/// `add element` lines for `jobs`, one per set, each address once with the
/// longest timeout asked for it.
pub fn script(table: &str, jobs: &[(&str, &[Ipv4Addr], u32)]) -> String {
    let mut sets: BTreeMap<&str, BTreeMap<Ipv4Addr, u32>> = BTreeMap::new();
    for (set, ips, ttl) in jobs {
        let s = sets.entry(set).or_default();
        for ip in ips.iter() {
            let t = s.entry(*ip).or_insert(0);
            *t = (*t).max(*ttl);
        }
    }
    let mut out = String::new();
    for (set, ips) in sets.iter().filter(|(_, ips)| !ips.is_empty()) {
        let items: Vec<String> = ips
            .iter()
            .map(|(ip, t)| format!("{ip} timeout {t}s"))
            .collect();
        let _ = writeln!(
            out,
            "add element inet {table} {set} {{ {} }}",
            items.join(", ")
        );
    }
    out
}

async fn run(mut rx: mpsc::Receiver<Job>, table: String) {
    let mut last: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        if let Some(l) = last {
            tokio::time::sleep_until(l + FLUSH_INTERVAL).await;
        }
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        last = Some(Instant::now());
        let all: Vec<(&str, &[Ipv4Addr], u32)> = jobs
            .iter()
            .map(|j| (j.set.as_str(), j.ips.as_slice(), j.ttl_secs))
            .collect();
        let ok = match nft::apply(&script(&table, &all)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("admitting a batch of {} answers: {e}", jobs.len());
                false
            }
        };
        if ok {
            for j in jobs {
                let _ = j.done.send(true);
            }
            continue;
        }
        // One set is probably gone: each set on its own.
        let mut by_set: BTreeMap<String, Vec<Job>> = BTreeMap::new();
        for j in jobs {
            by_set.entry(j.set.clone()).or_default().push(j);
        }
        for (set, jobs) in by_set {
            let all: Vec<(&str, &[Ipv4Addr], u32)> = jobs
                .iter()
                .map(|j| (j.set.as_str(), j.ips.as_slice(), j.ttl_secs))
                .collect();
            let ok = match nft::apply(&script(&table, &all)).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("admitting resolved addresses into {set}: {e}");
                    false
                }
            };
            for j in jobs {
                let _ = j.done.send(ok);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_set_each_address_once() {
        let a: Ipv4Addr = "1.2.3.4".parse().unwrap();
        let b: Ipv4Addr = "5.6.7.8".parse().unwrap();
        let s = script(
            "t",
            &[
                ("dns_1", &[a, b], 60),
                ("dns_2", &[a], 60),
                ("dns_1", &[a], 300),
                ("dns_3", &[], 60),
            ],
        );
        assert_eq!(
            s,
            "add element inet t dns_1 { 1.2.3.4 timeout 300s, 5.6.7.8 timeout 60s }\n\
             add element inet t dns_2 { 1.2.3.4 timeout 60s }\n"
        );
    }
}
