//! The guest side of a microVM's network (init mode only): give `eth0` the
//! address the host leased (`sandforge.net=ADDR/LEN,GATEWAY` on the kernel
//! command line), bring it up, route everything through the gateway, and
//! point `/etc/resolv.conf` at the supervisor's resolver there. Plain
//! interface and route ioctls: the guest has no iproute2 guarantee and
//! this runs before the agent. It must not be used in a container (the
//! host configures a container's end of its link).
//!
//! The host does not rely on any of this for security: its nftables rules
//! key on the host end of the link and drop any other source address, so
//! a guest that changes its own configuration gains nothing.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

/// `sandforge.net=` parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSpec {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

impl NetSpec {
    pub fn parse(v: &str) -> Result<NetSpec, String> {
        let bad = || format!("sandforge.net={v}: want ADDR/LEN,GATEWAY");
        let (cidr, gw) = v.split_once(',').ok_or_else(bad)?;
        let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
        let prefix: u8 = len.parse().map_err(|_| bad())?;
        if !(1..=32).contains(&prefix) {
            return Err(bad());
        }
        Ok(NetSpec {
            addr: addr.parse().map_err(|_| bad())?,
            prefix,
            gateway: gw.parse().map_err(|_| bad())?,
        })
    }

    fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix as u32))
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-old-data
    // structs; the kernel reads a sockaddr_in from this memory for AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    req
}

fn ioctl<T>(fd: &impl AsRawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the request's matching argument type
    // (ifreq for SIOC*IF*, rtentry for SIOCADDRT) as a live, exclusive
    // reference; the kernel reads and writes only within it.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Configure `ifname` as `spec` says, with a default route.
pub fn configure(ifname: &str, spec: &NetSpec) -> io::Result<()> {
    let sock = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
    let mut req = ifreq(ifname);
    req.ifr_ifru.ifru_addr = sockaddr(spec.addr);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req)?;
    let mut req = ifreq(ifname);
    req.ifr_ifru.ifru_netmask = sockaddr(spec.netmask());
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req)?;
    let mut req = ifreq(ifname);
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req)?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(spec.gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(&sock, libc::SIOCADDRT, &mut rt)?;
    std::fs::write(
        "/etc/resolv.conf",
        format!(
            "nameserver {}\noptions timeout:2 attempts:2\n",
            spec.gateway
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let s = NetSpec::parse("10.213.0.2/30,10.213.0.1").unwrap();
        assert_eq!(s.addr, Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        for bad in ["10.0.0.2", "10.0.0.2/33,10.0.0.1", "x/30,y", "10.0.0.2/30"] {
            assert!(NetSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
