//! Many SHA-512s at once: eight messages advanced together, one per 64-bit lane of an
//! AVX-512 register, where the CPU has AVX-512 (four times one core's single-message rate:
//! a single SHA-512 is a serial chain of rounds; eight independent ones fill the vector
//! unit). Elsewhere, or for a message left alone at the end, one at a time.
//!
//! Used wherever many objects are hashed in a row: the scan of a root, the verification of
//! fetched objects. The result for every message is exactly `ObjectId::of` of its bytes;
//! the tests hold it to ring's SHA-512 over lengths around every padding boundary.
//!
//! No crate offers this for streamed messages (commonware-cryptography's eight-lane
//! `hash_many` takes whole messages in memory; a 100 MiB file cannot be one), so the
//! lane engine is here: the round function is FIPS 180-4's, eight lanes wide.

use crate::hash::ObjectId;
use std::io::{self, Read};

/// Messages advanced together.
pub const LANES: usize = 8;
/// Bytes a lane reads from its message at a time.
const CHUNK: usize = 64 * 1024;
/// A SHA-512 block.
const BLOCK: usize = 128;

/// What `hash_many` hashes: a message's key (returned with its digest), its bytes, and
/// its expected length (a hint: the digest is of whatever the reader yields).
pub type Source<R> = (usize, R, u64);

/// Messages at least this long are hashed one at a time, as they come: a lane runs at an
/// eighth of the vector unit, half a core's single-message rate, and one long message in a
/// lane would be the last to end. Callers hand them out first, longest first.
pub const ALONE_BYTES: u64 = 8 << 20;

/// Hashes every message `next` yields, up to eight at a time, and hands each digest (or
/// the read error that ended its message) to `done` with its key, in the order the
/// messages end. `next` is called again whenever a lane frees, until it returns `None`.
pub fn hash_many<R: Read>(
    mut next: impl FnMut() -> Option<Source<R>>,
    mut done: impl FnMut(usize, io::Result<(ObjectId, u64)>),
) {
    // One buffer for every message hashed alone (zeroing one per message would cost more
    // than hashing a small one).
    let mut buf = vec![0u8; CHUNK];
    if !lanes_supported() {
        while let Some((key, r, _)) = next() {
            done(key, hash_alone(r, &mut buf));
        }
        return;
    }
    // `done` is called both for long messages, as they come, and by the engine.
    let done = std::cell::RefCell::new(done);
    let mut laned = || loop {
        let (key, r, len) = next()?;
        if len < ALONE_BYTES {
            return Some((key, r));
        }
        (done.borrow_mut())(key, hash_alone(r, &mut buf));
    };
    Engine::new().run(&mut laned, &mut |k, r| (done.borrow_mut())(k, r));
}

