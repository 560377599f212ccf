//! Packing a build's output for upload, streamed: the console log gzipped,
//! the artifacts folder as a tar.gz, produced on a blocking thread and handed
//! over in chunks through a small bounded channel, so memory stays flat
//! whatever the size and the upload starts with the first megabyte.
//!
//! Artifacts are often already compressed (jars, zips, images) or
//! incompressible; deflating them costs far more time than it saves bytes.
//! The tarball is therefore written as a sequence of gzip members of 1 MiB of
//! input each (RFC 1952 allows several; `gzip -d`, `tar xz` and Decap's own
//! readers read them all): a member whose sampled byte entropy says it will
//! not shrink is stored, the others are deflated at the fast level.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use flate2::Compression;
use flate2::write::GzEncoder;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Input bytes per gzip member of an artifacts tarball.
pub const MEMBER_BYTES: usize = 1024 * 1024;
/// Bytes per chunk handed to the uploader.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks buffered between the packer and the uploader.
const CHUNKS_QUEUED: usize = 8;

/// A stream of packed bytes, ending in an error if packing failed.
pub type Packed = ReceiverStream<io::Result<Bytes>>;

/// Whether a block of bytes looks incompressible: the Shannon entropy of
/// the bytes of a few samples is close to 8 bits per byte.
pub fn looks_incompressible(block: &[u8]) -> bool {
    const SAMPLES: usize = 8;
    const SAMPLE: usize = 4096;
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    if block.len() <= SAMPLES * SAMPLE {
        for &b in block {
            counts[b as usize] += 1;
        }
        n = block.len() as u32;
    } else {
        let stride = block.len() / SAMPLES;
        for i in 0..SAMPLES {
            for &b in &block[i * stride..i * stride + SAMPLE] {
                counts[b as usize] += 1;
            }
            n += SAMPLE as u32;
        }
    }
    if n < 1024 {
        return false;
    }
    let total = f64::from(n);
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / total;
            -p * p.log2()
        })
        .sum();
    entropy > 7.5
}

/// Writes `data` as one gzip member of stored (uncompressed) deflate blocks
/// (RFC 1951 §3.2.4, RFC 1952): a header, blocks of at most 65,535 bytes each
/// behind their lengths, the CRC-32 and the length. The data is copied once,
/// where a deflater at level 0 copies it three times.
fn write_stored_member(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=unix
    out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])?;
    let mut blocks = data.chunks(u16::MAX as usize).peekable();
    if blocks.peek().is_none() {
        out.write_all(&[1, 0, 0, 0xff, 0xff])?; // one final, empty block
    }
    while let Some(block) = blocks.next() {
        let last = u8::from(blocks.peek().is_none());
        let len = block.len() as u16;
        let [lo, hi] = len.to_le_bytes();
        let [nlo, nhi] = (!len).to_le_bytes();
        out.write_all(&[last, lo, hi, nlo, nhi])?;
        out.write_all(block)?;
    }
    let mut crc = flate2::Crc::new();
    crc.update(data);
    out.write_all(&crc.sum().to_le_bytes())?;
    out.write_all(&(data.len() as u32).to_le_bytes())?;
    Ok(())
}

/// A writer of gzip members, each holding [`MEMBER_BYTES`] of input, stored
/// or deflated as its content deserves.
pub struct AdaptiveGz<W: Write> {
    out: W,
    block: Vec<u8>,
    members: u64,
}

