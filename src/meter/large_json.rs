//! Usage read from a JSON body or SSE data line too large to keep (an
//! embeddings batch, a Responses call that returns generated images), as
//! its bytes pass.
//!
//! A tokenizer that keeps only the nesting skips everything except what
//! [`super::usage_from_bytes`] reads: the top-level `usage`, the `usage`
//! under `message` and `response`, the `service_tier` beside each, and the
//! `type` of each item of `output` and `response.output` (and the
//! top-level `type`, an event's kind). Those
//! values are copied out as they pass; at the end they are put back
//! together as a small document read by the same parser, so a large body is
//! charged by the same rules as a small one. Memory stays bounded whatever
//! the body's size.
//!
//! Only a body in the usual shape is read: one that the parser's fast path
//! takes (no key it reads given twice, `message` and `response` objects,
//! `output` a list of objects with a string `type`). Anything else, which
//! the parser would read its general way, is left unread, and the call is
//! charged its hold, as every body past the limit was before.

use smallvec::SmallVec;

use super::{HostedTool, Reported};

/// Most bytes kept of one value read (a `usage` object is a few hundred).
const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most hosted-tool calls counted in one `output` list.
const MAX_CALLS: usize = 100_000;
/// Deeper nesting is not read (the whole-body parser would read it; no
/// provider nests this deep): one open container costs this reader a byte
/// of memory or two.
const MAX_DEPTH: usize = 4096;
/// Keys are read this deep at most: nothing read is deeper.
const KEYED_DEPTH: usize = 4;
/// Longer keys are none of those read, however they are spelled (`usage`
/// written all in `\u` escapes is 30 bytes).
const MAX_KEY_BYTES: usize = 64;

/// The keys a path to a value read goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Usage,
    Message,
    Response,
    Output,
    Type,
    ServiceTier,
    Other,
}

impl Key {
    /// The key spelled `raw` (between its quotes); `None` when the escapes
    /// in it do not decode.
    fn of(raw: &[u8]) -> Option<Key> {
        // A key spelled with escapes is the same key to a JSON parser.
        let decoded = if raw.contains(&b'\\') {
            serde_json::from_slice::<String>(&[b"\"", raw, b"\""].concat()).ok()?.into_bytes()
        } else {
            raw.to_vec()
        };
        Some(match &decoded[..] {
            b"usage" => Key::Usage,
            b"message" => Key::Message,
            b"response" => Key::Response,
            b"output" => Key::Output,
            b"type" => Key::Type,
            b"service_tier" => Key::ServiceTier,
            _ => Key::Other,
        })
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What an object is to the parser's fast path: the keys it reads there
/// may each be given once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The document: `usage`, `message`, `response`, `output`, `service_tier`.
    Document,
    /// `message` or `response`: `usage`, `output`, `service_tier`.
    Nested,
    /// An item of `output`: `type`.
    Item,
    /// Anything else: not read as fields.
    Other,
}

impl Role {
    fn reads(self, key: Key) -> bool {
        match self {
            Role::Document => {
                matches!(key, Key::Usage | Key::Message | Key::Response | Key::Output | Key::ServiceTier)
            }
            Role::Nested => matches!(key, Key::Usage | Key::Output | Key::ServiceTier),
            Role::Item => key == Key::Type,
            Role::Other => false,
        }
    }
}

/// An open container: an object with the key of the value being read in
/// it (none while a key is due), or an array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    Object { key: Option<Key>, role: Role, seen: u8 },
    Array,
}

impl Open {
    fn key(&self) -> Option<Key> {
        match self {
            Open::Object { key, .. } => *key,
            Open::Array => None,
        }
    }
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
    /// `service_tier`, and under `message` and `response`: any value.
    ServiceTier,
    MessageServiceTier,
    ResponseServiceTier,
}

/// The place a value is at, as far as the fast path reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Read(Target),
    /// `message` or `response`: an object or null.
    Nested,
    /// `output`, `response.output`: a list or null.
    Output {
        in_response: bool,
    },
    /// `message.output`: not read here, so a body with one is left unread.
    MessageOutput,
    /// An item of an `output` list: an object.
    Item {
        in_response: bool,
    },
    Elsewhere,
}

