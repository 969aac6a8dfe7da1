//! Buffered exec output (`/execute`, `/exec` without ndjson): the
//! daemon-wide budget (`exec_buffer_budget_mb`) every buffered exec draws
//! from, and collecting one exec's frames into its JSON answer within it.
//!
//! Owns the accounting. A buffered exec is admitted only while the budget
//! has twice [`ADMISSION`] bytes left, and takes one (429 `limit`
//! otherwise, before the command runs); it then reserves every piece of output as it arrives, twice: the
//! decoded text it keeps, and the exact bytes that text will take in the
//! JSON answer. When a reservation fails (budget spent, or the answer would
//! pass [`MAX_ANSWER_BYTES`]), that stream stops being kept (`truncated:
//! true`) while the command runs on to its exit status. The text is freed
//! once the JSON is written; the JSON's reservation lives in the response
//! body and is given back when the body has been sent or dropped, so a
//! client that never reads holds its own answer, never more.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use hyper::body::{Frame as BodyFrame, SizeHint};
use sandforge_agent_proto::Frame;
use sandforge_api::limits;
use sandforge_runtime::agent::ExecStream;

use crate::controller::Controller;
use crate::error::ApiError;

/// What a buffered exec must be able to reserve to be admitted; it is its
/// first output's and its answer's frame.
pub const ADMISSION: usize = 64 * 1024;
/// The most one answer holds (its text and JSON together), whatever the
/// budget: a stream of control characters (six JSON bytes each) is cut
/// sooner than [`limits::MAX_BUFFERED_OUTPUT`] would cut it.
pub const MAX_ANSWER_BYTES: usize = 6 * limits::MAX_BUFFERED_OUTPUT;
/// The pieces a response body is sent in.
const SEND_CHUNK: usize = 64 * 1024;
/// Extra time the supervisor waits beyond a command's own timeout before it
/// gives up on the agent (the agent enforces the timeout itself).
const GRACE: Duration = Duration::from_secs(15);

/// Bytes all buffered execs of the daemon may hold at once.
#[derive(Debug)]
pub struct OutputBudget {
    capacity: usize,
    used: AtomicUsize,
}

impl OutputBudget {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(OutputBudget {
            capacity,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes reserved now.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Take `n` bytes if `spare` more would still be left.
    fn take(&self, n: usize, spare: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n)
                    .filter(|&t| t.saturating_add(spare) <= self.capacity)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Admit one buffered exec, or `None` when the budget is spent: less
    /// than two admissions' worth left. (The last is the running execs':
    /// one cut while a short exec held its admission must not leave that
    /// admission to be handed on from short exec to short exec.)
    pub fn admit(self: &Arc<Self>) -> Option<Reservation> {
        self.take(ADMISSION, ADMISSION).then(|| Reservation {
            budget: self.clone(),
            held: ADMISSION,
            used: 0,
        })
    }
}

/// One exec's share of the budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<OutputBudget>,
    /// Taken from the budget.
    held: usize,
    /// Of which in use.
    used: usize,
}

impl Reservation {
    /// Account `n` more bytes, taking from the budget what `held` lacks.
    fn take(&mut self, n: usize) -> bool {
        let want = self.used.saturating_add(n);
        if want > MAX_ANSWER_BYTES {
            return false;
        }
        if want > self.held {
            if !self.budget.take(want - self.held, 0) {
                return false;
            }
            self.held = want;
        }
        self.used = want;
        true
    }

    /// How many more bytes [`Reservation::take`] could account now.
    fn room(&self) -> usize {
        let spare = self.held - self.used;
        let free = self
            .budget
            .capacity
            .saturating_sub(self.budget.used.load(Ordering::Acquire));
        (spare + free).min(MAX_ANSWER_BYTES.saturating_sub(self.used))
    }

