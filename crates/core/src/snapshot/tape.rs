//! One YAML node as the fast reader lays it out: a flat run of tokens over the text, read by
//! serde exactly as the same node would be read once turned into a `serde_json::Value` by
//! serde-saphyr (the loader's other reader). Plain scalars are resolved only when read, so a
//! field nobody reads costs no number parsing and no allocation.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess, Unexpected,
    VariantAccess, Visitor,
};
use serde_json::{Error, Value};

/// A node's tokens, in document order. A collection's token says where it ends, so skipping
/// a subtree nobody reads is one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Token {
    /// A mapping: keys and values alternate up to token `end` (exclusive). Keys are scalars.
    Map { end: usize },
    /// A sequence: its items up to token `end` (exclusive).
    Seq { end: usize },
    /// A scalar's text: plain (resolved by [`resolve_plain`] when read) or not (a string).
    Scalar { text: Text, plain: bool },
}

/// Where a scalar's text is: in the source (most scalars), or in the tape's own text (escaped,
/// folded or block scalars).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Text {
    Source { start: usize, end: usize },
    Owned { start: usize, end: usize },
}

/// Tokens of one node (an object, or what the reader holds of a document), reused across nodes.
#[derive(Debug, Default)]
pub(crate) struct Tape {
    pub(crate) tokens: Vec<Token>,
    /// Text of the scalars that are not a slice of the source.
    pub(crate) owned: String,
}

impl Tape {
    pub(crate) fn clear(&mut self) {
        self.tokens.clear();
        self.owned.clear();
    }

    /// The node whose first token is `at`.
    pub(crate) fn node<'t>(&'t self, source: &'t str, at: usize) -> Node<'t> {
        Node {
            source,
            tape: self,
            at,
        }
    }
}

/// One node of a [`Tape`]: a serde [`Deserializer`] that reads it as a `serde_json::Value`
/// holding the same YAML would be read.
#[derive(Clone, Copy)]
pub(crate) struct Node<'t> {
    source: &'t str,
    tape: &'t Tape,
    at: usize,
}

impl fmt::Debug for Node<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", (*self).to_value())
    }
}

/// A plain scalar as serde-saphyr resolves it for a target that takes any type (its
/// `deserialize_any`, with its default options): YAML 1.1 booleans in any case, integers with
/// `0x`, `0o`, `0b` and `_`, YAML 1.2 floats; a decimal with a leading zero is a float, an
/// upper-case radix prefix or a signed `.nan` stays a string.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Plain<'a> {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    /// `.inf`, `.nan`, `1e999`: serde-saphyr refuses these for any-typed targets, which makes
    /// the whole text unreadable; the fast reader leaves such texts to it.
    NonFinite,
    Str(&'a str),
}

pub(crate) fn resolve_plain(text: &str) -> Plain<'_> {
    if matches!(text, "" | "~" | "null" | "Null" | "NULL") {
        return Plain::Null;
    }
    // Only scalars starting like a number need more than a glance.
    let first = text.as_bytes()[0];
    if !(first.is_ascii_digit() || matches!(first, b'+' | b'-' | b'.')) {
        return match yaml11_bool(text) {
            Some(b) => Plain::Bool(b),
            None => Plain::Str(text),
        };
    }
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    if matches!(unsigned.as_bytes(), [b'0', b'X' | b'O' | b'B', ..]) || is_signed_nan(text) {
        return Plain::Str(text);
    }
    if text.starts_with('-') {
        if !leading_zero_decimal(text)
            && let Some(v) = parse_signed(text)
        {
            return match u64::try_from(v) {
                Ok(u) => Plain::Unsigned(u),
                Err(_) => Plain::Signed(v),
            };
        }
    } else if let Some(v) = parse_unsigned(text) {
        return Plain::Unsigned(v);
    }
    match parse_float(text) {
        Some(f) if f.is_finite() => Plain::Float(f),
        Some(_) => Plain::NonFinite,
        None => Plain::Str(text),
    }
}

fn yaml11_bool(t: &str) -> Option<bool> {
    let is = |word: &str| t.eq_ignore_ascii_case(word);
    if is("true") || is("yes") || is("y") || is("on") {
        Some(true)
    } else if is("false") || is("no") || is("n") || is("off") {
        Some(false)
    } else {
        None
    }
}

fn is_signed_nan(t: &str) -> bool {
    t.strip_prefix(['+', '-'])
        .is_some_and(|unsigned| matches!(unsigned, ".nan" | ".NaN" | ".NAN"))
}

