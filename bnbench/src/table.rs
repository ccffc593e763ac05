//! The text tables bnbench prints, built with comfy-table in one style: a header
//! underlined, no other borders, numbers right-aligned, no wrapping (logs are read with
//! `tail` and `grep`, so a row stays on one line).

use comfy_table::{presets, CellAlignment, Table, TableComponent};

/// A table with `header`; the columns whose index is in `right` are right-aligned.
pub fn new(header: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_style(TableComponent::HeaderLines, '-')
        .set_header(header.to_vec());
    for (i, c) in t.column_iter_mut().enumerate() {
        // Two spaces between columns, none before the first.
        c.set_padding((0, 2));
        if right.contains(&i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// The table's text with a final newline; lines carry no trailing spaces.
pub fn render(t: &Table) -> String {
    let mut s: String = t.lines().map(|l| l.trim_end().to_string() + "\n").collect();
    if t.is_empty() && t.header().is_none() {
        s.clear();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_numbers_align_right() {
        let mut t = new(&["name", "value"], &[1]);
        t.add_row(vec!["a", "1.5"]);
        t.add_row(vec!["longer", "123.25"]);
        let text = render(&t);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("name") && lines[0].ends_with("value"));
        assert!(lines[1].chars().all(|c| c == '-'), "{text}");
        assert_eq!(lines[2], "a          1.5", "{text}");
        assert_eq!(lines[3], "longer  123.25", "{text}");
        assert!(text.lines().all(|l| l == l.trim_end()));
    }
}