    /// Keep `n` bytes (what the answer now holds), give back the rest.
    fn shrink_to(&mut self, n: usize) {
        if n < self.held {
            self.budget.give(self.held - n);
            self.held = n;
        }
        self.used = self.used.min(n);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

/// 429 `limit`: the budget is spent (nothing was run).
pub fn budget_spent(budget: &OutputBudget) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "limit",
        format!(
            "buffered exec output: the daemon's budget of {} MiB is in use by other calls; retry later or stream with Accept: application/x-ndjson",
            budget.capacity >> 20
        ),
    )
}

/// Decodes UTF-8 across chunk boundaries: an incomplete trailing sequence is
/// held back until the next chunk instead of becoming U+FFFD.
#[derive(Default)]
pub struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    pub fn push(&mut self, data: &[u8]) -> String {
        self.0.extend_from_slice(data);
        let keep_from = match std::str::from_utf8(&self.0) {
            Ok(_) => self.0.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.0.len(),
        };
        let rest = self.0.split_off(keep_from);
        let s = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = rest;
        s
    }

    /// What is held back, decoded (an incomplete sequence at the end).
    fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.0).into_owned();
        self.0.clear();
        s
    }
}

/// serde_json's string escaping without the quotes.
struct Unquoted;

impl serde_json::ser::Formatter for Unquoted {
    fn begin_string<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        Ok(())
    }
    fn end_string<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_escaped(out: &mut Vec<u8>, s: &str) {
    let mut ser = serde_json::Serializer::with_formatter(out, Unquoted);
    // Writing a string into a Vec cannot fail.
    let _ = serde::Serialize::serialize(s, &mut ser);
}

/// The bytes `s` takes inside a JSON string.
fn escaped_len(s: &str) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let mut ser = serde_json::Serializer::with_formatter(&mut c, Unquoted);
    let _ = serde::Serialize::serialize(s, &mut ser);
    c.0
}

/// The bytes `c` takes inside a JSON string, as serde_json escapes it.
fn escaped_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The longest prefix of `text` (a byte index on a char boundary) whose
/// text and escaped JSON together take at most `room` bytes.
fn fitting_prefix(text: &str, room: usize) -> usize {
    let mut cost = 0;
    for (i, c) in text.char_indices() {
        cost += c.len_utf8() + escaped_char_len(c);
        if cost > room {
            return i;
        }
    }
    text.len()
}

/// One of stdout and stderr as it is kept.
#[derive(Default)]
struct Kept {
    pieces: Vec<String>,
    /// Raw bytes taken (the per-stream cap counts these).
    raw: usize,
    /// Bytes the pieces take escaped.
    json: usize,
    carry: Utf8Carry,
    /// Cut: nothing more is kept.
    cut: bool,
}

impl Kept {
    /// Keep `data` if the cap and the reservation allow; false when cut.
    fn push(&mut self, data: &[u8], res: &mut Reservation) -> bool {
        if self.cut {
            return false;
        }
        let room = limits::MAX_BUFFERED_OUTPUT.saturating_sub(self.raw);
        let take = &data[..data.len().min(room)];
        let text = self.carry.push(take);
        self.raw += take.len();
        let whole = take.len() == data.len();
        if !self.keep(text, res) || !whole {
            self.cut = true;
        }
        !self.cut
    }

    /// Keep `text` if its reservation succeeds; else keep the longest prefix
    /// that fits (so a spent budget is spent to the byte) and say false.
    fn keep(&mut self, mut text: String, res: &mut Reservation) -> bool {
        if text.is_empty() {
            return true;
        }
        let json = escaped_len(&text);
        if res.take(text.len() + json) {
            self.json += json;
            self.pieces.push(text);
            return true;
        }
        let fits = fitting_prefix(&text, res.room());
        if fits > 0 {
            text.truncate(fits);
            text.shrink_to_fit();
            let json = escaped_len(&text);
            // Another exec may have taken the room meanwhile.
            if res.take(text.len() + json) {
                self.json += json;
                self.pieces.push(text);
            }
        }
        false
    }

    /// End of output: keep what the carry held back.
    fn finish(&mut self, res: &mut Reservation) -> bool {
        if self.cut {
            return false;
        }
        let tail = self.carry.finish();
        if !self.keep(tail, res) {
            self.cut = true;
        }
        !self.cut
    }

    fn write(self, out: &mut Vec<u8>) {
        for p in self.pieces {
            write_escaped(out, &p);
        }
    }
}

/// A buffered exec's answer: `{exit_code, stdout, stderr, timed_out,
/// truncated?}` as JSON, holding its share of the budget until sent.
pub struct BufferedAnswer {
    json: Vec<u8>,
    res: Reservation,
}

