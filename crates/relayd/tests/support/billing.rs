//! The billing store read back as `relayd billing export --format jsonl` prints it.

use std::path::Path;

use serde_json::Value;

use super::relay::relayd_cmd;

/// `relayd --config CONFIG billing export --format FORMAT --records KIND` (`jsonl`, `csv`…;
/// `sessions` or `charges`), as the text it printed; panics with its stderr when it fails.
pub fn export_text(config: &Path, format: &str, records: &str) -> String {
    let out = relayd_cmd(config)
        .args([
            "billing",
            "export",
            "--format",
            format,
            "--records",
            records,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "relayd billing export failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `relayd --config CONFIG billing export --format jsonl --records KIND` (`sessions` or
/// `charges`), one JSON value per record, in the store's order.
pub fn export(config: &Path, records: &str) -> Vec<Value> {
    export_text(config, "jsonl", records)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad export line {l:?}: {e}")))
        .collect()
}

/// A string field of a record; panics naming the record when it has none.
pub fn field<'a>(record: &'a Value, name: &str) -> &'a str {
    record[name]
        .as_str()
        .unwrap_or_else(|| panic!("record without string {name}: {record}"))
}

/// An integer field of a record; panics naming the record when it has none.
pub fn int(record: &Value, name: &str) -> i64 {
    record[name]
        .as_i64()
        .unwrap_or_else(|| panic!("record without integer {name}: {record}"))
}
