//! Binary framing of streamed bodies: exec and terminal output (agent →
//! host) and terminal input (host → agent).
//!
//! A frame is `kind: u8 | len: u32 big-endian | payload[len]`. Kinds: 1
//! stdout bytes (a terminal's output), 2 stderr bytes, 3 exit (payload: JSON
//! [`ExitStatus`], always last), 4 resize (JSON [`Resize`]), 5 input bytes
//! (keystrokes). Raw bytes, not JSON strings, so that binary data survives
//! untouched.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{ExitStatus, Resize};

const KIND_STDOUT: u8 = 1;
const KIND_STDERR: u8 = 2;
const KIND_EXIT: u8 = 3;
const KIND_RESIZE: u8 = 4;
const KIND_INPUT: u8 = 5;
const HEADER: usize = 5;
/// Largest payload a decoder accepts (output is sent in chunks well below it).
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
    Resize(Resize),
    Input(Bytes),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(usize),
    #[error("bad exit frame: {0}")]
    BadExit(String),
    #[error("bad resize frame: {0}")]
    BadResize(String),
    #[error("stream ended inside a frame")]
    Truncated,
}

impl Frame {
    /// Encode this frame into a fresh buffer.
    pub fn encode(&self) -> Bytes {
        let (kind, payload): (u8, Bytes) = match self {
            Frame::Stdout(b) => (KIND_STDOUT, b.clone()),
            Frame::Stderr(b) => (KIND_STDERR, b.clone()),
            Frame::Exit(st) => (
                KIND_EXIT,
                Bytes::from(serde_json::to_vec(st).expect("ExitStatus serializes")),
            ),
            Frame::Resize(r) => (
                KIND_RESIZE,
                Bytes::from(serde_json::to_vec(r).expect("Resize serializes")),
            ),
            Frame::Input(b) => (KIND_INPUT, b.clone()),
        };
        let mut out = BytesMut::with_capacity(HEADER + payload.len());
        out.put_u8(kind);
        out.put_u32(payload.len() as u32);
        out.put_slice(&payload);
        out.freeze()
    }
}

/// Incremental decoder: push bytes as they arrive, pop whole frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let kind = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if !matches!(
            kind,
            KIND_STDOUT | KIND_STDERR | KIND_EXIT | KIND_RESIZE | KIND_INPUT
        ) {
            return Err(FrameError::UnknownKind(kind));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        self.buf.advance(HEADER);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(match kind {
            KIND_STDOUT => Frame::Stdout(payload),
            KIND_STDERR => Frame::Stderr(payload),
            KIND_INPUT => Frame::Input(payload),
            KIND_RESIZE => Frame::Resize(
                serde_json::from_slice(&payload)
                    .map_err(|e| FrameError::BadResize(e.to_string()))?,
            ),
            _ => Frame::Exit(
                serde_json::from_slice(&payload).map_err(|e| FrameError::BadExit(e.to_string()))?,
            ),
        }))
    }

    /// Call at end of stream: an error if bytes of a partial frame remain.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> Frame {
        Frame::Exit(ExitStatus {
            exit_code: code,
            signal: None,
            timed_out: false,
            error: None,
        })
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let frames = vec![
            Frame::Stdout(Bytes::from_static(b"hello\n")),
            Frame::Stderr(Bytes::from_static(&[0xff, 0x00, 0x80])),
            Frame::Stdout(Bytes::new()),
            Frame::Input(Bytes::from_static(b"ls\r")),
            Frame::Resize(Resize {
                rows: 40,
                cols: 100,
            }),
            exit(3),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
        let mut dec = FrameDecoder::new();
        let mut got = vec![];
        for b in wire {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        dec.finish().unwrap();
        assert_eq!(got, frames);
    }

    #[test]
    fn rejects_garbage() {
        let mut dec = FrameDecoder::new();
        dec.push(&[9, 0, 0, 0, 0]);
        assert_eq!(dec.next_frame(), Err(FrameError::UnknownKind(9)));
        let mut dec = FrameDecoder::new();
        dec.push(&[1, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge(_))));
        let mut dec = FrameDecoder::new();
        dec.push(&[1, 0, 0, 0, 4, b'a']);
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(dec.finish(), Err(FrameError::Truncated));
    }
}
