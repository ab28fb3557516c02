//! Small strict readers over `serde_json` values: unknown keys and wrong types
//! become typed errors that name the field.

use serde_json::{Map, Number, Value};

use crate::error::{Error, Result};

/// A short rendering of a JSON value for error messages.
pub(crate) fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!(
            "{}...",
            &s[..s.char_indices().take(40).last().map_or(0, |(i, _)| i)]
        )
    } else {
        s
    }
}

fn join(ctx: &str, key: &str) -> String {
    if ctx.is_empty() {
        key.to_string()
    } else {
        format!("{ctx}.{key}")
    }
}

/// A JSON object whose keys must all be in `allowed`.
pub(crate) struct Fields<'a> {
    map: &'a Map<String, Value>,
    ctx: String,
}

impl<'a> Fields<'a> {
    /// Reads `v` as an object with only `allowed` keys; `ctx` prefixes field names in errors.
    pub(crate) fn new(v: &'a Value, ctx: &str, allowed: &[&str]) -> Result<Self> {
        let map = v.as_object().ok_or_else(|| Error::WrongType {
            field: if ctx.is_empty() {
                "config".into()
            } else {
                ctx.into()
            },
            expected: "a JSON object",
            found: describe(v),
        })?;
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Error::UnknownConfigKey(join(ctx, k)));
        }
        Ok(Fields {
            map,
            ctx: ctx.to_string(),
        })
    }

    /// The full dotted name of `key`.
    pub(crate) fn name(&self, key: &str) -> String {
        join(&self.ctx, key)
    }

    /// The raw value, `None` when absent or null.
    pub(crate) fn value(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &Value) -> Error {
        Error::WrongType {
            field: self.name(key),
            expected,
            found: describe(v),
        }
    }

    /// A number (or null/absent as `None`).
    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    /// A number, `default` when absent or null.
    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// A number that must be present.
    pub(crate) fn req_f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| Error::MissingKey(self.name(key)))
    }

    /// A non-negative integer (or null/absent as `None`); `3.0` is accepted as 3.
    pub(crate) fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => {
                if let Some(i) = v.as_i64() {
                    return Ok(Some(i));
                }
                match v.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                    _ => Err(self.wrong(key, "an integer", v)),
                }
            }
        }
    }

    /// A boolean, `default` when absent or null.
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.value(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.wrong(key, "a boolean", v)),
        }
    }

    /// A string, `default` when absent or null.
    pub(crate) fn string_or(&self, key: &str, default: &str) -> Result<String> {
        match self.value(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    /// A list of strings that must be present.
    pub(crate) fn req_string_list(&self, key: &str) -> Result<Vec<String>> {
        let v = self
            .value(key)
            .ok_or_else(|| Error::MissingKey(self.name(key)))?;
        let wrong = || self.wrong(key, "a list of strings", v);
        v.as_array()
            .ok_or_else(wrong)?
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(wrong))
            .collect()
    }

    /// A list of numbers that must be present.
    pub(crate) fn req_f64_list(&self, key: &str) -> Result<Vec<f64>> {
        let v = self
            .value(key)
            .ok_or_else(|| Error::MissingKey(self.name(key)))?;
        let items = v
            .as_array()
            .ok_or_else(|| self.wrong(key, "a list of numbers", v))?;
        items
            .iter()
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| self.wrong(key, "a list of numbers", v))
            })
            .collect()
    }
}

/// A float as a JSON number (non-finite values become null; callers validate first).
pub(crate) fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// An integral float written as a JSON integer (Keras stores step counts as ints).
pub(crate) fn int_or_float(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        float(x)
    }
}

/// An optional float, `null` when absent.
pub(crate) fn opt_float(x: Option<f64>) -> Value {
    x.map_or(Value::Null, float)
}

/// Parses text as JSON with a typed error.
pub(crate) fn parse(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::Json(e.to_string()))
}
