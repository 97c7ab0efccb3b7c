//! Just enough SVG: a canvas that appends escaped elements to a string.
//! Charts have a few hundred points at most, so no drawing library is
//! needed, and the output is plain text that diffs and renders anywhere.

use std::fmt::Write as _;

/// Escapes text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Where a text's `x` is: its start, middle or end.
#[derive(Debug, Clone, Copy)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

impl Anchor {
    fn as_str(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

/// An SVG document being written.
pub struct Canvas {
    out: String,
}

impl Canvas {
    pub fn new(width: u32, height: u32) -> Self {
        let mut out = String::new();
        let _ = writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            out,
            r#"<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>"#
        );
        Self { out }
    }

    pub fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &str, dash: bool) {
        let dash = if dash {
            r#" stroke-dasharray="4 3""#
        } else {
            ""
        };
        let _ = writeln!(
            self.out,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{}" stroke-width="1"{dash}/>"#,
            escape(stroke)
        );
    }

    /// Text at `(x, y)`; `rotate` turns it by degrees around that point.
    pub fn text(
        &mut self,
        (x, y): (f64, f64),
        anchor: Anchor,
        text: &str,
        bold: bool,
        rotate: f64,
    ) {
        let weight = if bold { r#" font-weight="bold""# } else { "" };
        let transform = if rotate != 0.0 {
            format!(r#" transform="rotate({rotate} {x:.1} {y:.1})""#)
        } else {
            String::new()
        };
        let _ = writeln!(
            self.out,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{}"{weight}{transform}>{}</text>"#,
            anchor.as_str(),
            escape(text)
        );
    }

    /// A polyline through `points` (pixels).
    pub fn polyline(&mut self, points: &[(f64, f64)], stroke: &str) {
        let mut pts = String::new();
        for (i, (x, y)) in points.iter().enumerate() {
            if i > 0 {
                pts.push(' ');
            }
            let _ = write!(pts, "{x:.1},{y:.1}");
        }
        let _ = writeln!(
            self.out,
            r#"<polyline points="{pts}" fill="none" stroke="{}" stroke-width="1.8" stroke-linejoin="round"/>"#,
            escape(stroke)
        );
    }

    pub fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

/// A small well-formedness check for tests: every tag closes in order,
/// attributes are quoted, text has no raw `<` or stray `&`, one root.
#[cfg(test)]
pub fn check_well_formed(doc: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = doc;
    while let Some(lt) = rest.find('<') {
        check_text(&rest[..lt])?;
        rest = &rest[lt..];
        if let Some(body) = rest.strip_prefix("<?") {
            let end = body.find("?>").ok_or("unterminated <?")?;
            rest = &body[end + 2..];
            continue;
        }
        if let Some(body) = rest.strip_prefix("<!--") {
            let end = body.find("-->").ok_or("unterminated comment")?;
            rest = &body[end + 3..];
            continue;
        }
        let gt = rest.find('>').ok_or("unterminated tag")?;
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            match stack.pop() {
                Some(open) if open == name.trim() => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
            continue;
        }
        let (tag, self_closing) = match tag.strip_suffix('/') {
            Some(t) => (t, true),
            None => (tag, false),
        };
        let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
        let name = &tag[..name_end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("bad tag name in <{tag}>"));
        }
        check_attributes(&tag[name_end..])?;
        if stack.is_empty() {
            roots += 1;
        }
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    check_text(rest)?;
    match (stack.is_empty(), roots) {
        (true, 1) => Ok(()),
        (false, _) => Err(format!("unclosed: {stack:?}")),
        (_, n) => Err(format!("{n} root elements")),
    }
}

#[cfg(test)]
fn check_attributes(mut attrs: &str) -> Result<(), String> {
    loop {
        attrs = attrs.trim_start();
        if attrs.is_empty() {
            return Ok(());
        }
        let eq = attrs
            .find('=')
            .ok_or(format!("attribute without value: {attrs}"))?;
        let name = &attrs[..eq];
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':')
        {
            return Err(format!("bad attribute name {name:?}"));
        }
        let value = attrs[eq + 1..]
            .strip_prefix('"')
            .ok_or(format!("unquoted attribute {name}"))?;
        let end = value
            .find('"')
            .ok_or(format!("unterminated attribute {name}"))?;
        check_text(&value[..end])?;
        attrs = &value[end + 1..];
    }
}

#[cfg(test)]
fn check_text(text: &str) -> Result<(), String> {
    if text.contains('<') {
        return Err(format!("raw < in {text:?}"));
    }
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        let entity = &rest[amp..];
        let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
            .iter()
            .any(|e| entity.starts_with(e));
        if !ok {
            return Err(format!("stray & in {text:?}"));
        }
        rest = &rest[amp + 1..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        let mut c = Canvas::new(10, 10);
        c.text((1.0, 2.0), Anchor::Middle, r#"a < b & "c""#, true, -90.0);
        let doc = c.finish();
        assert!(doc.contains("a &lt; b &amp; &quot;c&quot;"), "{doc}");
        check_well_formed(&doc).expect("well formed");
    }

    #[test]
    fn the_checker_rejects_broken_documents() {
        assert!(check_well_formed("<svg><g></svg>").is_err());
        assert!(check_well_formed("<svg a=1/>").is_err());
        assert!(check_well_formed("<svg>a & b</svg>").is_err());
        assert!(check_well_formed("<svg/><svg/>").is_err());
        assert!(check_well_formed("<svg><g/></svg").is_err());
        assert!(check_well_formed(r#"<?xml version="1.0"?><svg a="1"><g/></svg>"#).is_ok());
    }
}
