//! The k6 scripts stay valid: each parses as an ES module (checked with Node.js, since k6 is
//! not installed where the suite runs), imports only modules built into k6, and declares
//! thresholds, so a failed check fails the run.

use std::{path::PathBuf, process::Command};

const BUILT_IN: &[&str] = &[
    "k6",
    "k6/http",
    "k6/ws",
    "k6/experimental/websockets",
    "k6/metrics",
    "k6/execution",
];

fn scripts() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("k6");
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("loadtest/k6")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "js"))
        .collect();
    scripts.sort();
    scripts
}

#[test]
fn the_four_scripts_exist() {
    let names: Vec<String> = scripts()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(
        names,
        [
            "connect-storm.js",
            "publish.js",
            "sse-smoke.js",
            "ws-fanout.js"
        ]
    );
}

#[test]
fn every_script_parses_as_an_es_module() {
    for script in scripts() {
        let source = std::fs::File::open(&script).expect("script");
        let checked = Command::new("node")
            .args(["--input-type=module", "--check"])
            .stdin(source)
            .output()
            .expect("node (Debian: apt-get install nodejs; scripts/test installs it)");
        assert!(
            checked.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&checked.stderr)
        );
    }
}

#[test]
fn scripts_use_only_built_in_modules_and_declare_thresholds() {
    for script in scripts() {
        let source = std::fs::read_to_string(&script).expect("script");
        for line in source
            .lines()
            .filter(|l| l.trim_start().starts_with("import "))
        {
            let module = line
                .rsplit_once(" from ")
                .map(|(_, m)| m.trim().trim_end_matches(';').trim_matches(['\'', '"']))
                .unwrap_or_default();
            assert!(
                BUILT_IN.contains(&module),
                "{}: imports {module:?}",
                script.display()
            );
        }
        assert!(
            source.contains("export const options"),
            "{}",
            script.display()
        );
        assert!(source.contains("thresholds:"), "{}", script.display());
        assert!(
            source.contains("__ENV.GATEWAY_URL") || source.contains("__ENV.PUBLISHER_URL"),
            "{}",
            script.display()
        );
    }
}
