//! Language presets: a project that names its `language` in `project.json`
//! needs no `build.sh`. Decap checks out the project's repository at the
//! build's commit and runs three phases in it, **machine** (the
//! environment), **setup** (dependencies) and **test**, each a folded
//! section of the console with its own duration.
//!
//! The defaults per language are the table [`PRESETS`]; a project adjusts
//! them with `.decap.json` at the root of its own repository
//! ([`OverrideFile`]): for each phase `override: true` drops the default
//! commands and `custom` adds commands after them; `services` names
//! sidecars from a small catalog ([`SERVICES`]) and sets their usual
//! variables; `env` adds variables. [`plan`] turns a language and that
//! file into the [`Plan`] a build runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A language with a preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// pip and pytest.
    Python,
    /// npm.
    Node,
    /// Bundler and rake.
    Ruby,
    /// The go tool.
    Go,
    /// Cargo.
    Rust,
    /// Maven.
    Java,
    /// A `test.sh` and nothing else.
    Shell,
}

impl Language {
    /// Every language, in the order of the table.
    pub const ALL: [Language; 7] = [
        Language::Python,
        Language::Node,
        Language::Ruby,
        Language::Go,
        Language::Rust,
        Language::Java,
        Language::Shell,
    ];

    /// Its name in `project.json`.
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Node => "node",
            Language::Ruby => "ruby",
            Language::Go => "go",
            Language::Rust => "rust",
            Language::Java => "java",
            Language::Shell => "shell",
        }
    }

    /// The language named `name`.
    pub fn from_name(name: &str) -> Option<Language> {
        Language::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Its preset.
    pub fn preset(self) -> &'static Preset {
        PRESETS
            .iter()
            .find(|p| p.language == self)
            .unwrap_or(&PRESETS[PRESETS.len() - 1])
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a language does by default.
#[derive(Debug)]
pub struct Preset {
    /// The language.
    pub language: Language,
    /// The build image when `project.json` names none (the operator may
    /// choose another with `--preset-image`).
    pub image: &'static str,
    /// The machine phase: variables set for every phase.
    pub env: &'static [(&'static str, &'static str)],
    /// The setup phase: dependencies.
    pub setup: &'static [&'static str],
    /// The test phase.
    pub test: &'static [&'static str],
}

/// The presets. Commands run with `sh` in the checkout, one after the other
/// in one shell (a variable one exports is seen by the next); the first
/// that fails ends the build.
pub const PRESETS: &[Preset] = &[
    Preset {
        language: Language::Python,
        image: "docker.io/library/python:3-slim",
        env: &[
            ("CI", "true"),
            ("PYTHONUNBUFFERED", "1"),
            ("PYTHONDONTWRITEBYTECODE", "1"),
            ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
            ("PIP_USER", "1"),
            ("PIP_BREAK_SYSTEM_PACKAGES", "1"),
        ],
        setup: &["if [ -f requirements.txt ]; then python3 -m pip install -r requirements.txt; fi"],
        test: &["python3 -m pytest"],
    },
    Preset {
        language: Language::Node,
        image: "docker.io/library/node:lts-slim",
        env: &[
            ("CI", "true"),
            ("NODE_ENV", "test"),
            ("npm_config_audit", "false"),
            ("npm_config_fund", "false"),
            ("npm_config_update_notifier", "false"),
        ],
        setup: &[
            "if [ -f package-lock.json ] || [ -f npm-shrinkwrap.json ]; then npm ci; else npm install; fi",
        ],
        test: &["npm test"],
    },
    Preset {
        language: Language::Ruby,
        image: "docker.io/library/ruby:3-slim",
        env: &[("CI", "true"), ("RAILS_ENV", "test"), ("RACK_ENV", "test")],
        setup: &["if [ -f Gemfile ]; then bundle install; fi"],
        test: &["if [ -f Gemfile ]; then bundle exec rake test; else rake test; fi"],
    },
    Preset {
        language: Language::Go,
        image: "docker.io/library/golang:1",
        env: &[("CI", "true")],
        setup: &["go mod download"],
        test: &["go test ./..."],
    },
    Preset {
        language: Language::Rust,
        image: "docker.io/library/rust:1",
        env: &[("CI", "true"), ("CARGO_INCREMENTAL", "0")],
        setup: &["cargo fetch"],
        test: &["cargo test"],
    },
    Preset {
        language: Language::Java,
        image: "docker.io/library/maven:3-eclipse-temurin-21",
        env: &[("CI", "true")],
        setup: &["mvn --batch-mode --no-transfer-progress dependency:resolve"],
        test: &["mvn --batch-mode --no-transfer-progress test"],
    },
    Preset {
        language: Language::Shell,
        image: "docker.io/library/debian:stable-slim",
        env: &[("CI", "true")],
        setup: &[],
        test: &["sh ./test.sh"],
    },
];

