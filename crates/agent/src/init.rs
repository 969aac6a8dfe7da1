//! Init mode: the agent as PID 1 of a microVM, run from the initramfs as
//! `/init` (or with `--init`), before any async runtime exists.
//!
//! Owns: bringing the guest from the kernel's hand-off to a running agent:
//! mounting `/dev`, `/proc`, `/sys`; reading the `sandforge.*` keys of
//! `/proc/cmdline`; loading the kernel modules listed in
//! `/lib/modules/order` (written by the host's initramfs builder); mounting
//! the root disk on `/newroot`, copying itself to `/.sandforge/sandforge-agent`
//! there (a tmpfs, remounted read-only) and switching root into it; then the
//! usual mounts of a Linux system (`/dev/pts`, `/dev/shm`, `/tmp`, `/run`),
//! the hostname, `lo`, the virtio-fs shares; finally finding the
//! virtio-serial port by its name and `exec`ing the agent's `--device` mode
//! on it, so PID 1 stays the agent, now running from the real root.
//!
//! Any failure is fatal: it is printed to the console (`sandforge-init: ...`)
//! and the VM powers off, so the host sees QEMU exit instead of a guest that
//! never answers.
//!
//! Must not: run anywhere but as PID 1 (it refuses), trust the root disk's
//! contents for anything but the files it runs, serve requests, or start
//! threads (it execs right after). `unsafe` is limited to the [`sys`]
//! wrappers of three syscalls that neither std nor rustix's enabled features
//! cover).

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use percent_encoding::percent_decode_str;
use rustix::mount::{mount, mount_move, mount_remount, MountFlags};

/// Where the agent copies itself in the new root (the container backend
/// binds the binary at the same path).
const AGENT_DIR: &str = "/.sandforge";
const AGENT_PATH: &str = "/.sandforge/sandforge-agent";
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long the root disk and the agent port may take to appear.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// Whether the command line asks for init mode: run as `/init`, or
/// `--init` as the first argument.
pub fn requested(argv0: &str, args: &[String]) -> bool {
    argv0 == "/init" || args.first().map(String::as_str) == Some("--init")
}

/// What the host put on the kernel command line.
#[derive(Debug, PartialEq)]
struct Config {
    /// `sandforge.root=`: the root block device (default `/dev/vda`).
    root: String,
    /// `sandforge.port=`: the virtio-serial port name (default
    /// `sandforge.agent`).
    port: String,
    /// `sandforge.hostname=`.
    hostname: Option<String>,
    /// `sandforge.net=ADDR/LEN,GATEWAY`: configure `eth0` (else no NIC).
    net: Option<crate::netconf::NetSpec>,
    /// `sandforge.mounts=TAG:GUESTPATH:ro|rw,...` (guest paths
    /// percent-decoded, so `%2C`, `%3A`, `%20` stand for `,`, `:`, space).
    mounts: Vec<Share>,
}

/// One virtio-fs share.
#[derive(Debug, PartialEq)]
struct Share {
    tag: String,
    path: PathBuf,
    readonly: bool,
}

fn parse_cmdline(cmdline: &str) -> Result<Config, String> {
    let mut cfg = Config {
        root: "/dev/vda".into(),
        port: "sandforge.agent".into(),
        hostname: None,
        net: None,
        mounts: Vec::new(),
    };
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "sandforge.root" => {
                if !value.starts_with("/dev/") || value.contains("..") {
                    return Err(format!("sandforge.root={value}: not a /dev path"));
                }
                cfg.root = value.into();
            }
            "sandforge.port" => {
                if value.is_empty() {
                    return Err("sandforge.port is empty".into());
                }
                cfg.port = value.into();
            }
            "sandforge.hostname" => {
                if value.is_empty() || value.len() > 64 {
                    return Err(format!("sandforge.hostname={value}: 1 to 64 bytes"));
                }
                cfg.hostname = Some(value.into());
            }
            "sandforge.net" => cfg.net = Some(crate::netconf::NetSpec::parse(value)?),
            "sandforge.mounts" => {
                cfg.mounts = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(parse_share)
                    .collect::<Result<_, _>>()?;
            }
            _ => {}
        }
    }
    Ok(cfg)
}

fn parse_share(spec: &str) -> Result<Share, String> {
    let bad = |why: &str| format!("sandforge.mounts entry {spec:?}: {why}");
    let mut parts = spec.split(':');
    let (Some(tag), Some(path), Some(mode), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("want TAG:GUESTPATH:ro|rw"));
    };
    if tag.is_empty() {
        return Err(bad("empty tag"));
    }
    let readonly = match mode {
        "ro" => true,
        "rw" => false,
        _ => return Err(bad("mode must be ro or rw")),
    };
    let path = percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| bad("path is not UTF-8"))?;
    let dots = path.split('/').any(|s| s == "." || s == "..");
    if !path.starts_with('/') || dots || path.trim_matches('/').is_empty() || path.len() > 4096 {
        return Err(bad("path must be absolute, without . or .., and not /"));
    }
    let path = PathBuf::from(path.as_ref());
    Ok(Share {
        tag: tag.into(),
        path,
        readonly,
    })
}

