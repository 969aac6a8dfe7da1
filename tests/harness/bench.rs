//! Shared by the benchmarks (`tests/benches/`): the sampling macro, the
//! statistics, the machine description and the markdown table. Pure
//! measurement plumbing: it starts nothing and asserts nothing.

use std::process::Command;
use std::time::Duration;

/// Time `$body` once as a warm-up, then `$n` times; the kept samples.
#[macro_export]
macro_rules! sample {
    ($n:expr, $body:expr) => {{
        let mut v = Vec::with_capacity($n);
        for i in 0..=$n {
            let t = std::time::Instant::now();
            $body;
            if i > 0 {
                v.push(t.elapsed());
            }
        }
        v
    }};
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, m)| m.trim().to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    // Filesystem type of each cgroup mount point, from mountinfo.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let fs = |mp: &str| {
        info.lines().rev().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (left.split(' ').nth(4)? == mp).then(|| right.split(' ').next().unwrap_or(""))
        })
    };
    let cgroup = if fs("/sys/fs/cgroup") == Some("cgroup2") {
        "v2 (unified)"
    } else if fs("/sys/fs/cgroup/unified") == Some("cgroup2") {
        "hybrid (v1 controllers + v2 unified)"
    } else {
        "v1"
    };
    let runc = Command::new("runc")
        .arg("--version")
        .output()
        .unwrap()
        .stdout;
    let runc = String::from_utf8(runc).unwrap_or_default();
    let (kernel, runc) = (kernel.trim(), runc.lines().next().unwrap_or("runc ?"));
    format!("machine: nproc {nproc}, kernel {kernel}, CPU {cpu}, cgroup {cgroup}, {runc}")
}

/// Median, p90 (nearest rank), min, max in milliseconds.
pub fn stats(s: &[Duration]) -> [f64; 4] {
    let mut ms: Vec<f64> = s.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let median = (ms[(n - 1) / 2] + ms[n / 2]) / 2.0;
    let p90 = ms[((n * 9).div_ceil(10)).max(1) - 1];
    [median, p90, ms[0], ms[n - 1]]
}

/// One table row: label, samples, index of its baseline row.
pub type Row = (&'static str, Vec<Duration>, Option<usize>);

/// Print the machine line, `runs` (how many samples the rows hold) and the
/// rows as a markdown table (ms).
pub fn print_table(runs: &str, rows: &[Row]) {
    println!("{}", machine());
    println!("{runs} (+1 warm-up, discarded); times in ms\n");
    println!("| measurement | median | p90 | min | max | median / baseline |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (label, s, base) in rows {
        let [med, p90, min, max] = stats(s);
        let ratio = base.map_or("".into(), |b| format!("×{:.1}", med / stats(&rows[b].1)[0]));
        println!("| {label} | {med:.3} | {p90:.3} | {min:.3} | {max:.3} | {ratio} |");
    }
}
