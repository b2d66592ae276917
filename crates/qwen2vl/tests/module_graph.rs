//! The modules of the three crates import each other one way only (issue 11, "no import
//! cycles"; `docs/architecture.md` shows the layers).
//!
//! Each crate's `src/` is read as text: every file is a module (`a/b.rs` and `a/b/mod.rs` are
//! `a::b`), and every path it names through `crate::`, `super::`, `self::` or one of its own
//! `mod` children (`use` groups `{…}` included) is an edge to the longest module that path
//! starts with. Comments and `#[cfg(test)]` tails are left out (tests may reach anywhere).
//! Two rules are checked:
//! - between top-level modules (`processing`, `model`, `generation`, `pipeline`, `engine`,
//!   …) the edges form no cycle: data flows one way;
//! - between files, leaving out the edges of a directory module's `mod.rs` to and from its
//!   own files (the facade re-exporting its children, which use its private types), the
//!   edges form no cycle either: no two sibling files need each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;
type Edges = BTreeSet<(Module, Module)>;

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a readable src dir") {
        let p = entry.expect("a dir entry").path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// `a/b.rs` and `a/b/mod.rs` → `["a", "b"]`; `lib.rs` / `main.rs` → `[]`.
fn module_of(root: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(root).expect("under src");
    let mut parts: Module = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("lib" | "main" | "mod")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its `#[cfg(test)]` tail.
fn code_of(src: &str) -> String {
    let src = src.split("\n#[cfg(test)]").next().unwrap_or("");
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Reads a path at `i` (`a::b::{c, d::e}` or `a::b::c`), appending every full path to `out`.
/// Returns where it ended.
fn read_path(s: &[u8], mut i: usize, prefix: &[String], out: &mut Vec<Module>) -> usize {
    let mut segs = prefix.to_vec();
    loop {
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < s.len() && s[i] == b'{' {
            i += 1;
            loop {
                while i < s.len() && (s[i].is_ascii_whitespace() || s[i] == b',') {
                    i += 1;
                }
                if i >= s.len() || s[i] == b'}' {
                    return i + 1;
                }
                let before = i;
                i = read_path(s, i, &segs, out);
                if i == before {
                    i += 1; // not a path (e.g. `*`): skip it
                }
            }
        }
        let start = i;
        while i < s.len() && is_ident(s[i]) {
            i += 1;
        }
        if i == start {
            break;
        }
        segs.push(String::from_utf8_lossy(&s[start..i]).into_owned());
        if s[i..].starts_with(b"::") {
            i += 2;
        } else {
            break;
        }
    }
    if segs.len() > prefix.len() {
        out.push(segs);
    }
    i
}

/// Every path the code names that starts with `crate`, `super`, `self` or a child module.
fn paths_in(code: &str) -> Vec<Module> {
    let kids: BTreeSet<String> = code
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l
                .strip_prefix("pub(crate) ")
                .or(l.strip_prefix("pub "))
                .unwrap_or(l);
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_string())
        })
        .collect();
    let s = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let starts = is_ident(s[i]) && (i == 0 || !(is_ident(s[i - 1]) || s[i - 1] == b':'));
        if starts {
            let end = (i..s.len()).find(|&j| !is_ident(s[j])).unwrap_or(s.len());
            let word = String::from_utf8_lossy(&s[i..end]);
            let rooted = matches!(&*word, "crate" | "super" | "self") || kids.contains(&*word);
            if rooted && s[end..].starts_with(b"::") {
                let mut found = Vec::new();
                i = read_path(s, i, &[], &mut found);
                out.extend(found.into_iter().map(|p| {
                    if kids.contains(&p[0]) {
                        std::iter::once("self".to_string()).chain(p).collect()
                    } else {
                        p
                    }
                }));
                continue;
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The modules of a crate and the edges between them (a module's edges to itself and to the
/// crate root, a facade of re-exports, are left out).
fn graph(src: &Path) -> (BTreeMap<Module, ()>, Edges) {
    let mut files = Vec::new();
    rs_files(src, &mut files);
    let mods: BTreeMap<Module, String> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).expect("readable source");
            (module_of(src, f), code_of(&text))
        })
        .collect();
    let mut edges = Edges::new();
    for (m, code) in &mods {
        for path in paths_in(code) {
            let mut base = m.clone();
            let mut rest = path.as_slice();
            match rest.first().map(String::as_str) {
                Some("crate") => {
                    base.clear();
                    rest = &rest[1..];
                }
                Some("self") => rest = &rest[1..],
                _ => {
                    while rest.first().is_some_and(|s| s == "super") {
                        base.pop();
                        rest = &rest[1..];
                    }
                }
            }
            let full: Module = base.into_iter().chain(rest.iter().cloned()).collect();
            let target = (1..=full.len())
                .rev()
                .map(|n| full[..n].to_vec())
                .find(|p| mods.contains_key(p));
            if let Some(t) = target {
                if &t != m {
                    edges.insert((m.clone(), t));
                }
            }
        }
    }
    (mods.keys().map(|k| (k.clone(), ())).collect(), edges)
}