impl Place {
    /// The place the path `open` leads to.
    fn at(open: &[Open]) -> Place {
        use Key::{Message, Output, Response, ServiceTier, Type, Usage};
        let item = |open: &Open| *open == Open::Array;
        match open {
            [a] => match a.key() {
                Some(Type) => Place::Read(Target::TopType),
                Some(Usage) => Place::Read(Target::Usage),
                Some(ServiceTier) => Place::Read(Target::ServiceTier),
                Some(Message | Response) => Place::Nested,
                Some(Output) => Place::Output { in_response: false },
                _ => Place::Elsewhere,
            },
            [a, b] => match (a.key(), b.key()) {
                (Some(Message), Some(Usage)) => Place::Read(Target::MessageUsage),
                (Some(Response), Some(Usage)) => Place::Read(Target::ResponseUsage),
                (Some(Message), Some(ServiceTier)) => Place::Read(Target::MessageServiceTier),
                (Some(Response), Some(ServiceTier)) => Place::Read(Target::ResponseServiceTier),
                (Some(Response), Some(Output)) => Place::Output { in_response: true },
                (Some(Message), Some(Output)) => Place::MessageOutput,
                (Some(Output), None) if item(b) => Place::Item { in_response: false },
                _ => Place::Elsewhere,
            },
            [a, b, c] => match (a.key(), b.key(), c.key()) {
                (Some(Output), None, Some(Type)) if item(b) => Place::Read(Target::OutputType),
                (Some(Response), Some(Output), None) if item(c) => Place::Item { in_response: true },
                _ => Place::Elsewhere,
            },
            [a, b, c, d] => match (a.key(), b.key(), d.key()) {
                (Some(Response), Some(Output), Some(Type)) if item(c) => {
                    Place::Read(Target::ResponseOutputType)
                }
                _ => Place::Elsewhere,
            },
            _ => Place::Elsewhere,
        }
    }

