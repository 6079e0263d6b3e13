//! A fast reader for the YAML that `kubectl get -o yaml` writes and people edit: block mappings
//! and sequences (compact or indented), plain, quoted and literal scalars (multi-line too),
//! one-line flow collections, comments, several documents, CRLF line ends.
//!
//! It never reports a YAML error. Anything it does not read (anchors and aliases, tags,
//! directives, folded or explicitly indented block scalars, complex keys, multi-line flow
//! collections, tabs in indentation, control characters) and anything invalid makes it give up
//! on the whole text ([`Unsupported`]); the loader then reads that text with serde-saphyr, which
//! handles all of YAML, applies the budgets against alias bombs and names the error. A text
//! this reader accepts means exactly what it means to serde-saphyr: a differential test holds
//! the two equal on generated and mutated texts.
//!
//! Documents are read one at a time into a [`Tape`]; the top-level `items` of a document (a
//! kubectl `List`) are read one item at a time instead, so memory follows one object, not the
//! file.

use std::ops::Range;

use memchr::{memchr, memchr2, memchr3};

use super::tape::{Node, Plain, Tape, Text, Token, resolve_plain};

/// Why the fast reader left a text to serde-saphyr, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Unsupported {
    pub(crate) at: usize,
    pub(crate) why: &'static str,
}

/// What the reader hands over as it reads.
pub(crate) trait Sink {
    /// Before anything else: how many documents the text holds (empty ones do not count).
    fn begin(&mut self, documents: usize);
    /// One entry of a document's top-level `items` sequence, read on its own.
    fn item(&mut self, document: usize, index: usize, item: Node<'_>);
    /// A whole document. `root` lacks the `items` entry when its items went to [`Sink::item`]
    /// (`streamed` says how many); `span` is the document's text, to read it again whole.
    fn document(&mut self, document: usize, root: Node<'_>, streamed: Option<usize>, span: Range<usize>);
}

/// Nesting this deep is left to serde-saphyr, which refuses it past [`super::MAX_DEPTH`] with its
/// own message (counted a little short of that limit, so that the two never disagree).
const MAX_DEPTH: usize = super::MAX_DEPTH - 4;
/// YAML limits an implicit key to 1024 characters.
const MAX_KEY: usize = 1024;

/// Reads every document of `text` into `sink`; returns how many documents held anything.
/// On [`Unsupported`] the sink has seen part of the text and must forget it.
pub(crate) fn read(text: &str, sink: &mut dyn Sink) -> Result<usize, Unsupported> {
    check_characters(text.as_bytes())?;
    let expected = count_documents(text.as_bytes());
    sink.begin(expected);
    let mut reader = Reader {
        source: text,
        bytes: text.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let read = reader.documents(sink)?;
    if read != expected {
        return Err(Unsupported {
            at: 0,
            why: "document markers the quick count misread",
        });
    }
    Ok(read)
}

/// Reads one document whole: one read again when its `items` turned out not to be a list's.
pub(crate) fn read_node(text: &str, span: Range<usize>, tape: &mut Tape) -> Result<(), Unsupported> {
    let mut reader = Reader {
        source: text,
        bytes: text.as_bytes(),
        pos: span.start,
        depth: 0,
    };
    tape.clear();
    match reader.next_content(span.start)? {
        Some(line) if line.start < span.end => {
            reader.pos = line.content;
            reader.block_node(&line, -1, tape)
        }
        _ => {
            push_null(tape, span.start);
            Ok(())
        }
    }
}

/// Reads one block sequence entry: `text` is a `- ` line in column 0 and the lines of its value,
/// as a streamed `List` hands over its items one at a time.
pub(crate) fn read_entry(text: &str, tape: &mut Tape) -> Result<(), Unsupported> {
    check_characters(text.as_bytes())?;
    let mut reader = Reader {
        source: text,
        bytes: text.as_bytes(),
        pos: 0,
        depth: 1,
    };
    tape.clear();
    let line = reader.line(0)?;
    if !reader.dash_at(line.content, line.end) || line.indent != 0 {
        return reader.unsupported(0, "not a sequence entry");
    }
    reader.pos = 1;
    reader.value_after_dash(0, &line, tape)?;
    match reader.next_content(reader.pos)? {
        None => Ok(()),
        Some(rest) => reader.unsupported(rest.start, "more than one entry"),
    }
}

/// The documents of a text that hold anything, counted from the `---` and `...` lines alone.
/// Exact for every text the reader accepts (it checks): inside a document no line of content
/// can start in column 0 with a marker.
fn count_documents(bytes: &[u8]) -> usize {
    let is_marker = |line: &[u8]| {
        line.len() >= 3
            && (line.starts_with(b"---") || line.starts_with(b"..."))
            && (line.len() == 3 || matches!(line[3], b' ' | b'\t' | b'\r'))
    };
    // Lines that may be markers, in order: a line break followed by three dashes or dots.
    let mut dashes = memchr::memmem::find_iter(bytes, b"\n---")
        .map(|i| i + 1)
        .peekable();
    let mut dots = memchr::memmem::find_iter(bytes, b"\n...")
        .map(|i| i + 1)
        .peekable();
    let mut next_candidate = |from: usize| -> Option<usize> {
        while dashes.next_if(|&i| i < from).is_some() {}
        while dots.next_if(|&i| i < from).is_some() {}
        match (dashes.peek(), dots.peek()) {
            (Some(&a), Some(&b)) => Some(a.min(b)),
            (a, b) => a.or(b).copied(),
        }
    };
    let mut documents = 0;
    let mut has_content = false;
    let mut start = 0;
    while start < bytes.len() {
        let end = memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i);
        let line = &bytes[start..end];
        if is_marker(line) {
            documents += usize::from(has_content);
            has_content = false;
        } else if !has_content {
            let first = line.iter().position(|b| !matches!(b, b' ' | b'\t' | b'\r'));
            has_content = first.is_some_and(|i| line[i] != b'#');
        } else {
            // The rest of a document with content: only where it ends matters.
            match next_candidate(end + 1) {
                Some(candidate) => {
                    start = candidate;
                    continue;
                }
                None => break,
            }
        }
        start = end + 1;
    }
    documents + usize::from(has_content)
}

/// Control characters, C1 controls, a byte-order mark inside the text, Unicode line separators,
/// and a carriage return not followed by a line feed: YAML treats each specially, so texts with
/// any are left to serde-saphyr.
fn check_characters(bytes: &[u8]) -> Result<(), Unsupported> {
    let unsupported = |at| {
        Err(Unsupported {
            at,
            why: "a control or special character",
        })
    };
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\t' | b'\n' | b' '..=b'~' | 0x80..=0xC1 | 0xC3..=0xE1 | 0xE3..=0xEE | 0xF0..=0xFF => {}
            b'\r' => {
                if bytes.get(i + 1) != Some(&b'\n') {
                    return unsupported(i);
                }
            }
            // U+0080-U+009F (C1 controls, NEL among them).
            0xC2 => {
                if matches!(bytes.get(i + 1), Some(0x80..=0x9F)) {
                    return unsupported(i);
                }
            }
            // U+2028 and U+2029, line and paragraph separators.
            0xE2 => {
                if bytes.get(i + 1) == Some(&0x80) && matches!(bytes.get(i + 2), Some(0xA8 | 0xA9)) {
                    return unsupported(i);
                }
            }
            // U+FEFF (a byte-order mark), U+FFFE and U+FFFF.
            0xEF => {
                let special = matches!(
                    (bytes.get(i + 1), bytes.get(i + 2)),
                    (Some(0xBB), Some(0xBF)) | (Some(0xBF), Some(0xBE | 0xBF))
                );
                if special {
                    return unsupported(i);
                }
            }
            _ => return unsupported(i),
        }
    }
    Ok(())
}

