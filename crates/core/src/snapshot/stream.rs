//! Reading a file as it comes in, so that a dump's memory follows what is kept of it, not its
//! size: a kubectl `List` (YAML or JSON) is read one item at a time and each item dropped once
//! its object is kept. The core opens nothing: the edge hands it a way to open the text.
//!
//! Only the layouts kubectl writes are streamed: a JSON object, or one YAML document whose
//! top-level `items:` is a sequence in column 0. Anything else is read into memory as it comes
//! and then read whole, as [`Loader::add_bytes`] reads it; a text that stops fitting the
//! layout after some of it was read (a second document, an item the fast reader leaves to
//! serde-saphyr, bytes that are not UTF-8) is opened again and read whole, so every text
//! means what it means when read whole.

use std::io::{self, BufRead, BufReader, Read};

use serde_json::Value;
use serde_json::value::RawValue;

use super::tape::{Node, Tape};
use super::{Batch, ItemsShape, JsonItems, JsonRoot, Loader, list_kind, yaml};

/// How a streamed read ended.
enum Streamed {
    /// Read, into the batch.
    Read,
    /// Not a streamed layout; all of it was read into memory on the way: read it whole.
    Whole(Vec<u8>),
    /// Stopped fitting the layout after part of it was read: open it again, read it whole.
    Again,
}

impl Loader {
    /// Reads one file as it comes in (see the module's documentation); `open` opens it from its
    /// start, and is called a second time only when the text must be read whole after all.
    pub fn add_reader<R: Read>(&mut self, source: &str, mut open: impl FnMut() -> io::Result<R>) {
        let mut batch = Batch::new(source, "");
        let streamed =
            open().and_then(|reader| stream(&mut batch, BufReader::with_capacity(1 << 16, reader)));
        match streamed {
            Ok(Streamed::Read) => self.commit(batch),
            Ok(Streamed::Whole(bytes)) => self.add_bytes(source, &bytes),
            Ok(Streamed::Again) => {
                let read = open().and_then(|mut reader| {
                    let mut bytes = Vec::new();
                    reader.read_to_end(&mut bytes).map(|_| bytes)
                });
                match read {
                    Ok(bytes) => self.add_bytes(source, &bytes),
                    Err(e) => self.unreadable(source, format!("cannot read: {e}")),
                }
            }
            Err(e) => self.unreadable(source, format!("cannot read: {e}")),
        }
    }
}

fn stream<R: BufRead>(batch: &mut Batch<'_>, mut reader: R) -> io::Result<Streamed> {
    let start = reader.fill_buf()?;
    if start.starts_with(&[0xEF, 0xBB, 0xBF]) {
        reader.consume(3);
    } else if start.starts_with(&[0xFF, 0xFE])
        || start.starts_with(&[0xFE, 0xFF])
        || start.starts_with(&[0, 0])
    {
        // UTF-16 (or UTF-32): decoded whole.
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes)?;
        return Ok(Streamed::Whole(bytes));
    }
    let mut lines = Lines::new(reader);
    // Blank lines first; then the first byte says JSON or YAML.
    let mut head = Vec::new();
    while lines.next()? && is_blank(&lines.line) {
        head.extend_from_slice(&lines.line);
    }
    let first = lines.line.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        head.extend_from_slice(&lines.line);
        let (reader, _) = lines.into_parts();
        return stream_json(batch, io::Cursor::new(head).chain(reader));
    }
    if lines.at_end && lines.line.is_empty() {
        return Ok(Streamed::Whole(head));
    }
    stream_yaml(batch, lines, head)
}

