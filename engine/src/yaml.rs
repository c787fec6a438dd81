//! The YAML reader: turns a file (a merge config, a storage config) into a
//! tree of `Node`s that remember where they were written, resolving plain
//! scalars the way PyYAML (YAML 1.1) does, because mergekit users wrote their
//! files for PyYAML. It knows nothing of what the file means.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in the YAML source (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Span {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.col)
    }
}

/// A file that is not the YAML this reader takes (syntax, duplicate keys,
/// several documents, unsupported tags), with the key path the reader was at
/// and the position.
///
/// Shown as `FILE: KEY_PATH (line L, column C): MESSAGE`, like a config error.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{file}{}{}: {message}",
    if key_path.is_empty() { String::new() } else { format!(": {key_path}") },
    span.map(|s| format!(" ({s})")).unwrap_or_default()
)]
pub struct YamlError {
    /// The file as the user named it.
    pub file: String,
    /// Dotted path of the key being read, e.g. `models[1].parameters`.
    pub key_path: String,
    pub span: Option<Span>,
    pub message: String,
}

/// One YAML node with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub span: Span,
}

/// The value of a node. Mappings keep their keys in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// Reads one YAML document. `file` is only used in error messages.
    pub fn parse(file: &str, source: &str) -> Result<Node, YamlError> {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(source);
        // `multi` so that a second document is seen (and rejected) instead of ignored.
        let scanned = parser.load(&mut builder, true);
        if let Some((key_path, span, message)) = builder.error {
            return Err(error(file, key_path, Some(span), message));
        }
        if let Err(e) = scanned {
            let span = marker_span(e.marker());
            let message = format!("YAML syntax error: {}", e.info());
            return Err(error(file, builder.path(), Some(span), message));
        }
        // A file with no document at all (empty or only comments) reads as null, like PyYAML.
        Ok(builder.root.unwrap_or(Node {
            kind: NodeKind::Null,
            span: Span { line: 1, col: 1 },
        }))
    }

    /// The string of a `Str` node.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The entries of a `Map` node.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            NodeKind::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The items of a `Seq` node.
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.kind {
            NodeKind::Seq(items) => Some(items),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.kind, NodeKind::Null)
    }

    /// What this node is, for messages like "expected a string, got a list".
    pub fn describe(&self) -> String {
        match &self.kind {
            NodeKind::Null => "nothing (null)".to_string(),
            NodeKind::Bool(b) => format!("the boolean {b}"),
            NodeKind::Int(i) => format!("the number {i}"),
            NodeKind::Float(f) => format!("the number {f}"),
            NodeKind::Str(s) => format!("the string '{s}'"),
            NodeKind::Seq(_) => "a list".to_string(),
            NodeKind::Map(_) => "a mapping".to_string(),
        }
    }
}

fn error(file: &str, key_path: String, span: Option<Span>, message: String) -> YamlError {
    YamlError {
        file: file.to_string(),
        key_path,
        span,
        message,
    }
}

/// yaml-rust2 counts lines from 1 but columns from 0.
fn marker_span(m: &Marker) -> Span {
    Span {
        line: m.line(),
        col: m.col() + 1,
    }
}

/// A collection still being read.
#[derive(Debug)]
enum Frame {
    Seq {
        items: Vec<Node>,
        span: Span,
        anchor: usize,
    },
    Map {
        entries: Vec<(Node, Node)>,
        /// The key read, waiting for its value.
        key: Option<Node>,
        /// Whether `key` is the merge key `<<` (its value is merged, not stored).
        merging: bool,
        /// Values of `<<` keys, in order.
        merges: Vec<Node>,
        span: Span,
        anchor: usize,
    },
}

/// Receives parser events and assembles the node tree. Event callbacks cannot
/// fail, so the first problem is stored and everything after it ignored.
#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    documents: usize,
    /// Nodes copied by aliases so far (see `MAX_ALIAS_NODES`).
    alias_nodes: usize,
    error: Option<(String, Span, String)>,
}

/// Aliases copy nodes, so a few lines of nested aliases can expand to billions
/// of nodes ("billion laughs"); no real merge config comes near this.
const MAX_ALIAS_NODES: usize = 100_000;

