//! Wire protocol v1: frames, messages and the codec.
//!
//! A frame is a 4-byte unsigned big-endian length `N` followed by `N` bytes of UTF-8
//! JSON. Requests are `{"id", "command", "args"}`; replies are
//! `{"id", "success": true, "result"}` or `{"id", "success": false, "error"}` where
//! the error is either a plain string (older bridge scripts) or
//! `{"type", "message", "traceback"}` (snakepool_worker). A streaming command sends
//! chunks `{"id", "chunk"}` before its reply; the host grants it more chunks with
//! `{"id", "credit": n}` and cancels a call with `{"id", "cancel": true}`.
//!
//! This is the only module that touches bytes. Frames longer than the configured
//! maximum are refused as soon as their header is seen, before any buffer for the body
//! is reserved.

use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

/// The protocol version this host speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// The default maximum frame size: 64 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Size of the length header in front of every frame.
const HEADER_BYTES: usize = 4;

/// The id of the handshake ping, the host's first frame to every worker.
pub const HANDSHAKE_ID: u64 = 0;

/// A request from the host to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Correlates the reply with this request.
    pub id: u64,
    /// The command name, looked up in the worker's registry.
    pub command: String,
    /// The command's arguments: always a JSON object on the wire.
    pub args: Value,
}

/// Asks a worker to cancel call `id` (protocol addition, for workers that announce
/// concurrency): `{"id": N, "cancel": true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cancel {
    /// The call to cancel.
    pub id: u64,
    cancel: bool,
}

impl Cancel {
    /// The cancel frame for call `id`.
    pub fn of(id: u64) -> Cancel {
        Cancel { id, cancel: true }
    }
}

/// Lets a worker send `credit` more chunks of call `id`: `{"id": N, "credit": n}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Credit {
    /// The streaming call.
    pub id: u64,
    /// How many more chunks it may send.
    pub credit: u32,
}

/// A worker's structured report of a failed command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// The exception type, e.g. `ValueError`; `Error` for string-form errors.
    #[serde(rename = "type")]
    pub kind: String,
    /// The human-readable message.
    pub message: String,
    /// The worker-side traceback, when the worker sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

impl RemoteError {
    /// Builds the error from either wire form: a string or `{type, message, traceback}`.
    pub fn from_wire(error: Value) -> Self {
        match error {
            Value::String(message) => RemoteError {
                kind: "Error".to_owned(),
                message,
                traceback: None,
            },
            Value::Object(mut map) => {
                let kind = match map.remove("type") {
                    Some(Value::String(s)) => s,
                    _ => "Error".to_owned(),
                };
                let message = match map.remove("message") {
                    Some(Value::String(s)) => s,
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let traceback = match map.remove("traceback") {
                    Some(Value::String(s)) if !s.is_empty() => Some(s),
                    _ => None,
                };
                RemoteError {
                    kind,
                    message,
                    traceback,
                }
            }
            other => RemoteError {
                kind: "Error".to_owned(),
                message: other.to_string(),
                traceback: None,
            },
        }
    }
}

/// A call a worker asks the host to journal in place of the request it answered,
/// sent as the reply's optional `journal` field: e.g. an optimizer's run is journaled
/// as loading the state it produced, so replaying the journal is cheap and exact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalHint {
    /// The command to replay.
    pub command: String,
    /// Its arguments.
    pub args: Value,
}

/// A worker's reply to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The id of the request this answers.
    pub id: u64,
    /// The command's result, or the worker's report of its failure.
    pub outcome: Result<Value, RemoteError>,
    /// What to journal instead of the request, if the worker said so.
    pub journal: Option<JournalHint>,
}

impl Reply {
    /// The reply as it goes on the wire (used by tests and by protocol-v1 peers).
    pub fn to_wire(&self) -> Value {
        let mut wire = match &self.outcome {
            Ok(result) => serde_json::json!({"id": self.id, "success": true, "result": result}),
            Err(error) => serde_json::json!({"id": self.id, "success": false, "error": error}),
        };
        if let Some(hint) = &self.journal {
            wire["journal"] = serde_json::json!(hint);
        }
        wire
    }
}

/// One chunk of a streaming call's output, sent before its reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The id of the call it belongs to.
    pub id: u64,
    /// The value the handler yielded.
    pub value: Value,
}

