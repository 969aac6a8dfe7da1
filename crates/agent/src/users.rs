//! Who a command or terminal runs as: a request's `user` ([`UserSpec`]:
//! `name`, `uid`, `name:group`, `uid:gid`) resolved against the sandbox's
//! own `/etc/passwd` and `/etc/group` to a uid, a primary gid,
//! supplementary groups, and the login environment (`HOME`, `USER`,
//! `LOGNAME`, `SHELL`); and dropping to those credentials in a child
//! between fork and exec.
//!
//! Both files are the sandbox's, so they are hostile only to the sandbox
//! itself; still, they are opened without blocking (a FIFO planted there
//! cannot hang the agent), must be regular files, and are read up to
//! [`MAX_DB_BYTES`] only. A numeric uid needs no entry: it runs with gid =
//! uid, `HOME=/` and no `USER`.
//!
//! Must not: change the agent's own credentials (only a forked child's), or
//! be called on an async worker (it reads files: `spawn_blocking`).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::process::{Gid, Uid};
use sandforge_agent_proto::{Ident, UserSpec};

/// Largest `/etc/passwd` or `/etc/group` read.
pub const MAX_DB_BYTES: u64 = 4 * 1024 * 1024;
/// Most supplementary groups given to a user (the kernel allows 65536).
const MAX_GROUPS: usize = 1024;

/// Credentials and login environment of a resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary gid included), sorted, unique.
    pub groups: Vec<u32>,
    /// The passwd name, when the user has an entry.
    pub name: Option<String>,
    /// The entry's home, `/` when none.
    pub home: String,
    pub shell: String,
}

/// A passwd line's fields that matter here.
struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
    shell: &'a str,
}

/// An id field of a database line: `u32::MAX` is -1 to the kernel, never an id.
fn id(field: &str) -> Option<u32> {
    field.parse::<u32>().ok().filter(|&v| v != u32::MAX)
}

fn passwd_entries(db: &str) -> impl Iterator<Item = Passwd<'_>> {
    db.lines().filter_map(|line| {
        let f: Vec<&str> = line.splitn(7, ':').collect();
        if f.len() != 7 || f[0].is_empty() {
            return None;
        }
        Some(Passwd {
            name: f[0],
            uid: id(f[2])?,
            gid: id(f[3])?,
            home: f[5],
            shell: f[6],
        })
    })
}

/// `(name, gid, members)` of each group line.
fn group_entries(db: &str) -> impl Iterator<Item = (&str, u32, &str)> {
    db.lines().filter_map(|line| {
        let f: Vec<&str> = line.splitn(4, ':').collect();
        if f.len() != 4 || f[0].is_empty() {
            return None;
        }
        Some((f[0], id(f[2])?, f[3]))
    })
}

/// Resolve `spec` against the two databases' text. `Err` is the message of
/// a 400 `unknown_user`.
pub fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<User, String> {
    let parsed = UserSpec::parse(spec).map_err(|e| format!("user {spec:?}: {e}"))?;
    let (uid, entry) = match &parsed.user {
        Ident::Name(n) => {
            let p = passwd_entries(passwd)
                .find(|p| p.name == n)
                .ok_or_else(|| format!("no user {n:?} in the sandbox's /etc/passwd"))?;
            (p.uid, Some(p))
        }
        Ident::Id(uid) => (*uid, passwd_entries(passwd).find(|p| p.uid == *uid)),
    };
    let gid = match &parsed.group {
        Some(Ident::Id(g)) => *g,
        Some(Ident::Name(n)) => group_entries(group)
            .find(|(name, _, _)| name == n)
            .map(|(_, g, _)| g)
            .ok_or_else(|| format!("no group {n:?} in the sandbox's /etc/group"))?,
        None => entry.as_ref().map_or(uid, |p| p.gid),
    };
    let mut groups = vec![gid];
    if let Some(p) = &entry {
        groups.extend(
            group_entries(group)
                .filter(|(_, _, members)| members.split(',').any(|m| m.trim() == p.name))
                .map(|(_, g, _)| g)
                .take(MAX_GROUPS),
        );
    }
    groups.sort_unstable();
    groups.dedup();
    groups.truncate(MAX_GROUPS);
    let home = entry
        .as_ref()
        .map(|p| p.home)
        .filter(|h| h.starts_with('/'))
        .unwrap_or("/");
    let shell = entry
        .as_ref()
        .map(|p| p.shell)
        .filter(|s| s.starts_with('/'))
        .unwrap_or("/bin/sh");
    Ok(User {
        uid,
        gid,
        groups,
        name: entry.as_ref().map(|p| p.name.to_string()),
        home: home.to_string(),
        shell: shell.to_string(),
    })
}

