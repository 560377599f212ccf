//! Live console logs: what bctool streams while a build runs.
//!
//! Each running build has a spool file under the data dir; bctool's chunks are
//! appended to it and followers (text `follow`, SSE) read it from any offset,
//! woken by a watch channel when it grows. Reading from the file instead of
//! fanning out bytes keeps memory flat however many people watch, and lets a
//! reconnecting viewer resume from its last offset. The spool outlives the
//! build environment; once the final log is stored in the blob store the
//! spool is dropped.

use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use decap_core::build::BuildId;
use futures::Stream;
use tokio::sync::watch;

/// The spool files of running builds.
pub struct LiveLogs {
    dir: PathBuf,
    cap: u64,
    logs: Mutex<HashMap<BuildId, Arc<LiveLog>>>,
}

/// One build's live log.
pub struct LiveLog {
    path: PathBuf,
    cap: u64,
    state: Mutex<State>,
    watch: watch::Sender<Progress>,
}

/// A live log with its spool open.
pub struct LiveReader {
    log: Arc<LiveLog>,
    file: std::fs::File,
}

impl LiveReader {
    /// Reads the log from `from`, following it until it is closed.
    pub fn follow(self, from: u64) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        decap_tail::follow(self.file, from, self.log.watch.subscribe())
    }

    /// What has arrived so far.
    pub fn snapshot(mut self) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let mut out = Vec::new();
        self.file.read_to_end(&mut out)?;
        Ok(out)
    }
}

struct State {
    file: std::fs::File,
    /// Bytes received from bctool (its offsets count these).
    received: u64,
    /// Bytes in the spool file (capped).
    stored: u64,
    truncated: bool,
}

pub use decap_tail::Progress;

impl LiveLogs {
    /// Spool files live in `dir`; each is capped at `cap` bytes.
    pub fn new(dir: PathBuf, cap: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(LiveLogs {
            dir,
            cap,
            logs: Mutex::new(HashMap::new()),
        })
    }

    fn spool_path(&self, id: BuildId) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// The live log of a build, created (or reopened after a restart) if needed.
    pub fn open(&self, id: BuildId) -> std::io::Result<Arc<LiveLog>> {
        let mut logs = self
            .logs
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        if let Some(log) = logs.get(&id) {
            return Ok(log.clone());
        }
        let path = self.spool_path(id);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        let (tx, _) = watch::channel(Progress { len, closed: false });
        let log = Arc::new(LiveLog {
            path,
            cap: self.cap,
            state: Mutex::new(State {
                file,
                received: len,
                stored: len,
                truncated: len >= self.cap,
            }),
            watch: tx,
        });
        logs.insert(id, log.clone());
        Ok(log)
    }

    /// The live log of a build, if it has one.
    pub fn get(&self, id: BuildId) -> Option<Arc<LiveLog>> {
        self.logs.lock().ok().and_then(|l| l.get(&id).cloned())
    }

    /// The live log of a build with its spool opened for reading. Opening
    /// under the same lock as [`LiveLogs::remove`] means a reader never finds
    /// a live log whose spool is already gone.
    pub fn reader(&self, id: BuildId) -> Option<LiveReader> {
        let logs = self.logs.lock().ok()?;
        let log = logs.get(&id)?.clone();
        let file = std::fs::File::open(&log.path).ok()?;
        Some(LiveReader { log, file })
    }

    /// The builds whose spools are in the folder (this run's and those an
    /// earlier run left).
    pub fn spooled(&self) -> Vec<BuildId> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                let id = name.to_str()?.strip_suffix(".log")?;
                BuildId::parse(id).ok()
            })
            .collect()
    }

    /// The spool left by an earlier run of the server, if any.
    pub fn leftover(&self, id: BuildId) -> Option<PathBuf> {
        let p = self.spool_path(id);
        p.is_file().then_some(p)
    }

    /// Forgets a build's live log and deletes its spool (open readers keep
    /// reading what they have open).
    pub fn remove(&self, id: BuildId) {
        let Ok(mut logs) = self.logs.lock() else {
            return;
        };
        if let Some(log) = logs.remove(&id) {
            log.close();
        }
        let _ = std::fs::remove_file(self.spool_path(id));
    }
}

impl LiveLog {
    /// Appends a chunk that starts at `offset` of bctool's stream. A chunk that
    /// overlaps what was received (a resent chunk after a reconnect) is trimmed;
    /// one that leaves a gap is refused. Returns the received length after.
    pub fn append_at(&self, offset: u64, data: &[u8]) -> std::io::Result<u64> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        if offset > st.received {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "chunk at offset {offset} leaves a gap after {} bytes",
                    st.received
                ),
            ));
        }
        let skip = (st.received - offset).min(data.len() as u64) as usize;
        let data = &data[skip..];
        if data.is_empty() {
            return Ok(st.received);
        }
        st.received += data.len() as u64;
        if !st.truncated {
            let room = self.cap.saturating_sub(st.stored) as usize;
            let take = room.min(data.len());
            st.file.write_all(&data[..take])?;
            st.stored += take as u64;
            if take < data.len() {
                let marker = format!(
                    "\n[decap: the console log reached its cap of {} bytes; the rest is not kept]\n",
                    self.cap
                );
                st.file.write_all(marker.as_bytes())?;
                st.stored += marker.len() as u64;
                st.truncated = true;
            }
            let len = st.stored;
            self.watch.send_modify(|p| p.len = len);
        }
        Ok(st.received)
    }

    /// How many bytes of bctool's stream have arrived.
    pub fn received(&self) -> u64 {
        self.state.lock().map(|s| s.received).unwrap_or(0)
    }

    /// Marks the log complete: followers end once they have read it all.
    pub fn close(&self) {
        self.watch.send_modify(|p| p.closed = true);
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The longest line sent as one event: a longer one is split, so that a
/// follower holds at most this much of a line (a build printing 30 MiB with
/// no newline costs each viewer 64 KiB, not 30 MiB).
pub const MAX_LINE: usize = 64 * 1024;

/// Splits a byte stream into lines (without their ends), carrying partial
/// lines across chunks; each line comes with the stream offset just after it.
/// Lines longer than [`MAX_LINE`] come in pieces, each cut at a character
/// boundary.
#[derive(Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    offset: u64,
}

