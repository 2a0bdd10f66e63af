//! Usage read from a JSON body or SSE data line too large to keep (an
//! embeddings batch, a Responses call that returns generated images), as
//! its bytes pass.
//!
//! A tokenizer that keeps only the nesting skips everything except what
//! [`super::usage_from_bytes`] reads: the top-level `usage`, the `usage`
//! under `message` and `response`, and the `type` of each item of `output`
//! and `response.output`. Those values are copied out as they pass; at the
//! end they are put back together as a small document that the same
//! function reads, so a large body is charged by the same rules as a small
//! one. Memory stays bounded whatever the body's size.

use smallvec::SmallVec;

use super::{HostedTool, Reported};

/// Most bytes kept of one value read (a `usage` object is a few hundred).
const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most items kept of one `output` list (a few bytes each).
const MAX_ITEMS: usize = 100_000;
/// Deeper nesting is not read (the whole-body parser would read it; no
/// provider nests this deep): one open container costs this reader a byte
/// of memory or two.
const MAX_DEPTH: usize = 4096;
/// Keys are read this deep at most: nothing read is deeper.
const KEYED_DEPTH: usize = 4;
/// Longer keys are none of those read.
const MAX_KEY_BYTES: usize = 32;

/// The keys a path to a value read goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Usage,
    Message,
    Response,
    Output,
    Type,
    Other,
}

impl Key {
    fn of(raw: &[u8]) -> Key {
        // A key spelled with escapes is the same key to a JSON parser.
        let decoded = if raw.contains(&b'\\') {
            match serde_json::from_slice::<String>(&[b"\"", raw, b"\""].concat()) {
                Ok(text) => text.into_bytes(),
                Err(_) => return Key::Other,
            }
        } else {
            raw.to_vec()
        };
        match &decoded[..] {
            b"usage" => Key::Usage,
            b"message" => Key::Message,
            b"response" => Key::Response,
            b"output" => Key::Output,
            b"type" => Key::Type,
            _ => Key::Other,
        }
    }
}

/// An open container: an object with the key of the value being read in
/// it (none while a key is due), or an array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    Object { key: Option<Key> },
    Array,
}

/// Where a value read goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The top-level `type`: an SSE event's kind.
    TopType,
    Usage,
    MessageUsage,
    ResponseUsage,
    OutputType,
    ResponseOutputType,
}

impl Target {
    /// The value that the path `open` leads to, if it is one read.
    fn at(open: &[Open]) -> Option<Target> {
        use Key::{Message, Output, Response, Type, Usage};
        let key = |open: &Open| match open {
            Open::Object { key } => *key,
            Open::Array => None,
        };
        let item = |open: &Open| *open == Open::Array;
        match open {
            [a] if key(a) == Some(Type) => Some(Target::TopType),
            [a] if key(a) == Some(Usage) => Some(Target::Usage),
            [a, b] if key(a) == Some(Message) && key(b) == Some(Usage) => Some(Target::MessageUsage),
            [a, b] if key(a) == Some(Response) && key(b) == Some(Usage) => Some(Target::ResponseUsage),
            [a, b, c] if key(a) == Some(Output) && item(b) && key(c) == Some(Type) => {
                Some(Target::OutputType)
            }
            [a, b, c, d]
                if key(a) == Some(Response) && key(b) == Some(Output) && item(c) && key(d) == Some(Type) =>
            {
                Some(Target::ResponseOutputType)
            }
            _ => None,
        }
    }
}

/// What a value being read is, for where it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Container,
    Text,
    Scalar,
}

#[derive(Debug)]
struct Reading {
    target: Target,
    shape: Shape,
    /// The nesting outside the value: a container ends when it is back.
    depth: usize,
    bytes: Vec<u8>,
}

/// An `output` list as read: one entry per item, `{"type": ...}` for a
/// hosted-tool call (or a type that is not a string), `{}` for any other
/// object, a stand-in for an item that is not one (so the document read at
/// the end takes the same path as this one); or the stand-in for a value
/// that is not a list.
#[derive(Debug)]
enum Items {
    List(Vec<Vec<u8>>),
    Odd(&'static [u8]),
}

impl Items {
    fn text(&self) -> Vec<u8> {
        match self {
            Items::List(items) => [b"[", &items.join(&b","[..])[..], b"]"].concat(),
            Items::Odd(stand_in) => stand_in.to_vec(),
        }
    }