/// Read one database: empty when it does not exist (or is not a regular
/// file), an error when it is larger than [`MAX_DB_BYTES`].
fn read_db(path: &Path) -> Result<String, String> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Ok(String::new());
    }
    let mut buf = Vec::new();
    File::take(file, MAX_DB_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if buf.len() as u64 > MAX_DB_BYTES {
        return Err(format!(
            "{} is larger than {} MiB",
            path.display(),
            MAX_DB_BYTES >> 20
        ));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Resolve `spec` in this sandbox (blocking: reads `/etc/passwd` and
/// `/etc/group`).
pub fn resolve(spec: &str) -> Result<User, String> {
    // A numeric spec without a group needs no group file, but reading it
    // keeps one path; both are small.
    let passwd = read_db(Path::new("/etc/passwd"))?;
    let group = read_db(Path::new("/etc/group"))?;
    resolve_in(spec, &passwd, &group)
}

/// [`resolve`] off the async workers.
pub async fn resolve_async(spec: String) -> Result<User, String> {
    tokio::task::spawn_blocking(move || resolve(&spec))
        .await
        .unwrap_or_else(|e| Err(format!("resolving the user: {e}")))
}

impl User {
    /// The login environment, set over the base one and under the
    /// request's own `env`.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("HOME", self.home.clone()), ("SHELL", self.shell.clone())];
        if let Some(name) = &self.name {
            env.push(("USER", name.clone()));
            env.push(("LOGNAME", name.clone()));
        }
        env
    }

    /// The directory a command starts in when the request names none: the
    /// home when it is a directory, else `/`.
    pub fn default_dir(&self) -> &str {
        if Path::new(&self.home).is_dir() {
            &self.home
        } else {
            "/"
        }
    }

    /// What [`Creds::apply`] needs, built before the fork (no allocation
    /// happens in the child).
    pub fn creds(&self) -> Creds {
        // SAFETY: `from_raw` requires a value other than -1 (`u32::MAX`);
        // `UserSpec::parse` and the database parser never yield it.
        let (uid, gid) = unsafe { (Uid::from_raw(self.uid), Gid::from_raw(self.gid)) };
        // SAFETY: as above, every group id came through the same filters.
        let groups = self
            .groups
            .iter()
            .map(|&g| unsafe { Gid::from_raw(g) })
            .collect();
        Creds { uid, gid, groups }
    }
}

/// Credentials to drop to in a child.
#[derive(Debug, Clone)]
pub struct Creds {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
}

impl Creds {
    /// Runs in the forked child before exec: supplementary groups, then the
    /// gid, then the uid (real, effective and saved alike, so the command
    /// cannot regain root). Raw syscalls for this one thread, which is the
    /// child's only one: async-signal-safe, no allocation, no locks.
    pub fn apply(&self) -> io::Result<()> {
        rustix::thread::set_thread_groups(&self.groups)?;
        rustix::thread::set_thread_res_gid(self.gid, self.gid, self.gid)?;
        rustix::thread::set_thread_res_uid(self.uid, self.uid, self.uid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        broken line\n\
        neg:x:4294967295:0::/:/bin/sh\n\
        user:x:1000:1000::/home/user:/bin/bash\n\
        nohome:x:1001:1001::relative:\n";
    const GROUP: &str = "root:x:0:\n\
        shadow:x:42:\n\
        users:x:100:user,other\n\
        staff:x:50:\n\
        audio:x:29:other, user\n\
        user:x:1000:\n";

    #[test]
    fn resolves_names_and_ids() {
        let u = resolve_in("user", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![29, 100, 1000]);
        assert_eq!(
            (u.home.as_str(), u.shell.as_str()),
            ("/home/user", "/bin/bash")
        );
        assert_eq!(u.name.as_deref(), Some("user"));
        assert_eq!(resolve_in("1000", PASSWD, GROUP).unwrap(), u);

        let r = resolve_in("root", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid, r.groups.clone()), (0, 0, vec![0]));
        assert_eq!(r.home, "/root");

        // A uid without an entry: gid = uid, HOME=/, no name.
        let n = resolve_in("4242", PASSWD, GROUP).unwrap();
        assert_eq!((n.uid, n.gid, n.groups.clone()), (4242, 4242, vec![4242]));
        assert_eq!((n.home.as_str(), n.name.clone()), ("/", None));
        assert!(n.env().iter().all(|(k, _)| *k != "USER"));

        // Explicit groups, by id and by name.
        let g = resolve_in("user:staff", PASSWD, GROUP).unwrap();
        assert_eq!((g.gid, g.groups.clone()), (50, vec![29, 50, 100]));
        assert_eq!(resolve_in("4242:7", PASSWD, GROUP).unwrap().groups, vec![7]);

        // A relative home and an empty shell fall back.
        let h = resolve_in("nohome", PASSWD, GROUP).unwrap();
        assert_eq!((h.home.as_str(), h.shell.as_str()), ("/", "/bin/sh"));
    }

    #[test]
    fn refuses_unknown_and_malformed() {
        assert!(resolve_in("nobody", PASSWD, GROUP).is_err());
        assert!(resolve_in("user:nogroup", PASSWD, GROUP).is_err());
        assert!(resolve_in("", PASSWD, GROUP).is_err());
        // The entry with uid -1 is skipped, not used.
        assert!(resolve_in("neg", PASSWD, GROUP).is_err());
        assert!(resolve_in("user", "", "").is_err());
    }
}