/// Where to cut a long piece so that no UTF-8 character is split: before an
/// unfinished character at its end, if there is one.
fn char_boundary(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        _ => bytes.len(),
    }
}

impl LineSplitter {
    /// Starts counting offsets at `offset`.
    pub fn at(offset: u64) -> Self {
        LineSplitter {
            partial: Vec::new(),
            offset,
        }
    }

    /// Feeds a chunk; returns the complete lines in it.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for &b in chunk {
            self.offset += 1;
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.partial);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                out.push((self.offset, String::from_utf8_lossy(&line).into_owned()));
            } else {
                self.partial.push(b);
                if self.partial.len() >= MAX_LINE {
                    let cut = char_boundary(&self.partial).max(1);
                    let rest = self.partial.split_off(cut);
                    let piece = std::mem::replace(&mut self.partial, rest);
                    let end = self.offset - self.partial.len() as u64;
                    out.push((end, String::from_utf8_lossy(&piece).into_owned()));
                }
            }
        }
        out
    }

    /// The last line if it had no newline.
    pub fn finish(&mut self) -> Option<(u64, String)> {
        if self.partial.is_empty() {
            return None;
        }
        let line = std::mem::take(&mut self.partial);
        Some((self.offset, String::from_utf8_lossy(&line).into_owned()))
    }
}

/// Copies a spool into memory-light gzip, for storing a log whose build
/// environment died before uploading it.
pub fn gzip_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut input = std::fs::File::open(path)?;
    input.seek(SeekFrom::Start(0))?;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::copy(&mut input, &mut enc)?;
    enc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn lines_split_across_chunks_with_offsets() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"hel"), vec![]);
        assert_eq!(
            s.push(b"lo\r\nworld\n"),
            vec![(7, "hello".into()), (13, "world".into())]
        );
        assert_eq!(s.push(b"tail"), vec![]);
        assert_eq!(s.finish(), Some((17, "tail".into())));
    }

    #[test]
    fn a_line_without_end_comes_in_bounded_pieces_with_true_offsets() {
        let mut s = LineSplitter::default();
        let mut got = Vec::new();
        // "é" is two bytes: pieces must not cut it.
        let chunk = "é".repeat(1000);
        for _ in 0..200 {
            got.extend(s.push(chunk.as_bytes()));
        }
        assert!(!got.is_empty());
        let mut total = 0u64;
        for (offset, line) in &got {
            assert!(line.len() <= MAX_LINE, "a piece is bounded");
            assert!(!line.contains('\u{FFFD}'), "no character is cut");
            total += line.len() as u64;
            assert_eq!(*offset, total, "offsets count the bytes sent");
        }
        assert!(s.partial.len() < MAX_LINE);
    }

    #[tokio::test]
    async fn followers_see_every_byte_once_and_resent_chunks_are_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = LiveLogs::new(dir.path().to_owned(), 1 << 20).expect("spool dir");
        let id = BuildId::new();
        let log = logs.open(id).expect("opens");
        let follower = logs.reader(id).expect("live").follow(0);
        log.append_at(0, b"one\n").expect("appends");
        log.append_at(0, b"one\ntwo\n")
            .expect("a resent chunk is trimmed");
        assert!(log.append_at(100, b"gap").is_err(), "a gap is refused");
        log.close();
        let got: Vec<u8> = follower.map(|c| c.expect("reads").to_vec()).concat().await;
        assert_eq!(got, b"one\ntwo\n");
        let late = logs
            .reader(id)
            .expect("still live")
            .follow(4)
            .map(|c| c.expect("reads").to_vec())
            .concat()
            .await;
        assert_eq!(late, b"two\n", "a follower resumes from an offset");
    }

    #[tokio::test]
    async fn a_flood_is_capped_with_a_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = LiveLogs::new(dir.path().to_owned(), 10).expect("spool dir");
        let log = logs.open(BuildId::new()).expect("opens");
        log.append_at(0, b"0123456789abcdef").expect("appends");
        log.append_at(16, b"more").expect("appends past the cap");
        assert_eq!(log.received(), 20);
        let text = std::fs::read_to_string(log.path()).expect("reads");
        assert!(text.starts_with("0123456789\n[decap: the console log reached its cap"));
    }
}
