//! Sending the bytes a scan recorded under a hash, from the live file, re-hashing every
//! byte sent (subd's `Snapshot.GetObjects`): a file changed since the scan is never passed
//! off under the stale hash. The record format is `model::frame::checked`.

use crate::scan::open_beneath;
use model::frame::{self, checked};
use model::hash::{ObjectHasher, ObjectId};
use model::path::FsPath;
use rustix::fd::BorrowedFd;
use rustix::fs::FileType;
use std::fs::File;
use std::io::{self, Read, Write};

/// What one record said about its object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// The bytes sent hash to the id.
    Same,
    /// Bytes were sent, but do not hash to the id (marked `CHANGED`).
    Changed,
    /// No path held a regular file of the recorded size: `UNAVAILABLE`, no content.
    Unavailable,
}

/// Writes one `frame::checked` record for object `id` of `size` bytes to `out`, reading
/// the first of `paths` (under `root_fd`) that is still a regular file of that size. The
/// bytes are hashed as they are sent; a file that shrinks while read is padded with
/// zeros and marked changed. `out`'s errors are returned; a path that cannot be opened
/// is skipped.
pub fn send_object(
    root_fd: BorrowedFd<'_>,
    paths: &[FsPath],
    id: &ObjectId,
    size: u64,
    buf: &mut [u8],
    out: &mut dyn Write,
) -> io::Result<Sent> {
    for path in paths {
        let Ok(fd) = open_beneath(root_fd, path) else {
            continue;
        };
        let Ok(st) = rustix::fs::fstat(&fd) else {
            continue;
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_size as u64 != size
        {
            continue;
        }
        out.write_all(&frame::header(id, size))?;
        let same = copy_hashed(&mut File::from(fd), size, id, buf, out)?;
        out.write_all(&[if same {
            checked::SAME
        } else {
            checked::CHANGED
        }])?;
        return Ok(if same { Sent::Same } else { Sent::Changed });
    }
    out.write_all(&frame::header(id, checked::UNAVAILABLE))?;
    Ok(Sent::Unavailable)
}

/// Copies exactly `size` bytes of `f` to `out` (zeros if it ends early), hashing them;
/// true if they hash to `id` (a read error counts as a change, not a failed reply).
fn copy_hashed(
    f: &mut File,
    size: u64,
    id: &ObjectId,
    buf: &mut [u8],
    out: &mut dyn Write,
) -> io::Result<bool> {
    let mut h = ObjectHasher::new();
    let mut left = size;
    let mut intact = true;
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let n = if intact {
            match f.read(&mut buf[..want]) {
                Ok(0) | Err(_) => {
                    intact = false;
                    0
                }
                Ok(n) => n,
            }
        } else {
            0
        };
        let n = if n == 0 {
            // Shrunk or unreadable: pad, and the record is marked changed.
            buf[..want].fill(0);
            want
        } else {
            n
        };
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(intact && h.finish().0 == *id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::frame::read_header;

    fn record(out: &[u8]) -> (ObjectId, u64, Vec<u8>, Option<u8>) {
        let mut r = out;
        let (id, len) = read_header(&mut r).unwrap().unwrap();
        if len == checked::UNAVAILABLE {
            assert!(r.is_empty());
            return (id, len, vec![], None);
        }
        let (content, rest) = r.split_at(len as usize);
        assert_eq!(rest.len(), 1);
        (id, len, content.to_vec(), Some(rest[0]))
    }

    #[test]
    fn sends_same_changed_and_unavailable() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"hello").unwrap();
        std::fs::write(d.path().join("b"), b"HELLO").unwrap();
        std::os::unix::fs::symlink("a", d.path().join("link")).unwrap();
        let root = File::open(d.path()).unwrap();
        use std::os::fd::AsFd;
        let fd = root.as_fd();
        let id = ObjectId::of(b"hello");
        let p = |s: &str| s.parse::<FsPath>().unwrap();
        let mut buf = vec![0u8; 2];
        let cases: [(&[FsPath], u64, Sent); 5] = [
            (&[p("/a")], 5, Sent::Same),
            // Same size, other bytes: sent but marked changed.
            (&[p("/b")], 5, Sent::Changed),
            // A missing path and a symlink are skipped, the next path serves.
            (&[p("/gone"), p("/link"), p("/a")], 5, Sent::Same),
            // The recorded size no longer matches: nothing sent.
            (&[p("/a")], 6, Sent::Unavailable),
            (&[], 5, Sent::Unavailable),
        ];
        for (paths, size, want) in cases {
            let mut out = Vec::new();
            let got = send_object(fd, paths, &id, size, &mut buf, &mut out).unwrap();
            assert_eq!(got, want, "{paths:?}");
            let (rid, len, content, status) = record(&out);
            assert_eq!(rid, id);
            match want {
                Sent::Same => {
                    assert_eq!((content.as_slice(), status), (&b"hello"[..], Some(0)))
                }
                Sent::Changed => assert_eq!((len, status), (5, Some(checked::CHANGED))),
                Sent::Unavailable => assert_eq!(len, checked::UNAVAILABLE),
            }
        }
    }
}