/// A JSON object: each element of its `items` array read as it comes (split off the text by
/// [`JsonSplitter`], then read by serde_json like any other JSON object); what is left, the
/// List's own fields, is read at the end.
fn stream_json<R: Read>(batch: &mut Batch<'_>, mut reader: R) -> io::Result<Streamed> {
    batch.documents = 1;
    let location = batch.source.clone();
    let mut splitter = JsonSplitter::default();
    let mut chunk = vec![0u8; 1 << 16];
    let mut index = 0;
    loop {
        let read = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        splitter.feed(&chunk[..read]);
        for item in splitter.items.drain(..) {
            let raw = std::str::from_utf8(&item)
                .ok()
                .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
            // Not JSON after all (or not UTF-8): read whole, which says what is wrong.
            let Some(raw) = raw else {
                return Ok(Streamed::Again);
            };
            batch.add_document(&format!("{location}, items[{index}]"), raw);
            index += 1;
        }
    }
    if !splitter.split_items || splitter.depth != 0 {
        return Ok(Streamed::Again);
    }
    let root = std::str::from_utf8(&splitter.rest)
        .ok()
        .and_then(|text| serde_json::from_str::<JsonRoot<'_>>(text).ok());
    let Some(root) = root else {
        return Ok(Streamed::Again);
    };
    let kind = root.kind.as_ref().and_then(Value::as_str).unwrap_or_default();
    match root.items {
        JsonItems::Seq(rest) if rest.is_empty() => Ok(end_list(batch, &location, kind)),
        _ => Ok(Streamed::Again),
    }
}

/// The end of a streamed List, its items read: it counts as one object, and one whose kind
/// is no List after all (an object of another kind with a field named `items`) is read whole.
fn end_list(batch: &mut Batch<'_>, location: &str, kind: &str) -> Streamed {
    match list_kind(kind, ItemsShape::Seq) {
        Some(cut_off) => {
            batch.objects += 1;
            if cut_off {
                batch.cut_off_list(location, Some(0));
            }
            Streamed::Read
        }
        None => Streamed::Again,
    }
}

/// Splits the elements of a JSON object's top-level `items` array off its text as the text
/// comes in, tracking only strings and nesting: each element's text goes to `items`, the rest
/// (with `"items": []`) to `rest`. Whether any of it is valid JSON is serde_json's to say.
#[derive(Default)]
struct JsonSplitter {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The last string of the root object, and whether a colon followed it: a key.
    key: Vec<u8>,
    in_key: bool,
    items_key: bool,
    /// Inside the `items` array, and in one of its elements.
    in_items: bool,
    in_item: bool,
    /// An `items` array was split off (a second one is left in `rest`, for serde_json to refuse).
    split_items: bool,
    item: Vec<u8>,
    items: Vec<Vec<u8>>,
    rest: Vec<u8>,
}

impl JsonSplitter {
    fn feed(&mut self, bytes: &[u8]) {
        let mut at = 0;
        while at < bytes.len() {
            // Inside an element, long runs cannot change the state: a string's text up to its
            // next quote or backslash, and, nested in the element, anything but quotes and
            // brackets. They are copied whole; the bytes that matter go one by one.
            if self.in_item {
                let rest = &bytes[at..];
                let run = if self.in_string {
                    if self.escaped {
                        0
                    } else {
                        memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len())
                    }
                } else if self.depth >= 3 {
                    rest.iter()
                        .position(|b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']'))
                        .unwrap_or(rest.len())
                } else {
                    0
                };
                self.item.extend_from_slice(&rest[..run]);
                at += run;
                if at == bytes.len() {
                    break;
                }
            }
            self.byte(bytes[at]);
            at += 1;
        }
    }

    fn byte(&mut self, b: u8) {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            if self.in_key {
                if self.in_string {
                    self.key.push(b);
                } else {
                    self.in_key = false;
                }
            }
            return self.keep(b);
        }
        match b {
            b'"' => {
                self.in_string = true;
                if self.depth == 1 {
                    self.in_key = true;
                    self.key.clear();
                }
                if self.in_items && self.depth == 2 && !self.in_item {
                    self.in_item = true;
                }
            }
            b':' if self.depth == 1 => self.items_key = self.key == b"items" && !self.split_items,
            b'{' | b'[' => {
                self.depth += 1;
                if b == b'[' && self.depth == 2 && self.items_key {
                    self.in_items = true;
                    self.split_items = true;
                    self.items_key = false;
                    return self.rest.push(b);
                }
                if self.in_items && self.depth == 3 && !self.in_item {
                    self.in_item = true;
                }
            }
            b'}' | b']' => {
                if self.in_items && self.depth == 2 {
                    // The end of the items: a scalar element ends with them.
                    self.end_item();
                    self.in_items = false;
                    self.depth -= 1;
                    return self.rest.push(b);
                }
                self.depth = self.depth.saturating_sub(1);
                if self.in_items && self.in_item && self.depth == 2 {
                    self.item.push(b);
                    return self.end_item();
                }
            }
            b',' if self.in_items && self.depth == 2 => return self.end_item(),
            b' ' | b'\t' | b'\r' | b'\n' if self.in_items && self.depth == 2 && !self.in_item => return,
            _ => {
                if self.depth == 1 && !b.is_ascii_whitespace() {
                    self.items_key &= b == b':';
                }
                if self.in_items && self.depth == 2 && !self.in_item {
                    self.in_item = true;
                }
            }
        }
        self.keep(b);
    }

    /// Where a byte goes: to the element being split off, or to the rest.
    fn keep(&mut self, b: u8) {
        if self.in_item {
            self.item.push(b);
        } else if !self.in_items {
            self.rest.push(b);
        }
    }

    fn end_item(&mut self) {
        if self.in_item {
            self.in_item = false;
            self.items.push(std::mem::take(&mut self.item));
        }
    }
}

