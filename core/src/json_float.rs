//! Floats in JSON that survive NaN and infinities: `serde_json` writes a non-finite `f64` as `null`, which
//! then fails to read back as a number (a metrics line dropped on resume) or reads as "absent" for an
//! `Option<f64>`. With `#[serde(with = "crate::json_float")]` (or `json_float::option`), finite values stay
//! plain JSON numbers and non-finite ones are written as the strings "NaN", "inf" and "-inf"; reading
//! accepts both, and `null` for a plain `f64` (lines written before) as NaN.

use serde::{Deserialize, Deserializer, Serializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum Repr {
    Number(f64),
    Text(String),
}

fn from_repr<E: serde::de::Error>(r: Repr) -> Result<f64, E> {
    match r {
        Repr::Number(v) => Ok(v),
        Repr::Text(t) => match t.as_str() {
            "NaN" => Ok(f64::NAN),
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            other => Err(E::custom(format!("expected a number, NaN, inf or -inf, found \"{other}\""))),
        },
    }
}

pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else if v.is_nan() {
        s.serialize_str("NaN")
    } else if *v > 0.0 {
        s.serialize_str("inf")
    } else {
        s.serialize_str("-inf")
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match Option::<Repr>::deserialize(d)? {
        Some(r) => from_repr(r),
        None => Ok(f64::NAN),
    }
}

/// The same for `Option<f64>`: `None` is `null`, `Some(NaN)` is "NaN".
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Option::<Repr>::deserialize(d)?.map(from_repr).transpose()
    }
}
