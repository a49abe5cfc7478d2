//! The parts of Python that Hugging Face chat templates lean on and minijinja lacks:
//! methods on strings (`.strip()`, `.startswith()`, `.split()`, ...) and dicts (`.items()`,
//! `.get()`), `tojson` as `json.dumps(ensure_ascii=False)` writes it, and `strftime_now`.
//! (minijinja-contrib has a `pycompat` module; this is the subset templates use, without a
//! new dependency.)

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind, State};

type R<T> = Result<T, Error>;

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// Positional arguments, and keyword arguments if the call had any.
fn split_args(args: &[Value]) -> (Vec<Value>, Option<Kwargs>) {
    match args.split_last() {
        Some((last, rest)) if last.is_kwargs() => {
            (rest.to_vec(), Kwargs::try_from(last.clone()).ok())
        }
        _ => (args.to_vec(), None),
    }
}

/// Argument `i` by position, or by `name` as a keyword.
fn arg(pos: &[Value], kw: &Option<Kwargs>, i: usize, name: &str) -> R<Option<Value>> {
    if let Some(v) = pos.get(i) {
        return Ok(Some(v.clone()));
    }
    match kw {
        Some(k) => k.get::<Option<Value>>(name),
        None => Ok(None),
    }
}

fn opt_str(v: Option<Value>) -> Option<String> {
    v.filter(|v| !v.is_none() && !v.is_undefined()).map(|v| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    })
}

fn opt_int(v: Option<Value>, default: i64) -> R<i64> {
    match v {
        None => Ok(default),
        Some(v) if v.is_none() => Ok(default),
        Some(v) => i64::try_from(v).map_err(|_| bad("expected an integer argument")),
    }
}

/// Python's `str.isspace` set: Unicode White_Space plus the ASCII separators 0x1C..0x1F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn strip<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
    let set = |c: char| match chars {
        Some(cs) => cs.contains(c),
        None => py_space(c),
    };
    let s = if left { s.trim_start_matches(set) } else { s };
    if right {
        s.trim_end_matches(set)
    } else {
        s
    }
}

/// Python `str.split` / `str.rsplit`.
fn split(s: &str, sep: Option<&str>, maxsplit: i64, from_right: bool) -> R<Vec<String>> {
    let max = if maxsplit < 0 {
        usize::MAX
    } else {
        maxsplit as usize
    };
    Ok(match sep {
        Some("") => return Err(bad("empty separator")),
        Some(sep) => {
            if from_right {
                let mut v: Vec<String> = s
                    .rsplitn(max.saturating_add(1), sep)
                    .map(str::to_string)
                    .collect();
                v.reverse();
                v
            } else {
                s.splitn(max.saturating_add(1), sep)
                    .map(str::to_string)
                    .collect()
            }
        }
        None => {
            // runs of whitespace separate; no empty strings; the remainder keeps its spaces
            // except those next to the split point
            let mut out = Vec::new();
            if from_right {
                let mut rest = strip(s, None, false, true);
                while !rest.is_empty() {
                    if out.len() == max {
                        out.push(strip(rest, None, false, true).to_string());
                        break;
                    }
                    match rest.rfind(py_space) {
                        Some(i) => {
                            let w = &rest[i..];
                            let c = w.chars().next().map_or(1, char::len_utf8);
                            out.push(w[c..].to_string());
                            rest = strip(&rest[..i], None, false, true);
                        }
                        None => {
                            out.push(rest.to_string());
                            break;
                        }
                    }
                }
                out.reverse();
            } else {
                let mut rest = strip(s, None, true, false);
                while !rest.is_empty() {
                    if out.len() == max {
                        out.push(strip(rest, None, true, false).to_string());
                        break;
                    }
                    match rest.find(py_space) {
                        Some(i) => {
                            out.push(rest[..i].to_string());
                            rest = strip(&rest[i..], None, true, false);
                        }
                        None => {
                            out.push(rest.to_string());
                            break;
                        }
                    }
                }
            }
            out
        }
    })
}

