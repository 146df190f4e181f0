//! Published events: parsing and validating a publish body (contract §9), and
//! building the envelope clients receive (contract §1, §7).
//!
//! An envelope is serialised once per event and mediaBase64 variant; the
//! resulting text is shared by every client that receives it. A webhook
//! attempt's envelope is made from the event's stored text.

use bytestring::ByteString;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::domain::EventKind;

/// One accepted event (serialised as `{"event","data"}` between nodes).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    #[serde(rename = "event")]
    pub kind: EventKind,
    /// The producer's `data` object, as sent.
    pub data: Map<String, Value>,
}

/// Parses a publish body: one `{"event","data"}` object or an array of up to
/// `max_batch` of them. Every item is checked before any is accepted; the
/// error text says what was wrong (it goes to `error.details`).
pub fn parse_publish(body: &[u8], max_batch: usize) -> Result<Vec<Event>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    match value {
        Value::Array(items) => {
            if items.len() > max_batch {
                return Err(format!(
                    "at most {max_batch} events per request, got {}",
                    items.len()
                ));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| parse_item(item).map_err(|e| format!("item {i}: {e}")))
                .collect()
        }
        item @ Value::Object(_) => Ok(vec![parse_item(item)?]),
        _ => Err("body must be an event object or an array of them".into()),
    }
}

fn parse_item(item: Value) -> Result<Event, String> {
    let Value::Object(mut fields) = item else {
        return Err("an event must be an object".into());
    };
    let kind = match fields.get("event") {
        Some(Value::String(name)) => {
            EventKind::parse(name).ok_or_else(|| format!("unknown event `{name}`"))?
        }
        Some(_) => return Err("`event` must be a string".into()),
        None => return Err("`event` is required".into()),
    };
    match fields.remove("data") {
        Some(Value::Object(data)) => Ok(Event { kind, data }),
        Some(_) => Err("`data` must be an object".into()),
        None => Err("`data` is required".into()),
    }
}

/// The `instanceData` object of an instance's envelopes, serialised once.
pub fn instance_data_json(base_url: &str, instance: &str, token: &str) -> String {
    serde_json::json!({"baseUrl": base_url, "instance": instance, "token": token}).to_string()
}

/// Whether the event carries a `data.message.media.base64` to strip.
fn has_media_base64(data: &Map<String, Value>) -> bool {
    data.get("message")
        .and_then(|m| m.get("media"))
        .and_then(Value::as_object)
        .is_some_and(|media| media.contains_key("base64"))
}

/// Whether an instance without mediaBase64 sends `event` altered (it is a
/// `message.exchange` carrying `data.message.media.base64`).
pub fn strips_media(event: &Event) -> bool {
    event.kind == EventKind::MessageExchange && has_media_base64(&event.data)
}

/// The envelope text of one event. `media_base64 = false` strips
/// `data.message.media.base64` from `message.exchange` (and only there).
pub fn envelope(event: &Event, instance_data: &str, media_base64: bool) -> ByteString {
    let strip =
        !media_base64 && event.kind == EventKind::MessageExchange && has_media_base64(&event.data);
    let data = if strip {
        let mut copy = event.data.clone();
        if let Some(Value::Object(media)) = copy.get_mut("message").and_then(|m| m.get_mut("media"))
        {
            // The other fields keep their order.
            media.shift_remove("base64");
        }
        Value::Object(copy).to_string()
    } else {
        // A Map serialises infallibly: keys are strings and numbers are finite.
        serde_json::to_string(&event.data).unwrap_or_else(|_| "{}".into())
    };
    ByteString::from(envelope_text(event.kind, &data, instance_data))
}

/// The envelope of a stored event (a webhook delivery): `data` is the JSON
/// text of its object as the publish stored it, which is the text
/// [`envelope`] makes of that object, so it goes in as it is, checked but
/// not rebuilt. Only a `message.exchange` that may carry a base64 to strip
/// is parsed. `None`: the text is not a JSON object.
pub fn stored_envelope(
    kind: EventKind,
    data: &str,
    instance_data: &str,
    media_base64: bool,
) -> Option<ByteString> {
    // Serialised keys are never escaped: a `base64` key is this text.
    if !media_base64 && kind == EventKind::MessageExchange && data.contains("\"base64\"") {
        let data: Map<String, Value> = serde_json::from_str(data).ok()?;
        return Some(envelope(&Event { kind, data }, instance_data, false));
    }
    let raw: &RawValue = serde_json::from_str(data).ok()?;
    let raw = raw.get();
    raw.starts_with('{')
        .then(|| ByteString::from(envelope_text(kind, raw, instance_data)))
}

