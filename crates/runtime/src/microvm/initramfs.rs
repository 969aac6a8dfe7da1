//! The microVM initramfs: a small uncompressed "newc" cpio archive the kernel
//! unpacks into its rootfs before running `/init`.
//!
//! Owns: the archive layout (`/init` = the static agent, which runs in its
//! init mode as PID 1; `/lib/modules/*.ko` + `/lib/modules/order` = the guest
//! kernel modules in load order, as built by `scripts/build-guest.sh`; the
//! empty mount points `/dev`, `/proc`, `/sys`, `/newroot`; `/dev/console`,
//! which the kernel opens as PID 1's stdio before any devtmpfs is mounted)
//! and the newc encoding, written by hand (it is 110-byte ASCII headers).
//!
//! Must not: know how the guest boots (the agent's `init` module does) or
//! compress (the kernel maps an uncompressed archive faster than it inflates
//! a gzip one, and the file is written once per daemon, not per VM).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Write the initramfs for `agent` (the static `sandforge-agent` binary) and
/// the modules listed, one file name a line, in `modules_dir/order` to `out`
/// (via `out.tmp` and a rename, so `out` is always complete).
pub fn write_initramfs(agent: &Path, modules_dir: &Path, out: &Path) -> io::Result<()> {
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let result = write_archive(agent, modules_dir, tmp).and_then(|()| std::fs::rename(tmp, out));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn write_archive(agent: &Path, modules_dir: &Path, path: &Path) -> io::Result<()> {
    let order = std::fs::read_to_string(modules_dir.join("order")).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{}: {e}", modules_dir.join("order").display()),
        )
    })?;
    let modules: Vec<&str> = order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    for name in &modules {
        if name.contains('/') || *name == "." || *name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad module file name {name:?} in modules/order"),
            ));
        }
    }

    let file = File::create(path)?;
    let mut w = Newc::new(BufWriter::new(file));
    for dir in ["dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        w.entry(dir, S_IFDIR | 0o755, 0, (0, 0), &mut io::empty())?;
    }
    w.entry("dev/console", S_IFCHR | 0o600, 0, (5, 1), &mut io::empty())?;
    w.file("init", 0o755, agent)?;
    for name in &modules {
        w.file(
            &format!("lib/modules/{name}"),
            0o644,
            &modules_dir.join(name),
        )?;
    }
    let order_text = modules.iter().fold(String::new(), |s, m| s + m + "\n");
    w.entry(
        "lib/modules/order",
        S_IFREG | 0o644,
        order_text.len() as u64,
        (0, 0),
        &mut order_text.as_bytes(),
    )?;
    let file = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// A newc ("070701") cpio writer: every entry is owned by root with mtime 0.
struct Newc<W: Write> {
    out: W,
    ino: u32,
    offset: u64,
}

impl<W: Write> Newc<W> {
    fn new(out: W) -> Self {
        Newc {
            out,
            ino: 1,
            offset: 0,
        }
    }

    /// Add the regular file at `src` as `name` with permission bits `perm`.
    fn file(&mut self, name: &str, perm: u32, src: &Path) -> io::Result<()> {
        let open = || -> io::Result<(File, u64)> {
            let f = File::open(src)?;
            let len = f.metadata()?.len();
            Ok((f, len))
        };
        let (f, len) =
            open().map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        self.entry(name, S_IFREG | perm, len, (0, 0), &mut f.take(len))
    }

    /// One header, name and (exactly `size` bytes of) data, each padded to 4.
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        size: u64,
        rdev: (u32, u32),
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let size32 = u32::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.ino += 1;
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        let copied = io::copy(data, &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: changed size while archived ({copied} of {size} bytes)"),
            ));
        }
        self.offset += size;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.offset % 4) % 4;
        self.put(&[0; 3][..n as usize])
    }

    /// Write the trailer and hand back the writer.
    fn finish(mut self) -> io::Result<W> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 0, (0, 0), &mut io::empty())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct Entry {
        name: String,
        mode: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// Parse a newc archive back into its entries (without the trailer).
    fn parse(mut buf: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&buf[..6], b"070701", "magic at {offset}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap() as usize
            };
            let (mode, size, rdev) = (field(1), field(6), (field(9), field(10)));
            let namesize = field(11);
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(buf[110 + namesize - 1], 0);
            let data_at = (offset + 110 + namesize).next_multiple_of(4) - offset;
            let data = buf[data_at..data_at + size].to_vec();
            let next = (offset + data_at + size).next_multiple_of(4) - offset;
            offset += next;
            buf = &buf[next..];
            if name == "TRAILER!!!" {
                assert!(buf.is_empty(), "bytes after the trailer");
                return entries;
            }
            entries.push(Entry {
                name,
                mode: mode as u32,
                rdev: (rdev.0 as u32, rdev.1 as u32),
                data,
            });
        }
    }

    #[test]
    fn archive_round_trips() {
        let dir = TempDir(
            std::env::temp_dir().join(format!("sandforge-initramfs-test-{}", std::process::id())),
        );
        let mods = dir.0.join("modules");
        std::fs::create_dir_all(&mods).unwrap();
        let agent = dir.0.join("agent");
        std::fs::write(&agent, b"\x7fELF pretend agent, 31 bytes..").unwrap();
        std::fs::write(mods.join("a.ko"), b"module a").unwrap();
        std::fs::write(mods.join("b_b.ko"), b"bb").unwrap();
        std::fs::write(mods.join("unused.ko"), b"not listed").unwrap();
        std::fs::write(mods.join("order"), "b_b.ko\n\na.ko\n").unwrap();
        let out = dir.0.join("initramfs.cpio");

        write_initramfs(&agent, &mods, &out).unwrap();
        assert!(!dir.0.join("initramfs.cpio.tmp").exists());
        let entries = parse(&std::fs::read(&out).unwrap());
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "sys",
                "newroot",
                "lib",
                "lib/modules",
                "dev/console",
                "init",
                "lib/modules/b_b.ko",
                "lib/modules/a.ko",
                "lib/modules/order"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("init").data, std::fs::read(&agent).unwrap());
        assert_eq!(get("lib/modules/a.ko").data, b"module a");
        assert_eq!(get("lib/modules/order").data, b"b_b.ko\na.ko\n");
        assert_eq!(get("dev/console").mode, 0o020600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("newroot").mode, 0o040755);

        // The system's cpio reads it too, when installed.
        if let Ok(o) = std::process::Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&out)
            .output()
        {
            assert!(o.status.success(), "cpio -t: {o:?}");
            let listed = String::from_utf8(o.stdout).unwrap();
            assert_eq!(listed.lines().collect::<Vec<_>>(), names);
        }

        // A bad order file is refused and leaves nothing behind.
        std::fs::write(mods.join("order"), "../../etc/passwd\n").unwrap();
        let bad = dir.0.join("bad.cpio");
        assert!(write_initramfs(&agent, &mods, &bad).is_err());
        assert!(!bad.exists() && !dir.0.join("bad.cpio.tmp").exists());
        // So is a missing module.
        std::fs::write(mods.join("order"), "missing.ko\n").unwrap();
        assert!(write_initramfs(&agent, &mods, &bad).is_err());
        assert!(!bad.exists() && !dir.0.join("bad.cpio.tmp").exists());
    }
}