/// A cycle in the graph, as the list of its nodes, if there is one.
fn find_cycle(edges: &Edges) -> Option<Vec<Module>> {
    let mut adj: BTreeMap<&Module, Vec<&Module>> = BTreeMap::new();
    for (a, b) in edges {
        adj.entry(a).or_default().push(b);
        adj.entry(b).or_default();
    }
    // 0 unseen, 1 on the stack, 2 done.
    let mut state: BTreeMap<&Module, u8> = adj.keys().map(|k| (*k, 0)).collect();
    fn visit<'a>(
        v: &'a Module,
        adj: &BTreeMap<&'a Module, Vec<&'a Module>>,
        state: &mut BTreeMap<&'a Module, u8>,
        stack: &mut Vec<&'a Module>,
    ) -> Option<Vec<Module>> {
        state.insert(v, 1);
        stack.push(v);
        for &w in &adj[v] {
            match state[w] {
                1 => {
                    let at = stack.iter().position(|x| *x == w).expect("on the stack");
                    return Some(stack[at..].iter().map(|m| (*m).clone()).collect());
                }
                0 => {
                    if let Some(c) = visit(w, adj, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(v, 2);
        None
    }
    let nodes: Vec<&Module> = adj.keys().copied().collect();
    for v in nodes {
        if state[v] == 0 {
            if let Some(c) = visit(v, &adj, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn top_level(edges: &Edges) -> Edges {
    edges
        .iter()
        .filter(|(a, b)| !a.is_empty() && !b.is_empty() && a[0] != b[0])
        .map(|(a, b)| (vec![a[0].clone()], vec![b[0].clone()]))
        .collect()
}

/// Edges between files, less those between a module and its ancestors.
fn between_files(edges: &Edges) -> Edges {
    edges
        .iter()
        .filter(|(a, b)| !(a.starts_with(b) || b.starts_with(a)))
        .cloned()
        .collect()
}

fn show(c: &[Module]) -> String {
    let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
    format!("{} -> {}", names.join(" -> "), names[0])
}

#[test]
fn no_import_cycles_in_any_crate() {
    for name in ["qwen2vl", "qwen2vl-server", "qwen2vl-cli"] {
        let (mods, edges) = graph(&crate_src(name));
        assert!(mods.len() > 5, "{name}: only {} modules read", mods.len());
        if let Some(c) = find_cycle(&top_level(&edges)) {
            panic!("{name}: top-level modules import each other: {}", show(&c));
        }
        if let Some(c) = find_cycle(&between_files(&edges)) {
            panic!("{name}: files import each other: {}", show(&c));
        }
    }
}

/// The library's layers, lowest first, as `docs/architecture.md` draws them.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "base",
        &[
            "error",
            "config",
            "architecture",
            "memory",
            "weights",
            "gguf",
            "ops",
            "rope",
            "inputs",
            "kv_cache",
            "grounding",
            "encoder_cache",
            "mapped",
            "lru",
            "prefix_cache",
        ],
    ),
    ("inputs", &["processing"]),
    ("compute", &["nn", "vision", "text", "moe", "model"]),
    ("answer", &["generation"]),
    ("drivers", &["pipeline", "engine"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

#[test]
fn the_library_layers_point_one_way() {
    let (mods, edges) = graph(&crate_src("qwen2vl"));
    // Every top-level module has a layer (a new one must be placed in the table above).
    for m in mods.keys().filter(|m| m.len() == 1) {
        assert!(
            layer_of(&m[0]).is_some(),
            "module {} is in no layer of LAYERS (tests/module_graph.rs, docs/architecture.md)",
            m[0]
        );
    }
    let top = top_level(&edges);
    // The reader sees the edges that exist (so a broken reader cannot pass by finding none)...
    for (a, b) in [
        ("engine", "generation"),
        ("pipeline", "generation"),
        ("pipeline", "model"),
        ("model", "vision"),
        ("processing", "config"),
    ] {
        let e = (vec![a.to_string()], vec![b.to_string()]);
        assert!(top.contains(&e), "{a} -> {b} not found in {top:?}");
    }
    // ...and none points up: data flows processing → model → generation → pipeline/engine.
    for (a, b) in &top {
        let (la, lb) = (layer_of(&a[0]), layer_of(&b[0]));
        assert!(
            lb <= la,
            "{} ({}) imports {} ({}), a higher layer",
            a[0],
            LAYERS[la.unwrap_or(0)].0,
            b[0],
            LAYERS[lb.unwrap_or(0)].0
        );
    }
}

#[test]
fn the_reader_finds_groups_children_and_cycles() {
    let code = "use crate::a::{b, c::{d, e}};\nmod kid;\nfn f() { kid::g(); super::h::i(); }\n// crate::x::y in a comment\n";
    let mut got = paths_in(&code_of(code));
    got.sort();
    let want: Vec<Module> = [
        "crate a b",
        "crate a c d",
        "crate a c e",
        "self kid g",
        "super h i",
    ]
    .iter()
    .map(|s| s.split(' ').map(String::from).collect())
    .collect();
    assert_eq!(got, want);
    let m = |s: &str| vec![s.to_string()];
    let mut edges: Edges = [(m("a"), m("b")), (m("b"), m("c"))].into_iter().collect();
    assert_eq!(find_cycle(&edges), None);
    edges.insert((m("c"), m("a")));
    assert_eq!(find_cycle(&edges).map(|c| c.len()), Some(3));
}