/// Number of nodes in `node`, counting no further than `limit`.
fn count_nodes(node: &Node, limit: usize) -> usize {
    let mut count = 1;
    let mut pending: Vec<&Node> = vec![node];
    while let Some(n) = pending.pop() {
        if count > limit {
            break;
        }
        match &n.kind {
            NodeKind::Seq(items) => {
                count += items.len();
                pending.extend(items);
            }
            NodeKind::Map(entries) => {
                count += 2 * entries.len();
                pending.extend(entries.iter().flat_map(|(k, v)| [k, v]));
            }
            _ => {}
        }
    }
    count
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let span = marker_span(&mark);
        if let Err(message) = self.handle(ev, span) {
            self.error = Some((self.path(), span, message));
        }
    }
}

impl Builder {
    fn handle(&mut self, ev: Event, span: Span) -> Result<(), String> {
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(
                        "a second YAML document (`---`) starts here; a merge config \
                                must be a single document"
                            .to_string(),
                    );
                }
                Ok(())
            }
            Event::Scalar(value, style, anchor, tag) => {
                let merge_key = style == TScalarStyle::Plain && value == "<<" && tag.is_none();
                let kind = scalar_kind(&value, style, tag.as_ref())?;
                let span = if value.is_empty() && style == TScalarStyle::Plain {
                    self.empty_value_span(span)
                } else {
                    span
                };
                let node = Node { kind, span };
                self.remember(anchor, &node);
                self.push(node, merge_key)
            }
            Event::Alias(id) => {
                let Some(anchored) = self.anchors.get(&id) else {
                    return Err("this alias refers to a node that contains it".to_string());
                };
                self.alias_nodes += count_nodes(anchored, MAX_ALIAS_NODES);
                if self.alias_nodes > MAX_ALIAS_NODES {
                    return Err(format!(
                        "aliases expand to more than {MAX_ALIAS_NODES} nodes; write the values out"
                    ));
                }
                let node = Node {
                    kind: anchored.kind.clone(),
                    span,
                };
                self.push(node, false)
            }
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "seq")?;
                self.stack.push(Frame::Seq {
                    items: Vec::new(),
                    span,
                    anchor,
                });
                Ok(())
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "map")?;
                self.stack.push(Frame::Map {
                    entries: Vec::new(),
                    key: None,
                    merging: false,
                    merges: Vec::new(),
                    span,
                    anchor,
                });
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => self.close(),
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => Ok(()),
        }
    }

    /// The parser places an empty value (`weight:` with nothing after it) at
    /// the next token, often on a later line; its key's position is more useful.
    fn empty_value_span(&self, span: Span) -> Span {
        match self.stack.last() {
            Some(Frame::Map { key: Some(k), .. }) => k.span,
            _ => span,
        }
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
    }

    /// Finishes the innermost collection and hands it to its parent.
    fn close(&mut self) -> Result<(), String> {
        let node = match self.stack.pop() {
            Some(Frame::Seq {
                items,
                span,
                anchor,
            }) => {
                let node = Node {
                    kind: NodeKind::Seq(items),
                    span,
                };
                self.remember(anchor, &node);
                node
            }
            Some(Frame::Map {
                entries,
                merges,
                span,
                anchor,
                ..
            }) => {
                // A block mapping's start event is marked after its first key;
                // the mapping starts where that key does.
                let span = match entries.first() {
                    Some((k, _)) if (k.span.line, k.span.col) < (span.line, span.col) => k.span,
                    _ => span,
                };
                let entries = apply_merges(entries, merges)?;
                let node = Node {
                    kind: NodeKind::Map(entries),
                    span,
                };
                self.remember(anchor, &node);
                node
            }
            // The parser never ends a collection it did not start.
            None => return Ok(()),
        };
        self.push(node, false)
    }

    /// Places a finished node in the collection being read (or as the document).
    fn push(&mut self, node: Node, merge_key: bool) -> Result<(), String> {
        match self.stack.last_mut() {
            None => {
                self.root = Some(node);
                Ok(())
            }
            Some(Frame::Seq { items, .. }) => {
                items.push(node);
                Ok(())
            }
            Some(Frame::Map {
                entries,
                key,
                merging,
                merges,
                ..
            }) => match key.take() {
                None => {
                    if !merge_key {
                        check_duplicate(entries, &node)?;
                    }
                    *merging = merge_key;
                    *key = Some(node);
                    Ok(())
                }
                Some(_) if *merging => {
                    merges.push(node);
                    Ok(())
                }
                Some(k) => {
                    entries.push((k, node));
                    Ok(())
                }
            },
        }
    }

    /// The dotted key path of the place being read, e.g. `models[1].parameters`.
    fn path(&self) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Seq { items, .. } => path.push_str(&format!("[{}]", items.len())),
                Frame::Map { key: Some(k), .. } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&key_text(k));
                }
                Frame::Map { key: None, .. } => {}
            }
        }
        path
    }
}

