//! Follows a growing file: the writer announces its length (and, at the end,
//! that it is complete) through a [`tokio::sync::watch`] channel; each reader
//! reads the file from its own offset as the length grows.
//!
//! bctool uses it to stream the console it captures, the server to serve live
//! logs to any number of viewers without holding the bytes in memory.
#![deny(missing_docs)]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

/// The most one read takes. A follower holds no buffer between reads, so
/// many followers of quiet logs cost nothing; one catching up on a fast log
/// reads large pieces, one blocking-pool trip each.
pub const MAX_READ: usize = 256 * 1024;

/// How far a followed file has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Bytes readable.
    pub len: u64,
    /// Whether the file is complete.
    pub closed: bool,
}

struct Follow {
    file: Arc<std::fs::File>,
    pos: u64,
    rx: watch::Receiver<Progress>,
}

/// Reads `file` from `from` as the writer's [`Progress`] grows, ending once
/// the file is closed and read to its end (or the writer is gone). The file
/// is opened by the caller, so a writer that deletes it once complete cannot
/// pull it from under a reader.
pub fn follow(
    file: std::fs::File,
    from: u64,
    rx: watch::Receiver<Progress>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let state = Follow {
        file: Arc::new(file),
        pos: from,
        rx,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            let progress = *st.rx.borrow_and_update();
            if st.pos < progress.len {
                let want = ((progress.len - st.pos) as usize).min(MAX_READ);
                match read_at(&st.file, st.pos, want).await {
                    Ok(chunk) if chunk.is_empty() => {}
                    Ok(chunk) => {
                        st.pos += chunk.len() as u64;
                        return Some((Ok(chunk), st));
                    }
                    Err(e) => return Some((Err(e), st)),
                }
            }
            if progress.closed && st.pos >= progress.len {
                return None;
            }
            if st.rx.changed().await.is_err() {
                return None;
            }
        }
    })
}

/// Up to `want` bytes of `file` from `pos`, read on the blocking pool.
async fn read_at(file: &Arc<std::fs::File>, pos: u64, want: usize) -> std::io::Result<Bytes> {
    let file = Arc::clone(file);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; want];
        let n = file.read_at(&mut buf, pos)?;
        buf.truncate(n);
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::io::Write;

    #[tokio::test]
    async fn a_follower_reads_what_is_written_until_the_file_closes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let mut file = std::fs::File::create(&path).expect("creates");
        let (tx, rx) = watch::channel(Progress::default());
        let opened = std::fs::File::open(&path).expect("opens");
        let reader = tokio::spawn(
            follow(opened, 0, rx)
                .map(|c| c.expect("reads").to_vec())
                .concat(),
        );
        for part in [&b"one\n"[..], b"two\n", b"three\n"] {
            file.write_all(part).expect("writes");
            tx.send_modify(|p| p.len += part.len() as u64);
            tokio::task::yield_now().await;
        }
        tx.send_modify(|p| p.closed = true);
        assert_eq!(reader.await.expect("joins"), b"one\ntwo\nthree\n");
        let (_tx2, rx2) = watch::channel(Progress {
            len: 14,
            closed: true,
        });
        let again = std::fs::File::open(&path).expect("opens");
        let tail: Vec<u8> = follow(again, 8, rx2)
            .map(|c| c.expect("reads").to_vec())
            .concat()
            .await;
        assert_eq!(tail, b"three\n", "a follower can start anywhere");
    }
}