fn title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_cased = false;
    for c in s.chars() {
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = c.is_alphabetic();
    }
    out
}

fn capitalize(s: &str) -> String {
    let mut cs = s.chars();
    match cs.next() {
        None => String::new(),
        Some(f) => f
            .to_uppercase()
            .chain(cs.flat_map(char::to_lowercase))
            .collect(),
    }
}

/// Characters (not bytes) before byte offset `i`: Python indexes strings by code point.
fn char_index(s: &str, i: usize) -> i64 {
    s[..i].chars().count() as i64
}

fn prefixes(v: &Value) -> R<Vec<String>> {
    match v.kind() {
        ValueKind::String => Ok(vec![v.as_str().unwrap_or_default().to_string()]),
        ValueKind::Seq => v
            .try_iter()?
            .map(|x| Ok(x.as_str().unwrap_or_default().to_string()))
            .collect(),
        _ => Err(bad(
            "startswith/endswith take a string or a tuple of strings",
        )),
    }
}

fn string_method(s: &str, name: &str, args: &[Value]) -> R<Option<Value>> {
    let (pos, kw) = split_args(args);
    let a = |i, n| arg(&pos, &kw, i, n);
    let all = |f: fn(char) -> bool| !s.is_empty() && s.chars().all(f);
    Ok(Some(match name {
        "strip" => Value::from(strip(s, opt_str(a(0, "chars")?).as_deref(), true, true)),
        "lstrip" => Value::from(strip(s, opt_str(a(0, "chars")?).as_deref(), true, false)),
        "rstrip" => Value::from(strip(s, opt_str(a(0, "chars")?).as_deref(), false, true)),
        "startswith" | "endswith" => {
            let p = prefixes(
                &a(0, "prefix")?.ok_or_else(|| bad(format!("{name} needs an argument")))?,
            )?;
            Value::from(p.iter().any(|p| {
                if name == "startswith" {
                    s.starts_with(p.as_str())
                } else {
                    s.ends_with(p.as_str())
                }
            }))
        }
        "split" | "rsplit" => {
            let sep = opt_str(a(0, "sep")?);
            let max = opt_int(a(1, "maxsplit")?, -1)?;
            Value::from(split(s, sep.as_deref(), max, name == "rsplit")?)
        }
        "splitlines" => Value::from(s.lines().map(str::to_string).collect::<Vec<_>>()),
        "replace" => {
            let old = opt_str(a(0, "old")?).ok_or_else(|| bad("replace needs two arguments"))?;
            let new = opt_str(a(1, "new")?).ok_or_else(|| bad("replace needs two arguments"))?;
            let count = opt_int(a(2, "count")?, -1)?;
            if count < 0 {
                Value::from(s.replace(&old, &new))
            } else {
                Value::from(s.replacen(&old, &new, count as usize))
            }
        }
        "lower" => Value::from(s.to_lowercase()),
        "upper" => Value::from(s.to_uppercase()),
        "title" => Value::from(title(s)),
        "capitalize" => Value::from(capitalize(s)),
        "count" => {
            let sub = opt_str(a(0, "sub")?).ok_or_else(|| bad("count needs an argument"))?;
            let n = if sub.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(sub.as_str()).count()
            };
            Value::from(n as i64)
        }
        "find" | "rfind" | "index" | "rindex" => {
            let sub =
                opt_str(a(0, "sub")?).ok_or_else(|| bad(format!("{name} needs an argument")))?;
            let at = if name.starts_with('r') {
                s.rfind(sub.as_str())
            } else {
                s.find(sub.as_str())
            };
            match at {
                Some(i) => Value::from(char_index(s, i)),
                None if name.ends_with("find") => Value::from(-1),
                None => return Err(bad("substring not found")),
            }
        }
        "removeprefix" => {
            let p = opt_str(a(0, "prefix")?).unwrap_or_default();
            Value::from(s.strip_prefix(p.as_str()).unwrap_or(s))
        }
        "removesuffix" => {
            let p = opt_str(a(0, "suffix")?).unwrap_or_default();
            Value::from(s.strip_suffix(p.as_str()).unwrap_or(s))
        }
        "join" => {
            let items = a(0, "iterable")?.ok_or_else(|| bad("join needs an argument"))?;
            let parts: Vec<String> = items
                .try_iter()?
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x.to_string())
                })
                .collect();
            Value::from(parts.join(s))
        }
        "isdigit" => Value::from(all(|c| c.is_numeric())),
        "isalpha" => Value::from(all(char::is_alphabetic)),
        "isalnum" => Value::from(all(char::is_alphanumeric)),
        "isspace" => Value::from(all(py_space)),
        "islower" => {
            Value::from(s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase))
        }
        "isupper" => {
            Value::from(s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase))
        }
        _ => return Ok(None),
    }))
}

