//! What the repository tells users, checked against the programs, so it
//! cannot go stale: the Grafana dashboard queries only metrics the programs
//! export, and docs/configuration.md names every flag, variable and
//! connector key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tidemark_common::ops::{names, Kind};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Every PromQL expression in a Grafana dashboard: panel targets (rows'
/// panels too) and templating queries.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        ("query" | "definition", serde_json::Value::String(q))
                            if q.contains('(') =>
                        {
                            out.push(q.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// PromQL functions and keywords a dashboard query may use; every other
/// name outside label matchers, ranges and `by (...)` is a metric.
const PROMQL_WORDS: &[&str] = &[
    "rate",
    "irate",
    "increase",
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "by",
    "without",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "label_values",
    "max_over_time",
    "time",
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
];

/// The metric names an expression refers to, and any other unknown word.
fn metric_names(expr: &str) -> Vec<String> {
    // Drop label matchers, ranges and grouping labels: what is left are
    // functions, metrics, numbers and operators.
    let mut plain = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    for c in expr.chars() {
        match c {
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            c => plain.push(c),
        }
    }
    let mut words = Vec::new();
    let mut word = String::new();
    for c in plain.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
    }
    let mut names = Vec::new();
    let mut grouping = false;
    for w in &words {
        if w.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        if w == "by" || w == "without" {
            grouping = true;
            continue;
        }
        if grouping {
            // Labels of `by (...)`: up to the next function or metric.
            if PROMQL_WORDS.contains(&w.as_str()) || w.starts_with("tidemark_") {
                grouping = false;
            } else {
                continue;
            }
        }
        if !PROMQL_WORDS.contains(&w.as_str()) {
            names.push(w.clone());
        }
    }
    names
}

#[test]
fn every_dashboard_query_names_a_metric_the_programs_export() {
    let path = repo("docker/grafana/tidemark.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "too few queries: {queries:?}");
    let mut exported = BTreeSet::new();
    for m in names::all() {
        exported.insert(m.name.to_owned());
        if m.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{}{suffix}", m.name));
            }
        }
    }
    let mut used = BTreeSet::new();
    for q in &queries {
        let found = metric_names(q);
        assert!(!found.is_empty(), "a query without a metric: {q}");
        for name in found {
            assert!(
                exported.contains(&name),
                "{}: the query `{q}` names `{name}`, which no program exports (common::ops::names)",
                path.display()
            );
            used.insert(name);
        }
    }
    // Each program's families are on the dashboard.
    for prefix in ["tidemark_source_", "tidemark_sink_", "tidemark_replay_"] {
        assert!(
            used.iter().any(|n| n.starts_with(prefix)),
            "no {prefix}* panel"
        );
    }
    promtool_check_queries(&queries);
}

/// The queries parse as PromQL: `promtool check rules` on a rule file made
/// of them (Grafana's `$__rate_interval` as a fixed range). Without
/// promtool the check is left out, except in CI.
fn promtool_check_queries(queries: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yml");
    let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let q = q.replace("$__rate_interval", "1m");
        text.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&q).unwrap()
        ));
    }
    std::fs::write(&rules, text).unwrap();
    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules on the dashboard's queries: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is not installed; CI must run it (apt-get install prometheus)"
            );
            eprintln!("promtool not installed: the dashboard's PromQL left unchecked");
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    }
}

/// Each option of a program's `--help`: its flag and, when it has one, its
/// environment variable.
fn help_options(bin: &str, args: &[&str]) -> Vec<(String, Option<String>)> {
    let out = std::process::Command::new(bin)
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{bin} --help failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut options: Vec<(String, Option<String>)> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let flag = trimmed
            .strip_prefix("-h, ")
            .or_else(|| trimmed.strip_prefix("-V, "))
            .unwrap_or(trimmed);
        if line.starts_with("  ") && flag.starts_with("--") {
            let name: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            options.push((name, None));
        }
        if let Some((_, rest)) = line.split_once("[env: ") {
            let var: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            options.last_mut().expect("an env line follows its flag").1 = Some(var);
        }
    }
    options.retain(|(f, _)| f != "--help" && f != "--version");
    assert!(
        options.len() >= 5,
        "{bin}: too few options found: {options:?}"
    );
    options
}