    /// False when the list is full.
    fn push(&mut self, item: Vec<u8>) -> bool {
        match self {
            Items::List(items) if items.len() < MAX_ITEMS => {
                items.push(item);
                true
            }
            Items::List(_) => false,
            Items::Odd(_) => true,
        }
    }
}

/// What stands in for a value of the wrong kind starting with `byte`:
/// `null` reads as absent, anything else fails the same way.
fn stand_in(byte: u8) -> &'static [u8] {
    if byte == b'n' {
        b"null"
    } else {
        b"0"
    }
}

/// Inside a string: a key being read, and whether a backslash came last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InString {
    key: bool,
    escaped: bool,
}

/// Reads the usage of one JSON body chunk by chunk.
#[derive(Debug, Default)]
pub(super) struct LargeJson {
    /// Open containers, outermost first.
    open: Vec<Open>,
    string: Option<InString>,
    /// Inside a number, `true`, `false` or `null`.
    in_scalar: bool,
    /// The key being read, while it is short enough to be one read.
    key: Option<SmallVec<[u8; MAX_KEY_BYTES]>>,
    reading: Option<Reading>,
    top_type: Option<Vec<u8>>,
    usage: Option<Vec<u8>>,
    message_usage: Option<Vec<u8>>,
    response_usage: Option<Vec<u8>>,
    output: Option<Items>,
    response_output: Option<Items>,
    /// `message` and `response` when they are not objects.
    message_odd: Option<&'static [u8]>,
    response_odd: Option<&'static [u8]>,
    /// The top-level value began, and ended.
    started: bool,
    ended: bool,
    /// Not one JSON object (or one this does not read): no usage.
    broken: bool,
    /// Bytes seen.
    len: u64,
}

