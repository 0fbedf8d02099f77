//! `parse_reply` on arbitrary bytes, checked against the protocol's rules, and replies
//! round-tripped through `Reply::to_wire`.
//!
//! 1. The bytes as a frame body: never a panic; not JSON is `InvalidJson`; JSON that is
//!    not an object with a u64 `id`, a boolean `success` and a null, absent or
//!    `{command, args}` `journal` is `BadShape`; anything else parses to a reply with
//!    that id and outcome. A parsed reply's `to_wire()` parses back to the same reply.
//! 2. The same bytes read as a description of a reply (its id, result or error, and
//!    journal hint, built from them with `arbitrary`): `to_wire()` parses back to it.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Number, Value};

use protocol::{FrameError, JournalHint, RemoteError, Reply, parse_reply};

/// `snakepool::protocol`, compiled from its source file (see `fuzz/Cargo.toml`).
#[allow(dead_code)]
#[path = "../../src/protocol.rs"]
mod protocol;

/// `reply.to_wire()`, serialised and parsed again, must give back `reply`.
fn assert_round_trips(reply: &Reply) {
    let wire = serde_json::to_vec(&reply.to_wire()).expect("a reply always serialises");
    match parse_reply(&wire) {
        Ok(again) => assert!(
            again == *reply,
            "{reply:?} came back as {again:?}; to_wire() gave {}",
            String::from_utf8_lossy(&wire)
        ),
        Err(error) => panic!(
            "to_wire() gave {} which does not parse: {error}",
            String::from_utf8_lossy(&wire)
        ),
    }
}

/// The result `parse_reply` must give for a JSON value, by the protocol's rules.
fn check_against_rules(value: &Value, parsed: &Result<Reply, FrameError>) {
    let Value::Object(map) = value else {
        assert!(matches!(parsed, Err(FrameError::BadShape(_))), "{parsed:?}");
        return;
    };
    let id = map.get("id").and_then(Value::as_u64);
    let success = map.get("success").and_then(Value::as_bool);
    let journal_ok = match map.get("journal") {
        None | Some(Value::Null) => true,
        Some(hint) => serde_json::from_value::<JournalHint>(hint.clone()).is_ok(),
    };
    let (Some(id), Some(success), true) = (id, success, journal_ok) else {
        assert!(
            matches!(parsed, Err(FrameError::BadShape(_))),
            "id {id:?}, success {success:?}, journal ok {journal_ok}: {parsed:?}"
        );
        return;
    };
    let reply = match parsed {
        Ok(reply) => reply,
        Err(error) => panic!("a well-formed reply was refused: {error}"),
    };
    assert_eq!(reply.id, id);
    let field = |name| map.get(name).cloned().unwrap_or(Value::Null);
    if success {
        assert_eq!(reply.outcome, Ok(field("result")));
    } else {
        assert_eq!(reply.outcome, Err(RemoteError::from_wire(field("error"))));
    }
}

/// A JSON value of bounded depth and width.
fn json(u: &mut Unstructured, depth: u32) -> arbitrary::Result<Value> {
    let kinds = if depth == 0 { 5 } else { 7 };
    Ok(match u.int_in_range(0..=kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<u64>()?),
        3 => Value::from(u.arbitrary::<i64>()?),
        4 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        5 => Value::String(u.arbitrary()?),
        6 => {
            let n = u.int_in_range(0..=4)?;
            Value::Array(
                (0..n)
                    .map(|_| json(u, depth - 1))
                    .collect::<Result<_, _>>()?,
            )
        }
        _ => {
            let mut map = Map::new();
            for _ in 0..u.int_in_range(0..=4)? {
                map.insert(u.arbitrary()?, json(u, depth - 1)?);
            }
            Value::Object(map)
        }
    })
}

/// A reply as `parse_reply` can produce it (a traceback from the wire is never empty).
fn reply(u: &mut Unstructured) -> arbitrary::Result<Reply> {
    let id = u.arbitrary()?;
    let outcome = if u.arbitrary()? {
        Ok(json(u, 3)?)
    } else {
        let traceback: Option<String> = u.arbitrary()?;
        Err(RemoteError {
            kind: u.arbitrary()?,
            message: u.arbitrary()?,
            traceback: traceback.filter(|t| !t.is_empty()),
        })
    };
    let journal = if bool::arbitrary(u)? {
        Some(JournalHint {
            command: u.arbitrary()?,
            args: json(u, 3)?,
        })
    } else {
        None
    };
    Ok(Reply {
        id,
        outcome,
        journal,
    })
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse_reply(data);
    match serde_json::from_slice::<Value>(data) {
        Err(_) => assert!(
            matches!(parsed, Err(FrameError::InvalidJson(_))),
            "not JSON, yet {parsed:?}"
        ),
        Ok(value) => check_against_rules(&value, &parsed),
    }
    if let Ok(reply) = &parsed {
        assert_round_trips(reply);
    }

    if let Ok(reply) = reply(&mut Unstructured::new(data)) {
        assert_round_trips(&reply);
    }
});
