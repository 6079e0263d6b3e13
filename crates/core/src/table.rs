//! Column-aligned text tables in the style of `kubectl get`.

use std::borrow::Cow;

/// `text` with control characters (and the bidirectional overrides that reorder a terminal
/// line) written as escapes (`\n`, `\u{1b}`), so a name in a snapshot cannot break a table's
/// lines or send codes to the terminal. Cheap when there is nothing to escape.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A table with upper-case headers and columns padded to their widest cell, three spaces apart.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; control characters in cells are escaped ([`escape_controls`]).
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        let cells = cells
            .into_iter()
            .map(|c| match escape_controls(&c) {
                Cow::Borrowed(_) => c,
                Cow::Owned(escaped) => escaped,
            })
            .collect();
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, (cell, width)) in line.iter().zip(&widths).enumerate() {
                if i + 1 == line.len() {
                    text.push_str(cell);
                } else {
                    text.push_str(&format!("{cell:<width$}   "));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns_like_kubectl() {
        let mut t = Table::new(&["name", "port"]);
        t.row(vec!["storefront".into(), "80".into()]);
        t.row(vec!["db".into(), "5432".into()]);
        assert_eq!(
            t.render(),
            "NAME         PORT\nstorefront   80\ndb           5432\n"
        );
    }

    #[test]
    fn control_characters_in_cells_are_escaped() {
        let mut t = Table::new(&["name"]);
        t.row(vec!["web\n\u{1b}[31mred\u{202E}x".into()]);
        assert_eq!(t.render(), "NAME\nweb\\n\\u{1b}[31mred\\u{202e}x\n");
        assert_eq!(escape_controls("plain-name"), Cow::Borrowed("plain-name"));
    }
}