impl LargeJson {
    /// Bytes seen so far.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Reads the next bytes of the body.
    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        while !bytes.is_empty() && !self.broken {
            let taken = match self.string {
                None => {
                    self.structure(bytes[0]);
                    1
                }
                Some(string) => self.text(bytes, string),
            };
            bytes = &bytes[taken..];
        }
    }

    /// The usage the body reported, once it has ended: `None` unless it was
    /// one whole JSON object with a usage in it.
    pub(super) fn usage(&self) -> Option<Reported> {
        if self.broken || !self.ended || self.string.is_some() {
            return None;
        }
        let mut fields: Vec<Vec<u8>> = Vec::new();
        if let Some(usage) = &self.usage {
            fields.push([b"\"usage\":", &usage[..]].concat());
        }
        match (self.message_odd, &self.message_usage) {
            (Some(odd), _) => fields.push([b"\"message\":", odd].concat()),
            (None, Some(usage)) => fields.push([b"\"message\":{\"usage\":", &usage[..], b"}"].concat()),
            (None, None) => {}
        }
        let mut response: Vec<Vec<u8>> = Vec::new();
        if let Some(usage) = &self.response_usage {
            response.push([b"\"usage\":", &usage[..]].concat());
        }
        if let Some(items) = &self.response_output {
            response.push([b"\"output\":", &items.text()[..]].concat());
        }
        match self.response_odd {
            Some(odd) => fields.push([b"\"response\":", odd].concat()),
            None if !response.is_empty() => {
                fields.push([b"\"response\":{", &response.join(&b","[..])[..], b"}"].concat());
            }
            None => {}
        }
        if let Some(items) = &self.output {
            fields.push([b"\"output\":", &items.text()[..]].concat());
        }
        let document = [b"{", &fields.join(&b","[..])[..], b"}"].concat();
        super::usage_from_bytes(&document)
    }

    /// Whether the usage read is the call's last word (see
    /// [`super::ends_usage`]): for an SSE event, from its top-level `type`.
    pub(super) fn ends_usage(&self) -> bool {
        self.top_type.as_deref().is_some_and(super::ends_usage)
    }

    /// One byte outside any string.
    fn structure(&mut self, byte: u8) {
        let whitespace = matches!(byte, b' ' | b'\t' | b'\n' | b'\r');
        if self.open.is_empty() && !whitespace && matches!(byte, b',' | b':' | b'}' | b']') {
            // Punctuation outside the document: not one JSON value.
            self.broken = true;
            return;
        }
        match byte {
            _ if whitespace => self.end_scalar(),
            b'"' => {
                self.end_scalar();
                let key = matches!(self.open.last(), Some(Open::Object { key: None }));
                if key {
                    self.key = (self.open.len() <= KEYED_DEPTH).then(SmallVec::new);
                    self.keep(byte);
                } else {
                    self.value_begins(Shape::Text, byte);
                }
                self.string = Some(InString { key, escaped: false });
            }
            b'{' | b'[' => {
                self.end_scalar();
                self.value_begins(Shape::Container, byte);
                if self.broken {
                    return;
                }
                if self.open.len() == MAX_DEPTH {
                    self.broken = true;
                    return;
                }
                self.open.push(if byte == b'{' { Open::Object { key: None } } else { Open::Array });
            }
            b'}' | b']' => {
                self.end_scalar();
                self.keep(byte);
                let closes = match self.open.pop() {
                    Some(Open::Object { .. }) => byte == b'}',
                    Some(Open::Array) => byte == b']',
                    None => false,
                };
                if !closes {
                    self.broken = true;
                    return;
                }
                if self
                    .reading
                    .as_ref()
                    .is_some_and(|r| r.shape == Shape::Container && r.depth == self.open.len())
                {
                    self.finish_reading();
                }
                if self.open.is_empty() {
                    self.ended = true;
                }
            }
            b',' => {
                self.end_scalar();
                self.keep(byte);
                if let Some(Open::Object { key }) = self.open.last_mut() {
                    *key = None;
                }
            }
            b':' => {
                self.end_scalar();
                self.keep(byte);
            }
            _ if self.in_scalar => self.keep(byte),
            _ => {
                self.in_scalar = true;
                self.value_begins(Shape::Scalar, byte);
            }
        }
    }

    /// Bytes inside a string; returns how many were taken.
    fn text(&mut self, bytes: &[u8], string: InString) -> usize {
        if string.escaped {
            self.string = Some(InString { escaped: false, ..string });
            self.text_bytes(&bytes[..1], string.key);
            return 1;
        }
        let Some(at) = memchr::memchr2(b'"', b'\\', bytes) else {
            self.text_bytes(bytes, string.key);
            return bytes.len();
        };
        self.text_bytes(&bytes[..at], string.key);
        if bytes[at] == b'\\' {
            self.text_bytes(&bytes[at..=at], string.key);
            self.string = Some(InString { escaped: true, ..string });
            return at + 1;
        }
        self.string = None;
        self.keep(b'"');
        if string.key {
            let key = self.key.take().map_or(Key::Other, |raw| Key::of(&raw));
            if let Some(Open::Object { key: slot }) = self.open.last_mut() {
                *slot = Some(key);
            }
        } else if self.reading.as_ref().is_some_and(|r| r.shape == Shape::Text && r.depth == self.open.len())
        {
            self.finish_reading();
        }
        at + 1
    }

    /// Characters of a string (not its quotes).
    fn text_bytes(&mut self, bytes: &[u8], key: bool) {
        if key {
            if let Some(raw) = &mut self.key {
                if raw.len() + bytes.len() <= MAX_KEY_BYTES {
                    raw.extend_from_slice(bytes);
                } else {
                    self.key = None;
                }
            }
        }
        self.keep_all(bytes);
    }

    fn value_begins(&mut self, shape: Shape, byte: u8) {
        if self.ended {
            // Something after the document: not one JSON value.
            self.broken = true;
            return;
        }
        if !self.started {
            self.started = true;
            // Only an object has a usage in it.
            self.broken = byte != b'{';
            return;
        }
        if self.reading.is_some() {
            self.keep(byte);
            return;
        }
        // The shapes of what holds the values read, as the parser sees them.
        let list = |byte: u8| if byte == b'[' { Items::List(Vec::new()) } else { Items::Odd(stand_in(byte)) };
        let odd = |byte: u8, open: u8| (byte != open).then(|| stand_in(byte));
        let item = |byte: u8| if byte == b'{' { b"{}".to_vec() } else { stand_in(byte).to_vec() };
        use Open::{Array, Object};
        match self.open.as_slice() {
            [Object { key: Some(Key::Output) }] => self.output = Some(list(byte)),
            [Object { key: Some(Key::Response) }, Object { key: Some(Key::Output) }] => {
                self.response_output = Some(list(byte));
            }
            // A key given twice is read as its last value.
            [Object { key: Some(Key::Response) }] => {
                (self.response_odd, self.response_usage, self.response_output) =
                    (odd(byte, b'{'), None, None);
            }
            [Object { key: Some(Key::Message) }] => {
                (self.message_odd, self.message_usage) = (odd(byte, b'{'), None);
            }
            // One entry per item: `{}` until its type is read.
            [Object { key: Some(Key::Output) }, Array] => self.push_item(false, item(byte)),
            [Object { key: Some(Key::Response) }, Object { key: Some(Key::Output) }, Array] => {
                self.push_item(true, item(byte));
            }
            _ => {}
        }
        if let Some(target) = Target::at(&self.open) {
            self.reading = Some(Reading { target, shape, depth: self.open.len(), bytes: vec![byte] });
        }
    }

    fn end_scalar(&mut self) {
        if !self.in_scalar {
            return;
        }
        self.in_scalar = false;
        if self.reading.as_ref().is_some_and(|r| r.shape == Shape::Scalar && r.depth == self.open.len()) {
            self.finish_reading();
        }
    }

    fn keep(&mut self, byte: u8) {
        self.keep_all(&[byte]);
    }

    fn keep_all(&mut self, bytes: &[u8]) {
        if let Some(reading) = &mut self.reading {
            if reading.bytes.len() + bytes.len() <= MAX_VALUE_BYTES {
                reading.bytes.extend_from_slice(bytes);
            } else {
                // Larger than any usage: the body's usage is not read.
                self.broken = true;
            }
        }
    }

    fn finish_reading(&mut self) {
        let Some(Reading { target, bytes, .. }) = self.reading.take() else { return };
        let in_response = match target {
            Target::TopType => return self.top_type = Some(bytes),
            Target::Usage => return self.usage = Some(bytes),
            Target::MessageUsage => return self.message_usage = Some(bytes),
            Target::ResponseUsage => return self.response_usage = Some(bytes),
            Target::OutputType => false,
            Target::ResponseOutputType => true,
        };
        // Only hosted-tool calls are counted; a type that is not a string
        // is kept, so the document read at the end is as odd as this one.
        let counted = match serde_json::from_slice::<String>(&bytes) {
            Ok(kind) => HostedTool::from_item_type(&kind).is_some(),
            Err(_) => true,
        };
        let items = if in_response { &mut self.response_output } else { &mut self.output };
        if let Some(Items::List(items)) = items {
            if let Some(last) = items.last_mut() {
                // The last `type` of an item is its type, as the parser reads it.
                *last = if counted { [b"{\"type\":", &bytes[..], b"}"].concat() } else { b"{}".to_vec() };
            }
        }
    }

    fn push_item(&mut self, in_response: bool, item: Vec<u8>) {
        let items = if in_response { &mut self.response_output } else { &mut self.output };
        if !items.get_or_insert(Items::List(Vec::new())).push(item) {
            self.broken = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::{usage_from_bytes, Meter, MAX_METERED_JSON_BYTES};
    use super::*;

    /// Bodies in the shapes the providers send, and some odd ones.
    const BODIES: [&str; 25] = [
        r#"{"object":"list","data":[{"object":"embedding","embedding":[0.1,-0.2,3e-5],"index":0}],"model":"m","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        r#"{"id":"r","output":[{"type":"web_search_call","id":"ws"},{"type":"image_generation_call","result":"AAAA\"x"},{"type":"message","content":[{"type":"output_text","text":"hi \\ \" there"}]}],"usage":{"input_tokens":9,"output_tokens":4,"input_tokens_details":{"cached_tokens":2}}}"#,
        r#"{"id":"msg","type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":10,"output_tokens":2,"cache_read_input_tokens":5,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},"server_tool_use":{"web_search_requests":2}}}"#,
        r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":5,"output_tokens":1}}}"#,
        r#"{"type":"response.completed","response":{"output":[{"type":"file_search_call"},{"type":"message"}],"usage":{"input_tokens":7,"output_tokens":3}}}"#,
        r#"{"\u0075sage":{"prompt_tokens":3,"completion_tokens":4}}"#,
        "{\r\n  \"usage\" : {\r\n    \"prompt_tokens\" : 12 ,\r\n    \"completion_tokens\": 1\r\n  },\r\n  \"choices\": [ ]\r\n}\r\n",
        r#"{"usage":null}"#,
        r#"{"output":[{"type":"message"}],"response":{"output":[{"type":"web_search_call"}],"usage":{"input_tokens":1,"output_tokens":1}}}"#,
        r#"{"choices":[{"usage":{"prompt_tokens":99}}],"usage":{"prompt_tokens":2,"completion_tokens":2}}"#,
        r#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":{"prompt_tokens":5,"completion_tokens":6}}"#,
        r#"{"output":[{"type":7},{"type":"code_interpreter_call"}],"usage":{"input_tokens":1,"output_tokens":1}}"#,
        r#"{"usage":{"prompt_tokens":"3","completion_tokens":-1}}"#,
        r#"{"usage":{"prompt_tokens":4,"completion_tokens":2}} trailing"#,
        r#"[{"usage":{"prompt_tokens":4,"completion_tokens":2}}]"#,
        r#"{"usage":{"prompt_tokens":4,"completion_tokens":2}"#,
        r#"{"output":"x","response":{"output":[{"type":"web_search_call"}],"usage":{"input_tokens":2,"output_tokens":1}}}"#,
        r#"{"output":null,"response":{"output":[{"type":"web_search_call"}],"usage":{"input_tokens":2,"output_tokens":1}}}"#,
        r#"{"output":[3,{"type":"web_search_call"},[]],"usage":{"input_tokens":2,"output_tokens":1}}"#,
        r#"{"response":[1],"usage":{"input_tokens":2,"output_tokens":1}}"#,
        r#"{"message":"hi","response":null,"usage":{"input_tokens":2,"output_tokens":1}}"#,
        r#"{"message":{"usage":{"input_tokens":3,"output_tokens":9}},"response":{"usage":{"input_tokens":4,"output_tokens":1}}}"#,
        r#"{"usage":{"input_tokens":2,"output_tokens":1,"server_tool_use":{"web_search_requests":1}},"output":[{"type":"web_search_call","type":"message"}]}"#,
        r#"{"usage":{"input_tokens":5.0,"output_tokens":1e2,"prompt_tokens_details":null}}"#,
        r#"{"response":{"usage":{"input_tokens":4,"output_tokens":1}},"response":{"id":"r"},"message":{"usage":{"input_tokens":1,"output_tokens":1}},"message":{}}"#,
    ];

    fn read(parts: &[&[u8]]) -> Option<Reported> {
        let mut large = LargeJson::default();
        for part in parts {
            large.feed(part);
        }
        large.usage()
    }

    #[test]
    fn reads_what_the_whole_body_parser_reads_at_every_split() {
        // Proves the streaming read agrees with the parse of a whole body,
        // for every shape above and wherever the chunks break.
        for body in BODIES {
            let body = body.as_bytes();
            let whole = usage_from_bytes(body);
            for at in 0..=body.len() {
                for second in (at..=body.len()).step_by(7) {
                    let parts = [&body[..at], &body[at..second], &body[second..]];
                    assert_eq!(
                        read(&parts),
                        whole,
                        "{} split at {at}, {second}",
                        String::from_utf8_lossy(body)
                    );
                }
            }
        }
        assert!(BODIES.iter().filter(|body| usage_from_bytes(body.as_bytes()).is_some()).count() >= 11);
    }

    #[test]
    fn a_body_that_is_not_one_whole_object_reports_nothing() {
        for body in [
            &br#"{"usage":{"prompt_tokens":4,"completion_tokens":2}}}"#[..],
            br#"{"usage":{"prompt_tokens":4,"completion_tokens":2}},"#,
            br#"{"usage":{"prompt_tokens":4,"completion_tokens":2}]"#,
            br#"{"usage":{"prompt_tokens":4,"completion_tokens":2}}{}"#,
            br#"{"usage":{"prompt_tokens":4,"completion_tokens":2},"text":"cut"#,
            br#"{"usage":{"prompt_tokens":4,"completion_tokens":2},"n":1"#,
            br#""usage""#,
        ] {
            assert_eq!(read(&[body]), None, "{}", String::from_utf8_lossy(body));
        }
        let deep = |depth| {
            format!("{{\"a\":{}1{},\"usage\":{{\"prompt_tokens\":1}}}}", "[".repeat(depth), "]".repeat(depth))
        };
        let nested = deep(MAX_DEPTH - 2);
        assert!(usage_from_bytes(nested.as_bytes()).is_some());
        assert_eq!(read(&[nested.as_bytes()]), usage_from_bytes(nested.as_bytes()), "deep, but not too deep");
        assert_eq!(read(&[deep(MAX_DEPTH).as_bytes()]), None, "nested past what is read");
        let long = format!("{{\"usage\":{{\"prompt_tokens\":1,\"x\":\"{}\"}}}}", "a".repeat(MAX_VALUE_BYTES));
        assert_eq!(read(&[long.as_bytes()]), None, "a usage larger than any is not read");
    }

    /// `body` with a field `padding` put before everything else: `open`,
    /// then `item` repeated past `bytes`, then `close`.
    fn padded(body: &str, (open, item, close): (&str, &str, &str), bytes: usize) -> Vec<u8> {
        let mut out = format!("{{\"padding\":{open}").into_bytes();
        out.extend_from_slice(&item.as_bytes().repeat(bytes / item.len() + 1));
        out.extend_from_slice(close.as_bytes());
        out.push(b',');
        out.extend_from_slice(&body.as_bytes()[1..]);
        out
    }

    #[test]
    fn a_body_past_the_held_size_is_charged_from_its_usage() {
        // Proves the meter reads the usage of bodies it cannot hold (before,
        // they were charged at the hold): an embeddings batch of numbers, a
        // Responses call carrying a base64 image, in 64 KiB chunks.
        let pad = MAX_METERED_JSON_BYTES + 1024 * 1024;
        for (body, filler) in [
            (BODIES[0], ("[", "0.0123456789,-0.987654321,", "1]")),
            (BODIES[1], ("\"", "iVBORw0KGgoAAAANSUhEUgAA\\\"+/=", "\"")),
            (BODIES[2], ("[", "{\"type\":\"text\",\"text\":\"a \\\"quoted\\\" word\"},", "{}]")),
        ] {
            let document = padded(body, filler, pad);
            assert!(document.len() > MAX_METERED_JSON_BYTES);
            let whole = usage_from_bytes(&document);
            assert!(whole.is_some(), "the padded body is one JSON document");
            assert_eq!(whole, usage_from_bytes(body.as_bytes()), "padding changes no usage");
            let mut meter = Meter::new(false, false);
            for chunk in document.chunks(64 * 1024) {
                let passed = meter.observe(Bytes::copy_from_slice(chunk));
                assert_eq!(&passed[..], chunk, "the body passes unchanged");
            }
            assert_eq!(meter.delivered_output_estimate(), (document.len() as u64).div_ceil(4));
            assert_eq!(Some(meter.finish()), whole);
            assert!(meter.usage_is_final());
        }
    }

    /// A Responses stream whose `response.completed` carries an image of
    /// `image_bytes` of base64, ended with `end`.
    fn responses_stream(image_bytes: usize, end: &str) -> Vec<u8> {
        let image = "iVBORw0KGgo+/=".repeat(image_bytes / 14 + 1);
        format!(
            concat!(
                "event: response.created\r\ndata: {{\"type\":\"response.created\",\"response\":{{\"id\":\"r\",\"output\":[]}}}}\r\n\r\n",
                "event: response.output_text.delta\r\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}}\r\n\r\n",
                "event: response.completed\r\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"r\",\"output\":[",
                "{{\"type\":\"web_search_call\"}},{{\"type\":\"image_generation_call\",\"result\":\"{image}\"}},{{\"type\":\"message\"}}],",
                "\"usage\":{{\"input_tokens\":9,\"output_tokens\":4}}}}}}{end}"
            ),
            image = image,
            end = end
        )
        .into_bytes()
    }

    #[test]
    fn an_sse_line_past_the_held_size_is_read_as_it_passes() {
        // Proves a stream's last event is read however long its line (before, a line over
        // 1 MiB lost its usage and the call was charged its hold), rewritten or not, ended
        // with its blank line or not, and reads as the same event with a short image.
        let small = {
            let mut meter = Meter::new(true, false);
            meter.observe(Bytes::from(responses_stream(10, "\r\n\r\n")));
            meter.finish()
        };
        assert_eq!((small.input_tokens, small.output_tokens), (Some(9), Some(4)));
        assert_eq!(small.hosted_calls[HostedTool::WebSearch.index()], 1);
        assert_eq!(small.hosted_calls[HostedTool::ImageGeneration.index()], 1);
        for end in ["\r\n\r\n", "\n", ""] {
            let stream = responses_stream(3 * 1024 * 1024, end);
            for rewriting in [false, true] {
                let mut meter = Meter::new(true, rewriting);
                let mut passed = Vec::new();
                for chunk in stream.chunks(64 * 1024) {
                    passed.extend_from_slice(&meter.observe(Bytes::copy_from_slice(chunk)));
                }
                passed.extend_from_slice(&meter.end_of_body());
                assert!(passed == stream, "the stream passes unchanged (end {end:?}, rewriting {rewriting})");
                assert_eq!(meter.finish(), small, "end {end:?}, rewriting {rewriting}");
                assert!(meter.usage_is_final(), "response.completed ends the usage");
            }
        }
    }
}