/// One message through ring, read into `buf`.
fn hash_alone(mut r: impl Read, buf: &mut [u8]) -> io::Result<(ObjectId, u64)> {
    let mut h = crate::hash::ObjectHasher::new();
    loop {
        match r.read(buf) {
            Ok(0) => return Ok(h.finish()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// True where the eight-lane kernel runs (x86-64 with AVX-512F and AVX-512BW).
pub fn lanes_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One lane's message: its reader, the bytes read but not yet compressed, its length.
struct Lane<R> {
    key: usize,
    reader: R,
    /// Bytes `buf[start..end]` wait to be compressed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    len: u64,
    /// The message is read and its padding appended: `buf[start..end]` is the rest.
    padded: bool,
}

impl<R: Read> Lane<R> {
    /// A lane reading `reader` into `buf` (reused from the lane's last message: zeroing a
    /// new one per message would cost more than hashing a small file).
    fn new(key: usize, reader: R, mut buf: Vec<u8>) -> Lane<R> {
        buf.resize(CHUNK + 2 * BLOCK, 0);
        Lane {
            key,
            reader,
            buf,
            start: 0,
            end: 0,
            len: 0,
            padded: false,
        }
    }

    fn blocks(&self) -> usize {
        (self.end - self.start) / BLOCK
    }

    /// Reads until a whole block waits (or the message ends and is padded).
    fn refill(&mut self) -> io::Result<()> {
        while self.blocks() == 0 && !self.padded {
            // Move the partial block to the front, then read behind it.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let n = match self.reader.read(&mut self.buf[self.end..CHUNK]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.pad();
            } else {
                self.end += n;
                self.len += n as u64;
            }
        }
        Ok(())
    }

    /// Appends SHA-512's padding: 0x80, zeros, the length in bits as 128 bits.
    fn pad(&mut self) {
        let rem = self.end - self.start;
        let total = if rem % BLOCK < BLOCK - 16 {
            rem - rem % BLOCK + BLOCK
        } else {
            rem - rem % BLOCK + 2 * BLOCK
        };
        let tail = &mut self.buf[self.start + rem..self.start + total];
        tail.fill(0);
        tail[0] = 0x80;
        let bits = (self.len as u128) * 8;
        tail[total - rem - 16..].copy_from_slice(&bits.to_be_bytes());
        self.end = self.start + total;
        self.padded = true;
    }
}

/// The lanes and their SHA-512 states, word-major (`state[w][lane]`), as the kernel holds
/// them.
struct Engine<R> {
    lanes: [Option<Lane<R>>; LANES],
    state: [[u64; LANES]; 8],
    /// Buffers of ended messages, for the next ones.
    spare: Vec<Vec<u8>>,
}

const IV: [u64; 8] = [
    0x6a09e667f3bcc908,
    0xbb67ae8584caa73b,
    0x3c6ef372fe94f82b,
    0xa54ff53a5f1d36f1,
    0x510e527fade682d1,
    0x9b05688c2b3e6c1f,
    0x1f83d9abfb41bd6b,
    0x5be0cd19137e2179,
];

impl<R: Read> Engine<R> {
    fn new() -> Engine<R> {
        Engine {
            lanes: std::array::from_fn(|_| None),
            state: [[0; LANES]; 8],
            spare: Vec::new(),
        }
    }

    /// Fills free lanes → reads → compresses the blocks every busy lane has → hands out
    /// what ended; a message left alone once `next` is dry is finished one lane wide.
    fn run(
        &mut self,
        next: &mut impl FnMut() -> Option<(usize, R)>,
        done: &mut impl FnMut(usize, io::Result<(ObjectId, u64)>),
    ) {
        let mut dry = false;
        loop {
            if !dry {
                dry = self.admit(next);
            }
            self.refill(done);
            let busy: Vec<usize> = (0..LANES).filter(|&i| self.lanes[i].is_some()).collect();
            match busy.len() {
                0 if dry => return,
                0 => continue,
                1 if dry => {
                    self.finish_alone(busy[0], done);
                    continue;
                }
                _ => {}
            }
            self.compress_common();
            self.hand_out(done);
        }
    }

    /// Gives every free lane the next message; true once `next` has none left.
    fn admit(&mut self, next: &mut impl FnMut() -> Option<(usize, R)>) -> bool {
        for i in 0..LANES {
            if self.lanes[i].is_none() {
                let Some((key, reader)) = next() else {
                    return true;
                };
                let buf = self.spare.pop().unwrap_or_default();
                self.lanes[i] = Some(Lane::new(key, reader, buf));
                for (word, iv) in self.state.iter_mut().zip(IV) {
                    word[i] = iv;
                }
            }
        }
        false
    }

    /// Makes every busy lane hold a block; a lane whose read fails is reported and freed.
    fn refill(&mut self, done: &mut impl FnMut(usize, io::Result<(ObjectId, u64)>)) {
        for i in 0..LANES {
            if let Some(Err(e)) = self.lanes[i].as_mut().map(Lane::refill) {
                let lane = self.free(i);
                done(lane.key, Err(e));
            }
        }
    }

    /// Takes lane `i`'s message out, keeping its buffer.
    fn free(&mut self, i: usize) -> Lane<R> {
        let mut lane = self.lanes[i].take().expect("a busy lane");
        self.spare.push(std::mem::take(&mut lane.buf));
        lane
    }

    /// Compresses as many blocks as every busy lane has waiting; idle lanes compress a
    /// block of zeros into a state nobody reads.
    fn compress_common(&mut self) {
        let n = self
            .lanes
            .iter()
            .flatten()
            .map(Lane::blocks)
            .min()
            .unwrap_or(0);
        if n == 0 {
            return;
        }
        static IDLE: [u8; BLOCK] = [0; BLOCK];
        let ptrs: [*const u8; LANES] = std::array::from_fn(|i| match &self.lanes[i] {
            Some(l) => l.buf[l.start..].as_ptr(),
            None => IDLE.as_ptr(),
        });
        let strides: [usize; LANES] =
            std::array::from_fn(|i| if self.lanes[i].is_some() { BLOCK } else { 0 });
        kernel::compress(&mut self.state, &ptrs, &strides, n);
        for lane in self.lanes.iter_mut().flatten() {
            lane.start += n * BLOCK;
        }
    }

    /// Reports and frees every lane whose padded message is all compressed.
    fn hand_out(&mut self, done: &mut impl FnMut(usize, io::Result<(ObjectId, u64)>)) {
        for i in 0..LANES {
            let ended = self.lanes[i]
                .as_ref()
                .is_some_and(|l| l.padded && l.start == l.end);
            if ended {
                let lane = self.free(i);
                done(lane.key, Ok((self.digest(i), lane.len)));
            }
        }
    }

    /// Lane `i`'s digest.
    fn digest(&self, i: usize) -> ObjectId {
        let mut id = [0u8; 64];
        for w in 0..8 {
            id[w * 8..w * 8 + 8].copy_from_slice(&self.state[w][i].to_be_bytes());
        }
        ObjectId(id)
    }

    /// Finishes lane `i`'s message one block at a time: alone, eight lanes wide would do
    /// an eighth of the work per step.
    fn finish_alone(
        &mut self,
        i: usize,
        done: &mut impl FnMut(usize, io::Result<(ObjectId, u64)>),
    ) {
        let mut lane = self.lanes[i].take().expect("busy");
        let mut state: [u64; 8] = std::array::from_fn(|w| self.state[w][i]);
        loop {
            let whole = lane.blocks() * BLOCK;
            kernel::compress_one(&mut state, &lane.buf[lane.start..lane.start + whole]);
            lane.start += whole;
            if lane.padded {
                break;
            }
            if let Err(e) = lane.refill() {
                return done(lane.key, Err(e));
            }
        }
        for (w, word) in state.iter().enumerate() {
            self.state[w][i] = *word;
        }
        done(lane.key, Ok((self.digest(i), lane.len)));
    }
}

/// Hashes `messages` (whole, in memory) through the lanes; the digests in order.
pub fn hash_slices(messages: &[&[u8]]) -> Vec<ObjectId> {
    let mut out = vec![ObjectId([0; 64]); messages.len()];
    let mut it = messages.iter().enumerate();
    hash_many(
        || it.next().map(|(i, m)| (i, *m, m.len() as u64)),
        |i, r| out[i] = r.expect("reading a slice cannot fail").0,
    );
    out
}

/// The SHA-512 compression function: eight lanes wide, and one lane for what is left.
mod kernel {
    use super::{BLOCK, LANES};

    pub(super) const K: [u64; 80] = [
        0x428a2f98d728ae22,
        0x7137449123ef65cd,
        0xb5c0fbcfec4d3b2f,
        0xe9b5dba58189dbbc,
        0x3956c25bf348b538,
        0x59f111f1b605d019,
        0x923f82a4af194f9b,
        0xab1c5ed5da6d8118,
        0xd807aa98a3030242,
        0x12835b0145706fbe,
        0x243185be4ee4b28c,
        0x550c7dc3d5ffb4e2,
        0x72be5d74f27b896f,
        0x80deb1fe3b1696b1,
        0x9bdc06a725c71235,
        0xc19bf174cf692694,
        0xe49b69c19ef14ad2,
        0xefbe4786384f25e3,
        0x0fc19dc68b8cd5b5,
        0x240ca1cc77ac9c65,
        0x2de92c6f592b0275,
        0x4a7484aa6ea6e483,
        0x5cb0a9dcbd41fbd4,
        0x76f988da831153b5,
        0x983e5152ee66dfab,
        0xa831c66d2db43210,
        0xb00327c898fb213f,
        0xbf597fc7beef0ee4,
        0xc6e00bf33da88fc2,
        0xd5a79147930aa725,
        0x06ca6351e003826f,
        0x142929670a0e6e70,
        0x27b70a8546d22ffc,
        0x2e1b21385c26c926,
        0x4d2c6dfc5ac42aed,
        0x53380d139d95b3df,
        0x650a73548baf63de,
        0x766a0abb3c77b2a8,
        0x81c2c92e47edaee6,
        0x92722c851482353b,
        0xa2bfe8a14cf10364,
        0xa81a664bbc423001,
        0xc24b8b70d0f89791,
        0xc76c51a30654be30,
        0xd192e819d6ef5218,
        0xd69906245565a910,
        0xf40e35855771202a,
        0x106aa07032bbd1b8,
        0x19a4c116b8d2d0c8,
        0x1e376c085141ab53,
        0x2748774cdf8eeb99,
        0x34b0bcb5e19b48a8,
        0x391c0cb3c5c95a63,
        0x4ed8aa4ae3418acb,
        0x5b9cca4f7763e373,
        0x682e6ff3d6b2b8a3,
        0x748f82ee5defb2fc,
        0x78a5636f43172f60,
        0x84c87814a1f0ab72,
        0x8cc702081a6439ec,
        0x90befffa23631e28,
        0xa4506cebde82bde9,
        0xbef9a3f7b2c67915,
        0xc67178f2e372532b,
        0xca273eceea26619c,
        0xd186b8c721c0c207,
        0xeada7dd6cde0eb1e,
        0xf57d4f7fee6ed178,
        0x06f067aa72176fba,
        0x0a637dc5a2c898a6,
        0x113f9804bef90dae,
        0x1b710b35131c471b,
        0x28db77f523047d84,
        0x32caab7b40c72493,
        0x3c9ebe0a15c9bebc,
        0x431d67c49c100d4c,
        0x4cc5d4becb3e42b6,
        0x597f299cfc657e2a,
        0x5fcb6fab3ad6faec,
        0x6c44198c4a475817,
    ];

    /// Compresses `n` blocks of each lane into `state` (word-major): lane `i`'s blocks start
    /// at `ptrs[i]`, `strides[i]` bytes apart (0: the same block again, for an idle lane).
    pub(super) fn compress(
        state: &mut [[u64; LANES]; 8],
        ptrs: &[*const u8; LANES],
        strides: &[usize; LANES],
        n: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        if super::lanes_supported() {
            // SAFETY: the CPU has the features `x8` is compiled for (checked above); every
            // `ptrs[i] + k * strides[i]` for k < n starts BLOCK readable bytes (the caller's
            // buffers hold n whole blocks from each pointer; idle lanes stride 0 over a
            // static block).
            unsafe { x8(state, ptrs, strides, n) };
            return;
        }
        // One lane at a time (never reached through `hash_many`, which checks first).
        for i in 0..LANES {
            let mut one: [u64; 8] = std::array::from_fn(|w| state[w][i]);
            for k in 0..n {
                // SAFETY: as above, each block is BLOCK readable bytes.
                let block =
                    unsafe { std::slice::from_raw_parts(ptrs[i].add(k * strides[i]), BLOCK) };
                compress_one(&mut one, block);
            }
            for w in 0..8 {
                state[w][i] = one[w];
            }
        }
    }

    /// Compresses whole blocks `blocks` (a multiple of BLOCK bytes) into one state (the
    /// `sha2` crate's compression function: AVX2 where the CPU has it).
    pub(super) fn compress_one(state: &mut [u64; 8], blocks: &[u8]) {
        debug_assert_eq!(blocks.len() % BLOCK, 0);
        let blocks: Vec<_> = blocks
            .chunks_exact(BLOCK)
            .map(|b| *sha2::digest::generic_array::GenericArray::from_slice(b))
            .collect();
        sha2::compress512(state, &blocks);
    }

    /// `compress` on AVX-512: register `w` holds word `w` of all eight lanes' states; the
    /// message words are gathered from the eight blocks and byte-swapped to big-endian.
    /// One function on purpose (over 100 lines): the gather, the 80 rounds and the
    /// feed-forward share the 16 message registers and the 8 state registers, which split
    /// functions would spill to memory between calls.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512BW, and every `ptrs[i] + k * strides[i]`
    /// (k < n) must start BLOCK readable bytes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn x8(
        state: &mut [[u64; LANES]; 8],
        ptrs: &[*const u8; LANES],
        strides: &[usize; LANES],
        n: usize,
    ) {
        use std::arch::x86_64::*;
        // Reverses the bytes of each 64-bit word.
        let bswap = _mm512_set_epi8(
            56, 57, 58, 59, 60, 61, 62, 63, 48, 49, 50, 51, 52, 53, 54, 55, 40, 41, 42, 43, 44, 45,
            46, 47, 32, 33, 34, 35, 36, 37, 38, 39, 24, 25, 26, 27, 28, 29, 30, 31, 16, 17, 18, 19,
            20, 21, 22, 23, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7,
        );
        let addr = |i: usize| ptrs[i] as i64;
        let mut at = _mm512_set_epi64(
            addr(7),
            addr(6),
            addr(5),
            addr(4),
            addr(3),
            addr(2),
            addr(1),
            addr(0),
        );
        let step = |i: usize| strides[i] as i64;
        let advance = _mm512_set_epi64(
            step(7),
            step(6),
            step(5),
            step(4),
            step(3),
            step(2),
            step(1),
            step(0),
        );
        // SAFETY (loads and stores of `state`): `[u64; LANES]` is 64 bytes, one register.
        let mut s: [__m512i; 8] =
            std::array::from_fn(|w| unsafe { _mm512_loadu_si512(state[w].as_ptr().cast()) });
        for _ in 0..n {
            let mut w = [_mm512_setzero_si512(); 16];
            for (j, word) in w.iter_mut().enumerate() {
                let offsets = _mm512_add_epi64(at, _mm512_set1_epi64((j * 8) as i64));
                // SAFETY: each lane's address is within its block (the caller's promise).
                let v = unsafe { _mm512_i64gather_epi64::<1>(offsets, std::ptr::null::<i64>()) };
                *word = _mm512_shuffle_epi8(v, bswap);
            }
            let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = s;
            for t in 0..80 {
                let wt = if t < 16 {
                    w[t]
                } else {
                    let (w2, w15) = (w[(t - 2) & 15], w[(t - 15) & 15]);
                    let s1 = _mm512_ternarylogic_epi64::<0x96>(
                        _mm512_ror_epi64::<19>(w2),
                        _mm512_ror_epi64::<61>(w2),
                        _mm512_srli_epi64::<6>(w2),
                    );
                    let s0 = _mm512_ternarylogic_epi64::<0x96>(
                        _mm512_ror_epi64::<1>(w15),
                        _mm512_ror_epi64::<8>(w15),
                        _mm512_srli_epi64::<7>(w15),
                    );
                    let next = _mm512_add_epi64(
                        _mm512_add_epi64(s1, w[(t - 7) & 15]),
                        _mm512_add_epi64(s0, w[t & 15]),
                    );
                    w[t & 15] = next;
                    next
                };
                let s1 = _mm512_ternarylogic_epi64::<0x96>(
                    _mm512_ror_epi64::<14>(e),
                    _mm512_ror_epi64::<18>(e),
                    _mm512_ror_epi64::<41>(e),
                );
                // Ch: e ? f : g.
                let ch = _mm512_ternarylogic_epi64::<0xCA>(e, f, g);
                let t1 = _mm512_add_epi64(
                    _mm512_add_epi64(_mm512_add_epi64(h, s1), ch),
                    _mm512_add_epi64(_mm512_set1_epi64(K[t] as i64), wt),
                );
                let s0 = _mm512_ternarylogic_epi64::<0x96>(
                    _mm512_ror_epi64::<28>(a),
                    _mm512_ror_epi64::<34>(a),
                    _mm512_ror_epi64::<39>(a),
                );
                // Maj: the majority of a, b, c.
                let maj = _mm512_ternarylogic_epi64::<0xE8>(a, b, c);
                h = g;
                g = f;
                f = e;
                e = _mm512_add_epi64(d, t1);
                d = c;
                c = b;
                b = a;
                a = _mm512_add_epi64(t1, _mm512_add_epi64(s0, maj));
            }
            for (sw, v) in s.iter_mut().zip([a, b, c, d, e, f, g, h]) {
                *sw = _mm512_add_epi64(*sw, v);
            }
            at = _mm512_add_epi64(at, advance);
        }
        for (w, v) in s.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_si512(state[w].as_mut_ptr().cast(), *v) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        crate::testing::noise(seed, len)
    }

    #[test]
    fn every_padding_boundary_matches_the_single_message_hash() {
        // 111/112 and 239/240: where the padding needs one block or two.
        let lens: Vec<usize> = [
            0, 1, 64, 110, 111, 112, 113, 127, 128, 129, 239, 240, 241, 255, 256,
        ]
        .into_iter()
        .chain([CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
        .chain([ALONE_BYTES as usize - 1, ALONE_BYTES as usize])
        .collect();
        let msgs: Vec<Vec<u8>> = lens.iter().map(|&l| bytes(l, l as u64)).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(|m| &m[..]).collect();
        for (m, got) in msgs.iter().zip(hash_slices(&refs)) {
            assert_eq!(got, ObjectId::of(m), "length {}", m.len());
        }
    }

    #[test]
    fn the_known_answer_for_abc() {
        let got = hash_slices(&[b"abc"]);
        assert!(got[0].to_hex().starts_with("ddaf35a193617aba"));
    }

    #[test]
    fn a_message_read_in_odd_pieces_hashes_as_whole() {
        /// A reader that hands out at most `step` bytes per read.
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(self.1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let msgs: Vec<Vec<u8>> = (0..20).map(|i| bytes(1000 + i * 777, i as u64)).collect();
        let mut out = vec![None; msgs.len()];
        let mut it = msgs.iter().enumerate();
        hash_many(
            || {
                it.next()
                    .map(|(i, m)| (i, Trickle(m, 1 + i * 13), m.len() as u64))
            },
            |i, r| out[i] = Some(r.unwrap()),
        );
        for (m, got) in msgs.iter().zip(out) {
            assert_eq!(got, Some((ObjectId::of(m), m.len() as u64)));
        }
    }

    #[test]
    fn a_read_error_ends_only_its_own_message() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        enum Src<'a> {
            Ok(&'a [u8]),
            Bad(Failing),
        }
        impl Read for Src<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self {
                    Src::Ok(r) => r.read(buf),
                    Src::Bad(f) => f.read(buf),
                }
            }
        }
        let good = bytes(5000, 1);
        let mut keys = (0..10).collect::<Vec<usize>>().into_iter();
        let mut results = Vec::new();
        hash_many(
            || {
                keys.next().map(|k| {
                    let src = if k == 3 {
                        Src::Bad(Failing)
                    } else {
                        Src::Ok(&good)
                    };
                    (k, src, 5000)
                })
            },
            |k, r| results.push((k, r.map_err(|e| e.to_string()))),
        );
        results.sort_by_key(|(k, _)| *k);
        assert_eq!(results.len(), 10);
        for (k, r) in results {
            if k == 3 {
                assert_eq!(r.unwrap_err(), "disk on fire");
            } else {
                assert_eq!(r.unwrap(), (ObjectId::of(&good), 5000));
            }
        }
    }

    proptest! {
        #[test]
        fn any_messages_hash_as_one_at_a_time(
            lens in proptest::collection::vec(0usize..3000, 0..30),
            seed in any::<u64>(),
        ) {
            let msgs: Vec<Vec<u8>> =
                lens.iter().enumerate().map(|(i, &l)| bytes(l, seed ^ i as u64)).collect();
            let refs: Vec<&[u8]> = msgs.iter().map(|m| &m[..]).collect();
            let got = hash_slices(&refs);
            for (m, g) in msgs.iter().zip(got) {
                prop_assert_eq!(g, ObjectId::of(m));
            }
        }
    }

    #[test]
    fn the_one_lane_kernel_matches_ring() {
        for len in [0usize, 100, 128, 300, 1000] {
            let m = bytes(len, 9);
            let mut lane = Lane::new(0, &m[..], Vec::new());
            let mut state = IV;
            loop {
                lane.refill().unwrap();
                let whole = lane.blocks() * BLOCK;
                kernel::compress_one(&mut state, &lane.buf[lane.start..lane.start + whole]);
                lane.start += whole;
                if lane.padded {
                    break;
                }
            }
            let mut id = [0u8; 64];
            for w in 0..8 {
                id[w * 8..w * 8 + 8].copy_from_slice(&state[w].to_be_bytes());
            }
            assert_eq!(ObjectId(id), ObjectId::of(&m), "length {len}");
        }
    }
}
