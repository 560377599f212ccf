//! A sidecar's `readinessProbe`, checked the way the kubelet checks it: an
//! `exec` command in the sidecar (ready when it exits 0), a TCP connection,
//! or an HTTP `GET` answered 200–399. TCP and HTTP probes reach the
//! sidecar at its network namespace's address on the engine's network.

use std::net::IpAddr;
use std::time::Duration;

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use decap_kube::k8s_openapi::api::core::v1::{Container, Probe};
use decap_kube::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a sidecar has to pass its probe, from its start:
/// `initialDelaySeconds + failureThreshold × periodSeconds` (Kubernetes'
/// defaults: 0 + 3 × 10 s).
pub fn deadline(p: &Probe) -> Duration {
    let secs =
        |v: Option<i32>, default: i32| u64::try_from(v.unwrap_or(default).max(0)).unwrap_or(0);
    let initial = secs(p.initial_delay_seconds, 0);
    let period = secs(p.period_seconds, 10).max(1);
    let failures = secs(p.failure_threshold, 3).max(1);
    Duration::from_secs(initial + failures * period)
}

/// The wait between two checks of a probe that has not passed yet. The
/// build waits on it, so it is checked every 100 ms rather than every
/// `periodSeconds` (which still sets how long it has: see [`deadline`]).
pub const INTERVAL: Duration = Duration::from_millis(100);

/// The probe's initial delay.
pub fn initial_delay(p: &Probe) -> Duration {
    Duration::from_secs(u64::try_from(p.initial_delay_seconds.unwrap_or(0).max(0)).unwrap_or(0))
}

fn port(c: &Container, p: &IntOrString) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} is not a port")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| format!("no port is named {name:?}")),
    }
}

/// Whether the probe passes now. `Err` is a probe that cannot work (a
/// mistake in its spec), as opposed to one that does not pass yet.
pub async fn check(
    docker: &Docker,
    container: &str,
    sidecar: &Container,
    probe: &Probe,
    address: Option<IpAddr>,
) -> Result<bool, String> {
    let timeout =
        Duration::from_secs(u64::try_from(probe.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1));
    if let Some(exec) = &probe.exec {
        let cmd = exec.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return Err("its exec probe has no command".into());
        }
        return Ok(exec_passes(docker, container, cmd, timeout).await);
    }
    let reach = |p: &IntOrString| -> Result<(IpAddr, u16), String> {
        let port = port(sidecar, p)?;
        let ip = address.ok_or(
            "its TCP or HTTP probe needs the sidecar's address, and the engine gave none (use an exec probe)",
        )?;
        Ok((ip, port))
    };
    if let Some(tcp) = &probe.tcp_socket {
        let (ip, port) = reach(&tcp.port)?;
        return Ok(matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect((ip, port))).await,
            Ok(Ok(_))
        ));
    }
    if let Some(http) = &probe.http_get {
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| !s.eq_ignore_ascii_case("http"))
        {
            return Err(
                "its HTTP probe asks for HTTPS, which the container executor does not check".into(),
            );
        }
        let (ip, port) = reach(&http.port)?;
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        return Ok(tokio::time::timeout(timeout, http_passes(ip, port, &path))
            .await
            .unwrap_or(false));
    }
    Err("its readinessProbe has no exec, tcpSocket or httpGet".into())
}

async fn exec_passes(
    docker: &Docker,
    container: &str,
    cmd: Vec<String>,
    timeout: Duration,
) -> bool {
    let run = async {
        let created = docker
            .create_exec(
                container,
                CreateExecOptions {
                    cmd: Some(cmd),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..CreateExecOptions::default()
                },
            )
            .await
            .ok()?;
        // Attached: the output ends when the command does (Podman does not
        // mark a detached exec as ended).
        if let StartExecResults::Attached { mut output, .. } = docker
            .start_exec(&created.id, None::<StartExecOptions>)
            .await
            .ok()?
        {
            while let Some(chunk) = output.next().await {
                chunk.ok()?;
            }
        }
        let r = docker.inspect_exec(&created.id).await.ok()?;
        Some(r.running != Some(true) && r.exit_code == Some(0))
    };
    matches!(tokio::time::timeout(timeout, run).await, Ok(Some(true)))
}

async fn http_passes(ip: IpAddr, port: u16, path: &str) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect((ip, port)).await else {
        return false;
    };
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: decap-probe\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 32];
    let Ok(n) = s.read(&mut head).await else {
        return false;
    };
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (200..400).contains(&c))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_probe_gets_its_initial_delay_plus_its_failures_times_its_period() {
        let p = Probe {
            initial_delay_seconds: Some(2),
            period_seconds: Some(1),
            failure_threshold: Some(5),
            ..Probe::default()
        };
        assert_eq!(deadline(&p), Duration::from_secs(7));
        assert_eq!(deadline(&Probe::default()), Duration::from_secs(30));
    }
}
