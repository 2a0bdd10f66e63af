//! What changed between two price files: every model and tool added,
//! removed, or with a field whose value changed, with the percentage change
//! of prices, and the table-wide `[markup]` (an entry's own
//! `markup_percent` is one of its fields). Compared field by field as written (after both files pass
//! validation), so a change to a schedule, a tier or an alias shows too.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

/// One difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// An entry only the new file has.
    Added {
        /// "model" or "tool".
        kind: &'static str,
        /// Its name.
        name: String,
        /// Its fields, `key = value`.
        fields: Vec<String>,
    },
    /// An entry only the old file has.
    Removed {
        /// "model" or "tool".
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A field whose value changed, appeared or went away.
    Changed {
        /// "model" or "tool".
        kind: &'static str,
        /// The entry.
        name: String,
        /// Dotted field path (`service_tiers.priority.input`).
        field: String,
        /// Old value, if it was set.
        old: Option<String>,
        /// New value, if it is set.
        new: Option<String>,
    },
}

impl Change {
    /// (new - old) / old in percent, two places, for numeric values.
    pub fn percent(&self) -> Option<Decimal> {
        let Change::Changed { old: Some(old), new: Some(new), .. } = self else { return None };
        let (old, new) = (Decimal::from_str(old).ok()?, Decimal::from_str(new).ok()?);
        if old.is_zero() {
            return None;
        }
        Some(((new - old) * Decimal::ONE_HUNDRED / old).round_dp(2).normalize())
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Added { kind, name, fields } => write!(f, "{kind} {name}: added ({})", fields.join(", ")),
            Change::Removed { kind, name } => write!(f, "{kind} {name}: removed"),
            Change::Changed { kind, name, field, old, new } => {
                let show = |value: &Option<String>| value.clone().unwrap_or_else(|| "(unset)".into());
                write!(f, "{kind} {name}: {field} {} -> {}", show(old), show(new))?;
                match self.percent() {
                    Some(percent) if percent > Decimal::ZERO => write!(f, " (+{percent}%)"),
                    Some(percent) => write!(f, " ({percent}%)"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A TOML value as one line of text: strings bare, the rest as TOML.
fn text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Leaf fields of an entry by dotted path; arrays (aliases, schedules) whole.
fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            toml::Value::Table(inner) => flatten(&path, inner, out),
            other => {
                out.insert(path, text(other));
            }
        }
    }
}

fn entries(file: &toml::Table, section: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let Some(toml::Value::Table(section)) = file.get(section) else { return BTreeMap::new() };
    section
        .iter()
        .map(|(name, value)| {
            let mut fields = BTreeMap::new();
            if let toml::Value::Table(table) = value {
                flatten("", table, &mut fields);
            }
            (name.clone(), fields)
        })
        .collect()
}

/// Equal as written, or as numbers ("2.00" and "2" are one price).
fn same(a: Option<&String>, b: Option<&String>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a == b || matches!((Decimal::from_str(a), Decimal::from_str(b)), (Ok(x), Ok(y)) if x == y)
        }
        (a, b) => a == b,
    }
}

/// Each field of one entry that changed, appeared or went away.
fn changed_fields(
    kind: &'static str,
    name: &str,
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
    changes: &mut Vec<Change>,
) {
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for field in keys {
        let (was, is) = (before.get(field), after.get(field));
        if !same(was, is) {
            changes.push(Change::Changed {
                kind,
                name: name.to_owned(),
                field: field.clone(),
                old: was.cloned(),
                new: is.cloned(),
            });
        }
    }
}

/// Every model and tool difference from `old` to `new` (both price files
/// that already passed validation).
pub fn diff(old: &str, new: &str) -> Result<Vec<Change>, String> {
    let old: toml::Table = toml::from_str(old).map_err(|err| format!("old file: {err}"))?;
    let new: toml::Table = toml::from_str(new).map_err(|err| format!("new file: {err}"))?;
    let mut changes = Vec::new();
    let table_markup = |file: &toml::Table| {
        let mut fields = BTreeMap::new();
        if let Some(toml::Value::Table(markup)) = file.get("markup") {
            flatten("", markup, &mut fields);
        }
        fields
    };
    let (before, after) = (table_markup(&old), table_markup(&new));
    changed_fields("table", "[markup]", &before, &after, &mut changes);
    for (kind, section) in [("model", "models"), ("tool", "tools")] {
        let (before, after) = (entries(&old, section), entries(&new, section));
        for (name, fields) in &after {
            let Some(previous) = before.get(name) else {
                let fields = fields.iter().map(|(key, value)| format!("{key} = {value}")).collect();
                changes.push(Change::Added { kind, name: name.clone(), fields });
                continue;
            };
            changed_fields(kind, name, previous, fields, &mut changes);
        }
        for name in before.keys().filter(|name| !after.contains_key(*name)) {
            changes.push(Change::Removed { kind, name: name.clone() });
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn changed_added_and_removed_entries_are_reported_with_percentages() {
        let old = r#"
[models."a"]
input_per_mtok = "2.00"
output_per_mtok = "8"
default_max_output_tokens = 100
[models."gone"]
input_per_mtok = "1"
[tools."t"]
per_call = "0.01"
"#;
        let new = r#"
[models."a"]
input_per_mtok = "2.50"
output_per_mtok = "8"
default_max_output_tokens = 100
service_tiers.priority = { input = "2", output = "2" }
[models."fresh"]
input_per_mtok = "3"
[tools."t"]
per_call = "0.005"
"#;
        let changes = diff(old, new).unwrap();
        let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "model a: input_per_mtok 2.00 -> 2.50 (+25%)",
                "model a: service_tiers.priority.input (unset) -> 2",
                "model a: service_tiers.priority.output (unset) -> 2",
                "model fresh: added (input_per_mtok = 3)",
                "model gone: removed",
                "tool t: per_call 0.01 -> 0.005 (-50%)",
            ]
        );
        assert_eq!(changes[0].percent(), Some(dec!(25)));
        assert!(diff(old, old).unwrap().is_empty());
        // The same price written another way is no change.
        assert!(diff(old, &old.replace("\"2.00\"", "\"2\"")).unwrap().is_empty());
    }

    #[test]
    fn markup_changes_are_reported_table_wide_and_per_entry() {
        let old = r#"
[markup]
percent = "20"
[models."a"]
input_per_mtok = "1"
[models."b"]
input_per_mtok = "1"
markup_percent = "0"
[tools."t"]
per_call = "0.01"
"#;
        let new = r#"
[markup]
percent = "25"
[models."a"]
input_per_mtok = "1"
markup_percent = "35"
[models."b"]
input_per_mtok = "1"
[tools."t"]
per_call = "0.01"
markup_percent = "7.5"
"#;
        let lines: Vec<String> = diff(old, new).unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "table [markup]: percent 20 -> 25 (+25%)",
                "model a: markup_percent (unset) -> 35",
                "model b: markup_percent 0 -> (unset)",
                "tool t: markup_percent (unset) -> 7.5",
            ]
        );
        let unmarked = old.replace("[markup]\npercent = \"20\"\n", "");
        let lines: Vec<String> = diff(&unmarked, old).unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(lines, ["table [markup]: percent (unset) -> 20"], "a markup added is a change");
        assert!(diff(old, &old.replace("\"20\"", "\"20.00\"")).unwrap().is_empty(), "same percent");
    }
}