/// A frame from a worker: a reply, or a chunk of a call still running.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The final answer to a request.
    Reply(Reply),
    /// Part of a streaming call's output.
    Chunk(Chunk),
}

impl Frame {
    /// The id of the call the frame belongs to.
    pub fn id(&self) -> u64 {
        match self {
            Frame::Reply(reply) => reply.id,
            Frame::Chunk(chunk) => chunk.id,
        }
    }
}

/// Everything that can be wrong with bytes arriving on a worker's channel.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length header announced more than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The frame's body is not valid JSON.
    #[error("frame is not valid JSON: {0}")]
    InvalidJson(String),
    /// The JSON is valid but is not a protocol-v1 reply.
    #[error("frame is not a protocol-v1 reply: {0}")]
    BadShape(String),
    /// Reading or writing the pipe failed.
    #[error("i/o error on the worker channel: {0}")]
    Io(#[from] std::io::Error),
}

/// The fields of a frame body, read straight from its JSON object without building a
/// map of them first. Read as a `Value` would be: every value is read whole (also
/// those of fields the protocol does not know, then dropped), and of a field given
/// twice the last one counts. A field is `None` when missing, `Some(Value::Null)` when
/// `null`.
#[derive(Default)]
struct FrameFields {
    id: Option<Value>,
    success: Option<Value>,
    result: Option<Value>,
    error: Option<Value>,
    journal: Option<Value>,
    chunk: Option<Value>,
}

/// The name of a frame body's field.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum FieldName {
    Id,
    Success,
    Result,
    Error,
    Journal,
    Chunk,
    #[serde(other)]
    Unknown,
}

impl<'de> Deserialize<'de> for FrameFields {
    fn deserialize<D: serde::Deserializer<'de>>(body: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = FrameFields;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<FrameFields, A::Error> {
                let mut fields = FrameFields::default();
                while let Some(name) = map.next_key::<FieldName>()? {
                    let value: Value = map.next_value()?;
                    let slot = match name {
                        FieldName::Id => &mut fields.id,
                        FieldName::Success => &mut fields.success,
                        FieldName::Result => &mut fields.result,
                        FieldName::Error => &mut fields.error,
                        FieldName::Journal => &mut fields.journal,
                        FieldName::Chunk => &mut fields.chunk,
                        FieldName::Unknown => continue,
                    };
                    *slot = Some(value);
                }
                Ok(fields)
            }
        }
        body.deserialize_map(Fields)
    }
}

/// Reads a frame body's fields: `InvalidJson` unless it is JSON, `BadShape` unless
/// it is an object.
fn frame_fields(body: &[u8]) -> Result<FrameFields, FrameError> {
    // The common case, read without a map; anything else is told apart by reading it
    // as a `Value`.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return serde_json::from_slice(body).map_err(|e| FrameError::InvalidJson(e.to_string()));
    }
    serde_json::from_slice::<Value>(body).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    Err(FrameError::BadShape("reply is not a JSON object".into()))
}

/// Parses one frame body: a chunk is an object with `chunk` and no `success`; anything
/// else must be a reply (see [`parse_reply`]).
pub fn parse_frame(body: &[u8]) -> Result<Frame, FrameError> {
    let fields = frame_fields(body)?;
    if fields.success.is_some() || fields.chunk.is_none() {
        return reply_from(fields).map(Frame::Reply);
    }
    let id = id_of(fields.id.as_ref(), "chunk")?;
    let value = fields.chunk.unwrap_or(Value::Null);
    Ok(Frame::Chunk(Chunk { id, value }))
}

/// Parses one frame body into a [`Reply`].
pub fn parse_reply(body: &[u8]) -> Result<Reply, FrameError> {
    reply_from(frame_fields(body)?)
}

/// The `id` of a reply or chunk (`what`), which must be a u64.
fn id_of(id: Option<&Value>, what: &str) -> Result<u64, FrameError> {
    match id {
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| FrameError::BadShape(format!("{what} id {n} is not a u64"))),
        Some(other) => Err(FrameError::BadShape(format!(
            "{what} id {other} is not a number"
        ))),
        None => Err(FrameError::BadShape(format!("{what} has no id"))),
    }
}

