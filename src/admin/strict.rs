//! Objects only: a deserializer wrapper that refuses a JSON array wherever
//! the target type did not ask for a list.
//!
//! serde's derived `Deserialize` for a struct also accepts a sequence and
//! matches fields by position, and serde_json offers one for `[`: left
//! alone, `["1.00",null,null]` reads as a purchase. [`Objects`] wraps a
//! deserializer so that every value it reaches (at any depth, through maps,
//! sequences, options and enum variants) is wrapped in turn, and a sequence
//! is handed only to a type that asked for one (`deserialize_seq`,
//! `deserialize_tuple`, `deserialize_tuple_struct`). Structs, maps, enums
//! and self-describing (`deserialize_any`) positions such as internally
//! tagged enums see an array as an error.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// A deserializer whose structures come only from JSON objects.
pub struct Objects<D>(pub D);

/// What a refused array says; serde_path_to_error adds where it was.
const ARRAY_REFUSED: &str = "expected a JSON object: fields are matched by name, never by position";

/// A visitor that forwards everything, wrapping what it is handed, and
/// refuses a sequence unless its type asked for one.
struct Guard<V> {
    visitor: V,
    sequence_allowed: bool,
}

fn guard<V>(visitor: V, sequence_allowed: bool) -> Guard<V> {
    Guard { visitor, sequence_allowed }
}

/// Forwards `deserialize_*` methods that take only a visitor.
macro_rules! forward {
    ($($method:ident => $sequence_allowed:expr,)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
            self.0.$method(guard(visitor, $sequence_allowed))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Objects<D> {
    type Error = D::Error;

    forward! {
        deserialize_any => false,
        deserialize_bool => false,
        deserialize_i8 => false,
        deserialize_i16 => false,
        deserialize_i32 => false,
        deserialize_i64 => false,
        deserialize_i128 => false,
        deserialize_u8 => false,
        deserialize_u16 => false,
        deserialize_u32 => false,
        deserialize_u64 => false,
        deserialize_u128 => false,
        deserialize_f32 => false,
        deserialize_f64 => false,
        deserialize_char => false,
        deserialize_str => false,
        deserialize_string => false,
        deserialize_bytes => false,
        deserialize_byte_buf => false,
        deserialize_option => false,
        deserialize_unit => false,
        deserialize_seq => true,
        deserialize_map => false,
        deserialize_identifier => false,
        deserialize_ignored_any => true,
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_unit_struct(name, guard(visitor, false))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_newtype_struct(name, guard(visitor, false))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple(len, guard(visitor, true))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple_struct(name, len, guard(visitor, true))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_struct(name, fields, guard(visitor, false))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, guard(visitor, false))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// Forwards `visit_*` methods that take a plain value.
macro_rules! pass {
    ($($method:ident($type:ty),)*) => {$(
        fn $method<E: de::Error>(self, value: $type) -> Result<V::Value, E> {
            self.visitor.$method(value)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Guard<V> {
    type Value = V::Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(formatter)
    }

    pass! {
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    }

    /// JSON Schema counts `5.0` as an integer, and the OpenAPI document
    /// says "integer": an integral number in range is handed on as one.
    fn visit_f64<E: de::Error>(self, value: f64) -> Result<V::Value, E> {
        const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
        const MINUS_TWO_POW_63: f64 = -9_223_372_036_854_775_808.0;
        if value.fract() == 0.0 {
            if (0.0..TWO_POW_64).contains(&value) {
                return self.visitor.visit_u64(value as u64);
            }
            if (MINUS_TWO_POW_63..0.0).contains(&value) {
                return self.visitor.visit_i64(value as i64);
            }
        }
        self.visitor.visit_f64(value)
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.visitor.visit_some(Objects(deserializer))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.visitor.visit_newtype_struct(Objects(deserializer))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        if !self.sequence_allowed {
            return Err(de::Error::custom(ARRAY_REFUSED));
        }
        self.visitor.visit_seq(Objects(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(Objects(map))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_enum(Objects(data))
    }
}

/// A seed whose value is read through [`Objects`].
struct Seed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Objects(deserializer))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Objects<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Objects<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Seed(seed))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Objects<A> {
    type Error = A::Error;
    type Variant = Objects<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.0.variant_seed(Seed(seed))?;
        Ok((value, Objects(variant)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Objects<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Seed(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, guard(visitor, true))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, guard(visitor, false))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        a: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case", tag = "type")]
    enum Tagged {
        Limit { amount: u32 },
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        inner: Option<Inner>,
        #[serde(default)]
        list: Vec<Inner>,
        tagged: Option<Tagged>,
        pair: Option<(u32, u32)>,
    }

    /// The value, or the path and message of the error.
    fn read(text: &str) -> Result<Outer, (String, String)> {
        let mut json = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(Objects(&mut json))
            .map_err(|e| (e.path().to_string(), e.inner().to_string()))
    }

    #[test]
    fn integral_numbers_written_with_a_fraction_are_integers() {
        // Proves a body the OpenAPI document allows ("integer" includes 5.0
        // in JSON Schema) is read, at any depth, while 5.5 and numbers past
        // the field's range are still refused naming the field.
        let outer = read(r#"{"inner": {"a": 5.0}, "tagged": {"type": "limit", "amount": 3.0}}"#).unwrap();
        assert_eq!(outer.inner, Some(Inner { a: 5 }));
        assert_eq!(outer.tagged, Some(Tagged::Limit { amount: 3 }));
        assert_eq!(read(r#"{"inner": {"a": 5.5}}"#).unwrap_err().0, "inner.a");
        assert_eq!(read(r#"{"inner": {"a": 5e12}}"#).unwrap_err().0, "inner.a", "past u32");
        assert_eq!(read(r#"{"inner": {"a": -1.0}}"#).unwrap_err().0, "inner.a", "negative");
    }

    #[test]
    fn objects_and_lists_are_read_as_before() {
        // Proves the wrapper changes nothing for well-formed bodies.
        let outer = read(
            r#"{"inner": {"a": 1}, "list": [{"a": 2}], "tagged": {"type": "limit", "amount": 3}, "pair": [4, 5]}"#,
        )
        .unwrap();
        assert_eq!(outer.inner, Some(Inner { a: 1 }));
        assert_eq!(outer.list, vec![Inner { a: 2 }]);
        assert_eq!(outer.tagged, Some(Tagged::Limit { amount: 3 }));
        assert_eq!(outer.pair, Some((4, 5)));
    }

    #[test]
    fn an_array_in_a_struct_position_is_refused_with_its_path() {
        // Proves positional structs are refused at every depth, naming where.
        for (text, path) in [
            (r#"[null, [], null, null]"#, "."),
            (r#"{"inner": [1]}"#, "inner"),
            (r#"{"list": [[2]]}"#, "list[0]"),
            (r#"{"tagged": ["limit", 3]}"#, "tagged"),
        ] {
            let (at, message) = read(text).unwrap_err();
            assert!(message.contains(ARRAY_REFUSED), "{text}: {message}");
            assert_eq!(at, path, "{text}: {message}");
        }
    }
}