impl<W: Write> AdaptiveGz<W> {
    /// A writer into `out`.
    pub fn new(out: W) -> Self {
        AdaptiveGz {
            out,
            block: Vec::with_capacity(MEMBER_BYTES),
            members: 0,
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if looks_incompressible(&self.block) {
            write_stored_member(&mut self.out, &self.block)?;
        } else {
            let mut enc = GzEncoder::new(&mut self.out, Compression::fast());
            enc.write_all(&self.block)?;
            enc.finish()?;
        }
        self.block.clear();
        self.members += 1;
        Ok(())
    }

    /// Writes the last member (an empty one if nothing was written, so the
    /// output is always valid gzip) and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() || self.members == 0 {
            self.emit()?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for AdaptiveGz<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = (MEMBER_BYTES - self.block.len()).min(data.len());
        self.block.extend_from_slice(&data[..take]);
        if self.block.len() == MEMBER_BYTES {
            self.emit()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that hands its bytes to an async receiver in chunks.
struct ChunkSender {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
}

impl ChunkSender {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK_BYTES);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped reading"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Runs `produce` on a blocking thread, writing into a stream.
fn produce<F>(produce: F) -> Packed
where
    F: FnOnce(&mut ChunkSender) -> io::Result<()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHUNKS_QUEUED);
    tokio::task::spawn_blocking(move || {
        let mut sender = ChunkSender {
            tx: tx.clone(),
            buf: BytesMut::with_capacity(CHUNK_BYTES),
        };
        let outcome = produce(&mut sender).and_then(|()| sender.flush());
        if let Err(e) = outcome {
            // The receiver sees the failure instead of a short upload.
            let _ = tx.blocking_send(Err(e));
        }
    });
    ReceiverStream::new(rx)
}

/// Whether a folder holds anything (a missing folder holds nothing).
pub fn has_files(dir: &Path) -> io::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The folder as a tar.gz (links kept as links, never followed).
pub fn artifacts(dir: PathBuf) -> Packed {
    produce(move |out| {
        let mut tar = tar::Builder::new(AdaptiveGz::new(out));
        tar.follow_symlinks(false);
        tar.append_dir_all(".", &dir)?;
        tar.into_inner()?.finish()?;
        Ok(())
    })
}

/// The file gzipped (console logs are text: always deflated).
pub fn log(path: PathBuf) -> Packed {
    produce(move |out| {
        let mut input = std::fs::File::open(&path)?;
        let mut enc = GzEncoder::new(out, Compression::fast());
        io::copy(&mut input, &mut enc)?;
        enc.finish()?;
        Ok(())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read;

    fn noise(len: usize) -> Vec<u8> {
        // A xorshift generator: incompressible without a dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn entropy_tells_noise_from_text() {
        assert!(looks_incompressible(&noise(MEMBER_BYTES)));
        let text = "line 42: compiling decap-core v0.1.0\n".repeat(30_000);
        assert!(!looks_incompressible(text.as_bytes()));
        assert!(!looks_incompressible(&[0u8; 100_000]));
        assert!(!looks_incompressible(b"tiny"));
    }

    #[test]
    fn members_round_trip_and_store_noise_and_shrink_text() {
        let text = "all tests passed; artifacts in target/\n".repeat(100_000);
        let mut input = noise(MEMBER_BYTES * 2 + 12_345);
        input.extend_from_slice(text.as_bytes());
        let mut gz = AdaptiveGz::new(Vec::new());
        gz.write_all(&input).unwrap();
        let packed = gz.finish().unwrap();
        // Noise stored (a little larger), text deflated (much smaller).
        assert!(packed.len() < MEMBER_BYTES * 2 + 12_345 + text.len() / 4);
        assert!(packed.len() > MEMBER_BYTES * 2);
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&packed[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, input);
    }

    #[test]
    fn stored_members_decode_with_their_checksums() {
        for len in [0, 1, 65_535, 65_536, 3 * 65_535, 200_000] {
            let data = noise(len);
            let mut packed = Vec::new();
            write_stored_member(&mut packed, &data).unwrap();
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&packed[..])
                .read_to_end(&mut back)
                .unwrap_or_else(|e| panic!("{len}: {e}"));
            assert_eq!(back, data, "{len}");
            // and the system's gzip agrees
            let mut gunzip = std::process::Command::new("gzip")
                .args(["-d", "-c"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            gunzip.stdin.take().unwrap().write_all(&packed).unwrap();
            let out = gunzip.wait_with_output().unwrap();
            assert!(out.status.success(), "{len}");
            assert_eq!(out.stdout, data, "{len}");
        }
    }

    #[test]
    fn nothing_written_is_still_valid_gzip() {
        let packed = AdaptiveGz::new(Vec::new()).finish().unwrap();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&packed[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back.is_empty());
    }

    #[tokio::test]
    async fn artifacts_stream_unpacks_to_the_same_files() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/noise.bin"), noise(3 * MEMBER_BYTES)).unwrap();
        std::fs::write(dir.path().join("report.txt"), "ok\n".repeat(10_000)).unwrap();
        let mut stream = artifacts(dir.path().to_owned());
        let mut packed = Vec::new();
        while let Some(chunk) = stream.next().await {
            packed.extend_from_slice(&chunk.unwrap());
        }
        let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(&packed[..]));
        let out = tempfile::tempdir().unwrap();
        archive.unpack(out.path()).unwrap();
        assert_eq!(
            std::fs::read(out.path().join("sub/noise.bin")).unwrap(),
            noise(3 * MEMBER_BYTES)
        );
        assert_eq!(
            std::fs::read_to_string(out.path().join("report.txt")).unwrap(),
            "ok\n".repeat(10_000)
        );
    }

    #[tokio::test]
    async fn a_missing_file_ends_the_stream_in_an_error() {
        use futures::StreamExt;
        let mut stream = log(PathBuf::from("/nonexistent/console.log"));
        let mut saw_error = false;
        while let Some(chunk) = stream.next().await {
            saw_error |= chunk.is_err();
        }
        assert!(saw_error);
    }
}
