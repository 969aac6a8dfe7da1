//! Query-string parsing.
//!
//! Owns: `application/x-www-form-urlencoded` decoding of a URI query and a
//! tiny serde deserializer that turns the decoded pairs into any
//! `Deserialize` struct (used for `FileQuery`): values are strings, parsed
//! into numbers or booleans where the target field asks for them.
//!
//! Must not: validate what the fields mean (paths, modes): handlers do.

use std::fmt;

use percent_encoding::percent_decode_str;
use serde::de::value::{Error as DeError, MapDeserializer};
use serde::de::{Deserialize, Deserializer, Error as _, IntoDeserializer, Visitor};

/// Why a query string was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QueryError {
    #[error("query is not valid UTF-8 after percent-decoding")]
    NotUtf8,
    #[error("bad query: {0}")]
    Fields(String),
}

/// Decode `a=1&b=x%20y` into pairs (`+` is a space, empty segments skipped).
pub fn decode_pairs(query: &str) -> Result<Vec<(String, String)>, QueryError> {
    query
        .split('&')
        .filter(|seg| !seg.is_empty())
        .map(|seg| {
            let (k, v) = seg.split_once('=').unwrap_or((seg, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn decode(s: &str) -> Result<String, QueryError> {
    let plus = s.replace('+', " ");
    percent_decode_str(&plus)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| QueryError::NotUtf8)
}

/// Parse a (possibly absent) query string into `T`.
pub fn parse<T: for<'de> Deserialize<'de>>(query: Option<&str>) -> Result<T, QueryError> {
    let pairs = decode_pairs(query.unwrap_or(""))?;
    let map = MapDeserializer::new(pairs.into_iter().map(|(k, v)| (k, Part(v))));
    T::deserialize(map).map_err(|e: DeError| QueryError::Fields(e.to_string()))
}

/// One query value; parses itself into whatever type the field wants.
struct Part(String);

impl<'de> IntoDeserializer<'de, DeError> for Part {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

macro_rules! parse_number {
    ($($method:ident => $visit:ident,)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            match self.0.parse() {
                Ok(n) => visitor.$visit(n),
                Err(_) => Err(DeError::custom(format_args!("invalid number {:?}", self.0))),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Part {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_string(self.0)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_some(self)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0.as_str() {
            "true" | "1" | "" => visitor.visit_bool(true),
            "false" | "0" => visitor.visit_bool(false),
            other => Err(DeError::custom(format_args!("invalid boolean {other:?}"))),
        }
    }

    parse_number! {
        deserialize_u8 => visit_u8,
        deserialize_u16 => visit_u16,
        deserialize_u32 => visit_u32,
        deserialize_u64 => visit_u64,
        deserialize_i8 => visit_i8,
        deserialize_i16 => visit_i16,
        deserialize_i32 => visit_i32,
        deserialize_i64 => visit_i64,
        deserialize_f32 => visit_f32,
        deserialize_f64 => visit_f64,
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char str string bytes byte_buf unit unit_struct newtype_struct seq
        tuple tuple_struct map struct enum identifier ignored_any
    }
}

impl fmt::Debug for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandforge_agent_proto::FileQuery;

    #[test]
    fn decodes_pairs() {
        let p = decode_pairs("path=%2Ftmp%2Fa+b&x=&y&&z=%C3%A9").unwrap();
        assert_eq!(
            p,
            vec![
                ("path".into(), "/tmp/a b".into()),
                ("x".into(), "".into()),
                ("y".into(), "".into()),
                ("z".into(), "é".into()),
            ]
        );
        assert_eq!(decode_pairs("a=%FF"), Err(QueryError::NotUtf8));
        // A literal '+' must be sent as %2B.
        assert_eq!(decode_pairs("p=a%2Bb").unwrap()[0].1, "a+b");
    }

    #[test]
    fn parses_file_query() {
        let q: FileQuery = parse(Some(
            "path=/etc/hosts&offset=2&limit=10&max_bytes=100&ls=true&mode=0755",
        ))
        .unwrap();
        assert_eq!(
            q,
            FileQuery {
                path: "/etc/hosts".into(),
                offset: Some(2),
                limit: Some(10),
                max_bytes: Some(100),
                ls: Some(true),
                mode: Some("0755".into()),
            }
        );
        let q: FileQuery = parse(Some("path=/x&ls=false")).unwrap();
        assert_eq!(q.ls, Some(false));
        assert_eq!(q.offset, None);
        // Unknown keys are ignored, like serde's default.
        let q: FileQuery = parse(Some("path=/x&whatever=1")).unwrap();
        assert_eq!(q.path, "/x");
    }

    #[test]
    fn rejects_bad_queries() {
        assert!(parse::<FileQuery>(None).is_err(), "path is required");
        assert!(parse::<FileQuery>(Some("path=/x&offset=abc")).is_err());
        assert!(parse::<FileQuery>(Some("path=/x&offset=-1")).is_err());
        assert!(parse::<FileQuery>(Some("path=/x&ls=maybe")).is_err());
        assert!(
            parse::<FileQuery>(Some("path=/x&path=/y")).is_err(),
            "duplicate field"
        );
    }
}
