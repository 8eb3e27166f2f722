//! The billing store read back as `relayd billing export --format jsonl` prints it.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::relay::relayd_bin;

/// `relayd --config CONFIG billing export --format jsonl --records KIND` (`sessions` or
/// `charges`), one JSON value per record, in the store's order.
pub fn export(config: &Path, records: &str) -> Vec<Value> {
    let out = Command::new(relayd_bin())
        .arg("--config")
        .arg(config)
        .args([
            "billing",
            "export",
            "--format",
            "jsonl",
            "--records",
            records,
        ])
        .env_remove("RELAYD_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "relayd billing export failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
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