    /// The role of an object that begins here.
    fn role(self) -> Role {
        match self {
            Place::Nested => Role::Nested,
            Place::Item { .. } => Role::Item,
            _ => Role::Other,
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
    /// The key being read (at a depth where keys are read), while it is
    /// short enough to be one read; `too_long` once it is not.
    key: Option<SmallVec<[u8; MAX_KEY_BYTES]>>,
    key_too_long: bool,
    reading: Option<Reading>,
    top_type: Option<Vec<u8>>,
    usage: Option<Vec<u8>>,
    message_usage: Option<Vec<u8>>,
    response_usage: Option<Vec<u8>>,
    service_tier: Option<Vec<u8>>,
    message_service_tier: Option<Vec<u8>>,
    response_service_tier: Option<Vec<u8>>,
    /// The hosted-tool calls among the items of `output` and
    /// `response.output`, once those lists began.
    output: Option<Vec<HostedTool>>,
    response_output: Option<Vec<HostedTool>>,
    /// The top-level value began, and ended.
    started: bool,
    ended: bool,
    /// Not one JSON object in the usual shape: nothing is read from it.
    unread: bool,
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
        while !bytes.is_empty() && !self.unread {
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
    /// one whole JSON object in the usual shape with a usage in it.
    pub(super) fn usage(&self) -> Option<Reported> {
        if self.unread || !self.ended || self.string.is_some() {
            return None;
        }
        let items = |calls: &[HostedTool]| {
            let listed: Vec<String> =
                calls.iter().map(|tool| format!("{{\"type\":\"{}\"}}", tool.item_type())).collect();
            format!("[{}]", listed.join(",")).into_bytes()
        };
        let field = |name: &[u8], value: &[u8]| [b"\"", name, b"\":", value].concat();
        let mut fields: Vec<Vec<u8>> = Vec::new();
        if let Some(usage) = &self.usage {
            fields.push(field(b"usage", usage));
        }
        if let Some(tier) = &self.service_tier {
            fields.push(field(b"service_tier", tier));
        }
        let mut message: Vec<Vec<u8>> = Vec::new();
        if let Some(usage) = &self.message_usage {
            message.push(field(b"usage", usage));
        }
        if let Some(tier) = &self.message_service_tier {
            message.push(field(b"service_tier", tier));
        }
        if !message.is_empty() {
            fields.push([b"\"message\":{", &message.join(&b","[..])[..], b"}"].concat());
        }
        let mut response: Vec<Vec<u8>> = Vec::new();
        if let Some(usage) = &self.response_usage {
            response.push(field(b"usage", usage));
        }
        if let Some(tier) = &self.response_service_tier {
            response.push(field(b"service_tier", tier));
        }
        if let Some(calls) = &self.response_output {
            response.push([b"\"output\":", &items(calls)[..]].concat());
        }
        if !response.is_empty() {
            fields.push([b"\"response\":{", &response.join(&b","[..])[..], b"}"].concat());
        }
        if let Some(calls) = &self.output {
            fields.push([b"\"output\":", &items(calls)[..]].concat());
        }
        let document = [b"{", &fields.join(&b","[..])[..], b"}"].concat();
        super::usage_from_usual_bytes(&document)
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
            self.unread = true;
            return;
        }
        match byte {
            _ if whitespace => self.end_scalar(),
            b'"' => {
                self.end_scalar();
                let key = matches!(self.open.last(), Some(Open::Object { key: None, .. }));
                if key {
                    self.key = (self.open.len() <= KEYED_DEPTH).then(SmallVec::new);
                    self.key_too_long = false;
                    self.keep(byte);
                } else {
                    self.value_begins(Shape::Text, byte);
                }
                self.string = Some(InString { key, escaped: false });
            }
            b'{' | b'[' => {
                self.end_scalar();
                let role = self.value_begins(Shape::Container, byte);
                if self.unread {
                    return;
                }
                if self.open.len() == MAX_DEPTH {
                    self.unread = true;
                    return;
                }
                self.open.push(if byte == b'{' {
                    Open::Object { key: None, role, seen: 0 }
                } else {
                    Open::Array
                });
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
                    self.unread = true;
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
                if let Some(Open::Object { key, .. }) = self.open.last_mut() {
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
            self.key_ends();
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
                    self.key_too_long = true;
                }
            }
        }
        self.keep_all(bytes);
    }

    /// A key has been read: the value that follows is read as its value.
    fn key_ends(&mut self) {
        let raw = self.key.take();
        let Some(Open::Object { key: slot, role, seen }) = self.open.last_mut() else { return };
        let key = match raw {
            // Too deep to matter, or (too long) none of those read, unless
            // it is spelled with escapes this does not decode.
            None => Some(Key::Other),
            Some(raw) if self.key_too_long => (!raw.contains(&b'\\')).then_some(Key::Other),
            Some(raw) => Key::of(&raw),
        };
        let Some(key) = key else {
            // The parser's fast path reads keys where it reads fields.
            if *role != Role::Other {
                self.unread = true;
            }
            *slot = Some(Key::Other);
            return;
        };
        if role.reads(key) {
            if *seen & key.bit() != 0 {
                // Given twice: the parser's fast path refuses it.
                self.unread = true;
            }
            *seen |= key.bit();
        }
        *slot = Some(key);
    }

    /// A value begins with `byte`; returns the role of an object beginning.
    fn value_begins(&mut self, shape: Shape, byte: u8) -> Role {
        if self.ended {
            // Something after the document: not one JSON value.
            self.unread = true;
            return Role::Other;
        }
        if !self.started {
            self.started = true;
            // Only an object has a usage in it.
            self.unread = byte != b'{';
            return Role::Document;
        }
        if self.reading.is_some() {
            self.keep(byte);
            return Role::Other;
        }
        let place = Place::at(&self.open);
        // The shapes the parser's fast path takes.
        let usual = match place {
            Place::Nested => byte == b'{' || byte == b'n',
            Place::Output { .. } => byte == b'[' || byte == b'n',
            // Read by the fast path, but not here: only `null` is read.
            Place::MessageOutput => byte == b'n',
            Place::Item { .. } => byte == b'{',
            Place::Read(Target::OutputType | Target::ResponseOutputType) => byte == b'"' || byte == b'n',
            Place::Read(_) | Place::Elsewhere => true,
        };
        if !usual {
            self.unread = true;
            return Role::Other;
        }
        match place {
            Place::Output { in_response: false } => self.output = (byte == b'[').then(Vec::new),
            Place::Output { in_response: true } => self.response_output = (byte == b'[').then(Vec::new),
            Place::Read(target) => {
                self.reading = Some(Reading { target, shape, depth: self.open.len(), bytes: vec![byte] });
            }
            _ => {}
        }
        place.role()
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
        let Some(reading) = &mut self.reading else { return };
        if reading.bytes.len() + bytes.len() <= MAX_VALUE_BYTES {
            reading.bytes.extend_from_slice(bytes);
        } else if reading.target == Target::TopType {
            // Not a kind of event: it ends no usage.
            self.reading = None;
        } else {
            // Larger than any usage or item type: the body is not read.
            self.unread = true;
        }
    }

    fn finish_reading(&mut self) {
        let Some(Reading { target, bytes, .. }) = self.reading.take() else { return };
        let in_response = match target {
            Target::TopType => return self.top_type = Some(bytes),
            Target::Usage => return self.usage = Some(bytes),
            Target::MessageUsage => return self.message_usage = Some(bytes),
            Target::ResponseUsage => return self.response_usage = Some(bytes),
            Target::ServiceTier => return self.service_tier = Some(bytes),
            Target::MessageServiceTier => return self.message_service_tier = Some(bytes),
            Target::ResponseServiceTier => return self.response_service_tier = Some(bytes),
            Target::OutputType => false,
            Target::ResponseOutputType => true,
        };
        // Only hosted-tool calls are counted; `null` is no type.
        let kind = match serde_json::from_slice::<Option<String>>(&bytes) {
            Ok(kind) => kind,
            Err(_) => return self.unread = true,
        };
        let Some(tool) = kind.as_deref().and_then(HostedTool::from_item_type) else { return };
        let calls = if in_response { &mut self.response_output } else { &mut self.output };
        if let Some(calls) = calls {
            if calls.len() == MAX_CALLS {
                self.unread = true;
            } else {
                calls.push(tool);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::{usage_from_bytes, Meter, MAX_METERED_JSON_BYTES};
    use super::*;

    /// Bodies in the usual shapes (the providers', and some odd but usual
    /// ones): read as the whole-body parse reads them.
    const USUAL: [&str; 22] = [
        r#"{"object":"list","data":[{"object":"embedding","embedding":[0.1,-0.2,3e-5],"index":0}],"model":"m","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        r#"{"id":"r","output":[{"type":"web_search_call","id":"ws"},{"type":"image_generation_call","result":"AAAA\"x"},{"type":"message","content":[{"type":"output_text","text":"hi \\ \" there"}]}],"usage":{"input_tokens":9,"output_tokens":4,"input_tokens_details":{"cached_tokens":2}}}"#,
        r#"{"id":"msg","type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":10,"output_tokens":2,"cache_read_input_tokens":5,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},"server_tool_use":{"web_search_requests":2}}}"#,
        r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":5,"output_tokens":1}}}"#,
        r#"{"type":"response.completed","response":{"output":[{"type":"file_search_call"},{"type":"message"}],"usage":{"input_tokens":7,"output_tokens":3}}}"#,
        r#"{"\u0075sage":{"prompt_tokens":3,"completion_tokens":4}}"#,
        r#"{"\u0072\u0065\u0073\u0070\u006f\u006e\u0073\u0065":{"usage":{"input_tokens":2,"output_tokens":1}}}"#,
        "{\r\n  \"usage\" : {\r\n    \"prompt_tokens\" : 12 ,\r\n    \"completion_tokens\": 1\r\n  },\r\n  \"choices\": [ ]\r\n}\r\n",
        r#"{"usage":null}"#,
        r#"{"output":[{"type":"message"}],"response":{"output":[{"type":"web_search_call"}],"usage":{"input_tokens":1,"output_tokens":1}}}"#,
        r#"{"choices":[{"usage":{"prompt_tokens":99}}],"usage":{"prompt_tokens":2,"completion_tokens":2}}"#,
        r#"{"usage":{"prompt_tokens":"3","completion_tokens":-1}}"#,
        r#"{"usage":{"prompt_tokens":4,"completion_tokens":2}} trailing"#,
        r#"{"usage":{"prompt_tokens":4,"completion_tokens":2}"#,
        r#"{"output":null,"response":{"output":[{"type":null},{"type":"web_search_call"}],"usage":{"input_tokens":2,"output_tokens":1}}}"#,
        r#"{"message":{"output":null,"usage":null},"response":null,"usage":{"input_tokens":2,"output_tokens":1}}"#,
        r#"{"message":{"usage":{"input_tokens":3,"output_tokens":9}},"response":{"usage":{"input_tokens":4,"output_tokens":1}}}"#,
        r#"{"usage":{"input_tokens":5.0,"output_tokens":1e2,"prompt_tokens_details":null}}"#,
        // The tier that served the call, wherever it is named, in any shape.
        r#"{"id":"c","choices":[],"service_tier":"priority","usage":{"prompt_tokens":4,"completion_tokens":2}}"#,
        r#"{"type":"response.completed","response":{"service_tier":"flex","usage":{"input_tokens":7,"output_tokens":3}}}"#,
        r#"{"type":"message_start","message":{"service_tier":null,"usage":{"input_tokens":5,"output_tokens":1,"service_tier":"priority"}}}"#,
        r#"{"service_tier":{"x":[1,"scale"]},"message":{"service_tier":"batch"},"usage":{"input_tokens":1,"output_tokens":1}}"#,
    ];

    /// Bodies the parser reads its general way (a key given twice, a list
    /// where an object goes, an item that is not an object): left unread.
    const UNUSUAL: [&str; 16] = [
        r#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":{"prompt_tokens":5,"completion_tokens":6}}"#,
        r#"{"output":[{"type":7},{"type":"code_interpreter_call"}],"usage":{"input_tokens":1,"output_tokens":1}}"#,
        r#"[{"usage":{"prompt_tokens":4,"completion_tokens":2}}]"#,
        r#"{"output":"x","response":{"output":[{"type":"web_search_call"}],"usage":{"input_tokens":2,"output_tokens":1}}}"#,
        r#"{"output":[3,{"type":"web_search_call"},[]],"usage":{"input_tokens":2,"output_tokens":1}}"#,
        r#"{"response":[1],"usage":{"input_tokens":2,"output_tokens":1}}"#,
        r#"{"message":"hi","usage":{"input_tokens":2,"output_tokens":1}}"#,
        r#"{"usage":{"input_tokens":2,"output_tokens":1,"server_tool_use":{"web_search_requests":1}},"output":[{"type":"web_search_call","type":"message"}]}"#,
        r#"{"response":{"usage":{"input_tokens":4,"output_tokens":1}},"response":{"id":"r"}}"#,
        r#"{"output":null,"message":{"output":0},"response":{"output":[{"type":"web_search_call"}],"usage":{"input_tokens":1,"output_tokens":1}}}"#,
        r#"{"message":{"usage":null},"response":{"usage":{"input_tokens":1,"output_tokens":1}},"output":[{"type":"a","type":"b"}]}"#,
        r#"{"usage":5,"response":{"usage":{"input_tokens":1,"output_tokens":1}},"x":1e400}"#,
        r#"{"\udc00":0,"usage":{"prompt_tokens":1}}"#,
        r#"{"output":[["web_search_call"]],"usage":{"input_tokens":1,"output_tokens":1}}"#,
        r#"{"message":[{"input_tokens":3,"output_tokens":2},null]}"#,
        r#"{"service_tier":"flex","service_tier":"priority","usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
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
        // Proves the streaming read agrees with the parse of a whole body for
        // every usual shape, wherever the chunks break, and leaves unusual
        // ones unread (before, a duplicated key could count a web search the
        // parse does not).
        let splits = |body: &'static str| {
            let body = body.as_bytes();
            (0..=body.len()).flat_map(move |at| {
                (at..=body.len())
                    .step_by(7)
                    .map(move |second| [&body[..at], &body[at..second], &body[second..]])
            })
        };
        for body in USUAL {
            let whole = usage_from_bytes(body.as_bytes());
            for parts in splits(body) {
                assert_eq!(read(&parts), whole, "{body} split as {parts:?}");
            }
        }
        assert!(USUAL.iter().filter(|body| usage_from_bytes(body.as_bytes()).is_some()).count() >= 14);
        for body in UNUSUAL {
            for parts in splits(body) {
                assert_eq!(read(&parts), None, "{body} split as {parts:?}");
            }
        }
        let read_whole = UNUSUAL.iter().filter(|body| usage_from_bytes(body.as_bytes()).is_some()).count();
        assert!(read_whole >= 10, "the general parse reads most of them: {read_whole}");
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
            (USUAL[0], ("[", "0.0123456789,-0.987654321,", "1]")),
            (USUAL[1], ("\"", "iVBORw0KGgoAAAANSUhEUgAA\\\"+/=", "\"")),
            (USUAL[2], ("[", "{\"type\":\"text\",\"text\":\"a \\\"quoted\\\" word\"},", "{}]")),
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