/// One YAML document whose top-level `items:` (in column 0) is a sequence in column 0, as
/// kubectl writes a `List`: the lines before `items:` and after the sequence are the List's
/// own fields, each entry in between is read as it comes.
fn stream_yaml<R: BufRead>(
    batch: &mut Batch<'_>,
    mut lines: Lines<R>,
    mut head: Vec<u8>,
) -> io::Result<Streamed> {
    batch.documents = 1;
    let location = batch.source.clone();
    // The List's own fields before its items; anything else is read whole.
    let mut has_content = false;
    loop {
        let line = &lines.line;
        if is_items_key(line) {
            break;
        }
        if is_marker(line) && has_content {
            // A second document.
            return lines.rest(head).map(Streamed::Whole);
        }
        has_content |= starts_content(line) && !is_marker(line);
        head.extend_from_slice(line);
        if !lines.next()? {
            return Ok(Streamed::Whole(head));
        }
    }
    let items_line = std::mem::take(&mut lines.line);
    // The first entry, in column 0; otherwise this is no kubectl List.
    let mut item = Vec::new();
    loop {
        if !lines.next()? {
            head.extend_from_slice(&items_line);
            head.extend_from_slice(&item);
            return Ok(Streamed::Whole(head));
        }
        if !is_blank(&lines.line) && !is_comment(&lines.line) {
            break;
        }
        item.extend_from_slice(&lines.line);
    }
    if !is_dash(&lines.line) {
        head.extend_from_slice(&items_line);
        head.extend_from_slice(&item);
        return lines.rest(head).map(Streamed::Whole);
    }
    let mut tape = Tape::default();
    let mut index = 0;
    item.clear();
    item.extend_from_slice(&lines.line);
    let mut tail = Vec::new();
    loop {
        let more = lines.next()?;
        let ends_item = !more || starts_content(&lines.line);
        if ends_item {
            let Ok(text) = std::str::from_utf8(&item) else {
                return Ok(Streamed::Again);
            };
            if yaml::read_entry(text, &mut tape).is_err() {
                return Ok(Streamed::Again);
            }
            batch.add_document(&format!("{location}, items[{index}]"), tape.node(text, 0));
            index += 1;
            item.clear();
            if !more {
                break;
            }
            if !is_dash(&lines.line) {
                tail.extend_from_slice(&lines.line);
                break;
            }
        }
        item.extend_from_slice(&lines.line);
    }
    // The List's own fields after its items.
    while lines.next()? {
        if is_marker(&lines.line) {
            return Ok(Streamed::Again);
        }
        tail.extend_from_slice(&lines.line);
    }
    head.extend_from_slice(&tail);
    let Ok(text) = std::str::from_utf8(&head) else {
        return Ok(Streamed::Again);
    };
    let mut root = Root::default();
    if yaml::read(text, &mut root).is_err() || root.documents != 1 || root.streamed {
        return Ok(Streamed::Again);
    }
    let Some(Value::Object(fields)) = root.value else {
        return Ok(Streamed::Again);
    };
    if fields.contains_key("items") {
        // `items` twice: serde-saphyr refuses the text.
        return Ok(Streamed::Again);
    }
    let kind = fields.get("kind").and_then(Value::as_str).unwrap_or_default();
    Ok(end_list(batch, &location, kind))
}

