//! The `tojson` filter as transformers defines it for chat templates: Python's `json.dumps`
//! with `ensure_ascii=False`, so `", "` and `": "` between items, non-ASCII text as is, and keys
//! in their given order. minijinja's own `tojson` writes compact, HTML-escaped JSON, which
//! would show a model tool schemas in a form it never saw in training.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// `value | tojson`, `tojson(4)`, `tojson(indent=4)`; `sort_keys=true` as in Python.
pub fn filter(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<String, Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
        None => None,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    // ensure_ascii=True would escape what the template author chose to show as is.
    if kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson(ensure_ascii=true) is not supported",
        ));
    }
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_value(&mut out, value, &Layout { indent, sort_keys }, 0)?;
    Ok(out)
}

struct Layout {
    indent: Option<usize>,
    sort_keys: bool,
}

impl Layout {
    /// What goes between two items, and before the first / after the last at `depth`.
    fn break_at(&self, out: &mut String, depth: usize) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }

    fn item_separator(&self) -> &'static str {
        if self.indent.is_some() {
            ","
        } else {
            ", "
        }
    }
}

fn write_value(out: &mut String, value: &Value, layout: &Layout, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value)?,
        ValueKind::String => write_string(out, value.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if layout.sort_keys {
                keys.sort();
            }
            let items = keys.into_iter().map(|k| {
                let v = value.get_item(&k);
                (k, v)
            });
            write_container(out, ('{', '}'), items, layout, depth, |out, (k, v), depth| {
                write_string(out, &k.to_string());
                out.push_str(": ");
                write_value(out, &v?, layout, depth)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, ('[', ']'), items.into_iter(), layout, depth, |out, v, depth| {
                write_value(out, &v, layout, depth)
            })?;
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {other} cannot be written as JSON"),
            ))
        }
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: impl Iterator<Item = T>,
    layout: &Layout,
    depth: usize,
    mut write_item: impl FnMut(&mut String, T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    let mut empty = true;
    for item in items {
        if !empty {
            out.push_str(layout.item_separator());
        }
        empty = false;
        layout.break_at(out, depth + 1);
        write_item(out, item, depth + 1)?;
    }
    if !empty {
        layout.break_at(out, depth);
    }
    out.push(close);
    Ok(())
}

/// Integers as they are; floats as Python's `repr` writes them (`1.0`, `1e-05`, `1e+16`).
fn write_number(out: &mut String, value: &Value) -> Result<(), Error> {
    if let Ok(i) = i128::try_from(value.clone()) {
        if value.is_integer() {
            out.push_str(&i.to_string());
            return Ok(());
        }
    }
    let f = f64::try_from(value.clone())?;
    if !f.is_finite() {
        // json.dumps writes NaN and Infinity, which are not JSON; no request can hold them.
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: not a finite number"));
    }
    out.push_str(&python_float(f));
    Ok(())
}

/// Rust's `{:?}` picks the same shortest digits and the same switch to exponents as Python's
/// repr; only the exponent is written differently (`1e-5` against `1e-05`).
fn python_float(f: f64) -> String {
    let debug = format!("{f:?}");
    match debug.split_once('e') {
        None => debug,
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, json: &str) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", filter);
        let value: Value = serde_json::from_str(json).expect("json");
        env.render_str(template, minijinja::context! { v => value })
            .expect("render")
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes_with_keys_in_their_order() {
        // Each expected text is json.dumps(v, ensure_ascii=False) of the same value in Python.
        let json = r#"{"type": "function", "b": [1, 2.5, 1e-5, 1e16, 100.0], "a": {"é": "x\n\"y\""}, "n": null, "t": true, "e": [], "o": {}}"#;
        assert_eq!(
            render("{{ v | tojson }}", json),
            r#"{"type": "function", "b": [1, 2.5, 1e-05, 1e+16, 100.0], "a": {"é": "x\n\"y\""}, "n": null, "t": true, "e": [], "o": {}}"#
        );
    }

    #[test]
    fn tojson_indents_as_python_does_and_sorts_keys_when_asked() {
        let json = r#"{"z": [1, {"k": "v"}], "a": {}}"#;
        let expected =
            "{\n    \"z\": [\n        1,\n        {\n            \"k\": \"v\"\n        }\n    ],\n    \"a\": {}\n}";
        assert_eq!(render("{{ v | tojson(indent=4) }}", json), expected);
        assert_eq!(render("{{ v | tojson(4) }}", json), expected);
        assert_eq!(
            render("{{ v | tojson(sort_keys=true) }}", json),
            r#"{"a": {}, "z": [1, {"k": "v"}]}"#
        );
    }
}