/// The presets as a Markdown table, as the README shows them (a test keeps
/// the two the same).
pub fn markdown_table() -> String {
    let cell = |cmds: &[&str]| {
        if cmds.is_empty() {
            "—".to_owned()
        } else {
            cmds.iter()
                .map(|c| format!("`{}`", c.replace('|', "\\|")))
                .collect::<Vec<_>>()
                .join("<br>")
        }
    };
    let mut out = String::from(
        "| `language` | image | machine (variables) | setup | test |\n| --- | --- | --- | --- | --- |\n",
    );
    for p in PRESETS {
        let env: Vec<String> = p.env.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} | {} |\n",
            p.language,
            p.image,
            env.join(" "),
            cell(p.setup),
            cell(p.test)
        ));
    }
    out
}

/// The services as a Markdown table, as the README shows them.
pub fn services_table() -> String {
    let mut out =
        String::from("| service | image | the build's variables |\n| --- | --- | --- |\n");
    for s in SERVICES {
        let env: Vec<String> = s.env.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
        out.push_str(&format!(
            "| `{}` | `{}` | {} |\n",
            s.name,
            s.image,
            env.join(" ")
        ));
    }
    out
}

/// The three phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseName {
    /// The environment.
    Machine,
    /// Dependencies.
    Setup,
    /// The tests.
    Test,
}

impl PhaseName {
    /// The phases in order.
    pub const ALL: [PhaseName; 3] = [PhaseName::Machine, PhaseName::Setup, PhaseName::Test];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            PhaseName::Machine => "machine",
            PhaseName::Setup => "setup",
            PhaseName::Test => "test",
        }
    }
}

impl std::fmt::Display for PhaseName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a command came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandSource {
    /// The language's preset.
    Default,
    /// The project's `.decap.json`.
    Override,
}

/// A command of a phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedCommand {
    /// The command line, run by `sh`.
    pub run: String,
    /// Where it came from.
    pub from: CommandSource,
}

/// A phase and its commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedPhase {
    /// The phase.
    pub name: PhaseName,
    /// Its commands, in order.
    pub commands: Vec<PlannedCommand>,
}

/// A variable a phase sets, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedVar {
    /// Its name.
    pub name: String,
    /// Its value (never a secret: these are printed).
    pub value: String,
    /// Where it came from: the preset, the override file, or a service.
    pub from: String,
}

/// What a preset build runs: written at launch beside the build's scripts
/// as `decap-preset.json` and run there by `bctool phases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The language.
    pub language: Language,
    /// The phases, in order.
    pub phases: Vec<PlannedPhase>,
    /// The machine phase's variables.
    pub env: Vec<PlannedVar>,
    /// The services (sidecars) the build has beside it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Whether the repository had an override file.
    #[serde(default)]
    pub override_file: bool,
    /// The commit checked out (set at launch).
    #[serde(default)]
    pub commit: String,
    /// Why the build cannot run its phases (its override file is invalid):
    /// it fails with this before any phase runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The file a preset build's plan is written to, beside its scripts.