fn map_method(v: &Value, name: &str, args: &[Value]) -> R<Option<Value>> {
    let (pos, kw) = split_args(args);
    Ok(Some(match name {
        "items" => {
            let mut out = Vec::new();
            for k in v.try_iter()? {
                let val = v.get_item(&k)?;
                out.push(Value::from(vec![k, val]));
            }
            Value::from(out)
        }
        "keys" => Value::from(v.try_iter()?.collect::<Vec<_>>()),
        "values" => {
            let mut out = Vec::new();
            for k in v.try_iter()? {
                out.push(v.get_item(&k)?);
            }
            Value::from(out)
        }
        "get" => {
            let key = arg(&pos, &kw, 0, "key")?.ok_or_else(|| bad("get needs a key"))?;
            let default = arg(&pos, &kw, 1, "default")?.unwrap_or(Value::from(()));
            match v.get_item(&key) {
                Ok(x) if !x.is_undefined() => x,
                _ => default,
            }
        }
        _ => return Ok(None),
    }))
}

/// The environment's unknown-method callback.
pub(crate) fn call_method(_: &State, v: &Value, name: &str, args: &[Value]) -> R<Value> {
    let found = match v.kind() {
        ValueKind::String => string_method(v.as_str().unwrap_or_default(), name, args)?,
        ValueKind::Map => map_method(v, name, args)?,
        _ => None,
    };
    found.ok_or_else(|| {
        Error::new(
            ErrorKind::UnknownMethod,
            format!("{} has no method named {name}", v.kind()),
        )
    })
}

fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn newline(out: &mut String, style: &JsonStyle, level: usize) {
    if let Some(n) = style.indent {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', n * level));
    }
}

fn json_value(v: &Value, style: &JsonStyle, level: usize, out: &mut String) -> R<()> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else if let Ok(f) = f64::try_from(v.clone()) {
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&f.to_string());
                }
            } else {
                out.push_str(&v.to_string());
            }
        }
        ValueKind::String => json_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, level + 1);
                json_value(x, style, level + 1, out)?;
            }
            newline(out, style, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, level + 1);
                json_string(
                    &k.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| k.to_string()),
                    out,
                );
                out.push_str(&style.key_sep);
                json_value(&v.get_item(k)?, style, level + 1, out)?;
            }
            newline(out, style, level);
            out.push('}');
        }
        _ => json_string(&v.to_string(), out),
    }
    Ok(())
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
pub(crate) fn tojson(v: &Value, indent: Option<Value>, kwargs: Kwargs) -> R<Value> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(i) if i.is_none() => None,
        Some(i) => Some(usize::try_from(i).map_err(|_| bad("tojson: indent must be an integer"))?),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(bad("tojson: separators must be a pair")),
        None => (
            (if indent.is_some() { "," } else { ", " }).to_string(),
            ": ".to_string(),
        ),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let _ = kwargs.get::<Option<bool>>("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    json_value(v, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) to days since 1970-01-01 (Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `strftime_now(format)`: the current UTC time with the common `strftime` fields (%Y %y %m
/// %d %e %B %b %A %a %H %I %M %S %p %j %%). transformers uses local time; a device
/// library has no dependable time zone, so this is UTC.
pub(crate) fn strftime_now(format: String) -> R<String> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(strftime(&format, secs))
}

pub(crate) fn strftime(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut it = format.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}
