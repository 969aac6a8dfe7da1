//! The QEMU command line of a sandbox VM (pure: builds arguments, runs
//! nothing). `-M microvm`: virtio-mmio devices only, no PCI, no firmware
//! option ROMs, no default devices; the legacy PIT/PIC and an ISA serial
//! port stay because, under TCG, the guest otherwise hangs calibrating its
//! TSC and the serial console is our post-mortem log. QEMU runs with
//! `-sandbox on` (seccomp: no obsolete calls, no privilege elevation, no
//! spawning, no resource control) and no monitor on stdio; QMP listens on
//! a unix socket in the sandbox directory.

use std::path::{Path, PathBuf};

use super::accel::Accel;
use super::virtiofs::{self, Share};

/// Everything that varies between VMs.
#[derive(Debug, Clone)]
pub struct VmArgs {
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mb: u64,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub disk: PathBuf,
    pub dir: PathBuf,
    pub hostname: String,
    /// Host CPU frequency for `tsc_early_khz` (TCG boots hang without it).
    pub tsc_khz: Option<u64>,
    /// Host directories served by virtiofsd.
    pub shares: Vec<Share>,
    /// A virtio-net NIC with the guest's lease (`nat`); QEMU gets the
    /// tap as an open file descriptor, number [`TAP_FD`].
    pub net: Option<crate::network::Lease>,
    /// The guest RAM file (shared, so snapshots can skip RAM in migration).
    pub mem_path: PathBuf,
    /// Wait for a migration stream (`-incoming defer`): a restore.
    pub incoming: bool,
    /// The disk's read-only base image comes as an open file descriptor,
    /// number [`BASE_FD`], rather than by the path its qcow2 header names:
    /// QEMU's uid needs no access to the template's directory.
    pub base_fd: bool,
}

/// x86 `COMMAND_LINE_SIZE` is 2048 bytes, with the terminating NUL.
pub const MAX_CMDLINE: usize = 2047;

pub const PORT_NAME: &str = "sandforge.agent";

/// The descriptor number a VM's tap is passed to QEMU as.
pub const TAP_FD: i32 = 3;
/// The descriptor number the base image is passed to QEMU as.
pub const BASE_FD: i32 = 4;

// What QEMU itself creates lives in the VM's own `qemu/` directory (see
// `identity`); the supervisor only reads there, never follows a link.

pub fn agent_socket(dir: &Path) -> PathBuf {
    super::identity::qemu_dir(dir).join("agent.sock")
}

pub fn qmp_socket(dir: &Path) -> PathBuf {
    super::identity::qemu_dir(dir).join("qmp.sock")
}

/// QEMU's serial console: a socket the supervisor reads into the capped
/// `console.log` (see [`crate::console`]). With nobody connected (the
/// supervisor is down) QEMU drops the output, so a guest can neither fill
/// the host's disk through it nor stall on it.
pub fn console_socket(dir: &Path) -> PathBuf {
    super::identity::qemu_dir(dir).join("console.sock")
}

pub fn pid_file(dir: &Path) -> PathBuf {
    super::identity::qemu_dir(dir).join("qemu.pid")
}

/// The kernel command line.
pub fn kernel_cmdline(a: &VmArgs) -> String {
    let mut c = vec![
        "console=ttyS0".to_string(),
        "reboot=k".into(),
        "panic=-1".into(),
        "quiet".into(),
        format!("sandforge.hostname={}", a.hostname),
        format!("sandforge.port={PORT_NAME}"),
    ];
    if let Some(khz) = a.tsc_khz {
        c.push(format!("tsc_early_khz={khz}"));
    }
    if !a.shares.is_empty() {
        c.push(format!(
            "sandforge.mounts={}",
            virtiofs::cmdline_value(&a.shares)
        ));
    }
    if let Some(l) = &a.net {
        c.push(format!(
            "sandforge.net={}/{},{}",
            l.guest_ip,
            crate::network::Lease::PREFIX_LEN,
            l.host_ip
        ));
    }
    c.join(" ")
}

