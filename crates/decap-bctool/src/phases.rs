//! `bctool phases PLAN`: a preset build (see `decap_core::preset`). The
//! `build.sh` Decap writes for it runs this under `bctool run`, which keeps
//! the console, the log, the artifacts and the result as for any build.
//!
//! It fetches the project's tree at the plan's commit from the server (the
//! repository's credentials stay there) into the working folder, then runs
//! the phases in order, each in its own `sh` that picks up the variables and
//! the folder the phase before left, each a section of the console between
//! two marker lines (`── phase setup ──` … `── phase setup: passed in 1.20 s
//! ──`, which the web UI folds). The first command that fails ends the
//! build with its exit code; the phases after it do not run. How each phase
//! went is written to `DECAP_PHASES_FILE` (set by `bctool run`, which sends
//! it with the result).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use decap_client::Client;
use decap_core::preset::{PhaseRecord, Plan};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

/// Where `bctool run` wants the phases written.
pub const PHASES_VAR: &str = "DECAP_PHASES_FILE";

/// The first line of a phase's section in the console.
pub fn start_marker(name: &str) -> String {
    format!("── phase {name} ──")
}

/// Prints a line to the console (bctool's standard output) at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// `'…'` for `sh`.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs the plan at `plan_path` for build `id`; returns the exit code.
pub async fn run(client: Client, id: &str, plan_path: &Path) -> Result<i32> {
    let plan: Plan = serde_json::from_slice(
        &std::fs::read(plan_path)
            .with_context(|| format!("cannot read {}", plan_path.display()))?,
    )
    .with_context(|| format!("{} is not a plan", plan_path.display()))?;
    let record_to = std::env::var_os(PHASES_VAR).map(PathBuf::from);
    let mut records: Vec<PhaseRecord> = plan
        .phases
        .iter()
        .map(|p| PhaseRecord {
            name: p.name,
            duration_ms: 0,
            exit_code: None,
            commands: p.commands.clone(),
        })
        .collect();
    let short = plan.commit.get(..12).unwrap_or(&plan.commit);
    say(&format!(
        "[decap: the {} preset{}, at commit {short}]",
        plan.language,
        if plan.override_file {
            ", adjusted by the repository's .decap.json"
        } else {
            ""
        }
    ));
    if let Some(error) = &plan.error {
        say(&format!("[decap: the build cannot run: {error}]"));
        return Ok(1);
    }
    let started = Instant::now();
    if let Err(e) = fetch_source(&client, id, &plan.commit).await {
        say(&format!("[decap: checking out {short} failed: {e:#}]"));
        return Ok(1);
    }
    say(&format!(
        "[decap: checked out {short} in {}]",
        seconds(started.elapsed())
    ));
    let work = tempfile::tempdir().context("cannot make a temporary folder")?;
    let state = work.path().join("state");
    let mut exit = 0;
    for (i, phase) in plan.phases.iter().enumerate() {
        let name = phase.name.name();
        say(&start_marker(name));
        if phase.name == decap_core::preset::PhaseName::Machine {
            for v in &plan.env {
                say(&format!("{}={} ({})", v.name, v.value, v.from));
            }
        }
        let mut script = String::from("set +e\n");
        script.push_str(&format!(
            "if [ -f {s} ]; then . {s}; fi\nif [ -f {p} ]; then cd \"$(cat {p})\"; fi\n",
            s = quoted(&state.to_string_lossy()),
            p = quoted(&format!("{}.pwd", state.to_string_lossy())),
        ));
        script.push_str(&format!(
            "decap_save() {{ export -p > {s}; pwd > {p}; }}\n",
            s = quoted(&state.to_string_lossy()),
            p = quoted(&format!("{}.pwd", state.to_string_lossy())),
        ));
        for c in &phase.commands {
            script.push_str(&format!(
                "printf '%s\\n' {}\neval {} || {{ decap_rc=$?; decap_save; exit $decap_rc; }}\n",
                quoted(&format!("$ {}", c.run)),
                quoted(&c.run)
            ));
        }
        script.push_str("decap_save\n");
        let t = Instant::now();
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .envs(plan.env.iter().map(|v| (&v.name, &v.value)))
            .stdin(std::process::Stdio::null())
            .status()
            .await
            .context("cannot run sh")?;
        let took = t.elapsed();
        let code = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(c), _) => c,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 1,
        };
        records[i].duration_ms = took.as_millis() as u64;
        records[i].exit_code = Some(code);
        if code == 0 {
            say(&format!("── phase {name}: passed in {} ──", seconds(took)));
        } else {
            say(&format!(
                "── phase {name}: failed (exit code {code}) in {} ──",
                seconds(took)
            ));
        }
        write_records(record_to.as_deref(), &records);
        if code != 0 {
            exit = code;
            for later in &plan.phases[i + 1..] {
                say(&format!("── phase {}: not run ──", later.name));
            }
            break;
        }
    }
    write_records(record_to.as_deref(), &records);
    Ok(exit)
}

fn write_records(to: Option<&Path>, records: &[PhaseRecord]) {
    let Some(to) = to else { return };
    if let Ok(json) = serde_json::to_vec(records) {
        let tmp = to.with_extension("tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, to);
        }
    }
}

/// Reads what `bctool phases` wrote (bounded: a build cannot make the
/// result large).
pub fn read_records(from: &Path) -> Vec<PhaseRecord> {
    match std::fs::metadata(from) {
        Ok(m) if m.len() <= 256 * 1024 => {}
        _ => return Vec::new(),
    }
    std::fs::read(from)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .map(decap_core::preset::bounded)
        .unwrap_or_default()
}

/// Downloads the tree and unpacks it into the working folder.
async fn fetch_source(client: &Client, id: &str, commit: &str) -> Result<()> {
    let tmp = tempfile::NamedTempFile::new().context("cannot make a temporary file")?;
    let mut file = tokio::fs::File::from_std(tmp.reopen()?);
    let mut stream = std::pin::pin!(client.source(id, commit).await?);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    drop(file);
    tokio::task::spawn_blocking(move || -> Result<()> {
        let f = std::fs::File::open(tmp.path())?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(f));
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        archive
            .unpack(".")
            .context("cannot unpack the repository's tree")?;
        Ok(())
    })
    .await?
}