fn leading_zero_decimal(t: &str) -> bool {
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    digits.len() > 1 && digits.starts_with('0') && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Digits in `radix`, single underscores allowed between them.
fn digits_value(digits: &str, radix: u32) -> Option<u128> {
    let bytes = digits.as_bytes();
    let mut value: u128 = 0;
    let mut saw = false;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'_' {
            let between = i > 0 && bytes[i - 1] != b'_' && i + 1 < bytes.len() && bytes[i + 1] != b'_';
            if !between {
                return None;
            }
            continue;
        }
        let digit = char::from(b).to_digit(16).filter(|d| *d < radix)?;
        value = value
            .checked_mul(u128::from(radix))?
            .checked_add(u128::from(digit))?;
        saw = true;
    }
    saw.then_some(value)
}

fn radix_and_digits(rest: &str) -> (u32, &str) {
    if let Some(r) = rest.strip_prefix("0x") {
        (16, r)
    } else if let Some(r) = rest.strip_prefix("0o") {
        (8, r)
    } else if let Some(r) = rest.strip_prefix("0b") {
        (2, r)
    } else {
        (10, rest)
    }
}

fn parse_unsigned(t: &str) -> Option<u64> {
    let rest = t.strip_prefix('+').unwrap_or(t);
    let (radix, digits) = radix_and_digits(rest);
    if radix == 10 && digits.starts_with('0') && digits != "0" {
        return None;
    }
    u64::try_from(digits_value(digits, radix)?).ok()
}

fn parse_signed(t: &str) -> Option<i64> {
    let rest = t.strip_prefix('-')?;
    let (radix, digits) = radix_and_digits(rest);
    if radix == 10 && digits.starts_with('0') && digits != "0" {
        return None;
    }
    let magnitude = digits_value(digits, radix)?;
    let value = i128::try_from(magnitude).ok()?.checked_neg()?;
    i64::try_from(value).ok()
}

/// A float as YAML 1.2 spells it (and as Rust parses it); an overflowing numeral counts as
/// non-finite, an alphabetic `inf` or `nan` as no float.
fn parse_float(t: &str) -> Option<f64> {
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    if matches!(unsigned, ".inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN") {
        return Some(f64::INFINITY);
    }
    if !unsigned
        .as_bytes()
        .first()
        .is_some_and(|b| b.is_ascii_digit() || *b == b'.')
    {
        return None;
    }
    let value = t.parse::<f64>().ok()?;
    if value.is_finite() || unsigned.as_bytes()[0].is_ascii_digit() {
        Some(value)
    } else {
        None
    }
}

impl<'t> Node<'t> {
    fn token(self) -> Token {
        self.tape.tokens[self.at]
    }

    /// The index just past this node's tokens.
    pub(crate) fn end(self) -> usize {
        match self.token() {
            Token::Map { end } | Token::Seq { end } => end,
            Token::Scalar { .. } => self.at + 1,
        }
    }

    fn at(self, at: usize) -> Node<'t> {
        Node { at, ..self }
    }

    fn text(self, text: Text) -> &'t str {
        match text {
            Text::Source { start, end } => &self.source[start..end],
            Text::Owned { start, end } => &self.tape.owned[start..end],
        }
    }

    /// A scalar's text and whether it is plain.
    fn scalar(self) -> Option<(&'t str, bool)> {
        match self.token() {
            Token::Scalar { text, plain } => Some((self.text(text), plain)),
            _ => None,
        }
    }

    /// A scalar that reads as a string, as its text.
    pub(crate) fn as_str(self) -> Option<&'t str> {
        match self.scalar()? {
            (text, false) => Some(text),
            (text, true) => match resolve_plain(text) {
                Plain::Str(text) => Some(text),
                _ => None,
            },
        }
    }

    pub(crate) fn is_map(self) -> bool {
        matches!(self.token(), Token::Map { .. })
    }

    /// Whether this is a null scalar (`null`, `~`, or nothing at all).
    pub(crate) fn is_null(self) -> bool {
        matches!(self.scalar(), Some((text, true)) if resolve_plain(text) == Plain::Null)
    }

    /// A mapping's entries, in order.
    pub(crate) fn entries(self) -> impl Iterator<Item = (&'t str, Node<'t>)> + 't {
        let node = self;
        let (mut at, end) = match node.token() {
            Token::Map { end } => (node.at + 1, end),
            _ => (0, 0),
        };
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let key = node.at(at).scalar().map_or("", |(text, _)| text);
            let value = node.at(at + 1);
            at = value.end();
            Some((key, value))
        })
    }

    /// A sequence's items, in order.
    pub(crate) fn elements(self) -> impl Iterator<Item = Node<'t>> + 't {
        let node = self;
        let (mut at, end) = match node.token() {
            Token::Seq { end } => (node.at + 1, end),
            _ => (0, 0),
        };
        std::iter::from_fn(move || {
            (at < end).then(|| {
                let item = node.at(at);
                at = item.end();
                item
            })
        })
    }

    pub(crate) fn is_seq(self) -> bool {
        matches!(self.token(), Token::Seq { .. })
    }

    /// The value of `key` in a mapping.
    pub(crate) fn get(self, key: &str) -> Option<Node<'t>> {
        self.entries().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub(crate) fn to_value(self) -> Value {
        serde::Deserialize::deserialize(self).unwrap_or(Value::Null)
    }

    fn unexpected(self) -> Unexpected<'t> {
        match self.token() {
            Token::Map { .. } => Unexpected::Map,
            Token::Seq { .. } => Unexpected::Seq,
            Token::Scalar { text, plain: false } => Unexpected::Str(self.text(text)),
            Token::Scalar { text, plain: true } => match resolve_plain(self.text(text)) {
                Plain::Null => Unexpected::Unit,
                Plain::Bool(b) => Unexpected::Bool(b),
                Plain::Unsigned(u) => Unexpected::Unsigned(u),
                Plain::Signed(i) => Unexpected::Signed(i),
                Plain::Float(f) => Unexpected::Float(f),
                Plain::NonFinite => Unexpected::Other("a non-finite float"),
                Plain::Str(s) => Unexpected::Str(s),
            },
        }
    }
}