impl BufferedAnswer {
    fn build(
        exit_code: i32,
        timed_out: bool,
        out: Kept,
        err: Kept,
        truncated: bool,
        mut res: Reservation,
    ) -> Self {
        let head = format!("{{\"exit_code\":{exit_code},\"stdout\":\"");
        let tail = format!(
            "\",\"timed_out\":{timed_out}{}}}",
            if truncated { ",\"truncated\":true" } else { "" }
        );
        let sep = "\",\"stderr\":\"";
        let mut json =
            Vec::with_capacity(head.len() + out.json + sep.len() + err.json + tail.len());
        json.extend_from_slice(head.as_bytes());
        out.write(&mut json);
        json.extend_from_slice(sep.as_bytes());
        err.write(&mut json);
        json.extend_from_slice(tail.as_bytes());
        // The text is gone; the JSON is what stays (its few dozen bytes of
        // fixed parts were never counted).
        res.shrink_to(json.len());
        BufferedAnswer { json, res }
    }
}

impl IntoResponse for BufferedAnswer {
    fn into_response(self) -> Response {
        let body = AnswerBody {
            json: self.json,
            sent: 0,
            _res: self.res,
        };
        let mut resp = Response::new(Body::new(body));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// Sends the JSON in [`SEND_CHUNK`] pieces as the client takes them, and
/// gives the reservation back when dropped (sent, or the client gone).
struct AnswerBody {
    json: Vec<u8>,
    sent: usize,
    _res: Reservation,
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.sent >= this.json.len() {
            // Sent: free the memory now rather than with the body.
            this.json = Vec::new();
            this.sent = 0;
            return Poll::Ready(None);
        }
        let end = (this.sent + SEND_CHUNK).min(this.json.len());
        let chunk = Bytes::copy_from_slice(&this.json[this.sent..end]);
        this.sent = end;
        Poll::Ready(Some(Ok(BodyFrame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.json.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.json.len().saturating_sub(self.sent)) as u64)
    }
}

/// Run an exec to completion, keeping its output within `res` (and at most
/// [`limits::MAX_BUFFERED_OUTPUT`] bytes of each stream).
pub async fn collect(
    controller: &Controller,
    id: &str,
    mut stream: ExecStream,
    timeout_secs: u64,
    mut res: Reservation,
) -> Result<BufferedAnswer, ApiError> {
    let (mut out, mut err, mut truncated) = (Kept::default(), Kept::default(), false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs) + GRACE;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "agent_timeout",
                    "the agent did not finish the command in time",
                )
            })?;
        match next {
            Some(Ok(Frame::Stdout(b))) => truncated |= !out.push(&b, &mut res),
            Some(Ok(Frame::Stderr(b))) => truncated |= !err.push(&b, &mut res),
            Some(Ok(Frame::Exit(status))) => {
                truncated |= !out.finish(&mut res);
                truncated |= !err.finish(&mut res);
                return Ok(BufferedAnswer::build(
                    status.exit_code,
                    status.timed_out,
                    out,
                    err,
                    truncated,
                    res,
                ));
            }
            // Terminal input frames never come from an exec.
            Some(Ok(Frame::Resize(_) | Frame::Input(_))) => {}
            Some(Err(e)) => return Err(controller.agent_failed(id, e).await),
            None => return Err(controller.agent_failed(id, "exec stream ended early").await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandforge_api::ExecuteResponse;

    fn kept(chunks: &[&[u8]], res: &mut Reservation) -> (Kept, bool) {
        let mut k = Kept::default();
        let mut truncated = false;
        for c in chunks {
            truncated |= !k.push(c, res);
        }
        truncated |= !k.finish(res);
        (k, truncated)
    }

    #[test]
    fn utf8_split_across_chunks() {
        let mut c = Utf8Carry::default();
        let snow = "☃".as_bytes();
        assert_eq!(c.push(&[b'a', snow[0]]), "a");
        assert_eq!(c.push(&snow[1..]), "☃");
        assert_eq!(c.push(&[0xff, b'b']), "\u{fffd}b");
        assert_eq!(c.push(&snow[..2]), "");
        assert_eq!(c.finish(), "\u{fffd}");
    }

    #[test]
    fn answer_is_the_json_serde_would_write() {
        let budget = OutputBudget::new(1 << 20);
        let snow = "☃".as_bytes();
        let first = [snow[0]];
        let out: Vec<&[u8]> = vec![b"a\"b\\\n\x01", &first, &snow[1..], &[0xff], b"\x7f"];
        let err: Vec<&[u8]> = vec![b"e\t", &snow[..2]];
        let mut res = budget.admit().unwrap();
        let (o, t1) = kept(&out, &mut res);
        let (e, t2) = kept(&err, &mut res);
        assert!(!t1 && !t2);
        let a = BufferedAnswer::build(3, true, o, e, false, res);
        let want = ExecuteResponse {
            exit_code: 3,
            stdout: "a\"b\\\n\x01☃\u{fffd}\x7f".into(),
            stderr: "e\t\u{fffd}".into(),
            timed_out: true,
            truncated: false,
        };
        assert_eq!(
            String::from_utf8(a.json.clone()).unwrap(),
            serde_json::to_string(&want).unwrap()
        );
        let parsed: ExecuteResponse = serde_json::from_slice(&a.json).unwrap();
        assert_eq!(parsed, want);
        // The answer holds its JSON's size.
        assert_eq!(budget.used(), a.json.len());
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn spent_budget_refuses_and_cuts() {
        let budget = OutputBudget::new(3 * ADMISSION);
        let mut first = budget.admit().unwrap();
        let _second = budget.admit().unwrap();
        // The last admission's worth is left to running execs.
        assert!(budget.admit().is_none());
        let e = budget_spent(&budget);
        assert_eq!(
            (e.status, e.code, e.field),
            (StatusCode::TOO_MANY_REQUESTS, "limit", None)
        );
        // Within the reservation: kept; beyond the budget: what fits is kept
        // (text and JSON, two bytes each here), then the stream is cut for
        // good.
        let mut k = Kept::default();
        assert!(k.push(&vec![b'x'; ADMISSION / 2], &mut first));
        assert!(!k.push(&vec![b'x'; ADMISSION], &mut first));
        assert_eq!(budget.used(), 3 * ADMISSION);
        assert!(!k.push(b"y", &mut first));
        assert_eq!(k.pieces.concat(), "x".repeat(ADMISSION));
        let a = BufferedAnswer::build(0, false, k, Kept::default(), true, first);
        let v: serde_json::Value = serde_json::from_slice(&a.json).unwrap();
        assert_eq!(v["truncated"], true);
        assert_eq!(v["stdout"].as_str().map(str::len), Some(ADMISSION));
        drop(a);
        assert!(budget.admit().is_some());
    }

    #[test]
    fn prefix_cost_matches_serde() {
        let text = "a\"\\\n\u{1}\u{7f}☃\t\u{1f}é";
        for room in 0..40 {
            let n = fitting_prefix(text, room);
            let p = &text[..n];
            assert!(p.len() + escaped_len(p) <= room, "{room}");
            if n < text.len() {
                let next = text[n..].chars().next().unwrap();
                let q = &text[..n + next.len_utf8()];
                assert!(q.len() + escaped_len(q) > room, "{room}");
            }
        }
    }

    #[test]
    fn per_stream_cap_still_applies() {
        let budget = OutputBudget::new(1 << 30);
        let mut res = budget.admit().unwrap();
        let mut k = Kept::default();
        let big = vec![b'a'; limits::MAX_BUFFERED_OUTPUT - 2];
        assert!(k.push(&big, &mut res));
        assert!(!k.push(b"abcd", &mut res));
        assert_eq!(k.raw, limits::MAX_BUFFERED_OUTPUT);
        assert!(!k.push(b"ab", &mut res));
        assert!(Kept::default().push(b"ab", &mut res));
    }

    #[test]
    fn body_sends_everything_then_gives_back() {
        use http_body_util::BodyExt;
        let budget = OutputBudget::new(1 << 30);
        let mut res = budget.admit().unwrap();
        let big = vec![b'z'; 3 * SEND_CHUNK + 5];
        let (o, _) = kept(&[&big], &mut res);
        let a = BufferedAnswer::build(0, false, o, Kept::default(), false, res);
        let len = a.json.len();
        let resp = a.into_response();
        assert!(budget.used() >= len);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt.block_on(resp.into_body().collect()).unwrap().to_bytes();
        assert_eq!(bytes.len(), len);
        assert_eq!(budget.used(), 0);
    }
}
