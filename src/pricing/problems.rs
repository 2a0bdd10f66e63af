//! Problems found in a price file, located by line and column.

use std::fmt;
use std::ops::Range;

/// One thing wrong with a price file, at a 1-based line and column (columns
/// count characters, not bytes). The message says what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Everything wrong with a price file, reported at once, in file order.
///
/// Returned instead of a table: the table in force before stays in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceFileErrors {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for PriceFileErrors {
    /// One `file:line:col: message` per line, the form editors and CI logs link.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: {}", self.file, p.line, p.column, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for PriceFileErrors {}

/// Collects problems while a file is checked, turning byte offsets into
/// line and column as they are recorded.
pub(super) struct Problems<'a> {
    text: &'a str,
    found: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Self { text, found: Vec::new() }
    }

    /// The text being checked, for quoting what the operator wrote.
    pub(super) fn text(&self) -> &'a str {
        self.text
    }

    pub(super) fn at(&mut self, offset: usize, message: impl Into<String>) {
        let (line, column) = line_column(self.text, offset);
        self.found.push(Problem { line, column, message: message.into() });
    }

    pub(super) fn at_span(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.at(span.start, message);
    }

    /// The 1-based line of a byte offset, for messages that point elsewhere
    /// ("already used at line 12").
    pub(super) fn line_of(&self, offset: usize) -> usize {
        line_column(self.text, offset).0
    }

    pub(super) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    pub(super) fn into_errors(self, file: &str) -> PriceFileErrors {
        let mut problems = self.found;
        problems.sort();
        problems.dedup();
        PriceFileErrors { file: file.to_owned(), problems }
    }
}

/// 1-based line and column of a byte offset. Offsets past the end clamp to the
/// end, so a span from a parser can never make error reporting panic.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let before = &bytes[..offset.min(bytes.len())];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |newline| newline + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    // Count UTF-8 lead bytes so a column is a character position.
    let column = before[line_start..].iter().filter(|&&b| (b & 0xC0) != 0x80).count() + 1;
    (line, column)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_one_based_line_and_character_column() {
        let text = "ab\ncé = 1\n";
        assert_eq!(line_column(text, 0), (1, 1), "start of file");
        assert_eq!(line_column(text, 3), (2, 1), "start of second line");
        // 'é' is two bytes; the '=' after it is the 4th character of line 2.
        assert_eq!(line_column(text, 7), (2, 4), "column counts characters");
        assert_eq!(line_column(text, 999), (3, 1), "past the end clamps");
    }

    #[test]
    fn display_prints_one_located_problem_per_line_in_file_order() {
        let mut problems = Problems::new("a\nb\nc\n");
        problems.at(4, "third");
        problems.at(0, "first");
        let errors = problems.into_errors("prices.toml");
        assert_eq!(errors.to_string(), "prices.toml:1:1: first\nprices.toml:3:1: third");
    }
}
