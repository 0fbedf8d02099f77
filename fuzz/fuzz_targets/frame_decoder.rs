//! Arbitrary bytes, cut into arbitrary chunks, fed to the host's frame decoder.
//!
//! Input layout: byte 0 says how many of the following bytes (`byte 0 % 8`) are chunk
//! sizes; the rest is the stream. Chunk sizes repeat in turn until the stream is used
//! up; a size byte of 0 means "all that is left". With no size bytes the stream arrives
//! in one piece.
//!
//! The decoder must never panic, must produce exactly what a plain reading of the
//! whole stream produces (each reply or chunk, or the one error that ends the stream)
//! however the stream is cut, must report each of them as soon as its last byte has arrived
//! (an oversized header as soon as the header has, before any of the body), and must
//! never grow its buffer or allocate beyond what the frame limit allows.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

use protocol::{Frame, FrameError, HostCodec, parse_frame};

/// `snakepool::protocol`, compiled from its source file (see `fuzz/Cargo.toml`).
#[allow(dead_code)]
#[path = "../../src/protocol.rs"]
mod protocol;

/// The frame limit the decoder is configured with.
const MAX_FRAME: usize = 64 * 1024;

/// The largest single allocation any input may cause. Parsing a frame of at most
/// `MAX_FRAME` bytes into JSON values allocates a small multiple of the frame (an array
/// element is 32 bytes); a header that made the decoder reserve the announced length
/// without checking it would ask for up to 4 GiB.
const ALLOCATION_LIMIT: usize = 256 * MAX_FRAME;

/// The system allocator, refusing any single allocation above [`ALLOCATION_LIMIT`]:
/// the refusal aborts the run with "memory allocation of N bytes failed", which
/// libFuzzer reports as a crash.
struct Capped;

// SAFETY: forwards to the system allocator unchanged, or refuses with a null pointer as
// the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout, same contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout, same contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's pointer, layout and size, unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// One thing the decoder reports: a reply or chunk, or the error that ends the stream.
#[derive(Debug, PartialEq)]
enum Outcome {
    Frame(Frame),
    TooLarge { len: usize, max: usize },
    InvalidJson(String),
    BadShape(String),
}

impl Outcome {
    fn of(result: Result<Frame, FrameError>) -> Outcome {
        match result {
            Ok(frame) => Outcome::Frame(frame),
            Err(FrameError::TooLarge { len, max }) => Outcome::TooLarge { len, max },
            Err(FrameError::InvalidJson(message)) => Outcome::InvalidJson(message),
            Err(FrameError::BadShape(message)) => Outcome::BadShape(message),
            Err(FrameError::Io(error)) => {
                panic!("decoding bytes already in memory reported an I/O error: {error}")
            }
        }
    }

    fn ends_stream(&self) -> bool {
        !matches!(self, Outcome::Frame(_))
    }
}

/// What the whole stream decodes to, read plainly front to back: each outcome with the
/// stream offset at which its last byte arrives.
fn expected(stream: &[u8]) -> Vec<(usize, Outcome)> {
    let mut outcomes = Vec::new();
    let mut at = 0;
    while stream.len() - at >= 4 {
        let header: [u8; 4] = stream[at..at + 4].try_into().expect("four bytes");
        let len = u32::from_be_bytes(header) as usize;
        let body = at + 4;
        if len > MAX_FRAME {
            outcomes.push((
                body,
                Outcome::TooLarge {
                    len,
                    max: MAX_FRAME,
                },
            ));
            break;
        }
        let end = body + len;
        if end > stream.len() {
            break;
        }
        let outcome = Outcome::of(parse_frame(&stream[body..end]));
        let last = outcome.ends_stream();
        outcomes.push((end, outcome));
        if last {
            break;
        }
        at = end;
    }
    outcomes
}

/// Splits the input into chunk sizes and the stream.
fn split_input(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = usize::from(first % 8).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    (sizes.iter().map(|&s| usize::from(s)).collect(), stream)
}

fn chunks<'a>(stream: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut turn = 0;
    while at < stream.len() {
        let size = match sizes.get(turn % sizes.len().max(1)) {
            None | Some(0) => stream.len() - at,
            Some(&size) => size.min(stream.len() - at),
        };
        chunks.push(&stream[at..at + size]);
        at += size;
        turn += 1;
    }
    chunks
}

fuzz_target!(|data: &[u8]| {
    let (sizes, stream) = split_input(data);
    let want = expected(stream);

    let mut codec = HostCodec::new(MAX_FRAME);
    assert_eq!(codec.max_frame_bytes(), MAX_FRAME);
    let mut buf = BytesMut::new();
    // Each outcome with the stream offsets before and after the chunk that produced it.
    let mut got: Vec<(usize, usize, Outcome)> = Vec::new();
    let mut fed = 0;
    let mut ended = false;
    'feed: for chunk in chunks(stream, &sizes) {
        let before = fed;
        fed += chunk.len();
        buf.extend_from_slice(chunk);
        loop {
            let result = codec.decode(&mut buf);
            // The buffer holds at most the bytes fed so far plus room for one frame.
            assert!(
                buf.capacity() <= 2 * (fed + MAX_FRAME + 4) + 64 * 1024,
                "buffer capacity {} after {fed} bytes",
                buf.capacity()
            );
            match result {
                Ok(None) => break,
                Ok(Some(frame)) => got.push((before, fed, Outcome::Frame(frame))),
                Err(error) => {
                    got.push((before, fed, Outcome::of(Err(error))));
                    ended = true;
                    break 'feed;
                }
            }
        }
    }

    assert_eq!(
        got.len(),
        want.len(),
        "decoded {:?}, expected {:?}",
        got.iter().map(|g| &g.2).collect::<Vec<_>>(),
        want.iter().map(|w| &w.1).collect::<Vec<_>>()
    );
    for ((before, after, outcome), (ready_at, expected)) in got.iter().zip(&want) {
        assert_eq!(outcome, expected);
        assert!(
            *before < *ready_at && *ready_at <= *after,
            "{outcome:?} was ready at byte {ready_at} but reported after the chunk {before}..{after}"
        );
    }

    if !ended {
        // End of input: a clean end only when nothing is left over.
        match codec.decode_eof(&mut buf) {
            Ok(None) => assert!(buf.is_empty()),
            Ok(Some(frame)) => panic!("a frame appeared only at end of input: {frame:?}"),
            Err(FrameError::Io(_)) => assert!(!buf.is_empty()),
            Err(other) => panic!("end of input reported {other:?}"),
        }
    }
});
