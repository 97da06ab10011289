//! Reading the JSON configuration object passed to `lifecycle.init`.
//!
//! The host has already checked the operator's values against the manifest's schema
//! (types, required keys, unknown keys), so these helpers only fetch values; they still
//! answer with a message naming the key, for plugins run by hand.

use std::collections::BTreeMap;

/// A parsed configuration object: key -> JSON value text, one level deep.
#[derive(Debug, Default, Clone)]
pub struct Config {
    values: BTreeMap<String, Value>,
}

/// A configuration value. Nested arrays and objects are kept as their JSON text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    /// Arrays and objects, as JSON text.
    Json(String),
}

impl Config {
    /// Parse the object given to `init`.
    pub fn parse(json: &str) -> Result<Config, String> {
        let mut p = Parser {
            s: json.as_bytes(),
            i: 0,
        };
        p.ws();
        let values = p
            .object()
            .map_err(|e| format!("config is not a JSON object: {e}"))?;
        p.ws();
        if p.i != p.s.len() {
            return Err("config is not a JSON object: trailing characters".into());
        }
        Ok(Config { values })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    pub fn string(&self, key: &str) -> Result<Option<&str>, String> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("config key `{key}`: expected a string")),
        }
    }

    pub fn require_string(&self, key: &str) -> Result<&str, String> {
        self.string(key)?
            .ok_or_else(|| format!("config key `{key}` is required"))
    }

    pub fn integer(&self, key: &str) -> Result<Option<i64>, String> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.fract() == 0.0 => Ok(Some(*n as i64)),
            Some(_) => Err(format!("config key `{key}`: expected an integer")),
        }
    }

    pub fn boolean(&self, key: &str) -> Result<Option<bool>, String> {
        match self.values.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(format!("config key `{key}`: expected true or false")),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(|k| k.as_str())
    }
}

// A small JSON reader: plugins should not need serde to read a flat config object.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\n' | b'\r' | b'\t') {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {}", c as char, self.i))
        }
    }
    fn object(&mut self) -> Result<BTreeMap<String, Value>, String> {
        let mut m = BTreeMap::new();
        self.eat(b'{')?;
        self.ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Ok(m);
        }
        loop {
            self.ws();
            let k = self.string()?;
            self.eat(b':')?;
            let v = self.value()?;
            m.insert(k, v);
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(m);
                }
                _ => return Err(format!("expected `,` or `}}` at byte {}", self.i)),
            }
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.eat(b'"')?;
        let mut out = String::new();
        loop {
            let c = *self.s.get(self.i).ok_or("unterminated string")?;
            self.i += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'n' => out.push('\n'),
                        b't' => out.push('\t'),
                        b'r' => out.push('\r'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
                            let hex = std::str::from_utf8(hex).map_err(|_| "bad \\u escape")?;
                            let cp = u32::from_str_radix(hex, 16).map_err(|_| "bad \\u escape")?;
                            self.i += 4;
                            out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                        }
                        _ => return Err("bad escape".into()),
                    }
                }
                _ => {
                    // Copy a run of plain bytes (valid UTF-8: the input is a &str).
                    let start = self.i - 1;
                    while self.i < self.s.len() && self.s[self.i] != b'"' && self.s[self.i] != b'\\'
                    {
                        self.i += 1;
                    }
                    out.push_str(
                        std::str::from_utf8(&self.s[start..self.i]).map_err(|_| "not UTF-8")?,
                    );
                }
            }
        }
    }
    fn value(&mut self) -> Result<Value, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b'{') | Some(b'[') => {
                let start = self.i;
                self.skip_nested()?;
                Ok(Value::Json(
                    String::from_utf8_lossy(&self.s[start..self.i]).into_owned(),
                ))
            }
            Some(b't') if self.s[self.i..].starts_with(b"true") => {
                self.i += 4;
                Ok(Value::Bool(true))
            }
            Some(b'f') if self.s[self.i..].starts_with(b"false") => {
                self.i += 5;
                Ok(Value::Bool(false))
            }
            Some(b'n') if self.s[self.i..].starts_with(b"null") => {
                self.i += 4;
                Ok(Value::Null)
            }
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                t.parse::<f64>()
                    .map(Value::Number)
                    .map_err(|_| format!("bad value at byte {start}"))
            }
            None => Err("unexpected end".into()),
        }
    }
    fn skip_nested(&mut self) -> Result<(), String> {
        let mut depth = 0usize;
        while let Some(&c) = self.s.get(self.i) {
            match c {
                b'"' => {
                    self.string()?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        self.i += 1;
                        return Ok(());
                    }
                }
                _ => {}
            }
            self.i += 1;
        }
        Err("unterminated array or object".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_objects() {
        let c = Config::parse(
            r#"{"dir":"/logs","n":3,"on":true,"x":null,"list":[1,"a]"],"o":{"k":"v"}}"#,
        )
        .unwrap();
        assert_eq!(c.require_string("dir").unwrap(), "/logs");
        assert_eq!(c.integer("n").unwrap(), Some(3));
        assert_eq!(c.boolean("on").unwrap(), Some(true));
        assert_eq!(c.string("x").unwrap(), None);
        assert_eq!(c.get("list"), Some(&Value::Json(r#"[1,"a]"]"#.into())));
        assert!(c.integer("dir").unwrap_err().contains("`dir`"));
        assert!(
            c.require_string("missing")
                .unwrap_err()
                .contains("`missing` is required")
        );
    }

    #[test]
    fn refuses_non_objects() {
        assert!(Config::parse("[]").is_err());
        assert!(Config::parse(r#"{"a":1} x"#).is_err());
        assert!(Config::parse(r#"{"a":"#).is_err());
    }
}