pub const PLAN_FILE: &str = "decap-preset.json";

/// The name of the override file at the root of a project's repository.
pub const OVERRIDE_FILE: &str = ".decap.json";

/// How a phase is adjusted in `.decap.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseOverride {
    /// Drop the preset's commands.
    #[serde(default)]
    pub r#override: bool,
    /// Commands run after the preset's (or alone, with `override`).
    #[serde(default)]
    pub custom: Vec<String>,
}

/// `.decap.json`, at the root of a project's repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideFile {
    /// The machine phase.
    #[serde(default)]
    pub machine: PhaseOverride,
    /// The setup phase.
    #[serde(default)]
    pub setup: PhaseOverride,
    /// The test phase.
    #[serde(default)]
    pub test: PhaseOverride,
    /// Services from the catalog (`postgresql`, `mysql`, `redis`).
    #[serde(default)]
    pub services: Vec<String>,
    /// Variables for every phase.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A service of the catalog: a sidecar and the variables that reach it.
#[derive(Debug)]
pub struct Service {
    /// Its name in `services`.
    pub name: &'static str,
    /// Its image.
    pub image: &'static str,
    /// The sidecar's own environment.
    pub sidecar_env: &'static [(&'static str, &'static str)],
    /// The command that says it is ready (a readiness probe).
    pub ready: &'static [&'static str],
    /// The user it runs as (the image's own).
    pub user: i64,
    /// The build's variables to reach it.
    pub env: &'static [(&'static str, &'static str)],
}

/// The services a project may name.
pub const SERVICES: &[Service] = &[
    Service {
        name: "postgresql",
        image: "docker.io/library/postgres:16-alpine",
        sidecar_env: &[
            ("POSTGRES_USER", "postgres"),
            ("POSTGRES_PASSWORD", "postgres"),
            ("POSTGRES_DB", "test"),
        ],
        ready: &["pg_isready", "-h", "127.0.0.1", "-U", "postgres"],
        user: 70,
        env: &[
            (
                "DATABASE_URL",
                "postgres://postgres:postgres@127.0.0.1:5432/test",
            ),
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", "5432"),
            ("PGUSER", "postgres"),
            ("PGPASSWORD", "postgres"),
            ("PGDATABASE", "test"),
        ],
    },
    Service {
        name: "mysql",
        image: "docker.io/library/mysql:8",
        sidecar_env: &[("MYSQL_ROOT_PASSWORD", "mysql"), ("MYSQL_DATABASE", "test")],
        ready: &["mysqladmin", "ping", "-h", "127.0.0.1", "-uroot", "-pmysql"],
        user: 999,
        env: &[("DATABASE_URL", "mysql://root:mysql@127.0.0.1:3306/test")],
    },
    Service {
        name: "redis",
        image: "docker.io/library/redis:7-alpine",
        sidecar_env: &[],
        ready: &["redis-cli", "-h", "127.0.0.1", "ping"],
        user: 999,
        env: &[("REDIS_URL", "redis://127.0.0.1:6379/0")],
    },
];

impl Service {
    /// The service named `name`.
    pub fn named(name: &str) -> Option<&'static Service> {
        SERVICES.iter().find(|s| s.name == name)
    }

    /// The sidecar, as a Kubernetes `Container` (what `*-sidecar.json`
    /// holds), named after the service, of `image` when the operator chose
    /// one (else the catalog's).
    pub fn sidecar(&self, image: Option<&str>) -> serde_json::Value {
        let env: Vec<serde_json::Value> = self
            .sidecar_env
            .iter()
            .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
            .collect();
        serde_json::json!({
            "name": self.name,
            "image": image.unwrap_or(self.image),
            "env": env,
            "readinessProbe": {
                "exec": {"command": self.ready},
                "periodSeconds": 1,
                "failureThreshold": 120,
            },
            "securityContext": {
                "runAsUser": self.user,
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
            },
        })
    }
}

