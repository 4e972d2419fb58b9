//! Tables read from CSV for drift references and comparisons: a column whose every non-empty
//! cell is a number is numeric, any other is text (categorical); an empty cell is missing.
//! Rows become what the agent's engine sees: one f32 per feature, NaN where missing, the code
//! of its category for a categorical feature.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use proto::drift::{FeatureDecl, FeatureKind};
use thiserror::Error;

/// Rows read from one file, at most; a larger reference belongs in a sample.
pub const MAX_ROWS: usize = 10_000_000;

#[derive(Debug, Error)]
pub enum TableError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} line {line}: {reason}")]
    Row { path: PathBuf, line: usize, reason: String },
    #[error("{path} has no header row; the first line must name the columns")]
    NoHeader { path: PathBuf },
    #[error("{path} has more than {MAX_ROWS} rows")]
    TooLarge { path: PathBuf },
    #[error("{path} lacks column {column:?}, which {other} has")]
    MissingColumn { path: PathBuf, column: String, other: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// NaN where a cell is empty.
    Numeric(Vec<f32>),
    Text(Vec<Option<String>>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Numeric(v) => v.len(),
            Column::Text(v) => v.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub columns: Vec<Column>,
}

impl Table {
    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, Column::len)
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.header.iter().position(|h| h == name).map(|i| &self.columns[i])
    }

    /// One declaration per column, for a comparison without a model: numeric columns numeric,
    /// text columns categorical with the categories in order of frequency (ties by name); every
    /// feature nullable, so missing values count.
    pub fn declarations(&self) -> Vec<FeatureDecl> {
        self.header
            .iter()
            .zip(&self.columns)
            .map(|(name, column)| match column {
                Column::Numeric(_) => FeatureDecl::numeric(name).nullable(),
                Column::Text(cells) => {
                    let mut counts: HashMap<&str, usize> = HashMap::new();
                    for cell in cells.iter().flatten() {
                        *counts.entry(cell).or_default() += 1;
                    }
                    let mut categories: Vec<(&str, usize)> = counts.into_iter().collect();
                    categories.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                    let names: Vec<&str> = categories.into_iter().map(|(c, _)| c).collect();
                    FeatureDecl { kind: FeatureKind::Categorical, ..FeatureDecl::categorical(name, &names).nullable() }
                }
            })
            .collect()
    }

    /// The rows as the engine takes them, for `decls` (matched to columns by name): numbers as
    /// they are, categories as their codes (a category outside the declared ones becomes a code
    /// past them, which the sketch counts as "other"), NaN where missing.
    pub fn encode(&self, path: &Path, decls: &[FeatureDecl], other: &str) -> Result<Vec<Vec<f32>>, TableError> {
        let mut rows = vec![Vec::with_capacity(decls.len()); self.rows()];
        for decl in decls {
            let column = self.column(&decl.name).ok_or_else(|| TableError::MissingColumn {
                path: path.into(),
                column: decl.name.clone(),
                other: other.into(),
            })?;
            let codes: HashMap<&str, f32> =
                decl.categories.iter().enumerate().map(|(i, c)| (c.as_str(), i as f32)).collect();
            let outside = decl.categories.len() as f32;
            for (row, out) in rows.iter_mut().enumerate() {
                let value = match (decl.kind, column) {
                    (FeatureKind::Numeric, Column::Numeric(values)) => values[row],
                    (FeatureKind::Categorical, Column::Text(cells)) => {
                        cells[row].as_deref().map_or(f32::NAN, |c| codes.get(c).copied().unwrap_or(outside))
                    }
                    // Codes given as numbers.
                    (FeatureKind::Categorical, Column::Numeric(values)) => values[row],
                    (FeatureKind::Numeric, Column::Text(_)) => {
                        return Err(TableError::Row {
                            path: path.into(),
                            line: row + 2,
                            reason: format!("column {:?} is numeric elsewhere but holds text here", decl.name),
                        })
                    }
                };
                out.push(value);
            }
        }
        Ok(rows)
    }
}

