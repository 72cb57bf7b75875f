//! Printing results: a human-readable table on stdout, then one JSON object as the very
//! last line, which scripts and CI parse.

use std::fmt::Write as _;
use std::io::Write as _;

use serde::Serialize;

/// A table of `N` columns: a left-aligned metric name, then right-aligned figures.
#[derive(Debug)]
pub struct Table<const N: usize> {
    header: [String; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    pub fn new(header: [&str; N]) -> Self {
        Self {
            header: header.map(str::to_owned),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: [String; N]) -> &mut Self {
        self.rows.push(cells);
        self
    }

    pub fn render(&self) -> String {
        let mut widths = self.header.clone().map(|h| h.chars().count());
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String; N]| {
            let (metric, rest) = cells.split_first().expect("a table has columns");
            let _ = write!(out, "{metric:<w$}", w = widths[0]);
            for (cell, w) in rest.iter().zip(&widths[1..]) {
                let _ = write!(out, "  {cell:>w$}");
            }
            out.push('\n');
        };
        line(&mut out, &self.header);
        let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for row in &self.rows {
            line(&mut out, row);
        }
        out
    }
}

/// `value` with `decimals` digits, or "-" when absent.
pub fn fixed(value: Option<f64>, decimals: usize) -> String {
    match value {
        // Rounded first so the table and the JSON line agree to the last digit.
        Some(v) => format!("{:.decimals$}", round(v, decimals as i32)),
        None => "-".to_owned(),
    }
}

/// Rounds for JSON, so the line stays readable.
pub fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Prints `value` as one line of JSON and flushes: call it last, nothing may follow it on
/// stdout.
pub fn print_json_last<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let line = serde_json::to_string(value)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_columns() {
        let mut t = Table::new(["metric", "direct", "mesh", "ratio"]);
        t.row([
            "throughput".into(),
            "18.20".into(),
            "4.10".into(),
            "0.23x".into(),
        ]);
        t.row([
            "rss".into(),
            fixed(None, 1),
            fixed(Some(12.345), 1),
            "".into(),
        ]);
        let expected = "\
metric      direct  mesh  ratio
-------------------------------
throughput   18.20  4.10  0.23x
rss              -  12.3       
";
        assert_eq!(t.render(), expected);
    }

    #[test]
    fn rounds() {
        assert_eq!(round(1.23456, 2), 1.23);
        assert_eq!(round(-0.005, 1), -0.0);
    }
}
