//! The shape issue 13 asked of relayd's source, checked on the source itself: the call's state
//! machine (`src/call/`) knows nothing of tokio outside its driver, and no two top-level
//! modules import each other in a circle (read from `crate::X` paths, as
//! `shared/tools/import-circles.py` does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// A file's code: without its unit tests (which may reach anywhere) and comment lines.
fn code_of(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules named by `crate::` paths in `code` (`crate::x::…` and
/// `crate::{x, y::…}`).
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name: String = item.trim().chars().take_while(|c| is_ident(*c)).collect();
                names.insert(name);
            }
        } else {
            names.insert(rest.chars().take_while(|c| is_ident(*c)).collect());
        }
    }
    names.remove("");
    names
}

#[test]
fn the_call_state_machine_uses_no_tokio_outside_its_driver() {
    let call = src().join("call");
    let driver = call.join("driver");
    let mut offenders = Vec::new();
    for file in rust_files(&call) {
        if file.starts_with(&driver) {
            continue;
        }
        let code = code_of(&file);
        if code.contains("tokio::") || code.contains("use tokio") {
            offenders.push(file.display().to_string());
        }
    }
    assert!(
        offenders.is_empty(),
        "tokio outside call/driver: {offenders:?}"
    );
    // The check reads what it should: the driver does use tokio.
    assert!(rust_files(&driver)
        .iter()
        .any(|f| code_of(f).contains("tokio::")));
}

#[test]
fn no_two_modules_import_each_other_in_a_circle() {
    // Top-level modules: src/x.rs and src/x/ (with src/x.rs beside it, if any).
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "main" || name == "lib" {
            continue;
        }
        let files = if path.is_dir() {
            rust_files(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            vec![path.clone()]
        } else {
            continue;
        };
        modules.entry(name).or_default().extend(files);
    }
    assert!(modules.contains_key("call") && modules.contains_key("served"));
    let edges: BTreeMap<&str, BTreeSet<String>> = modules
        .iter()
        .map(|(name, files)| {
            let mut to = BTreeSet::new();
            for f in files {
                to.extend(
                    crate_paths(&code_of(f))
                        .into_iter()
                        .filter(|o| o != name && modules.contains_key(o)),
                );
            }
            (name.as_str(), to)
        })
        .collect();
    let circle = first_circle(&edges);
    assert!(circle.is_none(), "import circle: {circle:?}");
}

/// A circle of `edges`, if there is one (depth-first: a module met again while on the path
/// closes one).
fn first_circle(edges: &BTreeMap<&str, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit<'a>(
        m: &'a str,
        edges: &'a BTreeMap<&'a str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| *p == m) {
            return Some(path[at..].iter().map(|s| s.to_string()).collect());
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for next in edges.get(m).into_iter().flatten() {
            if let Some(circle) = visit(next, edges, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|m| visit(m, edges, &mut Vec::new(), &mut done))
}

#[test]
fn a_circle_is_found_and_a_chain_is_not() {
    let graph = |pairs: &[(&'static str, &'static str)]| {
        let mut g: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry(a).or_default().insert(b.to_string());
            g.entry(b).or_default();
        }
        g
    };
    assert_eq!(
        first_circle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])),
        None
    );
    assert_eq!(
        first_circle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".to_string(), "b".into(), "c".into()])
    );
}

#[test]
fn crate_paths_reads_single_and_grouped_imports() {
    let code = "use crate::served::ServedSession;\nuse crate::{billing_control::X, trace};\nlet x = crate::relay::Relay::f();";
    let names: Vec<String> = crate_paths(code).into_iter().collect();
    assert_eq!(names, ["billing_control", "relay", "served", "trace"]);
}