/// Reads a CSV file whose first line names the columns.
pub fn read(path: &Path) -> Result<Table, TableError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| TableError::Read { path: path.into(), reason: e.to_string() })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Table, TableError> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).trim(csv::Trim::All).from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| TableError::Row { path: path.into(), line: 1, reason: e.to_string() })?
        .iter()
        .map(str::to_string)
        .collect();
    if header.is_empty() || header.iter().all(|h| h.parse::<f64>().is_ok()) {
        return Err(TableError::NoHeader { path: path.into() });
    }
    let mut cells: Vec<Vec<String>> = vec![Vec::new(); header.len()];
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| TableError::Row { path: path.into(), line: i + 2, reason: e.to_string() })?;
        if i >= MAX_ROWS {
            return Err(TableError::TooLarge { path: path.into() });
        }
        if record.len() != header.len() {
            let reason = format!("{} cells, the header names {}", record.len(), header.len());
            return Err(TableError::Row { path: path.into(), line: i + 2, reason });
        }
        for (column, cell) in cells.iter_mut().zip(record.iter()) {
            column.push(cell.to_string());
        }
    }
    let columns = cells.into_iter().map(column_of).collect();
    Ok(Table { header, columns })
}

fn column_of(cells: Vec<String>) -> Column {
    let numbers: Option<Vec<f32>> = cells
        .iter()
        .map(|c| if c.is_empty() { Some(f32::NAN) } else { c.parse::<f32>().ok().filter(|v| v.is_finite()) })
        .collect();
    match numbers {
        Some(values) => Column::Numeric(values),
        None => Column::Text(cells.into_iter().map(|c| (!c.is_empty()).then_some(c)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_and_text_columns_are_told_apart_and_empty_cells_are_missing() {
        let table = parse(Path::new("t.csv"), "x,colour\n1.5,red\n,blue\n-2,\n").unwrap();
        assert_eq!(table.rows(), 3);
        let Column::Numeric(x) = &table.columns[0] else { panic!() };
        assert_eq!((x[0], x[1].is_nan(), x[2]), (1.5, true, -2.0));
        assert_eq!(table.columns[1], Column::Text(vec![Some("red".into()), Some("blue".into()), None]));
    }

    #[test]
    fn categories_are_ordered_by_frequency_and_unknown_ones_get_a_code_past_them() {
        let reference = parse(Path::new("r.csv"), "c\nb\na\nb\nc\nb\na\n").unwrap();
        let decls = reference.declarations();
        assert_eq!(decls[0].categories, ["b", "a", "c"]);
        // A one-column table cannot hold an empty cell (a blank line is no row), hence x.
        let current = parse(Path::new("c.csv"), "c,x\na,1\nz,2\n,3\n").unwrap();
        let rows = current.encode(Path::new("c.csv"), &decls, "r.csv").unwrap();
        assert_eq!((rows[0][0], rows[1][0], rows[2][0].is_nan()), (1.0, 3.0, true));
    }

    #[test]
    fn a_table_without_a_header_or_with_a_short_row_is_refused_with_its_line() {
        let err = parse(Path::new("t.csv"), "1,2\n3,4\n").unwrap_err().to_string();
        assert_eq!(err, "t.csv has no header row; the first line must name the columns");
        let err = parse(Path::new("t.csv"), "a,b\n1,2\n3\n").unwrap_err().to_string();
        assert!(err.starts_with("t.csv line 3:"), "{err}");
        let current = parse(Path::new("c.csv"), "a\n1\n").unwrap();
        let decls = [FeatureDecl::numeric("b")];
        let err = current.encode(Path::new("c.csv"), &decls, "ref.csv").unwrap_err().to_string();
        assert_eq!(err, "c.csv lacks column \"b\", which ref.csv has");
    }
}
