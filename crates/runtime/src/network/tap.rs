//! Opening a VM's tap for its QEMU. QEMU runs unprivileged and
//! `/dev/net/tun` is often root-only (0600), so the supervisor opens the
//! persistent tap (`links::tap` made it) and hands QEMU the open file
//! descriptor (`-netdev tap,fd=N`), as libvirt does. `unsafe` is limited to
//! the one `TUNSETIFF` ioctl.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// An fd attached to the existing tap `iface` (no packet info header,
/// with virtio-net headers).
pub fn open(iface: &str) -> io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back) one ifreq through the
    // pointer, which points at a live local; the fd is open for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}
