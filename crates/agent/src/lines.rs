//! Which byte range of a file a read with `offset`/`limit`/`max_bytes` returns.
//!
//! Owns: the pure line/byte window logic. `offset` is the 1-indexed first line,
//! `limit` the maximum number of lines (each including its `\n`), `max_bytes`
//! the maximum number of bytes; whichever limit hits first ends the window.
//! The caller feeds the file's bytes from the start in chunks until
//! [`RangeScan::feed`] says the window is known (or EOF), then asks
//! [`RangeScan::finish`] for `[start, end)`. Only the bytes up to the end of
//! the window are ever scanned, and nothing is buffered.
//!
//! Must not: do I/O.

/// Incremental computation of the byte window of a read.
#[derive(Debug, Clone)]
pub struct RangeScan {
    first_line: u64,
    limit: Option<u64>,
    max_bytes: Option<u64>,
    /// Bytes consumed so far.
    pos: u64,
    /// Line number of the byte at `pos` (while `start` is unknown).
    line: u64,
    /// Offset of the first byte of `first_line`, once seen.
    start: Option<u64>,
    /// Complete lines seen since `start`.
    taken: u64,
}

impl RangeScan {
    pub fn new(offset: Option<u64>, limit: Option<u64>, max_bytes: Option<u64>) -> Self {
        let first_line = offset.unwrap_or(1).max(1);
        Self {
            first_line,
            limit,
            max_bytes,
            pos: 0,
            line: 1,
            start: (first_line == 1).then_some(0),
            taken: 0,
        }
    }

    /// True when the window is known without reading anything.
    pub fn is_done(&self) -> bool {
        let Some(start) = self.start else {
            return false;
        };
        match self.limit {
            None => true,
            Some(limit) => {
                self.taken >= limit || self.max_bytes.is_some_and(|m| self.pos >= start + m)
            }
        }
    }

    /// Consume the next chunk of the file; returns [`Self::is_done`].
    pub fn feed(&mut self, mut chunk: &[u8]) -> bool {
        while !chunk.is_empty() && !self.is_done() {
            let Some(i) = chunk.iter().position(|&b| b == b'\n') else {
                self.pos += chunk.len() as u64;
                break;
            };
            self.pos += i as u64 + 1;
            chunk = &chunk[i + 1..];
            match self.start {
                None => {
                    self.line += 1;
                    if self.line == self.first_line {
                        self.start = Some(self.pos);
                    }
                }
                Some(_) => self.taken += 1,
            }
        }
        self.is_done()
    }

    /// The window `[start, end)` for a file of `size` bytes. Call when
    /// [`Self::feed`] returned true, or after feeding the whole file.
    pub fn finish(&self, size: u64) -> (u64, u64) {
        // Offset beyond the last line: empty window at the end.
        let start = self.start.unwrap_or(self.pos).min(size);
        let mut end = match self.limit {
            // Either `limit` lines were seen, or max_bytes stopped the scan
            // (clamped below), or EOF came first: all end at `pos`.
            Some(_) => self.pos,
            None => size,
        };
        if let Some(m) = self.max_bytes {
            end = end.min(start.saturating_add(m));
        }
        (start, end.clamp(start, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Window of `data` fed in chunks of `step` bytes, as a string.
    fn window(data: &str, offset: Option<u64>, limit: Option<u64>, max: Option<u64>) -> String {
        let mut results = vec![];
        for step in [1, 2, 3, 7, 64 * 1024] {
            let mut scan = RangeScan::new(offset, limit, max);
            let mut consumed = 0;
            if !scan.is_done() {
                for chunk in data.as_bytes().chunks(step) {
                    consumed += chunk.len();
                    if scan.feed(chunk) {
                        break;
                    }
                }
            }
            let (s, e) = scan.finish(data.len() as u64);
            // Never scans beyond one chunk past the end of the window.
            assert!(consumed as u64 <= e.max(s) + step as u64);
            results.push(data[s as usize..e as usize].to_string());
        }
        results.dedup();
        assert_eq!(results.len(), 1, "chunking changed the result: {results:?}");
        results.pop().unwrap()
    }

    const TEXT: &str = "one\ntwo\nthree\nfour\n";

    #[test]
    fn no_limits_is_whole_file() {
        assert_eq!(window(TEXT, None, None, None), TEXT);
        assert!(RangeScan::new(None, None, None).is_done());
        assert_eq!(RangeScan::new(None, None, None).finish(10), (0, 10));
        assert_eq!(window(TEXT, Some(0), None, None), TEXT);
        assert_eq!(window(TEXT, Some(1), None, None), TEXT);
    }

    #[test]
    fn offset_and_limit() {
        assert_eq!(window(TEXT, Some(2), None, None), "two\nthree\nfour\n");
        assert_eq!(window(TEXT, Some(2), Some(2), None), "two\nthree\n");
        assert_eq!(window(TEXT, None, Some(1), None), "one\n");
        assert_eq!(window(TEXT, Some(4), Some(10), None), "four\n");
        assert_eq!(window(TEXT, Some(5), None, None), "");
        assert_eq!(window(TEXT, Some(99), Some(1), None), "");
        assert_eq!(window(TEXT, Some(2), Some(0), None), "");
    }

    #[test]
    fn max_bytes() {
        assert_eq!(window(TEXT, None, None, Some(5)), "one\nt");
        assert_eq!(window(TEXT, Some(2), None, Some(2)), "tw");
        assert_eq!(window(TEXT, Some(2), Some(3), Some(6)), "two\nth");
        assert_eq!(window(TEXT, Some(2), Some(1), Some(100)), "two\n");
        assert_eq!(window(TEXT, None, None, Some(0)), "");
        assert_eq!(window(TEXT, None, None, Some(1000)), TEXT);
    }

    #[test]
    fn no_trailing_newline() {
        let t = "a\nb\nc";
        assert_eq!(window(t, Some(3), None, None), "c");
        assert_eq!(window(t, Some(3), Some(5), None), "c");
        assert_eq!(window(t, Some(2), Some(5), None), "b\nc");
        assert_eq!(window("", Some(2), Some(5), None), "");
        assert_eq!(window("", None, Some(5), Some(3)), "");
    }

    #[test]
    fn finish_clamps_to_size() {
        // The file shrank after the scan: never return a window past EOF.
        let mut scan = RangeScan::new(None, Some(10), None);
        scan.feed(b"abc\ndef\n");
        assert_eq!(scan.finish(4), (0, 4));
    }
}