/// Issue 16.2: docs/configuration.md names every flag of every program,
/// its environment variable, and every connector key pg-source and
/// file-sink accept; a flag or key added without its line fails here.
#[test]
fn configuration_md_names_every_flag_variable_and_connector_key() {
    let path = repo("docs/configuration.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let mut missing = Vec::new();
    for (bin, args) in [
        (env!("CARGO_BIN_EXE_it-pg-source"), &[][..]),
        (env!("CARGO_BIN_EXE_it-file-sink"), &[][..]),
        (env!("CARGO_BIN_EXE_it-pg-replay"), &[][..]),
        (env!("CARGO_BIN_EXE_it-pg-replay"), &["verify"][..]),
        (env!("CARGO_BIN_EXE_it-schema-init"), &[][..]),
    ] {
        let file = Path::new(bin).file_name().unwrap().to_string_lossy();
        let program = file.trim_start_matches("it-");
        for (flag, var) in help_options(bin, args) {
            if !doc.contains(&format!("`{flag}`")) {
                missing.push(format!("{program} {} flag {flag}", args.join(" ")));
            }
            if let Some(var) = var {
                if !doc.contains(&format!("`{var}`")) {
                    missing.push(format!("{program} {flag}'s variable {var}"));
                }
            }
        }
    }
    for (program, keys) in [
        ("pg-source", &pg_source::KEYS),
        ("file-sink", &file_sink::KEYS),
    ] {
        let names = keys
            .supported
            .iter()
            .copied()
            .chain(keys.conditional.iter().map(|c| c.key));
        for key in names {
            if !doc.contains(&format!("`{key}`")) {
                missing.push(format!("{program} connector key {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} does not document: {missing:#?}",
        path.display()
    );
}

/// Issue 16.2: docs/operations.md lists every metric family the programs
/// export.
#[test]
fn operations_md_lists_every_metric() {
    let doc = std::fs::read_to_string(repo("docs/operations.md")).unwrap();
    let missing: Vec<&str> = names::all()
        .map(|m| m.name)
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not list: {missing:?}"
    );
}

/// Issue 16.4: the `observe` profile's Prometheus scrapes every program
/// where compose serves its /metrics, and promtool accepts its config.
#[test]
fn the_observe_profile_scrapes_every_program_where_it_serves() {
    let compose = std::fs::read_to_string(repo("docker/compose.yaml")).unwrap();
    let scrape = std::fs::read_to_string(repo("docker/prometheus/prometheus.yml")).unwrap();
    // Each service block of the compose file: its lines up to the next
    // service's name at two spaces' indent.
    let mut block_of = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for line in compose.lines() {
        if let Some(name) = line
            .strip_prefix("  ")
            .filter(|l| !l.starts_with(' ') && !l.starts_with('#'))
            .and_then(|l| l.strip_suffix(':'))
        {
            current = Some(name.to_owned());
        } else if !line.starts_with(' ') && !line.is_empty() && !line.starts_with('#') {
            current = None;
        }
        if let Some(c) = &current {
            block_of
                .entry(c.clone())
                .or_insert_with(String::new)
                .push_str(&format!("{line}\n"));
        }
    }
    for program in ["pg-source", "file-sink", "pg-replay"] {
        let block = block_of
            .get(program)
            .unwrap_or_else(|| panic!("no {program} service in docker/compose.yaml"));
        let port = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("TIDEMARK_HTTP_ADDR: 0.0.0.0:"))
            .unwrap_or_else(|| panic!("{program} serves no /metrics in compose: {block}"));
        assert!(
            scrape.contains(&format!("\"{program}:{port}\"")),
            "docker/prometheus/prometheus.yml does not scrape {program}:{port}"
        );
    }
    assert!(
        block_of
            .get("prometheus")
            .is_some_and(|b| b.contains("profiles: [\"observe\"]")),
        "no prometheus service in the observe profile"
    );
    match std::process::Command::new("promtool")
        .args(["check", "config", "--syntax-only"])
        .arg(repo("docker/prometheus/prometheus.yml"))
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not installed; CI must run it (apt-get install prometheus)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    }
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces
/// as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            code = !code;
        } else if !code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// Issue 16.1: the README stays short, keeps the test command `.ci/run`
/// reads, and every link of it and of docs/ leads to a file and heading
/// that exist.
#[test]
fn the_readme_is_short_and_every_link_of_it_and_the_docs_resolves() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 150,
        "README.md has {lines} lines; at most 150: move the rest into docs/"
    );
    let tests = readme
        .split("\n## Tests\n")
        .nth(1)
        .expect("README.md has a `## Tests` heading, which .ci/run reads");
    assert!(
        tests.lines().any(|l| l == "cargo test --workspace"),
        "the first `cargo test` line under `## Tests` is what .ci/run runs"
    );
    let mut files = vec![PathBuf::from("README.md")];
    for entry in std::fs::read_dir(repo("docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            files.push(PathBuf::from("docs").join(name));
        }
    }
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(repo(file.to_str().unwrap())).unwrap();
        let dir = file.parent().unwrap_or(Path::new(""));
        // Every `](target)` outside code: a relative path, an anchor, or both.
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
            let linked = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let linked_text = match std::fs::read_to_string(repo(linked.to_str().unwrap())) {
                Ok(t) => t,
                Err(_) if repo(linked.to_str().unwrap()).is_dir() => continue,
                Err(_) => {
                    broken.push(format!("{}: {target} (no such file)", file.display()));
                    continue;
                }
            };
            if !anchor.is_empty() && !anchors(&linked_text).contains(anchor) {
                broken.push(format!("{}: {target} (no such heading)", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}