/// Run init mode; never returns (it execs the agent or powers off).
pub fn run() -> ! {
    if rustix::process::getpid() != rustix::process::Pid::INIT {
        eprintln!("sandforge-init: refusing to run: not PID 1");
        std::process::exit(2);
    }
    match boot() {
        Ok(never) => match never {},
        Err(e) => fatal(&e),
    }
}

/// An error message with its context.
type Fail = String;

fn ctx(what: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> Fail {
    move |e| format!("{}: {e}", what())
}

fn log(msg: &str) {
    eprintln!("sandforge-init: {msg}");
}

fn fatal(msg: &str) -> ! {
    eprintln!("sandforge-init: fatal: {msg}; powering off");
    rustix::fs::sync();
    sys::power_off();
    // Only reached if power-off failed: exiting makes the kernel panic, and
    // `panic=-1` (with QEMU's -no-reboot) ends the VM that way.
    std::process::exit(1)
}

/// Seconds since boot, for the progress lines.
fn uptime() -> String {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

enum Never {}

fn boot() -> Result<Never, Fail> {
    // 1. The kernel's own filesystems.
    let kernel_fs = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount_fs("devtmpfs", "/dev", MountFlags::NOSUID, "mode=0755")?;
    mount_fs("proc", "/proc", kernel_fs, "")?;
    mount_fs("sysfs", "/sys", kernel_fs, "")?;

    // 2. What the host asks for.
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(ctx(|| "/proc/cmdline".into()))?;
    let cfg = parse_cmdline(&cmdline)?;

    // 3. Drivers.
    load_modules(Path::new("/lib/modules"))?;

    // 4. The root disk.
    wait_for(&cfg.root, || Path::new(&cfg.root).exists())?;
    mkdir_p("/newroot")?;
    mount(&cfg.root, "/newroot", "ext4", MountFlags::NOATIME, "").map_err(|e| {
        format!(
            "mounting the root disk {} (ext4) on /newroot: {e}",
            cfg.root
        )
    })?;
    log(&format!("root {} mounted ({} s)", cfg.root, uptime()));
    // The host may have made the disk larger than the template's image
    // (`disk_mb`): grow the filesystem to fill it, online.
    match sys::grow_ext4(&cfg.root, "/newroot") {
        Ok(Some(bytes)) => log(&format!(
            "root grown to {} MiB ({} s)",
            bytes >> 20,
            uptime()
        )),
        Ok(None) => {}
        Err(e) => return Err(format!("growing the root filesystem: {e}")),
    }

    // 5. The agent's own copy, out of reach of the disk's contents.
    let dir = format!("/newroot{AGENT_DIR}");
    mkdir_p(&dir)?;
    mount_fs(
        "tmpfs",
        &dir,
        MountFlags::NOSUID | MountFlags::NODEV,
        "mode=0755",
    )?;
    let target = format!("/newroot{AGENT_PATH}");
    fs::copy("/init", &target).map_err(ctx(|| format!("copying /init to {target}")))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .map_err(ctx(|| format!("chmod {target}")))?;
    mount_remount(
        &dir,
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "mode=0755",
    )
    .map_err(|e| format!("remounting {dir} read-only: {e}"))?;

    // 6. Switch root. The initramfs files are dead weight from here on.
    let _ = fs::remove_file("/init");
    let _ = fs::remove_dir_all("/lib");
    for dir in ["/dev", "/proc", "/sys"] {
        let to = format!("/newroot{dir}");
        mkdir_p(&to)?;
        mount_move(dir, &to).map_err(|e| format!("moving {dir} to {to}: {e}"))?;
    }
    rustix::process::chdir("/newroot").map_err(|e| format!("chdir /newroot: {e}"))?;
    mount_move(".", "/").map_err(|e| format!("moving /newroot to /: {e}"))?;
    rustix::process::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    rustix::process::chdir("/").map_err(|e| format!("chdir /: {e}"))?;

    // 7. The rest of a Linux system.
    system_mounts()?;
    if let Some(name) = &cfg.hostname {
        fs::write("/proc/sys/kernel/hostname", name)
            .map_err(ctx(|| format!("setting the hostname {name:?}")))?;
        // The same identity files the container backend writes, so tools
        // that read them (and the files API) agree with `hostname`.
        fs::write("/etc/hostname", format!("{name}\n"))
            .map_err(ctx(|| "writing /etc/hostname".into()))?;
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"
        );
        fs::write("/etc/hosts", hosts).map_err(ctx(|| "writing /etc/hosts".into()))?;
    }
    sys::loopback_up().map_err(ctx(|| "bringing lo up".into()))?;
    if let Some(net) = &cfg.net {
        wait_for("network device eth0", || {
            Path::new("/sys/class/net/eth0").exists()
        })?;
        crate::netconf::configure("eth0", net)
            .map_err(ctx(|| format!("configuring eth0 ({net:?})")))?;
    }
    for share in &cfg.mounts {
        mkdir_p(&share.path)?;
        let mut flags = MountFlags::NODEV;
        if share.readonly {
            flags |= MountFlags::RDONLY;
        }
        mount(&share.tag, &share.path, "virtiofs", flags, "").map_err(|e| {
            format!(
                "mounting virtio-fs {:?} on {}: {e}",
                share.tag,
                share.path.display()
            )
        })?;
    }

    // 8. The agent's port, named by the host.
    let mut device = None;
    wait_for(&format!("virtio-serial port {:?}", cfg.port), || {
        device = find_port(&cfg.port);
        device.is_some()
    })?;
    let device = device.unwrap_or_default();

    // 9. Become the agent.
    log(&format!("starting the agent on {device} ({} s)", uptime()));
    let err = Command::new(AGENT_PATH)
        .arg0("sandforge-agent")
        .args(["--device", &device])
        .env_clear()
        .env("PATH", PATH_ENV)
        .current_dir("/")
        .exec();
    Err(format!("exec {AGENT_PATH}: {err}"))
}

fn mkdir_p(path: impl AsRef<Path>) -> Result<(), Fail> {
    let path = path.as_ref();
    fs::create_dir_all(path).map_err(ctx(|| format!("mkdir {}", path.display())))
}

fn mount_fs(fs_type: &str, dir: &str, flags: MountFlags, data: &str) -> Result<(), Fail> {
    mkdir_p(dir)?;
    mount(fs_type, dir, fs_type, flags, data)
        .map_err(|e| format!("mounting {fs_type} on {dir}: {e}"))
}

/// The mounts a program expects on a Linux system, in the new root.
fn system_mounts() -> Result<(), Fail> {
    let hardened = MountFlags::NOSUID | MountFlags::NODEV;
    mount_fs(
        "devpts",
        "/dev/pts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )?;
    mount_fs("tmpfs", "/dev/shm", hardened, "mode=1777")?;
    mount_fs("tmpfs", "/tmp", hardened, "mode=1777")?;
    mount_fs("tmpfs", "/run", hardened, "mode=0755")?;
    // devtmpfs has no /dev/fd & co.; bash's process substitution needs them.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match symlink(target, link) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(format!("symlink {link}: {e}"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Load every module named in `dir/order`, in order (already loaded is fine).
fn load_modules(dir: &Path) -> Result<(), Fail> {
    let order = dir.join("order");
    let list = match fs::read_to_string(&order) {
        Ok(list) => list,
        // A kernel with everything built in needs none.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", order.display())),
    };
    let mut loaded = 0;
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let file = fs::File::open(&path).map_err(ctx(|| path.display().to_string()))?;
        match sys::finit_module(&file) {
            Ok(()) => loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(format!("loading module {name}: {e}")),
        }
    }
    log(&format!("{loaded} modules loaded ({} s)", uptime()));
    Ok(())
}

/// Poll `ready` every 10 ms for up to 10 s.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<(), Fail> {
    let deadline = Instant::now() + DEVICE_TIMEOUT;
    while !ready() {
        if Instant::now() >= deadline {
            return Err(format!("{what} did not appear within {DEVICE_TIMEOUT:?}"));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// `/dev/<port>` of the virtio-serial port named `name`, once its node exists.
fn find_port(name: &str) -> Option<String> {
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let Ok(found) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if found.trim_end_matches('\n') == name {
            let dev = Path::new("/dev").join(entry.file_name());
            return dev.exists().then(|| dev.display().to_string());
        }
    }
    None
}

/// The raw syscalls init needs that std and rustix (with this crate's
/// features) do not wrap.
mod sys {
    use std::io;
    use std::os::fd::{AsFd, AsRawFd};

    /// `finit_module(fd, "", 0)`.
    pub fn finit_module(file: &impl AsFd) -> io::Result<()> {
        // SAFETY: the fd is open for the whole call and the parameter string
        // is a static NUL-terminated empty C string; the kernel only reads
        // both.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_fd().as_raw_fd(),
                c"".as_ptr(),
                0,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Grow the ext4 filesystem mounted at `mnt` to fill the block device
    /// `dev` (`EXT4_IOC_RESIZE_FS`, online). `None` when it already does.
    pub fn grow_ext4(dev: &str, mnt: &str) -> io::Result<Option<u64>> {
        /// `_IOR(0x12, 114, u64)` from linux/fs.h.
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        /// `_IOW('f', 16, u64)` from fs/ext4/ext4.h.
        const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
        let disk = std::fs::File::open(dev)?;
        let mut bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
        // points at a live local; the fd is open for the call.
        if unsafe { libc::ioctl(disk.as_raw_fd(), BLKGETSIZE64, &mut bytes) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let st = rustix::fs::statvfs(mnt)?;
        let block = st.f_bsize.max(1024);
        let want = bytes / block;
        // f_blocks leaves out ext4's metadata overhead, so it is below the
        // real block count: equal or more means there is nothing to add.
        if want <= st.f_blocks {
            return Ok(None);
        }
        let root = std::fs::File::open(mnt)?;
        // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count)
        // through the pointer, which points at a live local. The kernel
        // treats the current size as a no-op and refuses to shrink.
        if unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &want) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(want * block))
    }

    /// `reboot(RB_POWER_OFF)`: returns only on failure.
    pub fn power_off() {
        // SAFETY: takes no pointers; as PID 1 with nothing left to clean up
        // (the caller synced), stopping the machine is what we want.
        unsafe {
            libc::reboot(libc::RB_POWER_OFF);
        }
    }

    /// Set `IFF_UP` on `lo` (SIOCGIFFLAGS/SIOCSIFFLAGS on a UDP socket).
    pub fn loopback_up() -> io::Result<()> {
        // Any AF_INET socket will do for interface ioctls.
        let sock = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        // SAFETY: `req` is a live, correctly laid out ifreq for both calls;
        // the kernel reads the name and reads/writes only ifr_flags.
        unsafe {
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_requested() {
        assert!(requested("/init", &[]));
        assert!(requested("sandforge-agent", &["--init".into()]));
        assert!(!requested(
            "sandforge-agent",
            &["--device".into(), "/dev/x".into()]
        ));
        assert!(!requested("init", &[]));
    }

    #[test]
    fn cmdline_defaults() {
        let cfg = parse_cmdline("console=ttyS0 reboot=k panic=-1 quiet\n").unwrap();
        assert_eq!(
            cfg,
            Config {
                root: "/dev/vda".into(),
                port: "sandforge.agent".into(),
                hostname: None,
                net: None,
                mounts: vec![],
            }
        );
        let cfg = parse_cmdline("sandforge.net=10.213.0.2/30,10.213.0.1").unwrap();
        assert_eq!(cfg.net.unwrap().gateway.to_string(), "10.213.0.1");
        assert!(parse_cmdline("sandforge.net=nonsense").is_err());
    }

    #[test]
    fn cmdline_keys() {
        let cfg = parse_cmdline(
            "console=ttyS0 sandforge.root=/dev/vdb sandforge.port=p1 \
             sandforge.hostname=vm-1 sandforge.future=x virtio_mmio.device=4K@0xd0000000:5 \
             sandforge.mounts=src:/work:rw,data:/mnt/my%20data%2Cv2:ro,\n",
        )
        .unwrap();
        assert_eq!(cfg.root, "/dev/vdb");
        assert_eq!(cfg.port, "p1");
        assert_eq!(cfg.hostname.as_deref(), Some("vm-1"));
        assert_eq!(
            cfg.mounts,
            vec![
                Share {
                    tag: "src".into(),
                    path: "/work".into(),
                    readonly: false
                },
                Share {
                    tag: "data".into(),
                    path: "/mnt/my data,v2".into(),
                    readonly: true
                },
            ]
        );
        // An empty list is no mounts.
        assert_eq!(parse_cmdline("sandforge.mounts=").unwrap().mounts, vec![]);
    }

    #[test]
    fn cmdline_rejects() {
        for bad in [
            "sandforge.root=vda",
            "sandforge.root=/dev/../etc/x",
            "sandforge.port=",
            "sandforge.hostname=",
            "sandforge.mounts=tag",
            "sandforge.mounts=tag:/a",
            "sandforge.mounts=tag:/a:rx",
            "sandforge.mounts=tag:/a:ro:extra",
            "sandforge.mounts=:/a:ro",
            "sandforge.mounts=t:relative:ro",
            "sandforge.mounts=t:/:ro",
            "sandforge.mounts=t:/a/../b:ro",
            "sandforge.mounts=t:/a/./b:rw",
            "sandforge.mounts=t:/a%2F..%2Fb:rw",
            "sandforge.mounts=t:/%FF:rw",
        ] {
            assert!(parse_cmdline(bad).is_err(), "{bad} accepted");
        }
        let long = format!("sandforge.hostname={}", "h".repeat(65));
        assert!(parse_cmdline(&long).is_err());
    }
}
