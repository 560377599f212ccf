//! `bctool phases PLAN`: a preset build (see `decap_core::preset`). The
//! `build.sh` Decap writes for it runs this under `bctool run`, which keeps
//! the console, the log, the artifacts and the result as for any build.
//!
//! It fetches the project's tree at the plan's commit from the server (the
//! repository's credentials stay there) into the working folder, then runs
//! the phases in order in one `sh` (a variable one phase exports, or a
//! folder it enters, is the next one's), each a section of the console between
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
    let exit = run_phases(&plan, &mut records, record_to.as_deref()).await?;
    write_records(record_to.as_deref(), &records);
    Ok(exit)
}

/// Runs the phases in one `sh`, so that a variable one exports or a
/// folder it enters is the next one's. Between phases the shell tells
/// bctool through a FIFO and waits for its answer on another, so that the
/// marker lines bctool prints fall between the phases' own output, and each
/// phase is timed by bctool's clock.
async fn run_phases(
    plan: &Plan,
    records: &mut [PhaseRecord],
    record_to: Option<&Path>,
) -> Result<i32> {
    use tokio::io::AsyncBufReadExt;
    let work = tempfile::tempdir().context("cannot make a temporary folder")?;
    let events = work.path().join("events");
    let answers = work.path().join("answers");
    for fifo in [&events, &answers] {
        nix::unistd::mkfifo(
            fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .with_context(|| format!("cannot make {}", fifo.display()))?;
    }
    // Both ends held read-write, so that neither side's open ever waits.
    let from_sh = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&events)?;
    let mut to_sh = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(&answers)?;
    let mut lines = tokio::io::BufReader::new(from_sh).lines();
    let mut script = format!(
        "decap_mark() {{ printf '%s\\n' \"$1\" > {ev}; read -r decap_go < {ans}; }}\n",
        ev = quoted(&events.to_string_lossy()),
        ans = quoted(&answers.to_string_lossy()),
    );
    for (i, phase) in plan.phases.iter().enumerate() {
        script.push_str(&format!("decap_mark 'start {i}'\n"));
        for c in &phase.commands {
            script.push_str(&format!(
                "printf '%s\\n' {}\neval {} || {{ decap_rc=$?; decap_mark \"end {i} $decap_rc\"; exit $decap_rc; }}\n",
                quoted(&format!("$ {}", c.run)),
                quoted(&c.run)
            ));
        }
        script.push_str(&format!("decap_mark 'end {i} 0'\n"));
    }
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .envs(plan.env.iter().map(|v| (&v.name, &v.value)))
        // The commit checked out, also when the build was asked for a branch.
        .env("COMMIT_SHA", &plan.commit)
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("cannot run sh")?;
    let mut current: Option<(usize, Instant)> = None;
    let mut failed: Option<i32> = None;
    // A stop (timeout, cancel) signals the whole process group: the phase
    // running then is recorded as stopped before bctool goes.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.context("waiting for sh")?,
            _ = term.recv() => {
                stopped(plan, records, record_to, current.take(), 128 + 15);
                let _ = child.start_kill();
                return Ok(128 + 15);
            }
            _ = int.recv() => {
                stopped(plan, records, record_to, current.take(), 128 + 2);
                let _ = child.start_kill();
                return Ok(128 + 2);
            }
            line = lines.next_line() => {
                let Some(line) = line? else { continue };
                let mut words = line.split_whitespace();
                let (what, i) = (words.next(), words.next().and_then(|w| w.parse::<usize>().ok()));
                match (what, i) {
                    (Some("start"), Some(i)) if i < plan.phases.len() => {
                        say(&start_marker(plan.phases[i].name.name()));
                        if plan.phases[i].name == decap_core::preset::PhaseName::Machine {
                            for v in &plan.env {
                                say(&format!("{}={} ({})", v.name, v.value, v.from));
                            }
                        }
                        current = Some((i, Instant::now()));
                    }
                    (Some("end"), Some(i)) if i < plan.phases.len() => {
                        let code: i32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
                        let took = current.take().map(|(_, t)| t.elapsed()).unwrap_or_default();
                        end_phase(plan, records, i, code, took);
                        write_records(record_to, records);
                        if code != 0 {
                            failed = Some(code);
                        }
                    }
                    _ => {}
                }
                to_sh.write_all(b"go\n").await?;
            }
        }
    };
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    // A phase cut short (a command that called `exit`, a signal) ends with
    // the shell's status.
    if let Some((i, t)) = current.take() {
        let code = if code == 0 { 1 } else { code };
        end_phase(plan, records, i, code, t.elapsed());
        failed = Some(code);
    }
    let exit = failed.unwrap_or(code);
    if exit != 0 {
        for r in records.iter().filter(|r| r.exit_code.is_none()) {
            say(&format!("── phase {}: not run ──", r.name));
        }
    }
    write_records(record_to, records);
    Ok(exit)
}