/// How a key is shown in a key path or message.
pub(crate) fn key_text(key: &Node) -> String {
    match &key.kind {
        NodeKind::Str(s) => s.clone(),
        NodeKind::Null => "null".to_string(),
        NodeKind::Bool(b) => b.to_string(),
        NodeKind::Int(i) => i.to_string(),
        NodeKind::Float(f) => f.to_string(),
        NodeKind::Seq(_) | NodeKind::Map(_) => "<complex key>".to_string(),
    }
}

/// PyYAML silently keeps the last of two equal keys; a repeated key in a merge
/// config is almost always a mistake, so it is an error here.
fn check_duplicate(entries: &[(Node, Node)], key: &Node) -> Result<(), String> {
    if matches!(key.kind, NodeKind::Seq(_) | NodeKind::Map(_)) {
        return Ok(());
    }
    match entries.iter().find(|(k, _)| k.kind == key.kind) {
        Some((first, _)) => Err(format!(
            "duplicate key '{}' (first on line {}, again on line {})",
            key_text(key),
            first.span.line,
            key.span.line
        )),
        None => Ok(()),
    }
}

/// Resolves `<<` merge keys like PyYAML: keys written in the mapping win over
/// merged ones, and among several merged mappings the first one listed wins.
fn apply_merges(
    explicit: Vec<(Node, Node)>,
    merges: Vec<Node>,
) -> Result<Vec<(Node, Node)>, String> {
    if merges.is_empty() {
        return Ok(explicit);
    }
    let mut sources: Vec<Vec<(Node, Node)>> = Vec::new();
    for value in merges {
        match value.kind {
            NodeKind::Map(entries) => sources.push(entries),
            NodeKind::Seq(items) => {
                // PyYAML applies the list back to front, so the first mapping wins.
                let mut maps = Vec::new();
                for item in items {
                    match item.kind {
                        NodeKind::Map(entries) => maps.push(entries),
                        _ => return Err(merge_value_error()),
                    }
                }
                sources.extend(maps.into_iter().rev());
            }
            _ => return Err(merge_value_error()),
        }
    }
    let mut merged: Vec<(Node, Node)> = Vec::new();
    for (k, v) in sources.into_iter().flatten().chain(explicit) {
        match merged.iter_mut().find(|(mk, _)| mk.kind == k.kind) {
            Some(slot) => slot.1 = v,
            None => merged.push((k, v)),
        }
    }
    Ok(merged)
}

fn merge_value_error() -> String {
    "the merge key `<<` needs a mapping (or a list of mappings) as its value".to_string()
}

const CORE_TAG: &str = "tag:yaml.org,2002:";

fn tag_text(tag: &Tag) -> String {
    match tag.handle.as_str() {
        CORE_TAG => format!("!!{}", tag.suffix),
        handle => format!("{handle}{}", tag.suffix),
    }
}

fn check_collection_tag(tag: Option<&Tag>, expected: &str) -> Result<(), String> {
    match tag {
        None => Ok(()),
        Some(t) if t.handle == CORE_TAG && t.suffix == expected => Ok(()),
        Some(t) => Err(format!(
            "the YAML tag `{}` is not supported here",
            tag_text(t)
        )),
    }
}

/// The value of a scalar: quoted and block scalars are strings, plain ones are
/// resolved like PyYAML; an explicit core tag (`!!str`, `!!float`, ...) wins.
fn scalar_kind(value: &str, style: TScalarStyle, tag: Option<&Tag>) -> Result<NodeKind, String> {
    match tag {
        Some(t) => tagged_scalar(value, t),
        None if style == TScalarStyle::Plain => Ok(resolve_plain(value)),
        None => Ok(NodeKind::Str(value.to_string())),
    }
}

