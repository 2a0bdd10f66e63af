//! A JSON object edited without rebuilding it: its members in the order
//! written, each value as written. A request body the gateway must edit
//! (an output cap, `stream_options`, a tool bound) goes upstream with every
//! other byte as the client sent it: rebuilt through `serde_json::Value`,
//! objects came out with their keys sorted (a Structured Outputs schema then
//! asks for its fields in another order) and integers past `u64` as floats.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;

/// An object's members, in order.
pub(super) struct Members(Vec<(String, Box<RawValue>)>);

impl Members {
    /// The members of the object `json` is; `None` for anything else.
    pub fn of(json: &str) -> Option<Members> {
        serde_json::from_str(json).ok()
    }

    /// The value of `key`, as written.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(name, _)| name == key).map(|(_, value)| &**value)
    }

    /// Sets `key` to `value`, as the last member: a member of that name
    /// goes (the gateway refused bodies that name a field it reads twice).
    pub fn set(&mut self, key: &str, value: Box<RawValue>) {
        self.0.retain(|(name, _)| name != key);
        self.0.push((key.to_owned(), value));
    }

    /// Sets `key` to the JSON text of `value`.
    pub fn set_to<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Option<()> {
        self.set(key, serde_json::value::to_raw_value(value).ok()?);
        Some(())
    }

    /// The object as JSON text.
    pub fn to_raw(&self) -> Option<Box<RawValue>> {
        serde_json::value::to_raw_value(self).ok()
    }
}

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

impl Serialize for Members {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}
