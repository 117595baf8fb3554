//! Object identity: the SHA-512 of a file's content (`ObjectId`) and helpers to compute it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

/// SHA-512 of an object's bytes; shown and serialized as 128 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; 64]);

/// A string that is not 128 hex characters.
#[derive(Debug, thiserror::Error)]
#[error("invalid object id {0:?}: want 128 hex characters")]
pub struct BadObjectId(pub String);

impl ObjectId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> ObjectId {
        let d = ring::digest::digest(&ring::digest::SHA512, data);
        let mut id = [0u8; 64];
        id.copy_from_slice(d.as_ref());
        ObjectId(id)
    }

    /// Lowercase hex form.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(128);
        for b in self.0 {
            s.push(char::from_digit((b >> 4) as u32, 16).unwrap());
            s.push(char::from_digit((b & 15) as u32, 16).unwrap());
        }
        s
    }

    /// Parses 128 hex characters (either case).
    pub fn from_hex(s: &str) -> Result<ObjectId, BadObjectId> {
        let b = s.as_bytes();
        if b.len() != 128 {
            return Err(BadObjectId(s.chars().take(140).collect()));
        }
        let mut out = [0u8; 64];
        for (i, pair) in b.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16);
            let lo = (pair[1] as char).to_digit(16);
            match (hi, lo) {
                (Some(h), Some(l)) => out[i] = (h * 16 + l) as u8,
                _ => return Err(BadObjectId(s.to_string())),
            }
        }
        Ok(ObjectId(out))
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({}…)", &self.to_hex()[..16])
    }
}

impl FromStr for ObjectId {
    type Err = BadObjectId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ObjectId::from_hex(s)
    }
}

impl Serialize for ObjectId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ObjectId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ObjectId::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Incremental SHA-512 that also counts bytes. (ring's SHA-512, OpenSSL's assembly, is
/// ~15–20 % faster here than the `sha2` crate; every object is hashed on both ends of an
/// upload.)
#[derive(Clone)]
pub struct ObjectHasher {
    inner: ring::digest::Context,
    len: u64,
}

impl Default for ObjectHasher {
    fn default() -> Self {
        ObjectHasher {
            inner: ring::digest::Context::new(&ring::digest::SHA512),
            len: 0,
        }
    }
}

impl ObjectHasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(self) -> (ObjectId, u64) {
        let mut id = [0u8; 64];
        id.copy_from_slice(self.inner.finish().as_ref());
        (ObjectId(id), self.len)
    }
}

/// Hashes everything `r` yields; returns the id and the byte count.
pub fn hash_reader<R: Read>(mut r: R) -> io::Result<(ObjectId, u64)> {
    let mut h = ObjectHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vector() {
        assert_eq!(
            ObjectId::of(b"abc").to_hex(),
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
    }

    #[test]
    fn bad_hex_rejected() {
        assert!(ObjectId::from_hex("abc").is_err());
        assert!(ObjectId::from_hex(&"g".repeat(128)).is_err());
    }

    proptest! {
        #[test]
        fn streaming_equals_one_shot(data in proptest::collection::vec(any::<u8>(), 0..5000), split in 0usize..5000) {
            let split = split.min(data.len());
            let mut h = ObjectHasher::new();
            h.update(&data[..split]);
            h.update(&data[split..]);
            let (id, n) = h.finish();
            prop_assert_eq!(id, ObjectId::of(&data));
            prop_assert_eq!(n, data.len() as u64);
            prop_assert_eq!(ObjectId::from_hex(&id.to_hex()).unwrap(), id);
        }
    }
}
