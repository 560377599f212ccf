//! Small real projects for the language presets' tests, each a git
//! repository with nothing to download.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

/// Runs `sh -ec script` in `dir` as a committer.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-ec", script])
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Dev")
        .env("GIT_AUTHOR_EMAIL", "dev@example.com")
        .env("GIT_COMMITTER_NAME", "Dev")
        .env("GIT_COMMITTER_EMAIL", "dev@example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A git repository at `dir` holding `files` on `main`; returns its commit.
pub fn repo(dir: &Path, files: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    sh(
        dir,
        "git init -q -b main . 2>/dev/null || { git init -q . && git checkout -q -b main; }
         git add -A && git commit -qm 'the project' && git rev-parse HEAD",
    )
}

/// A Python package with a pytest test (nothing to download).
pub fn python_project(dir: &Path) {
    repo(
        dir,
        &[
            (
                "greet/__init__.py",
                "def greet(n):\n    return f'hello {n}'\n",
            ),
            (
                "tests/test_greet.py",
                "from greet import greet\n\ndef test_greet():\n    assert greet('x') == 'hello x'\n",
            ),
            (
                "pyproject.toml",
                "[tool.pytest.ini_options]\npythonpath = ['.']\n",
            ),
        ],
    );
}

/// A Node package whose test runs with `node --test` (nothing to download).
pub fn node_project(dir: &Path) {
    repo(
        dir,
        &[
            (
                "package.json",
                r#"{"name": "greet", "version": "1.0.0", "private": true, "scripts": {"test": "node --test"}}"#,
            ),
            (
                "greet.test.js",
                "const test = require('node:test');\nconst assert = require('node:assert');\ntest('greets', () => assert.strictEqual(`hello ${'x'}`, 'hello x'));\n",
            ),
        ],
    );
}

/// A Go module with a test (nothing to download).
pub fn go_project(dir: &Path) {
    repo(
        dir,
        &[
            ("go.mod", "module example.com/greet\n\ngo 1.21\n"),
            (
                "greet.go",
                "package greet\n\nfunc Greet(n string) string { return \"hello \" + n }\n",
            ),
            (
                "greet_test.go",
                "package greet\n\nimport \"testing\"\n\nfunc TestGreet(t *testing.T) {\n\tif Greet(\"x\") != \"hello x\" {\n\t\tt.Fatal(\"no\")\n\t}\n}\n",
            ),
        ],
    );
}

/// A Cargo crate with a test (nothing to download).
pub fn rust_project(dir: &Path) {
    repo(
        dir,
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"greet\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[profile.dev]\ndebug = 0\n",
            ),
            (
                "src/lib.rs",
                "pub fn greet(n: &str) -> String { format!(\"hello {n}\") }\n\n#[test]\nfn greets() { assert_eq!(greet(\"x\"), \"hello x\"); }\n",
            ),
        ],
    );
}

/// The exit codes of a build's phases, in order (a phase that did not run
/// fails the test).
pub fn phase_exit_codes(b: &serde_json::Value) -> Vec<i64> {
    b["phases"]
        .as_array()
        .unwrap_or_else(|| panic!("no phases: {b}"))
        .iter()
        .map(|p| p["exitCode"].as_i64().unwrap())
        .collect()
}
