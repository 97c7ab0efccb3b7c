//! Small readers the checks share: YAML trees as JSON values, shell words,
//! paths, globs, durations, URLs. Each does what the tool reading the file
//! (the kubelet, compose, Docker, a shell) does for the inputs found here.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};
use yaml_rust2::Yaml;

/// A YAML node as a JSON value; `<<` merge keys are applied (explicit keys
/// win), as compose and the Kubernetes tools do.
pub fn yaml_to_json(y: Yaml) -> Result<Value, String> {
    Ok(match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("cannot read the number {s}"))?,
        Yaml::Integer(i) => Value::from(i),
        Yaml::String(s) => Value::String(s),
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Null => Value::Null,
        Yaml::Array(items) => Value::Array(
            items
                .into_iter()
                .map(yaml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Hash(hash) => {
            let mut map = Map::new();
            let mut merged = Vec::new();
            for (k, v) in hash {
                let key = match k {
                    Yaml::String(s) | Yaml::Real(s) => s,
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                if key == "<<" {
                    merged.push(yaml_to_json(v)?);
                } else {
                    map.insert(key, yaml_to_json(v)?);
                }
            }
            for m in merged {
                let sources = match m {
                    Value::Array(list) => list,
                    one => vec![one],
                };
                for source in sources {
                    let Value::Object(source) = source else {
                        return Err("a merge key (<<) of something not a mapping".into());
                    };
                    for (k, v) in source {
                        map.entry(k).or_insert(v);
                    }
                }
            }
            Value::Object(map)
        }
        Yaml::Alias(_) => return Err("an alias to an unknown anchor".into()),
        Yaml::BadValue => return Err("a value that is not YAML".into()),
    })
}

/// A scalar as the text a process would see (`str()` of it); "" for null.
pub fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The strings of a list (a command, args), scalars as text.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(scalar).collect())
        .unwrap_or_default()
}

/// POSIX shell words: quotes and backslashes, no expansion (Python's shlex).
pub fn shell_words(s: &str) -> Result<Vec<String>, String> {
    let (mut words, mut word, mut in_word) = (Vec::new(), String::new(), false);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unclosed ' in {s:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(format!("unclosed \" in {s:?}")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(format!("unclosed \" in {s:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    word.push(c);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The value of `--name value` or `--name=value` in `args`.
pub fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    for (i, a) in args.iter().enumerate() {
        if a == name {
            return args.get(i + 1).map(String::as_str);
        }
        if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

/// `path` with `.` and `a/..` folded away, as `os.path.normpath` does.
pub fn normpath(path: &Path) -> PathBuf {
    let mut out: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

/// Calls `f` with every file under `dir`, recursively.
pub fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

/// Shell-style glob of Python's `fnmatch.fnmatchcase`: `*` matches any
/// run of characters, `/` included; `?` one character; `[...]` a class.
pub fn fnmatch(name: &str, pattern: &str) -> bool {
    fn go(n: &[char], p: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(&n[i..], rest)),
            Some(('?', rest)) => !n.is_empty() && go(&n[1..], rest),
            Some(('[', rest)) => match rest.iter().position(|&c| c == ']') {
                Some(end) if !n.is_empty() => {
                    let (class, rest) = (&rest[..end], &rest[end + 1..]);
                    let (negate, class) = match class.split_first() {
                        Some(('!', c)) => (true, c),
                        _ => (false, class),
                    };
                    let mut hit = false;
                    let mut i = 0;
                    while i < class.len() {
                        if i + 2 < class.len() && class[i + 1] == '-' {
                            hit |= (class[i]..=class[i + 2]).contains(&n[0]);
                            i += 3;
                        } else {
                            hit |= class[i] == n[0];
                            i += 1;
                        }
                    }
                    hit != negate && go(&n[1..], rest)
                }
                _ => !n.is_empty() && n[0] == '[' && go(&n[1..], rest),
            },
            Some((c, rest)) => n.first() == Some(c) && go(&n[1..], rest),
        }
    }
    let n: Vec<char> = name.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    go(&n, &p)
}

/// A compose duration (`45s`, `1m30s`, `500ms`) in seconds.
pub fn duration_s(text: &str) -> Result<f64, String> {
    let bad = || format!("cannot read the duration {text:?}");
    let mut rest = text;
    let mut total = 0.0;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let amount: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, scale) = [
            ("ms", 1e-3),
            ("us", 1e-6),
            ("h", 3600.0),
            ("m", 60.0),
            ("s", 1.0),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u))
        .ok_or_else(bad)?;
        total += amount * scale;
        rest = &rest[unit.len()..];
    }
    Ok(total)
}

/// The parts of `scheme://user:password@host:port/path?query`.
#[derive(Debug, Default, PartialEq)]
pub struct Url {
    pub user: Option<String>,
    pub password: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: String,
}

pub fn parse_url(url: &str) -> Result<Url, String> {
    let Some((_, rest)) = url.split_once("://") else {
        return Ok(Url::default());
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((n, p)) => (Some(n.to_string()), Some(p.to_string())),
            None => (Some(u.to_string()), None),
        },
        None => (None, None),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (
            h,
            Some(
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: port {p:?} is not a number"))?,
            ),
        ),
        _ => (hostport, None),
    };
    Ok(Url {
        user,
        password,
        host: (!host.is_empty()).then(|| host.to_ascii_lowercase()),
        port,
        path: path.to_string(),
    })
}

/// Standard base64 (a Secret's `data`), padding optional.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("{:?} is not base64", char::from(c))),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

#[test]
fn readers_do_what_the_tools_do() {
    assert_eq!(
        shell_words(r#"a 'b c' "d \"e\"" f\ g"#).expect("words"),
        ["a", "b c", "d \"e\"", "f g"]
    );
    assert!(fnmatch("a/b.log", "**/*.log"));
    assert!(!fnmatch("engine", "target"));
    assert!(fnmatch("x1", "x[0-9]"));
    assert_eq!(duration_s("1m30s").expect("duration"), 90.0);
    assert_eq!(duration_s("500ms").expect("duration"), 0.5);
    assert!(duration_s("10 s").is_err());
    assert_eq!(
        normpath(Path::new("engine/../tests/x.rs")),
        Path::new("tests/x.rs")
    );
    let u = parse_url("postgres://u:p@Host:5433/db?x=1").expect("url");
    assert_eq!(
        (
            u.user.as_deref(),
            u.password.as_deref(),
            u.host.as_deref(),
            u.port,
            u.path.as_str()
        ),
        (Some("u"), Some("p"), Some("host"), Some(5433), "/db")
    );
    assert_eq!(base64_decode("aGk=").expect("base64"), b"hi");
    let merged =
        yaml_rust2::YamlLoader::load_from_str("x: &a {k: 1, j: 2}\ny:\n  <<: *a\n  k: 3\n")
            .expect("yaml");
    let v = yaml_to_json(merged[0].clone()).expect("json");
    assert_eq!(v["y"], serde_json::json!({"k": 3, "j": 2}));
}