/// `{"event":…,"data":…,"instanceData":…}` of a `data` and an
/// `instanceData` already serialised.
fn envelope_text(kind: EventKind, data: &str, instance_data: &str) -> String {
    // The four literal pieces below take 36 bytes: one allocation, exact.
    let kind = kind.as_str();
    let mut out = String::with_capacity(36 + kind.len() + data.len() + instance_data.len());
    out.push_str("{\"event\":\"");
    out.push_str(kind);
    out.push_str("\",\"data\":");
    out.push_str(data);
    out.push_str(",\"instanceData\":");
    out.push_str(instance_data);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_one_and_many() {
        let one = parse_publish(br#"{"event":"call.update","data":{"a":1},"x":2}"#, 10).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].kind, EventKind::CallUpdate);
        let many = parse_publish(
            br#"[{"event":"group.flow","data":{}},{"event":"label.update","data":{"b":[1]}}]"#,
            10,
        )
        .unwrap();
        assert_eq!(many.len(), 2);
        assert!(parse_publish(b"[]", 10).unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_items() {
        for bad in [
            &br#"{"event":"nope","data":{}}"#[..],
            br#"{"event":"call.update","data":[]}"#,
            br#"{"event":"call.update"}"#,
            br#"{"data":{}}"#,
            br#"{"event":5,"data":{}}"#,
            br#"[{"event":"call.update","data":{}}, 3]"#,
            br#"{"event":"call.update","data":{"n":1e999}}"#,
            b"\"x\"",
            b"{",
        ] {
            assert!(
                parse_publish(bad, 10).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let eleven =
            serde_json::to_vec(&vec![json!({"event":"call.update","data":{}}); 11]).unwrap();
        assert!(parse_publish(&eleven, 10)
            .unwrap_err()
            .contains("at most 10"));
    }

    #[test]
    fn envelope_strips_media_only_when_asked() {
        let ev = parse_publish(
            br#"{"event":"message.exchange","data":{"message":{"media":{"base64":"AAA","mime":"x"}}}}"#,
            1,
        )
        .unwrap()
        .remove(0);
        let idata = instance_data_json("http://h", "i", "t");
        let kept: Value = serde_json::from_str(&envelope(&ev, &idata, true)).unwrap();
        assert_eq!(kept["data"]["message"]["media"]["base64"], "AAA");
        let stripped: Value = serde_json::from_str(&envelope(&ev, &idata, false)).unwrap();
        assert_eq!(stripped["data"]["message"]["media"], json!({"mime":"x"}));
        assert_eq!(
            stripped["instanceData"],
            json!({"baseUrl":"http://h","instance":"i","token":"t"})
        );
        assert_eq!(stripped["event"], "message.exchange");
    }

    /// A stored event's envelope is byte for byte the one [`envelope`]
    /// makes of the published object, with and without mediaBase64.
    #[test]
    fn a_stored_event_goes_out_as_envelope_would_make_it() {
        let idata = instance_data_json("http://h", "i", "t");
        let bodies: [&[u8]; 5] = [
            br#"{"event":"message.exchange","data":{"message":{"media":{"base64":"AAA","mime":"x"}},"n":1.5e300}}"#,
            br#"{"event":"message.exchange","data":{"message":{"text":"no media, \"base64\" quoted"}}}"#,
            br#"{"event":"message.exchange","data":{"message":{"media":{"mime":"x"}},"base64":1}}"#,
            "{\"event\":\"call.update\",\"data\":{\"z\":-0.0,\"a\":[1,\"\\u0001\\n\\u00e9\",null],\"\u{1F600}\":18446744073709551615,\"f\":0.1}}".as_bytes(),
            br#"{"event":"label.update","data":{}}"#,
        ];
        for body in bodies {
            let ev = parse_publish(body, 1).unwrap().remove(0);
            let stored = serde_json::to_string(&ev.data).unwrap();
            for media in [true, false] {
                let made = envelope(&ev, &idata, media);
                let again = stored_envelope(ev.kind, &stored, &idata, media).unwrap();
                assert_eq!(again, made, "{stored} (mediaBase64 {media})");
            }
        }
    }

    #[test]
    fn a_stored_event_that_is_not_an_object_has_no_envelope() {
        for bad in ["", "not json", "[1]", "\"s\"", "{", "{} {}", "{\"a\":}"] {
            for kind in [EventKind::CallUpdate, EventKind::MessageExchange] {
                assert!(stored_envelope(kind, bad, "{}", true).is_none(), "{bad:?}");
            }
        }
        let media = r#"{"message":{"media":{"base64":"A"}},"#;
        assert!(stored_envelope(EventKind::MessageExchange, media, "{}", false).is_none());
    }

    /// An envelope's text is allocated once, at its exact size, for every
    /// event type.
    #[test]
    fn an_envelope_is_allocated_once() {
        for kind in EventKind::ALL {
            let text = envelope_text(kind, r#"{"a":1}"#, r#"{"b":2}"#);
            assert_eq!(text.capacity(), text.len(), "{}", kind.as_str());
        }
    }

    /// Stripping the base64 leaves the media's other fields in their order.
    #[test]
    fn stripping_keeps_the_order_of_the_other_fields() {
        let ev = parse_publish(
            br#"{"event":"message.exchange","data":{"message":{"media":{"base64":"A","mime":"x","caption":"c","size":3}}}}"#,
            1,
        )
        .unwrap()
        .remove(0);
        let text = envelope(&ev, "{}", false);
        assert!(
            text.contains(r#""media":{"mime":"x","caption":"c","size":3}"#),
            "{text}"
        );
    }
}