/// The file's error in words, with its line and column.
fn file_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let what = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text.as_str(),
    };
    format!(
        "{OVERRIDE_FILE}, line {}, column {}: {what}",
        e.line(),
        e.column()
    )
}

/// A variable the override file may set: a valid name, none Decap sets.
fn check_env_name(name: &str) -> Result<(), &'static str> {
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err("not a variable name (letters, digits and '_', not starting with a digit)");
    }
    if crate::descriptor::RESERVED_ENV.contains(&name) || name.starts_with("DECAP_") {
        return Err("set by Decap, so it cannot be overridden");
    }
    Ok(())
}

/// Parses `.decap.json`; the error names the file, the line and the column.
pub fn parse_override(bytes: &[u8]) -> Result<OverrideFile, String> {
    let file: OverrideFile = serde_json::from_slice(bytes).map_err(|e| file_error(&e))?;
    for (phase, o) in [
        ("machine", &file.machine),
        ("setup", &file.setup),
        ("test", &file.test),
    ] {
        if o.custom.iter().any(|c| c.trim().is_empty()) {
            return Err(format!(
                "{OVERRIDE_FILE}: {phase}.custom has an empty command"
            ));
        }
        if o.custom.iter().any(|c| c.contains('\0')) {
            return Err(format!(
                "{OVERRIDE_FILE}: {phase}.custom has a command with a NUL byte"
            ));
        }
    }
    for name in file.env.keys() {
        check_env_name(name).map_err(|why| format!("{OVERRIDE_FILE}: env {name:?}: {why}"))?;
    }
    if file.env.values().any(|v| v.contains('\0')) {
        return Err(format!("{OVERRIDE_FILE}: an env value has a NUL byte"));
    }
    let mut seen = Vec::new();
    for s in &file.services {
        if Service::named(s).is_none() {
            let known: Vec<&str> = SERVICES.iter().map(|s| s.name).collect();
            return Err(format!(
                "{OVERRIDE_FILE}: unknown service {s:?} (known: {})",
                known.join(", ")
            ));
        }
        if seen.contains(&s.as_str()) {
            return Err(format!("{OVERRIDE_FILE}: service {s:?} is named twice"));
        }
        seen.push(s);
    }
    if seen.contains(&"postgresql") && seen.contains(&"mysql") {
        return Err(format!(
            "{OVERRIDE_FILE}: postgresql and mysql would both set DATABASE_URL; name one of them"
        ));
    }
    Ok(file)
}

/// The plan of a build of `language`, adjusted by the repository's
/// `.decap.json` when it has one.
pub fn plan(language: Language, override_file: Option<&[u8]>) -> Result<Plan, String> {
    let file = override_file.map(parse_override).transpose()?;
    let preset = language.preset();
    let o = file.clone().unwrap_or_default();
    let mut phases = Vec::with_capacity(3);
    for name in PhaseName::ALL {
        let (defaults, adjust): (&[&str], &PhaseOverride) = match name {
            PhaseName::Machine => (&[], &o.machine),
            PhaseName::Setup => (preset.setup, &o.setup),
            PhaseName::Test => (preset.test, &o.test),
        };
        let mut commands = Vec::new();
        if !adjust.r#override {
            commands.extend(defaults.iter().map(|c| PlannedCommand {
                run: (*c).to_owned(),
                from: CommandSource::Default,
            }));
        }
        commands.extend(adjust.custom.iter().map(|c| PlannedCommand {
            run: c.clone(),
            from: CommandSource::Override,
        }));
        phases.push(PlannedPhase { name, commands });
    }
    let mut env: Vec<PlannedVar> = Vec::new();
    let mut set = |name: &str, value: &str, from: &str| {
        env.retain(|v| v.name != name);
        env.push(PlannedVar {
            name: name.to_owned(),
            value: value.to_owned(),
            from: from.to_owned(),
        });
    };
    if !o.machine.r#override {
        for (k, v) in preset.env {
            set(k, v, "default");
        }
    }
    for s in &o.services {
        if let Some(service) = Service::named(s) {
            for (k, v) in service.env {
                set(k, v, service.name);
            }
        }
    }
    for (k, v) in &o.env {
        set(k, v, "override");
    }
    Ok(Plan {
        language,
        phases,
        env,
        services: o.services.clone(),
        override_file: file.is_some(),
        commit: String::new(),
        error: None,
    })
}