fn tagged_scalar(value: &str, tag: &Tag) -> Result<NodeKind, String> {
    let bad = || format!("'{value}' cannot be read as {}", tag_text(tag));
    if tag.handle != CORE_TAG {
        return Err(format!("the YAML tag `{}` is not supported", tag_text(tag)));
    }
    match tag.suffix.as_str() {
        "str" => Ok(NodeKind::Str(value.to_string())),
        "null" => Ok(NodeKind::Null),
        "bool" => resolve_bool(value).map(NodeKind::Bool).ok_or_else(bad),
        "int" => resolve_int(value).ok_or_else(bad),
        "float" => match resolve_float(value).or_else(|| resolve_int(value)) {
            Some(NodeKind::Int(i)) => Ok(NodeKind::Float(i as f64)),
            Some(kind) => Ok(kind),
            None => Err(bad()),
        },
        _ => Err(format!("the YAML tag `{}` is not supported", tag_text(tag))),
    }
}

/// PyYAML's implicit resolvers (YAML 1.1) for an unquoted scalar.
pub(crate) fn resolve_plain(value: &str) -> NodeKind {
    if matches!(value, "" | "~" | "null" | "Null" | "NULL") {
        return NodeKind::Null;
    }
    if let Some(b) = resolve_bool(value) {
        return NodeKind::Bool(b);
    }
    resolve_int(value)
        .or_else(|| resolve_float(value))
        .unwrap_or_else(|| NodeKind::Str(value.to_string()))
}

fn resolve_bool(value: &str) -> Option<bool> {
    match value {
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => Some(true),
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// Splits an optional leading sign; returns (negative, rest).
fn split_sign(value: &str) -> (bool, &str) {
    match value.as_bytes().first() {
        Some(b'-') => (true, &value[1..]),
        Some(b'+') => (false, &value[1..]),
        _ => (false, value),
    }
}

fn all_chars(s: &str, ok: impl Fn(char) -> bool) -> bool {
    s.chars().all(ok)
}

/// PyYAML int forms: decimal, `0b`, `0x`, leading-zero octal, and sexagesimal
/// (`1:30`), each with `_` separators allowed. Values beyond i64 become floats.
fn resolve_int(value: &str) -> Option<NodeKind> {
    let (negative, body) = split_sign(value);
    let magnitude = if let Some(bin) = body.strip_prefix("0b") {
        digits_value(bin, 2)?
    } else if let Some(hex) = body.strip_prefix("0x") {
        digits_value(hex, 16)?
    } else if body == "0" {
        Magnitude::Exact(0)
    } else if let Some(oct) = body.strip_prefix('0') {
        digits_value(oct, 8)?
    } else if body.contains(':') {
        sexagesimal_int(body)?
    } else if body.starts_with(|c: char| c.is_ascii_digit()) {
        digits_value(body, 10)?
    } else {
        return None;
    };
    let sign = if negative { -1.0 } else { 1.0 };
    Some(match magnitude {
        Magnitude::Exact(m) => {
            let signed = if negative { -m } else { m };
            match i64::try_from(signed) {
                Ok(i) => NodeKind::Int(i),
                Err(_) => NodeKind::Float(signed as f64),
            }
        }
        Magnitude::Huge(m) => NodeKind::Float(sign * m),
    })
}

/// Digits (and `_`) in `radix`; at least one real digit, like Python's `int()` after
/// PyYAML strips the underscores.
fn digits_value(digits: &str, radix: u32) -> Option<Magnitude> {
    if digits.is_empty() || !all_chars(digits, |c| c == '_' || c.is_digit(radix)) {
        return None;
    }
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    if clean.is_empty() {
        return None;
    }
    Some(match i128::from_str_radix(&clean, radix) {
        Ok(i) => Magnitude::Exact(i),
        // Beyond i128: its value as a float (infinite for 400 digits), which a
        // setting then refuses as a number f32 cannot hold; never a saturated
        // i128::MAX that looks like a real value.
        Err(_) if radix == 10 => Magnitude::Huge(clean.parse().unwrap_or(f64::INFINITY)),
        Err(_) => Magnitude::Huge(
            clean
                .chars()
                .filter_map(|c| c.to_digit(radix))
                .fold(0.0f64, |acc, d| acc * f64::from(radix) + f64::from(d)),
        ),
    })
}

/// An integer's magnitude: exact, or past i128 as a float.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Magnitude {
    Exact(i128),
    Huge(f64),
}

impl Magnitude {
    fn as_f64(self) -> f64 {
        match self {
            Magnitude::Exact(i) => i as f64,
            Magnitude::Huge(x) => x,
        }
    }
}

/// `[1-9][0-9_]*(:[0-5]?[0-9])+` read in base 60.
fn sexagesimal_int(body: &str) -> Option<Magnitude> {
    let mut parts = body.split(':');
    let head = parts.next()?;
    if !head.starts_with(|c: char| ('1'..='9').contains(&c)) {
        return None;
    }
    let mut total = digits_value(head, 10)?;
    for part in parts {
        let digit = sexagesimal_digit(part)?;
        total = match total {
            Magnitude::Exact(t) => {
                match t.checked_mul(60).and_then(|t| t.checked_add(digit.into())) {
                    Some(t) => Magnitude::Exact(t),
                    None => Magnitude::Huge(t as f64 * 60.0 + f64::from(digit)),
                }
            }
            Magnitude::Huge(t) => Magnitude::Huge(t * 60.0 + f64::from(digit)),
        };
    }
    Some(total)
}

/// One `[0-5]?[0-9]` group.
fn sexagesimal_digit(part: &str) -> Option<u32> {
    let b = part.as_bytes();
    let ok = match b.len() {
        1 => b[0].is_ascii_digit(),
        2 => (b'0'..=b'5').contains(&b[0]) && b[1].is_ascii_digit(),
        _ => false,
    };
    if ok {
        part.parse().ok()
    } else {
        None
    }
}

/// PyYAML float forms: `1.5`, `-2.`, `1.0e-5` (the exponent needs a sign and
/// the mantissa a dot, so `1e-3` stays a string), `.5`, `.inf`, `.nan`, `1:30.5`.
fn resolve_float(value: &str) -> Option<NodeKind> {
    match value {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Some(NodeKind::Float(f64::INFINITY))
        }
        "-.inf" | "-.Inf" | "-.INF" => return Some(NodeKind::Float(f64::NEG_INFINITY)),
        ".nan" | ".NaN" | ".NAN" => return Some(NodeKind::Float(f64::NAN)),
        _ => {}
    }
    let (negative, body) = split_sign(value);
    let magnitude = if let Some(frac) = body.strip_prefix('.') {
        // `.5` takes no sign in PyYAML's pattern, and needs a digit.
        if value.len() != body.len() || !frac.starts_with(|c: char| c.is_ascii_digit() || c == '_')
        {
            return None;
        }
        dotted_float("0", frac)?
    } else {
        let (int_part, rest) = body.split_once('.')?;
        if int_part.contains(':') {
            sexagesimal_float(int_part, rest)?
        } else {
            if !int_part.starts_with(|c: char| c.is_ascii_digit()) {
                return None;
            }
            dotted_float(int_part, rest)?
        }
    };
    Some(NodeKind::Float(if negative {
        -magnitude
    } else {
        magnitude
    }))
}