/// What a List's own fields (the text without its items) hold.
#[derive(Default)]
struct Root {
    documents: usize,
    streamed: bool,
    value: Option<Value>,
}

impl yaml::Sink for Root {
    fn begin(&mut self, _documents: usize) {}

    fn item(&mut self, _document: usize, _index: usize, _item: Node<'_>) {
        self.streamed = true;
    }

    fn document(
        &mut self,
        _document: usize,
        root: Node<'_>,
        streamed: Option<usize>,
        _span: std::ops::Range<usize>,
    ) {
        self.documents += 1;
        self.streamed |= streamed.is_some();
        self.value = Some(root.to_value());
    }
}

/// Lines as they come, each with its line break.
struct Lines<R> {
    reader: R,
    line: Vec<u8>,
    at_end: bool,
}

impl<R: BufRead> Lines<R> {
    fn new(reader: R) -> Self {
        Lines {
            reader,
            line: Vec::new(),
            at_end: false,
        }
    }

    /// Reads the next line into `line`; `false` at the end (with `line` empty).
    fn next(&mut self) -> io::Result<bool> {
        self.line.clear();
        let read = self.reader.read_until(b'\n', &mut self.line)?;
        self.at_end = read == 0;
        Ok(read > 0)
    }

    /// `head`, the current line and every line after it.
    fn rest(mut self, mut head: Vec<u8>) -> io::Result<Vec<u8>> {
        head.extend_from_slice(&self.line);
        self.reader.read_to_end(&mut head)?;
        Ok(head)
    }