pub fn args(a: &VmArgs) -> Vec<String> {
    let d = |p: PathBuf| p.display().to_string();
    let mut v: Vec<String> = vec![
        "-M".into(),
        "microvm,pit=on,pic=on,rtc=on,isa-serial=on,memory-backend=mem".into(),
    ];
    v.extend(a.accel.qemu_args());
    v.extend([
        "-smp".into(),
        a.cpus.to_string(),
        "-m".into(),
        format!("{}M", a.memory_mb),
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
            a.memory_mb,
            d(a.mem_path.clone())
        ),
        "-nodefaults".into(),
        // virtio 1.x transport: vhost-user-fs (and virtiofsd) require it.
        "-global".into(),
        "virtio-mmio.force-legacy=false".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-display".into(),
        "none".into(),
        // A guest reboot or panic ends QEMU: the sandbox is then failed.
        "-no-reboot".into(),
        "-kernel".into(),
        d(a.kernel.clone()),
        "-initrd".into(),
        d(a.initramfs.clone()),
        "-append".into(),
        kernel_cmdline(a),
        "-chardev".into(),
        format!(
            "socket,id=console,path={},server=on,wait=off",
            d(console_socket(&a.dir))
        ),
        "-serial".into(),
        "chardev:console".into(),
    ]);
    let mut backing = "";
    if a.base_fd {
        v.extend([
            "-add-fd".into(),
            format!("fd={BASE_FD},set=1"),
            "-blockdev".into(),
            "driver=file,node-name=basefile,filename=/dev/fdset/1,read-only=on".into(),
            "-blockdev".into(),
            "driver=raw,node-name=base,file=basefile,read-only=on".into(),
        ]);
        backing = ",backing=base";
    }
    v.extend([
        "-drive".into(),
        format!(
            "id=root,file={},format=qcow2,if=none,discard=unmap{backing}",
            d(a.disk.clone())
        ),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            d(agent_socket(&a.dir))
        ),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={PORT_NAME}"),
    ]);
    for s in &a.shares {
        v.extend([
            "-chardev".into(),
            format!("socket,id={},path={}", s.tag, d(s.socket.clone())),
            "-device".into(),
            format!("vhost-user-fs-device,chardev={0},tag={0}", s.tag),
        ]);
    }
    if let Some(l) = &a.net {
        // A locally administered MAC derived from the slot.
        let s = l.slot.to_be_bytes();
        v.extend([
            "-netdev".into(),
            format!("tap,id=net0,fd={TAP_FD}"),
            "-device".into(),
            format!(
                "virtio-net-device,netdev=net0,mac=52:54:{:02x}:{:02x}:{:02x}:{:02x}",
                s[0], s[1], s[2], s[3]
            ),
        ]);
    }
    if a.incoming {
        v.extend(["-incoming".into(), "defer".into()]);
    }
    v.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", d(qmp_socket(&a.dir))),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-pidfile".into(),
        d(pid_file(&a.dir)),
    ]);
    v
}

/// The host CPU frequency in kHz, from /proc/cpuinfo.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_shape() {
        let a = VmArgs {
            accel: Accel::Tcg,
            cpus: 2,
            memory_mb: 512,
            kernel: "/g/vmlinuz".into(),
            initramfs: "/s/initramfs".into(),
            disk: "/s/sb/disk.qcow2".into(),
            dir: "/s/sb".into(),
            hostname: "box".into(),
            tsc_khz: Some(2_000_000),
            shares: vec![],
            net: None,
            mem_path: "/dev/shm/sf/sb.mem".into(),
            incoming: false,
            base_fd: true,
        };
        let v = args(&a);
        let joined = v.join(" ");
        assert!(joined.contains(
            "-add-fd fd=4,set=1 -blockdev driver=file,node-name=basefile,filename=/dev/fdset/1,read-only=on"
        ));
        assert!(joined.contains("format=qcow2,if=none,discard=unmap,backing=base"));
        assert!(joined.contains("-accel tcg,thread=multi"));
        assert!(joined.contains("-smp 2 -m 512M"));
        assert!(joined.contains("size=512M,mem-path=/dev/shm/sf/sb.mem,share=on"));
        assert!(!joined.contains("-incoming"));
        assert!(joined.contains("socket,id=agent,path=/s/sb/qemu/agent.sock,server=on,wait=off"));
        assert!(joined.contains("-qmp unix:/s/sb/qemu/qmp.sock"));
        assert!(joined.contains(
            "-chardev socket,id=console,path=/s/sb/qemu/console.sock,server=on,wait=off -serial chardev:console"
        ));
        assert!(joined.contains("-sandbox on,"));
        assert!(!joined.contains("virtio-net"), "offline VMs have no NIC");
        let cmdline = &v[v.iter().position(|x| x == "-append").unwrap() + 1];
        assert!(
            cmdline.contains("tsc_early_khz=2000000") && cmdline.contains("sandforge.hostname=box")
        );
        assert!(!cmdline.contains("sandforge.mounts"));
        assert!(Accel::Kvm.qemu_args().contains(&"host".to_string()));
        let shared = VmArgs {
            shares: vec![Share {
                tag: "sf0".into(),
                socket: "/s/sb/vfs-0.sock".into(),
                guest_path: "/work".into(),
                read_only: true,
            }],
            ..a
        };
        let joined = args(&shared).join(" ");
        assert!(joined.contains("-chardev socket,id=sf0,path=/s/sb/vfs-0.sock"));
        assert!(joined.contains("-device vhost-user-fs-device,chardev=sf0,tag=sf0"));
        assert!(kernel_cmdline(&shared).contains("sandforge.mounts=sf0:/work:ro"));
    }
}