/// How a phase of a build went, kept with the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseRecord {
    /// The phase.
    pub name: PhaseName,
    /// How long it ran, in milliseconds (0 when it did not run).
    pub duration_ms: u64,
    /// Its last command's exit code; none when the phase did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The commands it ran (or would have run), and where each came from.
    #[serde(default)]
    pub commands: Vec<PlannedCommand>,
}

/// The most phases a record keeps, and the longest command it keeps: what
/// a build reports is bounded.
pub const MAX_RECORDED_COMMANDS: usize = 64;
/// See [`MAX_RECORDED_COMMANDS`].
pub const MAX_RECORDED_COMMAND_LEN: usize = 1024;

/// Bounds what a build reported of its phases: three phases at most, each
/// once, in order, with at most [`MAX_RECORDED_COMMANDS`] commands of at
/// most [`MAX_RECORDED_COMMAND_LEN`] bytes.
pub fn bounded(mut phases: Vec<PhaseRecord>) -> Vec<PhaseRecord> {
    let mut seen = Vec::new();
    phases.retain(|p| {
        let fresh = !seen.contains(&p.name);
        seen.push(p.name);
        fresh
    });
    phases.truncate(PhaseName::ALL.len());
    for p in &mut phases {
        p.commands.truncate(MAX_RECORDED_COMMANDS);
        for c in &mut p.commands {
            if c.run.len() > MAX_RECORDED_COMMAND_LEN {
                let mut end = MAX_RECORDED_COMMAND_LEN;
                while !c.run.is_char_boundary(end) {
                    end -= 1;
                }
                c.run.truncate(end);
                c.run.push('…');
            }
        }
    }
    phases
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(p: &Plan, phase: PhaseName) -> Vec<(String, CommandSource)> {
        p.phases
            .iter()
            .find(|x| x.name == phase)
            .map(|x| x.commands.iter().map(|c| (c.run.clone(), c.from)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn every_language_has_one_preset_with_an_image_and_a_test() {
        for l in Language::ALL {
            let p = l.preset();
            assert_eq!(p.language, l);
            assert!(!p.image.is_empty());
            assert!(!p.test.is_empty(), "{l}");
            assert_eq!(Language::from_name(l.name()), Some(l));
            assert_eq!(
                serde_json::to_value(l).ok(),
                Some(serde_json::json!(l.name()))
            );
        }
        assert_eq!(PRESETS.len(), Language::ALL.len());
    }

    #[test]
    fn without_a_file_the_plan_is_the_table() {
        let p = plan(Language::Python, None).expect("plan");
        assert!(!p.override_file);
        assert_eq!(runs(&p, PhaseName::Machine), vec![]);
        assert_eq!(
            runs(&p, PhaseName::Test),
            vec![("python3 -m pytest".to_owned(), CommandSource::Default)]
        );
        assert!(p.env.iter().any(|v| v.name == "CI" && v.value == "true"));
        assert_eq!(
            p.phases.iter().map(|p| p.name).collect::<Vec<_>>(),
            PhaseName::ALL
        );
    }

    #[test]
    fn override_drops_and_custom_adds_after_the_defaults() {
        let file = br#"{
            "setup": {"override": true, "custom": ["make deps"]},
            "test": {"custom": ["make lint"]},
            "env": {"RAILS_ENV": "ci", "EXTRA": "1"}
        }"#;
        let p = plan(Language::Ruby, Some(file)).expect("plan");
        assert!(p.override_file);
        assert_eq!(
            runs(&p, PhaseName::Setup),
            vec![("make deps".to_owned(), CommandSource::Override)]
        );
        assert_eq!(
            runs(&p, PhaseName::Test),
            vec![
                (
                    Language::Ruby.preset().test[0].to_owned(),
                    CommandSource::Default
                ),
                ("make lint".to_owned(), CommandSource::Override)
            ]
        );
        let rails: Vec<_> = p.env.iter().filter(|v| v.name == "RAILS_ENV").collect();
        assert_eq!(rails.len(), 1);
        assert_eq!(
            (rails[0].value.as_str(), rails[0].from.as_str()),
            ("ci", "override")
        );
    }

    #[test]
    fn machine_override_drops_the_preset_variables() {
        let p = plan(Language::Node, Some(br#"{"machine": {"override": true}}"#)).expect("plan");
        assert!(p.env.is_empty());
    }

    #[test]
    fn services_set_their_variables_and_make_sidecars() {
        let p = plan(
            Language::Go,
            Some(br#"{"services": ["postgresql", "redis"]}"#),
        )
        .expect("plan");
        assert_eq!(p.services, ["postgresql", "redis"]);
        let get = |n: &str| p.env.iter().find(|v| v.name == n).map(|v| v.value.clone());
        assert_eq!(
            get("DATABASE_URL").as_deref(),
            Some("postgres://postgres:postgres@127.0.0.1:5432/test")
        );
        assert_eq!(
            get("REDIS_URL").as_deref(),
            Some("redis://127.0.0.1:6379/0")
        );
        let sidecar = Service::named("redis").expect("redis").sidecar(None);
        assert_eq!(sidecar["name"], "redis");
        assert_eq!(sidecar["readinessProbe"]["exec"]["command"][0], "redis-cli");
    }

    #[test]
    fn an_invalid_file_is_refused_with_its_line_and_column() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"{\n  \"tset\": {}\n}",
                ".decap.json, line 2, column 8: unknown field `tset`",
            ),
            (
                b"{\"test\": {\"custom\": \"x\"}}",
                ".decap.json, line 1, column 23: invalid type",
            ),
            (b"{\"setup\": ", ".decap.json, line 1, column 10: EOF"),
            (
                b"{\"services\": [\"oracle\"]}",
                "unknown service \"oracle\"",
            ),
            (b"{\"services\": [\"redis\", \"redis\"]}", "named twice"),
            (
                b"{\"services\": [\"mysql\", \"postgresql\"]}",
                "name one of them",
            ),
            (b"{\"env\": {\"BUILD_ID\": \"x\"}}", "env \"BUILD_ID\""),
            (b"{\"env\": {\"A B\": \"x\"}}", "env \"A B\""),
            (b"{\"test\": {\"custom\": [\" \"]}}", "empty command"),
        ];
        for (file, want) in cases {
            let err = plan(Language::Shell, Some(file)).expect_err("refused");
            assert!(err.contains(want), "{err:?} does not say {want:?}");
        }
    }

    #[test]
    fn what_a_build_reports_is_bounded() {
        let long = "x".repeat(5000);
        let rec = |name| PhaseRecord {
            name,
            duration_ms: 1,
            exit_code: Some(0),
            commands: vec![
                PlannedCommand {
                    run: long.clone(),
                    from: CommandSource::Default
                };
                100
            ],
        };
        let out = bounded(vec![
            rec(PhaseName::Machine),
            rec(PhaseName::Machine),
            rec(PhaseName::Setup),
            rec(PhaseName::Test),
            rec(PhaseName::Test),
        ]);
        assert_eq!(out.len(), 3);
        assert!(
            out.iter()
                .all(|p| p.commands.len() == MAX_RECORDED_COMMANDS)
        );
        assert!(out[0].commands[0].run.len() <= MAX_RECORDED_COMMAND_LEN + 3);
    }
}
