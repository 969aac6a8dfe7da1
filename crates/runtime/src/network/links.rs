//! The links of networked sandboxes, through iproute2 (`ip`, and `nsenter`
//! to configure a container's end inside its network namespace): a veth
//! pair per container (host end named by the lease, far end `eth0` in the
//! container), a persistent tap per VM owned by the VM's uid, each with the
//! host end's /30 address. Owns only interfaces named by a lease; it must
//! not change anything else on the host.

use std::process::Stdio;

use sandforge_api::Cidr;
use tokio::io::AsyncWriteExt;

use super::Lease;
use crate::error::{Result, RuntimeError};

async fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let err = |m: String| RuntimeError::Command {
        tool: tool.into(),
        message: m,
    };
    let mut child = cmd.spawn().map_err(|e| err(e.to_string()))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .await
            .map_err(|e| err(e.to_string()))?;
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| err(format!("{args:?} timed out")))?
        .map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Address the host end of a link and bring it up.
async fn host_end(lease: &Lease) -> Result<()> {
    let batch = format!(
        "addr add {}/{} dev {}\nlink set {} up\n",
        lease.host_ip,
        Lease::PREFIX_LEN,
        lease.iface,
        lease.iface
    );
    run("ip", &["-batch", "-"], Some(&batch)).await
}

/// A veth pair whose far end becomes `eth0` of the network namespace of
/// `pid` (a container's init), addressed with a default route.
pub async fn veth_into(lease: &Lease, pid: u32) -> Result<()> {
    let pid_s = pid.to_string();
    run(
        "ip",
        &[
            "link",
            "add",
            &lease.iface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pid_s,
        ],
        None,
    )
    .await?;
    host_end(lease).await?;
    let inside = format!(
        "addr add {}/{} dev eth0\nlink set eth0 up\nroute add default via {}\n",
        lease.guest_ip,
        Lease::PREFIX_LEN,
        lease.host_ip
    );
    run(
        "nsenter",
        &["-t", &pid_s, "-n", "ip", "-batch", "-"],
        Some(&inside),
    )
    .await
}

/// A persistent tap for a VM's virtio-net, usable by `uid` (QEMU).
pub async fn tap(lease: &Lease, uid: Option<u32>) -> Result<()> {
    let uid_s = uid.unwrap_or(0).to_string();
    run(
        "ip",
        &[
            "tuntap",
            "add",
            "dev",
            &lease.iface,
            "mode",
            "tap",
            "user",
            &uid_s,
        ],
        None,
    )
    .await?;
    host_end(lease).await
}

/// Delete a link (and with a veth, its far end); a missing one is fine.
pub async fn delete(iface: &str) {
    if std::path::Path::new("/sys/class/net").join(iface).exists() {
        if let Err(e) = run("ip", &["link", "del", iface], None).await {
            tracing::warn!(iface, "deleting link: {e}");
        }
    }
}

/// Whether `name` has the exact shape of a lease's link name: the prefix,
/// then the id's tail (12 characters, or fewer when the prefix is long).
pub fn is_lease_name(prefix: &str, name: &str) -> bool {
    let tail = 12.min(15 - prefix.len().min(15));
    name.len() == prefix.len() + tail
        && name.starts_with(prefix)
        && name[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Links on the host named like a lease of `prefix`.
pub fn list(prefix: &str) -> Result<Vec<String>> {
    let rd = std::fs::read_dir("/sys/class/net")
        .map_err(|e| RuntimeError::io("list", "/sys/class/net", e))?;
    Ok(rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_lease_name(prefix, n))
        .collect())
}

fn overlaps(a: &Cidr, b: &Cidr) -> bool {
    let len = a.len.min(b.len);
    let a = Cidr::parse(&format!("{}/{len}", a.addr));
    let b = Cidr::parse(&format!("{}/{len}", b.addr));
    a.is_some() && a == b
}

/// Refuse a subnet that overlaps a host route not made by us (it would
/// hijack or shadow the host's own traffic).
pub async fn overlapping_route(subnet: &Cidr, prefix: &str) -> Result<()> {
    let out = tokio::process::Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .await
        .map_err(|e| RuntimeError::Command {
            tool: "ip".into(),
            message: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        let dst = match first {
            "broadcast" | "local" | "unicast" => words.next().unwrap_or(""),
            other => other,
        };
        let ours = line
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .is_some_and(|d| d.starts_with(prefix));
        if ours || dst == "default" {
            continue;
        }
        if let Some(route) = Cidr::parse(dst) {
            if overlaps(&route, subnet) && !route.addr.is_loopback() {
                return Err(RuntimeError::Setup(format!(
                    "network subnet {subnet} overlaps the host route '{}'; choose another `network_subnet`",
                    line.trim()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names() {
        assert!(is_lease_name("sf", "sf5qj9nhdpv3q8"));
        assert!(!is_lease_name("sf", "sfp0"));
        assert!(!is_lease_name("sf", "sf5qj9nhdpv3q8x"));
        assert!(is_lease_name("zabc", "zabc5qj9nhdpv3q"));
    }

    #[test]
    fn overlap() {
        let c = |s| Cidr::parse(s).unwrap();
        assert!(overlaps(&c("10.0.0.0/8"), &c("10.213.0.0/16")));
        assert!(overlaps(&c("10.213.4.0/24"), &c("10.213.0.0/16")));
        assert!(!overlaps(&c("192.0.2.0/24"), &c("10.213.0.0/16")));
        assert!(!overlaps(&c("10.214.0.0/16"), &c("10.213.0.0/16")));
    }
}