fn reply_from(fields: FrameFields) -> Result<Reply, FrameError> {
    let id = id_of(fields.id.as_ref(), "reply")?;
    let outcome = match fields.success {
        Some(Value::Bool(true)) => Ok(fields.result.unwrap_or(Value::Null)),
        Some(Value::Bool(false)) => {
            Err(RemoteError::from_wire(fields.error.unwrap_or(Value::Null)))
        }
        Some(other) => {
            return Err(FrameError::BadShape(format!(
                "reply {id}: success is {other}, not a boolean"
            )));
        }
        None => return Err(FrameError::BadShape(format!("reply {id} has no success"))),
    };
    let journal = match fields.journal {
        None | Some(Value::Null) => None,
        Some(hint) => Some(serde_json::from_value(hint).map_err(|e| {
            FrameError::BadShape(format!("reply {id}: journal is not {{command, args}}: {e}"))
        })?),
    };
    Ok(Reply {
        id,
        outcome,
        journal,
    })
}

/// The host side of the codec: decodes [`Frame`]s ([`encode_frame`] encodes
/// requests, cancel and credit frames).
///
/// Framing is tokio-util's [`LengthDelimitedCodec`] with a 4-byte big-endian header.
/// The maximum frame size is checked against the header before the codec reserves any
/// space for the body, in both directions.
#[derive(Debug)]
pub struct HostCodec {
    frames: LengthDelimitedCodec,
    max_frame_bytes: usize,
    /// The inner codec has consumed a header and waits for the body: the buffer's
    /// first bytes are body bytes, not a header to check.
    in_body: bool,
}

impl HostCodec {
    /// A codec refusing frames longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        let frames = LengthDelimitedCodec::builder()
            .length_field_length(HEADER_BYTES)
            .big_endian()
            .max_frame_length(max_frame_bytes)
            .new_codec();
        HostCodec {
            frames,
            max_frame_bytes,
            in_body: false,
        }
    }

    /// The largest frame this codec accepts or sends.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Whether a frame's header has been read but not yet its whole body.
    pub fn mid_frame(&self) -> bool {
        self.in_body
    }
}

impl Decoder for HostCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let has_header = src.len() >= HEADER_BYTES;
        if !self.in_body && has_header {
            let len = (&src[..HEADER_BYTES]).get_u32() as usize;
            if len > self.max_frame_bytes {
                return Err(FrameError::TooLarge {
                    len,
                    max: self.max_frame_bytes,
                });
            }
        }
        match self.frames.decode(src)? {
            Some(body) => {
                self.in_body = false;
                parse_frame(&body).map(Some)
            }
            None => {
                // With a whole header buffered the inner codec always consumes it.
                self.in_body |= has_header;
                Ok(None)
            }
        }
    }
}

