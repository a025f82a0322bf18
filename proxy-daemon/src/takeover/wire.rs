//! The control socket's framing: each message is one JSON value plus an optional blob of
//! raw bytes, with file descriptors passed alongside (`SCM_RIGHTS`), over a Unix stream
//! socket. `[u32 json length][u32 blob length][json][blob]`, little-endian; the
//! descriptors ride on the first byte of the message.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 64;
/// Largest message accepted (a tunnel's held bytes are at most a few hundred KiB).
const MAX_MESSAGE: usize = 16 << 20;

pub struct Channel {
    stream: UnixStream,
}

/// A received message: its JSON value, its blob and the descriptors that came with it.
pub struct Received<T> {
    pub value: T,
    pub blob: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Channel {
        Channel { stream }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub async fn send<T: Serialize>(
        &self,
        value: &T,
        blob: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        assert!(fds.len() <= MAX_FDS, "too many descriptors in one message");
        let json = serde_json::to_vec(value).map_err(io::Error::other)?;
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&(json.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&(blob.len() as u32).to_le_bytes());
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let parts: [&[u8]; 3] = [&header, &json, blob];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut sent = 0;
        while sent < total {
            // The remaining parts, from `sent` on.
            let mut skip = sent;
            let iov: Vec<IoSlice<'_>> = parts
                .iter()
                .filter_map(|p| {
                    if skip >= p.len() {
                        skip -= p.len();
                        None
                    } else {
                        let s = IoSlice::new(&p[skip..]);
                        skip = 0;
                        Some(s)
                    }
                })
                .collect();
            let rights = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
                &rights
            } else {
                &[]
            };
            let n = loop {
                self.stream.writable().await?;
                match self.stream.try_io(Interest::WRITABLE, || {
                    sendmsg::<()>(
                        self.stream.as_raw_fd(),
                        &iov,
                        cmsgs,
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(io::Error::from)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            sent += n;
        }
        Ok(())
    }

    /// The next message; `Ok(None)` when the peer closed between messages.
    pub async fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<Received<T>>> {
        let mut fds = Vec::new();
        let mut header = [0u8; 8];
        if !self.read_exact(&mut header, &mut fds).await? {
            return Ok(None);
        }
        let json_len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let blob_len = u32::from_le_bytes(header[4..].try_into().unwrap()) as usize;
        if json_len + blob_len > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "control message too large",
            ));
        }
        let mut body = vec![0u8; json_len + blob_len];
        if !self.read_exact(&mut body, &mut fds).await? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let blob = body.split_off(json_len);
        let value = serde_json::from_slice(&body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Some(Received { value, blob, fds }))
    }

    /// Fills `buf`, collecting any descriptors that arrive; false on EOF before the
    /// first byte.
    async fn read_exact(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            let n = loop {
                self.stream.readable().await?;
                let result = self.stream.try_io(Interest::READABLE, || {
                    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
                    let mut iov = [IoSliceMut::new(&mut buf[got..])];
                    let msg = recvmsg::<()>(
                        self.stream.as_raw_fd(),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    let mut received = Vec::new();
                    for c in msg.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just installed these descriptors for us.
                            received.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                        // Descriptors the kernel could not install (out of fds): the
                        // sockets they were are gone; never carry on as if whole.
                        return Err(io::Error::other(
                            "descriptors passed over the control socket were truncated (open-file limit?)",
                        ));
                    }
                    Ok((msg.bytes, received))
                });
                match result {
                    Ok((n, received)) => {
                        fds.extend(received);
                        break n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[tokio::test]
    async fn messages_carry_json_blobs_and_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Channel::new(a), Channel::new(b));
        let mut file = tempfile();
        file.write_all(b"passed along").unwrap();
        let big = vec![7u8; 300_000];
        let send = async {
            a.send(&("hello", 42), &big, &[std::os::fd::AsFd::as_fd(&file)])
                .await
                .unwrap();
            a.send(&"second", b"", &[]).await.unwrap();
        };
        let recv = async {
            let m = b.recv::<(String, u32)>().await.unwrap().unwrap();
            let m2 = b.recv::<String>().await.unwrap().unwrap();
            (m, m2)
        };
        let (_, (m, m2)) = tokio::join!(send, recv);
        assert_eq!(m.value, ("hello".to_owned(), 42));
        assert_eq!(m.blob, big);
        assert_eq!(m.fds.len(), 1);
        let mut passed = std::fs::File::from(m.fds.into_iter().next().unwrap());
        passed.rewind().unwrap();
        let mut text = String::new();
        passed.read_to_string(&mut text).unwrap();
        assert_eq!(text, "passed along");
        assert_eq!(m2.value, "second");
        assert!(m2.fds.is_empty());
        drop(a);
        assert!(b.recv::<String>().await.unwrap().is_none());
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("wire-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