/// One line: where it starts, its indentation, its content and where the next one starts.
#[derive(Clone, Copy, Debug)]
struct Line {
    start: usize,
    indent: usize,
    /// The first byte that is not indentation (`end` when the line holds only spaces).
    content: usize,
    /// The end of the line's text, before `\r\n` or `\n`.
    end: usize,
    next: usize,
}

impl Line {
    fn is_blank(&self, bytes: &[u8]) -> bool {
        bytes[self.content..self.end]
            .iter()
            .all(|b| *b == b' ' || *b == b'\t')
    }
}

struct Reader<'s> {
    source: &'s str,
    bytes: &'s [u8],
    pos: usize,
    depth: usize,
}

type Read<T> = Result<T, Unsupported>;

fn push_null(tape: &mut Tape, at: usize) {
    tape.tokens.push(Token::Scalar {
        text: Text::Source { start: at, end: at },
        plain: true,
    });
}

fn is_blank_byte(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Characters that cannot start a plain scalar (YAML's indicators).
fn is_indicator(b: u8) -> bool {
    matches!(
        b,
        b'-' | b'?'
            | b':'
            | b','
            | b'['
            | b']'
            | b'{'
            | b'}'
            | b'#'
            | b'&'
            | b'*'
            | b'!'
            | b'|'
            | b'>'
            | b'\''
            | b'"'
            | b'%'
            | b'@'
            | b'`'
    )
}

fn is_flow_indicator(b: u8) -> bool {
    matches!(b, b',' | b'[' | b']' | b'{' | b'}')
}

impl<'s> Reader<'s> {
    fn unsupported<T>(&self, at: usize, why: &'static str) -> Read<T> {
        Err(Unsupported { at, why })
    }

    fn line(&self, start: usize) -> Read<Line> {
        let newline = memchr(b'\n', &self.bytes[start..]).map(|i| start + i);
        let (end, next) = match newline {
            Some(n) if n > start && self.bytes[n - 1] == b'\r' => (n - 1, n + 1),
            Some(n) => (n, n + 1),
            None => (self.bytes.len(), self.bytes.len()),
        };
        let mut content = start;
        while content < end && self.bytes[content] == b' ' {
            content += 1;
        }
        let line = Line {
            start,
            indent: content - start,
            content,
            end,
            next,
        };
        if content < end && self.bytes[content] == b'\t' && !line.is_blank(self.bytes) {
            return self.unsupported(content, "a tab in indentation");
        }
        Ok(line)
    }

    /// The line holding `at`.
    fn line_of(&self, at: usize) -> Read<Line> {
        let start = memchr::memrchr(b'\n', &self.bytes[..at]).map_or(0, |i| i + 1);
        self.line(start)
    }

    /// The next line from `from` that holds anything but blanks and a comment.
    fn next_content(&self, mut from: usize) -> Read<Option<Line>> {
        while from < self.bytes.len() {
            let line = self.line(from)?;
            if !line.is_blank(self.bytes) && self.bytes[line.content] != b'#' {
                return Ok(Some(line));
            }
            from = line.next;
        }
        Ok(None)
    }

    /// The next key line of the block mapping at `indent`, read up to its content, or `None`
    /// where the mapping ends.
    fn next_key_line(&mut self, indent: usize) -> Read<Option<Line>> {
        match self.next_content(self.pos)? {
            Some(next) if next.indent == indent && self.marker(&next).is_none() => {
                if self.dash_at(next.content, next.end) {
                    return self.unsupported(next.start, "a sequence entry in a mapping");
                }
                self.pos = next.content;
                Ok(Some(next))
            }
            Some(next) if next.indent > indent => self.unsupported(next.start, "unexpected indentation"),
            _ => Ok(None),
        }
    }

    /// `---` or `...` at the start of a line, alone or followed by a blank.
    fn marker(&self, line: &Line) -> Option<u8> {
        let b = &self.bytes[line.start..line.end];
        if line.indent != 0 || b.len() < 3 {
            return None;
        }
        let marker = match &b[..3] {
            b"---" => b'-',
            b"..." => b'.',
            _ => return None,
        };
        (b.len() == 3 || is_blank_byte(b[3])).then_some(marker)
    }

    fn skip_blanks(&self, mut at: usize, end: usize) -> usize {
        while at < end && is_blank_byte(self.bytes[at]) {
            at += 1;
        }
        at
    }

    /// The rest of `line` from `at` holds only blanks, or blanks and a comment; returns the
    /// start of the next line.
    fn rest_is_empty(&self, at: usize, line: &Line) -> Read<usize> {
        let i = self.skip_blanks(at, line.end);
        if i < line.end && !(self.bytes[i] == b'#' && i > at) {
            return self.unsupported(i, "text after a value");
        }
        Ok(line.next)
    }

    fn enter(&mut self) -> Read<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.unsupported(self.pos, "nested too deep");
        }
        Ok(())
    }

    fn documents(&mut self, sink: &mut dyn Sink) -> Read<usize> {
        let mut documents = 0;
        let mut tape = Tape::default();
        let mut item_tape = Tape::default();
        loop {
            let Some(line) = self.next_content(self.pos)? else {
                return Ok(documents);
            };
            if line.indent == 0 && self.bytes[line.content] == b'%' {
                return self.unsupported(line.start, "a directive");
            }
            if self.marker(&line).is_some() {
                // Anything after a marker on its line is a node: left to serde-saphyr.
                self.pos = self.rest_is_empty(line.start + 3, &line)?;
                continue;
            }
            let start = line.start;
            tape.clear();
            self.pos = line.content;
            let streamed = self.root(&line, &mut tape, &mut item_tape, documents, sink)?;
            if let Some(next) = self.next_content(self.pos)?
                && self.marker(&next).is_none()
            {
                return self.unsupported(next.start, "a second node in a document");
            }
            let root = tape.node(self.source, 0);
            if streamed.is_none() && root.is_null() {
                // serde-saphyr drops a document that is a null, as if it were empty.
                continue;
            }
            sink.document(documents, root, streamed, start..self.pos);
            documents += 1;
        }
    }

    /// A document's root: a block mapping whose `items` (a block sequence) go to the sink one by
    /// one, or any other node, read whole.
    fn root(
        &mut self,
        line: &Line,
        tape: &mut Tape,
        item_tape: &mut Tape,
        document: usize,
        sink: &mut dyn Sink,
    ) -> Read<Option<usize>> {
        if self.dash_at(line.content, line.end) || self.key_at(line.content, line.end)?.is_none() {
            self.block_node(line, -1, tape)?;
            return Ok(None);
        }
        self.enter()?;
        let indent = line.indent;
        let map = tape.tokens.len();
        tape.tokens.push(Token::Map { end: 0 });
        let mut streamed = None;
        let mut saw_items = false;
        let mut line = *line;
        loop {
            let key = self.key(&line, tape)?;
            if key == "items" {
                if saw_items {
                    return self.unsupported(line.start, "a duplicate key");
                }
                saw_items = true;
            }
            if key == "items" && self.block_sequence_follows(indent, &line)? {
                // The items are not in the tape: take their key out again.
                tape.tokens.pop();
                streamed = Some(self.streamed_items(&line, item_tape, document, sink)?);
            } else {
                self.value_after_key(indent, &line, tape)?;
            }
            match self.next_key_line(indent)? {
                Some(next) => line = next,
                None => break,
            }
        }
        tape.tokens[map] = Token::Map {
            end: tape.tokens.len(),
        };
        self.depth -= 1;
        self.check_unique_keys(tape, map)?;
        Ok(streamed)
    }

    /// Whether the value of the key on `line` (`self.pos` just past its colon) is a block
    /// sequence on the lines below.
    fn block_sequence_follows(&self, indent: usize, line: &Line) -> Read<bool> {
        let at = self.skip_blanks(self.pos, line.end);
        if at < line.end && !(self.bytes[at] == b'#' && at > self.pos) {
            return Ok(false);
        }
        Ok(match self.next_content(line.next)? {
            Some(next) => {
                next.indent >= indent && self.marker(&next).is_none() && self.dash_at(next.content, next.end)
            }
            None => false,
        })
    }

    /// The block sequence below `key_line` (see [`Self::block_sequence_follows`]), entry by
    /// entry, each read into `item_tape` and handed to the sink.
    fn streamed_items(
        &mut self,
        key_line: &Line,
        item_tape: &mut Tape,
        document: usize,
        sink: &mut dyn Sink,
    ) -> Read<usize> {
        let Some(mut line) = self.next_content(key_line.next)? else {
            return self.unsupported(key_line.next, "no items");
        };
        let indent = line.indent;
        let mut count = 0;
        self.enter()?;
        loop {
            item_tape.clear();
            self.pos = line.content + 1;
            self.value_after_dash(indent, &line, item_tape)?;
            sink.item(document, count, item_tape.node(self.source, 0));
            count += 1;
            match self.next_content(self.pos)? {
                Some(next) if next.indent == indent && self.dash_at(next.content, next.end) => line = next,
                Some(next) if next.indent > indent => {
                    return self.unsupported(next.start, "unexpected indentation");
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(count)
    }

    /// A `-` at `at` that starts a block sequence entry.
    fn dash_at(&self, at: usize, end: usize) -> bool {
        at < end && self.bytes[at] == b'-' && (at + 1 == end || is_blank_byte(self.bytes[at + 1]))
    }

    /// If the text at `at` (up to `end`, the end of its line) starts a mapping entry, where
    /// its key ends (just past a closing quote, or at the colon of a plain key).
    fn key_at(&self, at: usize, end: usize) -> Read<Option<usize>> {
        let b = self.bytes;
        match b[at] {
            b'"' | b'\'' => {
                let Some(close) = self.quoted_end(at, end) else {
                    return Ok(None);
                };
                let i = self.skip_blanks(close + 1, end);
                Ok(
                    (i < end && b[i] == b':' && (i + 1 == end || is_blank_byte(b[i + 1])))
                        .then_some(close + 1),
                )
            }
            b'-' | b'?' | b':' => {
                if at + 1 == end || is_blank_byte(b[at + 1]) {
                    return Ok(None);
                }
                Ok(self.plain_key_colon(at, end))
            }
            c if is_indicator(c) => Ok(None),
            _ => Ok(self.plain_key_colon(at, end)),
        }
    }

    /// The colon ending a plain key that starts at `at`, if the line has one before a comment.
    fn plain_key_colon(&self, at: usize, end: usize) -> Option<usize> {
        let b = self.bytes;
        let mut from = at;
        while let Some(i) = memchr2(b':', b'#', &b[from..end]).map(|i| from + i) {
            match b[i] {
                b':' if i + 1 == end || is_blank_byte(b[i + 1]) => return Some(i),
                b'#' if i > at && is_blank_byte(b[i - 1]) => return None,
                _ => from = i + 1,
            }
        }
        None
    }

    /// The closing quote of a quoted scalar opening at `at`, on the same line.
    fn quoted_end(&self, at: usize, end: usize) -> Option<usize> {
        let b = self.bytes;
        let quote = b[at];
        let mut i = at + 1;
        while i < end {
            if b[i] == quote {
                if quote == b'\'' && i + 1 < end && b[i + 1] == b'\'' {
                    i += 2;
                    continue;
                }
                return Some(i);
            }
            i += if quote == b'"' && b[i] == b'\\' { 2 } else { 1 };
        }
        None
    }

    /// The key at `self.pos` on `line`, and its colon: pushes the key, returns its text and
    /// leaves `self.pos` just past the colon.
    fn key(&mut self, line: &Line, tape: &mut Tape) -> Read<&'s str> {
        let at = self.pos;
        let Some(key_end) = self.key_at(at, line.end)? else {
            return self.unsupported(at, "not a mapping key");
        };
        let text = match self.bytes[at] {
            b'"' | b'\'' => match self.quoted(at, -1, tape)? {
                Text::Source { start, end } => Text::Source { start, end },
                // Escaped keys are rare; comparing them would take their own text.
                Text::Owned { .. } => return self.unsupported(at, "an escaped key"),
            },
            _ => {
                let mut end = key_end;
                while end > at && is_blank_byte(self.bytes[end - 1]) {
                    end -= 1;
                }
                let text = &self.source[at..end];
                if resolve_plain(text) == Plain::Null {
                    return self.unsupported(at, "a null key");
                }
                if text == "<<" {
                    return self.unsupported(at, "a merge key");
                }
                Text::Source { start: at, end }
            }
        };
        let Text::Source { start, end } = text else {
            unreachable!("keys are slices of the source")
        };
        if end - start > MAX_KEY {
            return self.unsupported(at, "a key over 1024 characters");
        }
        tape.tokens.push(Token::Scalar { text, plain: false });
        let colon = memchr(b':', &self.bytes[key_end..line.end]).map_or(line.end, |i| key_end + i);
        self.pos = colon + 1;
        Ok(&self.source[start..end])
    }

    /// Refuses a mapping (its token at `map`) with a key twice: serde-saphyr refuses duplicate
    /// keys, and its message is the one users should see.
    fn check_unique_keys(&self, tape: &Tape, map: usize) -> Read<()> {
        const FEW: usize = 16;
        let node = tape.node(self.source, map);
        let mut few = [""; FEW];
        let mut count = 0;
        let mut duplicate = false;
        for (key, _) in node.entries() {
            if count < FEW {
                duplicate |= few[..count].contains(&key);
                few[count] = key;
            }
            count += 1;
        }
        if count > FEW {
            let mut keys: Vec<&str> = node.entries().map(|(k, _)| k).collect();
            keys.sort_unstable();
            duplicate = keys.windows(2).any(|w| w[0] == w[1]);
        }
        if duplicate {
            return self.unsupported(self.pos, "a duplicate key");
        }
        Ok(())
    }

    /// The node that starts at `line`'s content (`self.pos`) in block context, inside a parent
    /// indented `parent` (-1 for a document's root).
    fn block_node(&mut self, line: &Line, parent: isize, tape: &mut Tape) -> Read<()> {
        let at = self.pos;
        if self.dash_at(at, line.end) {
            return self.block_sequence(line.indent, line, tape);
        }
        if self.key_at(at, line.end)?.is_some() {
            return self.block_mapping(line, tape);
        }
        match self.bytes[at] {
            b'[' | b'{' => self.flow_in_block(line, tape),
            b'"' | b'\'' => self.quoted_in_block(line, parent, tape),
            b'|' | b'>' => self.unsupported(at, "a block scalar on a line of its own"),
            c if is_indicator(c) && !matches!(c, b'-' | b'?' | b':') => self.unsupported(at, "an indicator"),
            b'?' | b':' if at + 1 == line.end || is_blank_byte(self.bytes[at + 1]) => {
                self.unsupported(at, "a complex key")
            }
            _ => self.plain(line, parent, tape),
        }
    }

    /// A block mapping whose first key is at `self.pos`, in column `line.indent`.
    fn block_mapping(&mut self, line: &Line, tape: &mut Tape) -> Read<()> {
        self.enter()?;
        let indent = line.indent;
        let map = tape.tokens.len();
        tape.tokens.push(Token::Map { end: 0 });
        let mut line = *line;
        loop {
            self.key(&line, tape)?;
            self.value_after_key(indent, &line, tape)?;
            match self.next_key_line(indent)? {
                Some(next) => line = next,
                None => break,
            }
        }
        tape.tokens[map] = Token::Map {
            end: tape.tokens.len(),
        };
        self.depth -= 1;
        self.check_unique_keys(tape, map)
    }

    /// A block sequence whose first dash is at `self.pos` on `line`, in column `indent`.
    fn block_sequence(&mut self, indent: usize, line: &Line, tape: &mut Tape) -> Read<()> {
        self.enter()?;
        let seq = tape.tokens.len();
        tape.tokens.push(Token::Seq { end: 0 });
        let mut line = *line;
        loop {
            self.pos += 1;
            self.value_after_dash(indent, &line, tape)?;
            match self.next_content(self.pos)? {
                Some(next) if next.indent == indent && self.dash_at(next.content, next.end) => {
                    self.pos = next.content;
                    line = next;
                }
                Some(next) if next.indent > indent => {
                    return self.unsupported(next.start, "unexpected indentation");
                }
                _ => break,
            }
        }
        tape.tokens[seq] = Token::Seq {
            end: tape.tokens.len(),
        };
        self.depth -= 1;
        Ok(())
    }

    /// The value of the entry whose key, in column `indent`, is on `line`; `self.pos` is just
    /// past its colon. Leaves `self.pos` at the start of the line after the value.
    fn value_after_key(&mut self, indent: usize, line: &Line, tape: &mut Tape) -> Read<()> {
        let at = self.skip_blanks(self.pos, line.end);
        if at == line.end || (self.bytes[at] == b'#' && at > self.pos) {
            // On the lines below: more indented, or a sequence in the key's own column.
            return match self.next_content(line.next)? {
                Some(next) if next.indent > indent && self.marker(&next).is_none() => {
                    self.pos = next.content;
                    self.block_node(&next, indent as isize, tape)
                }
                Some(next)
                    if next.indent == indent
                        && self.marker(&next).is_none()
                        && self.dash_at(next.content, next.end) =>
                {
                    self.pos = next.content;
                    self.block_sequence(indent, &next, tape)
                }
                _ => {
                    push_null(tape, at);
                    self.pos = line.next;
                    Ok(())
                }
            };
        }
        self.pos = at;
        self.inline_value(line, indent as isize, false, tape)
    }

    /// The value of a sequence entry whose dash, in column `indent`, is on `line`; `self.pos`
    /// is just past the dash.
    fn value_after_dash(&mut self, indent: usize, line: &Line, tape: &mut Tape) -> Read<()> {
        let at = self.skip_blanks(self.pos, line.end);
        if self.bytes[self.pos..at].contains(&b'\t') {
            // Whether a tab after a dash indents what follows is for serde-saphyr to say.
            return self.unsupported(at, "a tab after a dash");
        }
        if at == line.end || (self.bytes[at] == b'#' && at > self.pos) {
            return match self.next_content(line.next)? {
                Some(next) if next.indent > indent && self.marker(&next).is_none() => {
                    self.pos = next.content;
                    self.block_node(&next, indent as isize, tape)
                }
                _ => {
                    push_null(tape, at);
                    self.pos = line.next;
                    Ok(())
                }
            };
        }
        self.pos = at;
        self.inline_value(line, indent as isize, true, tape)
    }

    /// A value that starts on the line of its key or dash, at `self.pos`.
    fn inline_value(&mut self, line: &Line, parent: isize, after_dash: bool, tape: &mut Tape) -> Read<()> {
        let at = self.pos;
        if after_dash {
            // A compact nested sequence or mapping, in this column.
            let nested = Line {
                indent: at - line.start,
                ..*line
            };
            if self.dash_at(at, line.end) {
                return self.block_sequence(nested.indent, &nested, tape);
            }
            if self.key_at(at, line.end)?.is_some() {
                return self.block_mapping(&nested, tape);
            }
        } else if self.key_at(at, line.end)?.is_some() {
            return self.unsupported(at, "a mapping in a mapping value");
        }
        match self.bytes[at] {
            b'|' => self.literal(line, parent, tape),
            b'>' => self.unsupported(at, "a folded block scalar"),
            b'[' | b'{' => self.flow_in_block(line, tape),
            b'"' | b'\'' => self.quoted_in_block(line, parent, tape),
            b'-' | b':' if at + 1 == line.end || is_blank_byte(self.bytes[at + 1]) => {
                self.unsupported(at, "a block entry where a value was expected")
            }
            b'-' | b':' => self.plain(line, parent, tape),
            c if is_indicator(c) => self.unsupported(at, "an anchor, alias, tag or reserved indicator"),
            _ => self.plain(line, parent, tape),
        }
    }

    /// A quoted scalar in block context at `self.pos` on `line`; the rest of the line where it
    /// closes must be empty.
    fn quoted_in_block(&mut self, line: &Line, parent: isize, tape: &mut Tape) -> Read<()> {
        let text = self.quoted(self.pos, parent, tape)?;
        tape.tokens.push(Token::Scalar { text, plain: false });
        let closing = if self.pos <= line.end {
            *line
        } else {
            self.line_of(self.pos)?
        };
        self.pos = self.rest_is_empty(self.pos, &closing)?;
        Ok(())
    }

    /// A plain scalar at `self.pos` on `line`, perhaps continued on lines indented more than
    /// `parent`. Leaves `self.pos` at the start of the line after its last line.
    fn plain(&mut self, line: &Line, parent: isize, tape: &mut Tape) -> Read<()> {
        let start = self.pos;
        let (first_end, commented) = self.plain_line_end(start, line.end)?;
        let mut after = line.next;
        // Continuation lines, folded: a line break is a space, n blank lines are n line feeds.
        let mut folded: Option<String> = None;
        let mut breaks = 0usize;
        let mut from = line.next;
        while from < self.bytes.len() {
            let next = self.line(from)?;
            if next.is_blank(self.bytes) {
                breaks += 1;
                from = next.next;
                continue;
            }
            if (next.indent as isize) <= parent
                || self.marker(&next).is_some()
                || self.bytes[next.content] == b'#'
            {
                break;
            }
            if commented {
                return self.unsupported(next.start, "a plain scalar continued after a comment");
            }
            if is_indicator(self.bytes[next.content]) {
                return self.unsupported(next.content, "a continuation line starting with an indicator");
            }
            let (end, commented) = self.plain_line_end(next.content, next.end)?;
            if commented {
                return self.unsupported(end, "a comment inside a plain scalar");
            }
            let text = folded.get_or_insert_with(|| self.source[start..first_end].to_string());
            if breaks == 0 {
                text.push(' ');
            } else {
                text.extend(std::iter::repeat_n('\n', breaks));
            }
            text.push_str(self.source[next.content..end].trim_start_matches([' ', '\t']));
            breaks = 0;
            after = next.next;
            from = next.next;
        }
        let text = match folded {
            None => Text::Source {
                start,
                end: first_end,
            },
            Some(text) => owned(tape, &text),
        };
        let resolved = match text {
            Text::Source { start, end } => resolve_plain(&self.source[start..end]),
            Text::Owned { start, end } => resolve_plain(&tape.owned[start..end]),
        };
        if resolved == Plain::NonFinite {
            return self.unsupported(start, "a non-finite float");
        }
        tape.tokens.push(Token::Scalar { text, plain: true });
        self.pos = after;
        Ok(())
    }

    /// Where a plain scalar's text on one line ends (before trailing blanks and a comment),
    /// and whether a comment follows it. A `: ` inside would make it a key: left alone.
    fn plain_line_end(&self, start: usize, end: usize) -> Read<(usize, bool)> {
        let b = self.bytes;
        let mut from = start;
        let mut text_end = end;
        let mut commented = false;
        while let Some(i) = memchr2(b':', b'#', &b[from..end]).map(|i| from + i) {
            match b[i] {
                b':' if i + 1 == end || is_blank_byte(b[i + 1]) => {
                    return self.unsupported(i, "a colon and a blank in a plain scalar");
                }
                b'#' if i > start && is_blank_byte(b[i - 1]) => {
                    text_end = i;
                    commented = true;
                    break;
                }
                _ => from = i + 1,
            }
        }
        while text_end > start && is_blank_byte(b[text_end - 1]) {
            text_end -= 1;
        }
        Ok((text_end, commented))
    }

    /// A quoted scalar opening at `at`, perhaps over several lines indented more than
    /// `parent`; leaves `self.pos` just past the closing quote.
    fn quoted(&mut self, at: usize, parent: isize, tape: &mut Tape) -> Read<Text> {
        let b = self.bytes;
        let quote = b[at];
        let mut i = at + 1;
        let mut out: Option<String> = None;
        // The length of `out` that a line break keeps: trailing blanks before an unescaped
        // break are dropped, but not escaped ones.
        let mut kept = 0usize;
        loop {
            let found = if quote == b'"' {
                memchr3(b'"', b'\\', b'\n', &b[i..])
            } else {
                memchr2(b'\'', b'\n', &b[i..])
            };
            let Some(offset) = found else {
                return self.unsupported(at, "an unterminated quoted scalar");
            };
            let stop = i + offset;
            let run = &self.source[i..stop];
            match b[stop] {
                c if c == quote => {
                    if quote == b'\'' && b.get(stop + 1) == Some(&b'\'') {
                        let text = out.get_or_insert_with(String::new);
                        text.push_str(run);
                        text.push('\'');
                        kept = text.len();
                        i = stop + 2;
                        continue;
                    }
                    self.pos = stop + 1;
                    return Ok(match out {
                        None => Text::Source {
                            start: at + 1,
                            end: stop,
                        },
                        Some(mut text) => {
                            text.push_str(run);
                            owned(tape, &text)
                        }
                    });
                }
                b'\\' => {
                    let text = out.get_or_insert_with(String::new);
                    text.push_str(run);
                    let escaped = b.get(stop + 1).copied();
                    if matches!(escaped, Some(b'\n' | b'\r')) {
                        // An escaped line break joins the lines without a space.
                        let l = self.line_of(stop)?;
                        i = self.continuation(l.next, at, parent, text, false)?;
                        kept = text.len();
                        continue;
                    }
                    let simple = match escaped {
                        Some(b'0') => Some('\0'),
                        Some(b'a') => Some('\x07'),
                        Some(b'b') => Some('\x08'),
                        Some(b't' | b'\t') => Some('\t'),
                        Some(b'n') => Some('\n'),
                        Some(b'v') => Some('\x0B'),
                        Some(b'f') => Some('\x0C'),
                        Some(b'r') => Some('\r'),
                        Some(b'e') => Some('\x1B'),
                        Some(b' ') => Some(' '),
                        Some(b'"') => Some('"'),
                        Some(b'/') => Some('/'),
                        Some(b'\\') => Some('\\'),
                        Some(b'N') => Some('\u{85}'),
                        Some(b'_') => Some('\u{A0}'),
                        Some(b'L') => Some('\u{2028}'),
                        Some(b'P') => Some('\u{2029}'),
                        _ => None,
                    };
                    if let Some(c) = simple {
                        text.push(c);
                        kept = text.len();
                        i = stop + 2;
                        continue;
                    }
                    let digits = match escaped {
                        Some(b'x') => 2,
                        Some(b'u') => 4,
                        Some(b'U') => 8,
                        _ => return self.unsupported(stop, "an unknown escape"),
                    };
                    let c = self
                        .source
                        .get(stop + 2..stop + 2 + digits)
                        .filter(|h| h.bytes().all(|d| d.is_ascii_hexdigit()))
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .and_then(char::from_u32);
                    let Some(c) = c else {
                        return self.unsupported(stop, "an invalid escape");
                    };
                    text.push(c);
                    kept = text.len();
                    i = stop + 2 + digits;
                }
                _ => {
                    // A line break inside the quotes: folded.
                    let text = out.get_or_insert_with(String::new);
                    text.push_str(run);
                    let trimmed = text.trim_end_matches([' ', '\t']).len().max(kept);
                    text.truncate(trimmed);
                    i = self.continuation(stop + 1, at, parent, text, true)?;
                    kept = text.len();
                }
            }
        }
    }

    /// After a line break inside a quoted scalar (opened at `at`): blank lines become line
    /// feeds and, when `fold`, a lone break a space; returns where the next line's text starts.
    fn continuation(
        &self,
        mut from: usize,
        at: usize,
        parent: isize,
        text: &mut String,
        fold: bool,
    ) -> Read<usize> {
        let mut breaks = 0usize;
        loop {
            if from >= self.bytes.len() {
                return self.unsupported(at, "an unterminated quoted scalar");
            }
            let line = self.line(from)?;
            if line.is_blank(self.bytes) {
                breaks += 1;
                from = line.next;
                continue;
            }
            if (line.indent as isize) <= parent || self.marker(&line).is_some() {
                return self.unsupported(line.start, "a quoted scalar's line not indented");
            }
            if !fold && breaks > 0 {
                return self.unsupported(line.start, "blank lines after an escaped line break");
            }
            if fold {
                if breaks == 0 {
                    text.push(' ');
                } else {
                    text.extend(std::iter::repeat_n('\n', breaks));
                }
            }
            return Ok(self.skip_blanks(line.content, line.end));
        }
    }

    /// A literal block scalar (`|`, `|-`, `|+`) at `self.pos` on `line`, its content indented
    /// more than `parent`.
    fn literal(&mut self, line: &Line, parent: isize, tape: &mut Tape) -> Read<()> {
        let b = self.bytes;
        let mut i = self.pos + 1;
        let mut chomp = None;
        while i < line.end && matches!(b[i], b'-' | b'+' | b'0'..=b'9') {
            if b[i].is_ascii_digit() {
                return self.unsupported(i, "an explicit indentation indicator");
            }
            if chomp.is_some() {
                return self.unsupported(i, "two chomping indicators");
            }
            chomp = Some(b[i]);
            i += 1;
        }
        if i < line.end && !is_blank_byte(b[i]) {
            return self.unsupported(i, "text after a block scalar indicator");
        }
        self.rest_is_empty(i, line)?;
        // The content is indented as its first line that holds anything.
        let mut from = line.next;
        let mut leading_spaces = 0;
        let mut indent = None;
        while from < b.len() {
            let l = self.line(from)?;
            if l.content == l.end {
                leading_spaces = leading_spaces.max(l.indent);
                from = l.next;
                continue;
            }
            if l.is_blank(b) {
                return self.unsupported(l.start, "a blank line with a tab in a block scalar");
            }
            indent = Some(l.indent);
            break;
        }
        let indent = match indent {
            Some(n) if (n as isize) > parent && n > 0 && leading_spaces <= n => n,
            _ => return self.unsupported(line.next, "an empty or ambiguous block scalar"),
        };
        let mut text = String::new();
        let mut trailing = 0usize;
        let mut from = line.next;
        while from < b.len() {
            let l = self.line(from)?;
            if l.content == l.end {
                if l.indent > indent {
                    return self.unsupported(l.start, "a blank line indented past a block scalar's content");
                }
                trailing += 1;
                from = l.next;
                continue;
            }
            if l.indent < indent {
                if l.is_blank(b) {
                    return self.unsupported(l.start, "a blank line with a tab in a block scalar");
                }
                break;
            }
            text.extend(std::iter::repeat_n('\n', trailing));
            trailing = 0;
            text.push_str(&self.source[l.start + indent..l.end]);
            text.push('\n');
            from = l.next;
        }
        match chomp {
            Some(b'-') => {
                text.pop();
            }
            Some(_) => text.extend(std::iter::repeat_n('\n', trailing)),
            None => {}
        }
        let text = owned(tape, &text);
        tape.tokens.push(Token::Scalar { text, plain: false });
        self.pos = from;
        Ok(())
    }

    /// A flow collection on one line, at `self.pos`; the rest of the line must be empty.
    fn flow_in_block(&mut self, line: &Line, tape: &mut Tape) -> Read<()> {
        let end = self.flow(self.pos, line.end, tape)?;
        self.pos = self.rest_is_empty(end, line)?;
        Ok(())
    }

    /// A flow node at `at` on a line ending at `end`; returns where it ends.
    fn flow(&mut self, at: usize, end: usize, tape: &mut Tape) -> Read<usize> {
        let b = self.bytes;
        match b[at] {
            open @ (b'[' | b'{') => {
                self.enter()?;
                let close = if open == b'[' { b']' } else { b'}' };
                let start = tape.tokens.len();
                tape.tokens.push(Token::Seq { end: 0 });
                let mut i = self.skip_blanks(at + 1, end);
                loop {
                    if i >= end {
                        return self.unsupported(at, "a flow collection over several lines");
                    }
                    if b[i] == close {
                        i += 1;
                        break;
                    }
                    if open == b'{' {
                        i = self.flow_key(i, end, tape)?;
                        i = self.skip_blanks(i, end);
                        if i >= end || matches!(b[i], b',' | b'}' | b'#') {
                            return self.unsupported(i, "a flow mapping entry without a value");
                        }
                    }
                    i = self.flow(i, end, tape)?;
                    i = self.skip_blanks(i, end);
                    if i < end && b[i] == b',' {
                        i = self.skip_blanks(i + 1, end);
                    } else if i >= end || b[i] != close {
                        return self.unsupported(i, "a flow collection not closed on its line");
                    }
                }
                let stop = tape.tokens.len();
                tape.tokens[start] = if open == b'[' {
                    Token::Seq { end: stop }
                } else {
                    Token::Map { end: stop }
                };
                self.depth -= 1;
                if open == b'{' {
                    self.check_unique_keys(tape, start)?;
                }
                Ok(i)
            }
            b'"' | b'\'' => {
                let Some(close) = self.quoted_end(at, end) else {
                    return self.unsupported(at, "a quoted scalar over several lines in a flow collection");
                };
                let text = self.quoted(at, -1, tape)?;
                tape.tokens.push(Token::Scalar { text, plain: false });
                let next = self.skip_blanks(close + 1, end);
                if next < end && b[next] == b':' {
                    return self.unsupported(next, "a flow pair");
                }
                Ok(close + 1)
            }
            _ => {
                let stop = self.flow_plain_end(at, end)?;
                if stop < end && b[stop] == b':' {
                    return self.unsupported(stop, "a flow pair");
                }
                let text_end = self.trim_blanks_before(stop, at);
                let text = &self.source[at..text_end];
                if text.is_empty() {
                    return self.unsupported(at, "an empty flow entry");
                }
                if resolve_plain(text) == Plain::NonFinite {
                    return self.unsupported(at, "a non-finite float");
                }
                tape.tokens.push(Token::Scalar {
                    text: Text::Source {
                        start: at,
                        end: text_end,
                    },
                    plain: true,
                });
                Ok(stop)
            }
        }
    }

    fn trim_blanks_before(&self, mut end: usize, start: usize) -> usize {
        while end > start && is_blank_byte(self.bytes[end - 1]) {
            end -= 1;
        }
        end
    }

    /// A flow mapping's key at `at`, pushed, and its colon; returns the position after the colon.
    fn flow_key(&mut self, at: usize, end: usize, tape: &mut Tape) -> Read<usize> {
        let b = self.bytes;
        let colon = match b[at] {
            b'"' | b'\'' => {
                let Some(close) = self.quoted_end(at, end) else {
                    return self.unsupported(at, "a quoted key over several lines");
                };
                let text = self.quoted(at, -1, tape)?;
                if matches!(text, Text::Owned { .. }) {
                    return self.unsupported(at, "an escaped key");
                }
                tape.tokens.push(Token::Scalar { text, plain: false });
                self.skip_blanks(close + 1, end)
            }
            _ => {
                let stop = self.flow_plain_end(at, end)?;
                let text_end = self.trim_blanks_before(stop, at);
                let text = &self.source[at..text_end];
                if resolve_plain(text) == Plain::Null || text == "<<" {
                    return self.unsupported(at, "a null or merge key");
                }
                tape.tokens.push(Token::Scalar {
                    text: Text::Source {
                        start: at,
                        end: text_end,
                    },
                    plain: false,
                });
                stop
            }
        };
        if colon + 1 >= end || b[colon] != b':' || !is_blank_byte(b[colon + 1]) {
            return self.unsupported(colon, "a flow mapping key without a colon and a blank");
        }
        Ok(colon + 1)
    }

    /// Where a plain scalar in a flow collection ends: at a flow indicator or a colon followed
    /// by a blank. A comment, a bracket or the end of the line inside it is left alone.
    fn flow_plain_end(&self, at: usize, end: usize) -> Read<usize> {
        let b = self.bytes;
        let c = b[at];
        let safe_first = !is_indicator(c)
            || (matches!(c, b'-' | b'?' | b':')
                && at + 1 < end
                && !is_blank_byte(b[at + 1])
                && !is_flow_indicator(b[at + 1]));
        if !safe_first {
            return self.unsupported(at, "an indicator in a flow collection");
        }
        for i in at..end {
            match b[i] {
                b',' | b']' | b'}' => return Ok(i),
                b'[' | b'{' => return self.unsupported(i, "a bracket inside a flow scalar"),
                b':' if i + 1 == end || is_blank_byte(b[i + 1]) => return Ok(i),
                b':' if is_flow_indicator(b[i + 1]) => {
                    return self.unsupported(i, "a colon before a flow indicator");
                }
                b'#' if i > at && is_blank_byte(b[i - 1]) => {
                    return self.unsupported(i, "a comment in a flow collection");
                }
                _ => {}
            }
        }
        self.unsupported(at, "a flow collection over several lines")
    }
}

/// Appends `text` to the tape's own text.
fn owned(tape: &mut Tape, text: &str) -> Text {
    let start = tape.owned.len();
    tape.owned.push_str(text);
    Text::Owned {
        start,
        end: tape.owned.len(),
    }
}

#[cfg(test)]
mod tests;