/// `INT.FRAC[eE][-+]DIGITS`, with `_` allowed in INT and FRAC.
fn dotted_float(int_part: &str, rest: &str) -> Option<f64> {
    let (frac, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let digits_ok = |s: &str| all_chars(s, |c| c == '_' || c.is_ascii_digit());
    if !digits_ok(int_part) || !digits_ok(frac) {
        return None;
    }
    if let Some(e) = exp {
        let (_, e_digits) = split_sign(e);
        let signed = e.starts_with(['-', '+']);
        if !signed || e_digits.is_empty() || !all_chars(e_digits, |c| c.is_ascii_digit()) {
            return None;
        }
    }
    let text: String = format!("{int_part}.{rest}")
        .chars()
        .filter(|&c| c != '_')
        .collect();
    // "." alone (from "._") is not a number for Python either.
    text.parse().ok().filter(|_| text != ".")
}

/// `1:30.5` = 1·60 + 30.5.
fn sexagesimal_float(int_part: &str, frac: &str) -> Option<f64> {
    if !all_chars(frac, |c| c == '_' || c.is_ascii_digit()) {
        return None;
    }
    let (head, last) = int_part.rsplit_once(':')?;
    if !head.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut total = 0f64;
    for part in head.split(':').enumerate() {
        let v = match part {
            (0, p) => digits_value(p, 10)?.as_f64(),
            (_, p) => f64::from(sexagesimal_digit(p)?),
        };
        total = total * 60.0 + v;
    }
    let last_digit = sexagesimal_digit(last)?;
    let frac_clean: String = frac.chars().filter(|&c| c != '_').collect();
    let seconds: f64 = format!("{last_digit}.{frac_clean}").parse().ok()?;
    Some(total * 60.0 + seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Node {
        match Node::parse("t.yaml", src) {
            Ok(n) => n,
            Err(e) => panic!("parse failed: {e}"),
        }
    }

    fn kind(src: &str) -> NodeKind {
        resolve_plain(src)
    }

    #[test]
    fn nulls() {
        for s in ["", "~", "null", "Null", "NULL"] {
            assert_eq!(kind(s), NodeKind::Null, "{s:?}");
        }
        assert_eq!(kind("nULL"), NodeKind::Str("nULL".into()));
    }

    #[test]
    fn pyyaml_booleans() {
        for s in [
            "true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON",
        ] {
            assert_eq!(kind(s), NodeKind::Bool(true), "{s}");
        }
        for s in [
            "false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF",
        ] {
            assert_eq!(kind(s), NodeKind::Bool(false), "{s}");
        }
        // Not booleans in PyYAML: mixed case and the single letters.
        for s in ["tRue", "y", "n", "Y", "yES"] {
            assert_eq!(kind(s), NodeKind::Str(s.into()), "{s}");
        }
    }

    #[test]
    fn integers() {
        assert_eq!(kind("0"), NodeKind::Int(0));
        assert_eq!(kind("42"), NodeKind::Int(42));
        assert_eq!(kind("-7"), NodeKind::Int(-7));
        assert_eq!(kind("+7"), NodeKind::Int(7));
        assert_eq!(kind("1_000"), NodeKind::Int(1000));
        assert_eq!(kind("0x1F"), NodeKind::Int(31));
        assert_eq!(kind("-0x10"), NodeKind::Int(-16));
        assert_eq!(kind("0b101"), NodeKind::Int(5));
        // Leading zero means octal in YAML 1.1.
        assert_eq!(kind("010"), NodeKind::Int(8));
        assert_eq!(kind("1:30"), NodeKind::Int(90));
        assert_eq!(kind("09"), NodeKind::Str("09".into()));
        assert_eq!(kind("99999999999999999999"), NodeKind::Float(1e20));
        // Past i128: the float value (infinite for 400 digits, which settings
        // refuse), never a saturated i128::MAX.
        assert_eq!(kind(&"1".repeat(400)), NodeKind::Float(f64::INFINITY));
        assert_eq!(
            kind(&format!("-{}", "9".repeat(400))),
            NodeKind::Float(f64::NEG_INFINITY)
        );
        assert_eq!(kind(&format!("1{}", "0".repeat(40))), NodeKind::Float(1e40));
        assert_eq!(
            kind(&format!("0x1{}", "0".repeat(32))),
            NodeKind::Float(2f64.powi(128))
        );
    }

    #[test]
    fn floats() {
        assert_eq!(kind("1.5"), NodeKind::Float(1.5));
        assert_eq!(kind("1.0e-5"), NodeKind::Float(1.0e-5));
        assert_eq!(kind("1.0E+2"), NodeKind::Float(100.0));
        assert_eq!(kind(".5"), NodeKind::Float(0.5));
        assert_eq!(kind("-2."), NodeKind::Float(-2.0));
        assert_eq!(kind("1_0.2_5"), NodeKind::Float(10.25));
        assert_eq!(kind(".inf"), NodeKind::Float(f64::INFINITY));
        assert_eq!(kind("-.Inf"), NodeKind::Float(f64::NEG_INFINITY));
        assert_eq!(kind("1:30.5"), NodeKind::Float(90.5));
        assert!(matches!(kind(".nan"), NodeKind::Float(f) if f.is_nan()));
    }

    #[test]
    fn pyyaml_keeps_exponents_without_dot_or_sign_as_strings() {
        // PyYAML's float pattern needs a dot and a signed exponent: these are
        // strings there, and numeric parameters convert them later (pydantic does).
        for s in ["1e-3", "1E5", "1.0e5", "-.5", "abc", "1.2.3", "0.5x", "."] {
            assert_eq!(kind(s), NodeKind::Str(s.into()), "{s}");
        }
    }

    #[test]
    fn quoted_scalars_are_strings() {
        let n = parse("a: '1'\nb: \"true\"\nc: |\n  null\n");
        let map = n.as_map().unwrap_or_default();
        assert_eq!(map[0].1.kind, NodeKind::Str("1".into()));
        assert_eq!(map[1].1.kind, NodeKind::Str("true".into()));
        assert_eq!(map[2].1.kind, NodeKind::Str("null\n".into()));
    }

    #[test]
    fn explicit_tags() {
        let n = parse("a: !!str 1\nb: !!float 2\nc: !!int '3'\n");
        let map = n.as_map().unwrap_or_default();
        assert_eq!(map[0].1.kind, NodeKind::Str("1".into()));
        assert_eq!(map[1].1.kind, NodeKind::Float(2.0));
        assert_eq!(map[2].1.kind, NodeKind::Int(3));
        let err = Node::parse("t.yaml", "a: !foo 1\n").unwrap_err();
        assert!(err.message.contains("!foo"), "{err}");
    }

    #[test]
    fn spans_are_one_based_and_keep_key_order() {
        let src = "# comment\nmerge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n";
        let n = parse(src);
        let map = n.as_map().unwrap_or_default();
        assert_eq!(map[0].0.as_str(), Some("merge_method"));
        assert_eq!(map[0].0.span, Span { line: 2, col: 1 });
        assert_eq!(map[0].1.span, Span { line: 2, col: 15 });
        assert_eq!(map[1].0.as_str(), Some("models"));
        let models = map[1].1.as_seq().unwrap_or_default();
        assert_eq!(models[0].span.line, 4);
        let entry = models[0].as_map().unwrap_or_default();
        assert_eq!(entry[1].0.span, Span { line: 5, col: 5 });
        let params = entry[1].1.as_map().unwrap_or_default();
        assert_eq!(params[0].1.kind, NodeKind::Float(0.5));
        assert_eq!(params[0].1.span.line, 5);
    }

    #[test]
    fn aliases_clone_the_anchored_node() {
        let n = parse("p: &w {weight: 1}\nq: *w\n");
        let map = n.as_map().unwrap_or_default();
        assert_eq!(map[0].1.kind, map[1].1.kind);
        assert_eq!(map[1].1.span.line, 2);
    }

    #[test]
    fn alias_expansion_is_bounded() {
        let mut src = String::from("a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n");
        for i in 1..9 {
            let p = i - 1;
            src.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        let err = Node::parse("t.yaml", &src).unwrap_err();
        assert!(err.message.contains("aliases expand"), "{err}");
    }

    #[test]
    fn merge_keys_like_pyyaml() {
        let n = parse("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\n");
        let map = n.as_map().unwrap_or_default();
        let m = map[1].1.as_map().unwrap_or_default();
        let pairs: Vec<(String, NodeKind)> = m
            .iter()
            .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v.kind.clone()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("x".into(), NodeKind::Int(1)),
                ("y".into(), NodeKind::Int(3))
            ]
        );
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = Node::parse("t.yaml", "a: 1\nb:\n  c: 1\n  c: 2\n").unwrap_err();
        assert!(err.message.contains("duplicate key 'c'"), "{err}");
        assert!(
            err.message.contains("line 3") && err.message.contains("line 4"),
            "{err}"
        );
        assert_eq!(err.key_path, "b");
        assert_eq!(err.span.map(|s| s.line), Some(4));
    }

    #[test]
    fn multiple_documents_are_errors() {
        let err = Node::parse("t.yaml", "a: 1\n---\nb: 2\n").unwrap_err();
        assert!(err.message.contains("single document"), "{err}");
        assert_eq!(err.span.map(|s| s.line), Some(2));
        // One explicit document is fine.
        assert!(Node::parse("t.yaml", "---\na: 1\n").is_ok());
    }

    #[test]
    fn syntax_errors_carry_the_parser_position() {
        let err = Node::parse("t.yaml", "a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.message.starts_with("YAML syntax error"), "{err}");
        assert!(err.span.is_some());
        let err = Node::parse("t.yaml", "a:\n  - x\n - y\n").unwrap_err();
        assert_eq!(err.span.map(|s| s.line), Some(3), "{err}");
        assert!(
            err.to_string()
                .starts_with("t.yaml (line 3, column 2): YAML syntax error"),
            "{err}"
        );
    }

    #[test]
    fn empty_file_is_null() {
        assert_eq!(parse("# nothing\n").kind, NodeKind::Null);
    }
}