/// One frame carrying `message`: a 4-byte big-endian length, then its JSON. A body
/// longer than `max_frame_bytes` is refused.
pub fn encode_frame(
    message: &impl Serialize,
    max_frame_bytes: usize,
) -> Result<bytes::Bytes, FrameError> {
    let mut frame = Vec::with_capacity(128);
    frame.extend_from_slice(&[0; HEADER_BYTES]);
    serde_json::to_writer(&mut frame, message)
        .map_err(|e| FrameError::BadShape(format!("request is not serialisable: {e}")))?;
    let len = frame.len() - HEADER_BYTES;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    let header = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: u32::MAX as usize,
    })?;
    frame[..HEADER_BYTES].copy_from_slice(&header.to_be_bytes());
    Ok(bytes::Bytes::from(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use proptest::prelude::*;
    use serde_json::json;

    fn frame(body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.put_slice(body);
        buf
    }

    /// The reply a decoded frame must be.
    fn reply_of(frame: Option<Frame>) -> Reply {
        match frame {
            Some(Frame::Reply(reply)) => reply,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn decodes_chunks_and_tells_them_from_replies() {
        let mut codec = HostCodec::new(1024);
        let mut buf = frame(br#"{"id":5,"chunk":{"token":"he"}}"#);
        buf.extend_from_slice(&frame(
            br#"{"id":5,"chunk":null,"success":true,"result":2}"#,
        ));
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Frame::Chunk(Chunk {
                id: 5,
                value: json!({"token": "he"})
            }))
        );
        // With `success`, it is a reply whatever else it carries.
        assert_eq!(
            reply_of(codec.decode(&mut buf).unwrap()).outcome,
            Ok(json!(2))
        );
        for bad in [
            &br#"{"chunk":1}"#[..],
            br#"{"id":-1,"chunk":1}"#,
            br#"{"id":"x","chunk":1}"#,
        ] {
            assert!(
                matches!(parse_frame(bad), Err(FrameError::BadShape(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn encodes_credit_and_cancel_frames() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&encode_frame(&Credit { id: 3, credit: 8 }, 1024).unwrap());
        buf.extend_from_slice(&encode_frame(&Cancel::of(4), 1024).unwrap());
        let bodies: Vec<Value> = [&buf[4..4 + 19], &buf[4 + 19 + 4..]]
            .iter()
            .map(|body| serde_json::from_slice(body).unwrap())
            .collect();
        assert_eq!(
            bodies,
            [
                json!({"id": 3, "credit": 8}),
                json!({"id": 4, "cancel": true})
            ]
        );
    }

    #[test]
    fn decodes_success_reply() {
        let mut codec = HostCodec::new(1024);
        let mut buf = frame(br#"{"id":7,"success":true,"result":{"a":1}}"#);
        let reply = reply_of(codec.decode(&mut buf).unwrap());
        assert_eq!(reply.id, 7);
        assert_eq!(reply.outcome, Ok(json!({"a": 1})));
        assert!(buf.is_empty());
    }

    #[test]
    fn decodes_both_error_forms() {
        let mut codec = HostCodec::new(1024);
        let mut buf = frame(br#"{"id":1,"success":false,"error":"boom"}"#);
        let err = reply_of(codec.decode(&mut buf).unwrap())
            .outcome
            .unwrap_err();
        assert_eq!((err.kind.as_str(), err.message.as_str()), ("Error", "boom"));
        assert_eq!(err.traceback, None);

        let mut buf = frame(
            br#"{"id":2,"success":false,"error":{"type":"ValueError","message":"bad","traceback":"tb"}}"#,
        );
        let err = reply_of(codec.decode(&mut buf).unwrap())
            .outcome
            .unwrap_err();
        assert_eq!(err.kind, "ValueError");
        assert_eq!(err.message, "bad");
        assert_eq!(err.traceback.as_deref(), Some("tb"));
    }

    #[test]
    fn reads_the_journal_hint() {
        let reply = parse_reply(
            br#"{"id":4,"success":true,"result":1,"journal":{"command":"load","args":{"s":2}}}"#,
        )
        .unwrap();
        assert_eq!(
            reply.journal,
            Some(JournalHint {
                command: "load".into(),
                args: json!({"s": 2})
            })
        );
        assert!(matches!(
            parse_reply(br#"{"id":4,"success":true,"result":1,"journal":"nope"}"#),
            Err(FrameError::BadShape(_))
        ));
    }

    #[test]
    fn waits_for_whole_frame() {
        let mut codec = HostCodec::new(1024);
        let full = frame(br#"{"id":3,"success":true,"result":null}"#);
        let mut buf = BytesMut::from(&full[..6]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&full[6..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().id(), 3);
    }

    #[test]
    fn refuses_oversized_header_without_reserving_body() {
        let mut codec = HostCodec::new(1024);
        let mut buf = BytesMut::with_capacity(8);
        buf.put_u32(0xFFFF_FFF0);
        let before = buf.capacity();
        match codec.decode(&mut buf) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!((len, max), (0xFFFF_FFF0, 1024));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(buf.capacity(), before, "no space reserved for the body");
    }

    #[test]
    fn refuses_to_encode_oversized_request() {
        let request = Request {
            id: 1,
            command: "echo".into(),
            args: json!({"blob": "x".repeat(100)}),
        };
        assert!(matches!(
            encode_frame(&request, 64),
            Err(FrameError::TooLarge { max: 64, .. })
        ));
    }

    #[test]
    fn rejects_replies_without_id_or_success() {
        for body in [
            &br#"{"success":true,"result":1}"#[..],
            br#"{"id":"x","success":true}"#,
            br#"{"id":-1,"success":true}"#,
            br#"{"id":1}"#,
            br#"{"id":1,"success":"yes"}"#,
            br#"[1,2]"#,
            // An array is no object, even one a struct could be read from by position.
            br#" [1,true]"#,
            br#"{"id":null,"success":true}"#,
            br#"{"id":1,"success":true,"journal":{"command":1}}"#,
        ] {
            assert!(
                matches!(parse_reply(body), Err(FrameError::BadShape(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for body in [
            &b"{not json"[..],
            b"[1,",
            b"",
            b"{\"id\":1} x",
            // A field given twice, then not JSON.
            b"{\"id\":7,\"success\":true,\"id\":7,\"success\":truere}",
            // Fields the protocol does not know must be JSON all the same.
            b"{\"id\":1,\"success\":true,\"x\":\"\xbb\"}",
            b"{\"id\":1,\"success\":true,\"x\":\"\\ud800\"}",
        ] {
            assert!(
                matches!(parse_reply(body), Err(FrameError::InvalidJson(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn of_a_field_given_twice_the_last_counts() {
        let reply = parse_reply(br#"{"id":1,"success":false,"id":2,"success":true}"#).unwrap();
        assert_eq!((reply.id, reply.outcome), (2, Ok(Value::Null)));
    }

    #[test]
    fn null_fields_read_as_missing_ones_but_a_null_chunk_is_a_chunk() {
        let reply = parse_reply(br#"{"id":3,"success":true,"result":null,"journal":null}"#);
        let reply = reply.unwrap();
        assert_eq!((reply.outcome, reply.journal), (Ok(Value::Null), None));
        let frame = parse_frame(br#"{"id":4,"chunk":null,"extra":[1,{"a":2}]}"#).unwrap();
        assert_eq!(
            frame,
            Frame::Chunk(Chunk {
                id: 4,
                value: Value::Null
            })
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[^\u{0}]{0,16}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn request_round_trips(id in any::<u64>(), command in "[a-z_]{1,20}", args in json_value()) {
            let request = Request { id, command, args };
            let buf = encode_frame(&request, DEFAULT_MAX_FRAME_BYTES).unwrap();
            let len = (&buf[..4]).get_u32() as usize;
            prop_assert_eq!(len, buf.len() - 4);
            let decoded: Request = serde_json::from_slice(&buf[4..]).unwrap();
            prop_assert_eq!(decoded, request);
        }

        #[test]
        fn reply_round_trips(id in any::<u64>(), result in json_value(), fail in any::<bool>(),
                             kind in "[A-Za-z]{1,12}", message in ".{0,40}") {
            let outcome = if fail {
                Err(RemoteError { kind, message, traceback: Some("tb".into()) })
            } else {
                Ok(result)
            };
            let reply = Reply { id, outcome, journal: None };
            let body = serde_json::to_vec(&reply.to_wire()).unwrap();
            let mut codec = HostCodec::new(DEFAULT_MAX_FRAME_BYTES);
            let mut buf = frame(&body);
            prop_assert_eq!(reply_of(codec.decode(&mut buf).unwrap()), reply);
        }

        #[test]
        fn frames_split_anywhere_decode_the_same(cuts in prop::collection::vec(0usize..200, 0..6)) {
            let replies: Vec<Reply> = (1..=3)
                .map(|id| Reply {
                id,
                outcome: Ok(json!({"payload": "x".repeat(id as usize * 20)})),
                journal: (id == 2).then(|| JournalHint { command: "load".into(), args: json!({"n": id}) }),
            })
                .collect();
            let mut stream = BytesMut::new();
            for reply in &replies {
                stream.extend_from_slice(&frame(&serde_json::to_vec(&reply.to_wire()).unwrap()));
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % stream.len()).collect();
            cuts.sort_unstable();
            cuts.push(stream.len());
            let mut codec = HostCodec::new(1024);
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            let mut from = 0;
            for cut in cuts {
                buf.extend_from_slice(&stream[from..cut]);
                from = cut;
                while let Some(frame) = codec.decode(&mut buf).unwrap() {
                    decoded.push(reply_of(Some(frame)));
                }
            }
            prop_assert_eq!(decoded, replies);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = HostCodec::new(256);
            let mut buf = BytesMut::from(&bytes[..]);
            // Decode until the codec wants more bytes or reports an error.
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            let _ = parse_reply(&bytes);
            let _ = parse_frame(&bytes);
        }
    }
}
