//! Object batch framing, used by `ObjectServer.AddObjects` and `ObjectServer.GetObjects`:
//! a body is a sequence of frames, each the 64-byte raw SHA-512, the length as a big-endian
//! u64, then that many bytes of content. A body ends after the last complete frame; a body
//! that stops inside a frame is truncated and its last object is never stored.

use crate::hash::ObjectId;
use std::io::{self, Read};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 72;

/// Encodes a frame header.
pub fn header(id: &ObjectId, len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..64].copy_from_slice(&id.0);
    h[64..].copy_from_slice(&len.to_be_bytes());
    h
}

/// Decodes a frame header.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> (ObjectId, u64) {
    let mut id = [0u8; 64];
    id.copy_from_slice(&h[..64]);
    (
        ObjectId(id),
        u64::from_be_bytes(h[64..].try_into().unwrap()),
    )
}

/// Reads the next header from `r`: `Ok(None)` at a clean end, an `UnexpectedEof` error if
/// the stream stops inside the header.
pub fn read_header<R: Read>(r: &mut R) -> io::Result<Option<(ObjectId, u64)>> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body truncated inside a frame header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(parse_header(&h)))
}

/// The reply of `Snapshot.GetObjects` (subd reading live files): per requested hash, in
/// order, one record:
/// - `header(id, len)`, `len` bytes, then one status byte: [`checked::SAME`] if those
///   bytes hash to `id`, [`checked::CHANGED`] if not (the file changed since the scan,
///   or shrank while read and was padded): the bytes must then be discarded;
/// - or `header(id, checked::UNAVAILABLE)` and nothing else: no path of the last scan
///   with that hash still holds a regular file of its size (changed, gone, or never
///   scanned).
pub mod checked {
    /// The bytes sent hash to the id they were sent under.
    pub const SAME: u8 = 0;
    /// The bytes sent do not hash to the id: discard them.
    pub const CHANGED: u8 = 1;
    /// The length of a record with no content: the object could not be read.
    pub const UNAVAILABLE: u64 = u64::MAX;

    /// What a record says about its object.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Status {
        Same,
        Changed,
    }

    /// The status byte's meaning (`None`: not a status byte; a broken stream).
    pub fn status(b: u8) -> Option<Status> {
        match b {
            SAME => Some(Status::Same),
            CHANGED => Some(Status::Changed),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_truncation() {
        let id = ObjectId::of(b"x");
        let h = header(&id, 12345);
        let mut r = &h[..];
        assert_eq!(read_header(&mut r).unwrap(), Some((id, 12345)));
        assert_eq!(read_header(&mut r).unwrap(), None);
        let mut short = &h[..10];
        assert!(read_header(&mut short).is_err());
    }

    #[test]
    fn checked_status_bytes() {
        use checked::{status, Status};
        for (b, want) in [
            (checked::SAME, Some(Status::Same)),
            (checked::CHANGED, Some(Status::Changed)),
            (2, None),
            (255, None),
        ] {
            assert_eq!(status(b), want, "{b}");
        }
    }
}
