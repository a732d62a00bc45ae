//! The code's shape, checked: no crate's modules import each other in a cycle (a change
//! in one module of a cycle means reading all of them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a piece of code names through `crate::`, outside comments
/// and test modules.
fn named_modules(text: &str) -> BTreeSet<String> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::c}`: the first name of each path in the group.
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for path in group.split(',') {
                let name = ident(path.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// A cycle among `deps` (module -> modules it names), if there is one.
fn find_cycle(deps: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in deps.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, deps, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    deps.keys()
        .find_map(|node| visit(node, deps, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_modules_that_import_each_other_in_a_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut crates: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path().join("src"))
        .collect();
    crates.push(root.join("src"));
    let mut modules = 0;
    for src in crates {
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let rel = file.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            if top == "lib" || top == "main" {
                continue;
            }
            let mut named = named_modules(&std::fs::read_to_string(&file).unwrap());
            named.remove(&top);
            deps.entry(top).or_default().extend(named);
        }
        modules += deps.len();
        if let Some(cycle) = find_cycle(&deps) {
            panic!(
                "{}: modules in a cycle: {}",
                src.display(),
                cycle.join(" -> ")
            );
        }
    }
    assert!(modules > 40, "only {modules} modules found");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let named = named_modules("use crate::{a, b::C};\nfn f() { crate::c::g(); }\n// crate::z\n");
    assert_eq!(named, ["a", "b", "c"].map(String::from).into());
    let deps: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        find_cycle(&deps),
        Some(["a", "b", "c", "a"].map(String::from).to_vec())
    );
}

/// Lines of code of a source file: before its test module, neither blank nor comments.
fn lines_of_code(text: &str) -> usize {
    text.split("#[cfg(test)]")
        .next()
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .count()
}

#[test]
fn no_source_file_holds_more_than_450_lines_of_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("crates"), &mut files);
    let tests = |p: &Path| {
        let name = p.file_name().unwrap().to_string_lossy();
        name == "tests.rs" || name.ends_with("_tests.rs")
    };
    let mut long: Vec<(usize, String)> = files
        .iter()
        .filter(|f| !tests(f))
        .map(|f| {
            (
                lines_of_code(&std::fs::read_to_string(f).unwrap()),
                f.strip_prefix(root).unwrap().display().to_string(),
            )
        })
        .filter(|(n, _)| *n > 450)
        .collect();
    long.sort();
    assert!(long.is_empty(), "files over 450 lines of code: {long:?}");
    assert!(lines_of_code("fn a() {}\n// b\n\nfn c() {}\n#[cfg(test)]\nmod t {}\n") == 2);
}