impl<'t> Deserializer<'t> for Node<'t> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'t>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.token() {
            Token::Map { end } => {
                let mut map = Entries {
                    node: self,
                    at: self.at + 1,
                    end,
                };
                let value = visitor.visit_map(&mut map)?;
                if map.at < end {
                    return Err(de::Error::invalid_length(0, &"fewer elements in map"));
                }
                Ok(value)
            }
            Token::Seq { end } => {
                let mut seq = Items {
                    node: self,
                    at: self.at + 1,
                    end,
                };
                let value = visitor.visit_seq(&mut seq)?;
                if seq.at < end {
                    return Err(de::Error::invalid_length(0, &"fewer elements in array"));
                }
                Ok(value)
            }
            Token::Scalar { text, plain: false } => visitor.visit_borrowed_str(self.text(text)),
            Token::Scalar { text, plain: true } => match resolve_plain(self.text(text)) {
                Plain::Null => visitor.visit_unit(),
                Plain::Bool(b) => visitor.visit_bool(b),
                Plain::Unsigned(u) => visitor.visit_u64(u),
                Plain::Signed(i) => visitor.visit_i64(i),
                Plain::Float(f) => visitor.visit_f64(f),
                Plain::NonFinite => Err(de::Error::custom("non-finite float")),
                Plain::Str(s) => visitor.visit_borrowed_str(s),
            },
        }
    }

    fn deserialize_option<V: Visitor<'t>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'t>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'t>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // As `serde_json::Value` reads enums: a string is a unit variant, a mapping of one
        // entry a variant with its value.
        match self.token() {
            Token::Scalar { .. } => match self.unexpected() {
                Unexpected::Str(variant) => visitor.visit_enum(variant.into_deserializer()),
                other => Err(de::Error::invalid_type(other, &"string or map")),
            },
            Token::Map { .. } => {
                let mut entries = self.entries();
                match (entries.next(), entries.next()) {
                    (Some((variant, value)), None) => visitor.visit_enum(Variant { variant, value }),
                    _ => Err(de::Error::invalid_value(
                        Unexpected::Map,
                        &"map with a single key",
                    )),
                }
            }
            Token::Seq { .. } => Err(de::Error::invalid_type(Unexpected::Seq, &"string or map")),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'t>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        <W: Visitor<'t>>
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

struct Entries<'t> {
    node: Node<'t>,
    at: usize,
    end: usize,
}

impl<'t> MapAccess<'t> for Entries<'t> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'t>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        if self.at >= self.end {
            return Ok(None);
        }
        // Keys are strings, as in a `serde_json::Value`'s mapping.
        let key = self.node.at(self.at).scalar().map_or("", |(text, _)| text);
        self.at += 1;
        seed.deserialize(de::value::BorrowedStrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'t>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let value = self.node.at(self.at);
        self.at = value.end();
        seed.deserialize(value)
    }
}

struct Items<'t> {
    node: Node<'t>,
    at: usize,
    end: usize,
}

impl<'t> SeqAccess<'t> for Items<'t> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'t>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        if self.at >= self.end {
            return Ok(None);
        }
        let item = self.node.at(self.at);
        self.at = item.end();
        seed.deserialize(item).map(Some)
    }
}

struct Variant<'t> {
    variant: &'t str,
    value: Node<'t>,
}

impl<'t> EnumAccess<'t> for Variant<'t> {
    type Error = Error;
    type Variant = Node<'t>;

    fn variant_seed<V: DeserializeSeed<'t>>(self, seed: V) -> Result<(V::Value, Node<'t>), Error> {
        let variant = seed.deserialize(de::value::BorrowedStrDeserializer::<Error>::new(self.variant))?;
        Ok((variant, self.value))
    }
}

impl<'t> VariantAccess<'t> for Node<'t> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        serde::Deserialize::deserialize(self)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'t>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'t>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn struct_variant<V: Visitor<'t>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }
}