    fn into_parts(self) -> (R, Vec<u8>) {
        (self.reader, self.line)
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

fn is_comment(line: &[u8]) -> bool {
    line.iter()
        .find(|b| !matches!(b, b' ' | b'\t'))
        .is_some_and(|b| *b == b'#')
}

/// A line whose content starts in column 0 (not a comment): it ends whatever was indented.
fn starts_content(line: &[u8]) -> bool {
    line.first()
        .is_some_and(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'#'))
}

fn rest_is_blank(rest: &[u8]) -> bool {
    let content = rest.iter().position(|b| !matches!(b, b' ' | b'\t'));
    match content {
        None => true,
        Some(i) => matches!(rest[i], b'\r' | b'\n') || (rest[i] == b'#' && i > 0),
    }
}

fn is_items_key(line: &[u8]) -> bool {
    line.strip_prefix(b"items:").is_some_and(rest_is_blank)
}

fn is_dash(line: &[u8]) -> bool {
    line.strip_prefix(b"-")
        .is_some_and(|rest| rest.is_empty() || matches!(rest[0], b' ' | b'\r' | b'\n'))
}

fn is_marker(line: &[u8]) -> bool {
    (line.starts_with(b"---") || line.starts_with(b"..."))
        && line
            .get(3)
            .is_none_or(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::snapshot::Loaded;

    /// The text read as it comes in, and how many times it was opened.
    fn streamed(bytes: &[u8]) -> (Loaded, usize) {
        let opened = Cell::new(0);
        let mut loader = Loader::new();
        loader.add_reader("dump.yaml", || {
            opened.set(opened.get() + 1);
            Ok(bytes)
        });
        (loader.finish(), opened.get())
    }

    fn whole(bytes: &[u8]) -> Loaded {
        let mut loader = Loader::new();
        loader.add_bytes("dump.yaml", bytes);
        loader.finish()
    }

    /// Everything loaded, comparable: every object as JSON, the problems in order.
    fn outcome(loaded: &Loaded) -> Value {
        let s = &loaded.snapshot;
        let all = |v: serde_json::Result<Value>| v.unwrap();
        json!({
            "policies": all(serde_json::to_value(&s.policies)),
            "namespaces": all(serde_json::to_value(&s.namespaces)),
            "nodes": all(serde_json::to_value(&s.nodes)),
            "services": all(serde_json::to_value(&s.services)),
            "slices": all(serde_json::to_value(&s.endpoint_slices)),
            "pods": all(serde_json::to_value(&s.pods)),
            "daemonSets": all(serde_json::to_value(&s.daemon_sets)),
            "deployments": all(serde_json::to_value(&s.deployments)),
            "statefulSets": all(serde_json::to_value(&s.stateful_sets)),
            "problems": all(serde_json::to_value(&loaded.problems)),
            "unreadable": all(serde_json::to_value(&loaded.unreadable)),
        })
    }

    /// Reads `bytes` both ways; returns how many times the streamed read opened it.
    #[track_caller]
    fn same_as_whole(bytes: &[u8]) -> usize {
        let (loaded, opened) = streamed(bytes);
        assert_eq!(
            outcome(&loaded),
            outcome(&whole(bytes)),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
        opened
    }

    fn kubectl_dump() -> String {
        let shape = portpolicy_cluster_dump::DumpShape::LARGE.scaled_down(500);
        portpolicy_cluster_dump::yaml(shape)
    }

    #[test]
    fn kubectl_dumps_stream_in_one_pass_and_load_as_read_whole() {
        let yaml = kubectl_dump();
        assert_eq!(same_as_whole(yaml.as_bytes()), 1);
        let (loaded, _) = streamed(yaml.as_bytes());
        assert_eq!(loaded.problems, []);
        assert!(loaded.snapshot.pods.len() > 10);
        let shape = portpolicy_cluster_dump::DumpShape::LARGE.scaled_down(500);
        let json = portpolicy_cluster_dump::json(shape);
        assert_eq!(same_as_whole(json.as_bytes()), 1);
        // With a byte-order mark, and with Windows line ends.
        let bom = [&[0xEF, 0xBB, 0xBF][..], yaml.as_bytes()].concat();
        assert_eq!(same_as_whole(&bom), 1);
        assert_eq!(same_as_whole(yaml.replace('\n', "\r\n").as_bytes()), 1);
    }

    #[test]
    fn other_layouts_load_as_read_whole() {
        let demo = [
            include_str!("../../../../examples/demo-cluster/cluster.yaml"),
            include_str!("../../../../examples/demo-cluster/workloads.yaml"),
        ];
        for text in demo {
            same_as_whole(text.as_bytes());
        }
        let node = "- apiVersion: v1\n  kind: Node\n  metadata:\n    name: a\n";
        for text in [
            String::new(),
            "\n\n".to_string(),
            // The List's kind before its items; after; none (cut off); another kind.
            format!("apiVersion: v1\nkind: List\nitems:\n{node}"),
            format!("apiVersion: v1\nitems:\n{node}kind: List\nmetadata: {{resourceVersion: ''}}\n"),
            format!("apiVersion: v1\nitems:\n{node}"),
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: b}}\nitems:\n{node}"),
            // Items indented, items empty, items twice, a second document.
            format!("apiVersion: v1\nkind: List\nitems:\n  {}", node.replace("\n  ", "\n    ")),
            "apiVersion: v1\nkind: List\nitems: []\n".to_string(),
            format!("apiVersion: v1\nitems:\n{node}items:\n{node}kind: List\n"),
            format!("apiVersion: v1\nkind: List\nitems:\n{node}---\napiVersion: v1\nkind: Node\nmetadata: {{name: c}}\n"),
            format!("---\napiVersion: v1\nkind: List\nitems:\n{node}...\n"),
            // An item the fast reader leaves to serde-saphyr; a comment between items.
            format!("apiVersion: v1\nkind: List\nitems:\n{node}- &anchor\n  apiVersion: v1\n  kind: Node\n  metadata: {{name: x}}\n"),
            format!("apiVersion: v1\nkind: List\nitems:\n{node}# between\n{}", node.replace("name: a", "name: b")),
            // JSON: a List, an object, not JSON after all.
            r#"{"apiVersion": "v1", "items": [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "j"}}], "kind": "List"}"#.to_string(),
            r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "j"}}"#.to_string(),
            r#"{"apiVersion": "v1", "items": [], "items": [], "kind": "List"}"#.to_string(),
            "{apiVersion: v1, kind: Node, metadata: {name: f}}\n".to_string(),
            // JSON items that are not objects, a List whose items are null, an `items` key
            // spelled with an escape, `items` inside an item, and text after the object.
            r#"{"kind": "List", "items": [1, "two", [3], null, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "k"}}]}"#.to_string(),
            r#"{"kind": "List", "items": null}"#.to_string(),
            r#"{"kind": "List", "it\u0065ms": [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "e"}}]}"#.to_string(),
            r#"{"items": [{"items": [], "kind": "List", "apiVersion": "v1"}], "kind": "List"}"#.to_string(),
            r#"{"kind": "List", "items": []} {"kind": "List"}"#.to_string(),
            r#"{"kind": "List", "items": [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "q\"]},"}}]}"#.to_string(),
        ] {
            same_as_whole(text.as_bytes());
        }
    }

    /// A reader that hands over a few bytes at a time, so that every state of the JSON
    /// splitter (inside a string, after a backslash, between elements) meets a read's end.
    struct Trickle<'a> {
        bytes: &'a [u8],
        sizes: std::iter::Cycle<std::slice::Iter<'static, usize>>,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = (*self.sizes.next().unwrap()).min(out.len()).min(self.bytes.len());
            out[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn json_split_across_reads_loads_as_read_whole() {
        let shape = portpolicy_cluster_dump::DumpShape::LARGE.scaled_down(2000);
        let mut json = portpolicy_cluster_dump::json(shape);
        // Escapes and brackets inside strings, with a read ending right after the backslash.
        json = json.replacen(r#""name": "node-000""#, r#""name": "node-\"0]}0,\\0\u00e9x{""#, 1);
        assert!(json.contains(r#"node-\"0]}"#));
        let expected = outcome(&whole(json.as_bytes()));
        for sizes in [&[1usize][..], &[2, 3], &[7, 1, 13], &[4096, 5]] {
            let mut loader = Loader::new();
            let mut batch = Batch::new("dump.yaml", "");
            let reader = Trickle {
                bytes: json.as_bytes(),
                sizes: sizes.iter().cycle(),
            };
            let streamed = stream_json(&mut batch, reader).unwrap();
            assert!(matches!(streamed, Streamed::Read), "{sizes:?}");
            loader.commit(batch);
            assert_eq!(outcome(&loader.finish()), expected, "{sizes:?}");
        }
    }

    #[test]
    fn undecodable_bytes_are_refused_as_when_read_whole() {
        let mut bytes = kubectl_dump().into_bytes();
        let at = bytes.len() / 2;
        bytes[at] = 0xE9;
        assert_eq!(same_as_whole(&bytes), 2, "opened again to be read whole");
        let (loaded, _) = streamed(&bytes);
        assert!(!loaded.is_whole());
        assert!(
            loaded.problems[0]
                .message
                .contains("not UTF-8 text: invalid byte 0xE9")
        );
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend(
            "apiVersion: v1\nkind: Node\nmetadata: {name: w}\n"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        );
        same_as_whole(&utf16);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn a_cut_or_spliced_dump_loads_as_read_whole(
            json in any::<bool>(),
            at in any::<prop::sample::Index>(),
            cut in any::<bool>(),
            splice in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let shape = portpolicy_cluster_dump::DumpShape::LARGE.scaled_down(500);
            let text = if json { portpolicy_cluster_dump::json(shape) } else { kubectl_dump() }.into_bytes();
            let at = at.index(text.len());
            let mutated = if cut {
                text[..at].to_vec()
            } else {
                [&text[..at], &splice[..], &text[at..]].concat()
            };
            same_as_whole(&mutated);
        }
    }
}
