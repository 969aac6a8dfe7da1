//! Connecting to a sandbox's control sockets (a container agent's socket, a
//! QEMU's agent, QMP and migration sockets) without trusting the path.
//!
//! A socket lives in a directory; whoever owns that directory could have
//! replaced the socket (with a symlink to another sandbox's, say). So every
//! connection checks its peer with `SO_PEERCRED`: the process listening must
//! run as the owner of the socket's directory (the daemon itself, root, for
//! a container's socket, which it binds in a root-owned directory; the VM's
//! own uid for a QEMU's). A socket reached through a swapped path belongs
//! to another identity and is refused.
//!
//! Owns: that check. It must not retry or interpret what is said on the
//! socket.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tokio::net::UnixStream;

/// Connect to `path` and verify that its peer runs as the owner of the
/// directory `path` is in.
pub async fn connect(path: &Path) -> io::Result<UnixStream> {
    let dir = path.parent().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "socket path has no directory")
    })?;
    let owner = std::fs::metadata(dir)?.uid();
    let stream = UnixStream::connect(path).await?;
    check_peer(&stream, owner)?;
    Ok(stream)
}

fn check_peer(stream: &UnixStream, owner: u32) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    if cred.uid() != owner {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the socket's peer runs as uid {} (pid {:?}), not as {owner}, the owner of its directory",
                cred.uid(),
                cred.pid()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_peer_of_another_identity_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mine = d.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        let sock = mine.join("a.sock");
        let _l = tokio::net::UnixListener::bind(&sock).unwrap();
        connect(&sock).await.expect("our own socket");
        // The same socket seen from a directory owned by someone else (as
        // when a sandbox swapped its socket for a link to this one).
        let theirs = d.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::symlink(&sock, theirs.join("a.sock")).unwrap();
        std::os::unix::fs::chown(&theirs, Some(4_000_123), None).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = connect(&theirs.join("a.sock")).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    }
}