/// The phase running when the build was stopped by a signal ends with
/// `code`; the record is written at once.
fn stopped(
    plan: &Plan,
    records: &mut [PhaseRecord],
    record_to: Option<&Path>,
    current: Option<(usize, Instant)>,
    code: i32,
) {
    if let Some((i, t)) = current {
        end_phase(plan, records, i, code, t.elapsed());
    }
    write_records(record_to, records);
}

/// Ends phase `i` with `code` after `took`: its record and its marker.
fn end_phase(plan: &Plan, records: &mut [PhaseRecord], i: usize, code: i32, took: Duration) {
    let name = plan.phases[i].name.name();
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

/// The variable naming the stages whose artifacts a stage gets.
pub const INPUT_STAGES_VAR: &str = "DECAP_INPUT_STAGES";

/// Fetches each input of a pipeline stage (the artifacts of the stages it
/// needs) into `dir/<stage>/`; a stage that stored no artifacts gets an
/// empty folder. Exits 1 with the reason on the console when one cannot
/// be fetched, so the stage fails saying why.
pub async fn inputs(client: &Client, id: &str, dir: &Path) -> Result<i32> {
    let stages = std::env::var(INPUT_STAGES_VAR).unwrap_or_default();
    for stage in stages.split(',').filter(|s| !s.is_empty()) {
        if stage.contains('/') || stage.starts_with('.') {
            say(&format!("[decap: {stage:?} is not a stage name]"));
            return Ok(1);
        }
        let to = dir.join(stage);
        tokio::fs::create_dir_all(&to)
            .await
            .with_context(|| format!("cannot make {}", to.display()))?;
        let started = Instant::now();
        match client.input(id, stage).await {
            Ok(None) => say(&format!("[decap: stage {stage} left no artifacts]")),
            Ok(Some(stream)) => {
                if let Err(e) = unpack_stream(stream, to.clone()).await {
                    say(&format!(
                        "[decap: fetching the artifacts of stage {stage} failed: {e:#}]"
                    ));
                    return Ok(1);
                }
                say(&format!(
                    "[decap: the artifacts of stage {stage} are in {} ({})]",
                    to.display(),
                    seconds(started.elapsed())
                ));
            }
            Err(e) => {
                say(&format!(
                    "[decap: fetching the artifacts of stage {stage} failed: {e}]"
                ));
                return Ok(1);
            }
        }
    }
    Ok(0)
}

/// Downloads the tree and unpacks it into the working folder.
async fn fetch_source(client: &Client, id: &str, commit: &str) -> Result<()> {
    unpack_stream(client.source(id, commit).await?, PathBuf::from(".")).await
}

/// Downloads a `tar.gz` to a temporary file and unpacks it into `to`.
async fn unpack_stream(
    stream: impl tokio_stream::Stream<Item = decap_client::Result<bytes::Bytes>>,
    to: PathBuf,
) -> Result<()> {
    let tmp = tempfile::NamedTempFile::new().context("cannot make a temporary file")?;
    let mut file = tokio::fs::File::from_std(tmp.reopen()?);
    let mut stream = std::pin::pin!(stream);
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
            .unpack(&to)
            .with_context(|| format!("cannot unpack into {}", to.display()))?;
        Ok(())
    })
    .await?
}
