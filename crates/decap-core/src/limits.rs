//! What a build may use: quantities as `project.json` writes them
//! (Kubernetes' syntax: `500m`, `2`, `512Mi`, `1G`) and the limits an
//! executor enforces, resolved from the descriptor and the operator's
//! defaults.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::descriptor::{Network, ProjectDescriptor};
use crate::error::{Error, Result};

/// Checks every quantity of `resources` (as `project.json` or a stage of
/// `pipeline.json` writes them).
pub fn check_resources(r: &crate::descriptor::Resources) -> Result<()> {
    if let Some(q) = &r.cpu {
        parse_cpu_millis("resources.cpu", q)?;
    }
    if let Some(q) = &r.memory {
        parse_bytes("resources.memory", q)?;
    }
    if let Some(q) = &r.disk {
        parse_bytes("resources.disk", q)?;
    }
    if r.pids == Some(0) {
        return Err(Error::invalid(
            "resources",
            "resources.pids must be more than 0",
        ));
    }
    Ok(())
}

/// Parses a CPU quantity into thousandths of a CPU: `500m` → 500, `2` →
/// 2000, `0.5` → 500.
pub fn parse_cpu_millis(field: &str, q: &str) -> Result<u64> {
    let q = q.trim();
    let bad = || {
        Error::invalid(
            "project.json",
            format!("{field} {q:?} is not a CPU quantity (such as 500m, 1 or 1.5)"),
        )
    };
    let millis = if let Some(m) = q.strip_suffix('m') {
        m.parse::<u64>().map_err(|_| bad())?
    } else {
        let (whole, frac) = q.split_once('.').unwrap_or((q, ""));
        if whole.is_empty() && frac.is_empty() || frac.len() > 3 {
            return Err(bad());
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let frac: u64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<3}").parse().map_err(|_| bad())?
        };
        whole
            .checked_mul(1000)
            .and_then(|w| w.checked_add(frac))
            .ok_or_else(bad)?
    };
    if millis == 0 {
        return Err(Error::invalid(
            "project.json",
            format!("{field} must be more than 0"),
        ));
    }
    Ok(millis)
}

/// Parses a size in bytes: `512Mi`, `1Gi`, `1G`, `1000k`, `65536`.
pub fn parse_bytes(field: &str, q: &str) -> Result<u64> {
    let q = q.trim();
    let bad = || {
        Error::invalid(
            "project.json",
            format!("{field} {q:?} is not a size (such as 512Mi, 2Gi or 1G)"),
        )
    };
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (digits, unit) = q.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if bytes == 0 {
        return Err(Error::invalid(
            "project.json",
            format!("{field} must be more than 0"),
        ));
    }
    Ok(bytes)
}

/// Bytes as people read them: `512 MiB`, `1.5 GiB`.
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit < UNITS.len() - 1 {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 || v.fract() == 0.0 {
            write!(f, "{} {}", v as u64, UNITS[unit])
        } else {
            write!(f, "{v:.1} {}", UNITS[unit])
        }
    }
}

/// The limits a build runs under. `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Memory, bytes (the build's processes together, `/dev/shm` included).
    pub memory_bytes: Option<u64>,
    /// CPU, thousandths of a CPU.
    pub cpu_millis: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<u64>,
    /// The workspace (sources, artifacts, home and `/tmp`), bytes.
    pub disk_bytes: Option<u64>,
    /// Whether the build reaches the network.
    pub network: Network,
}

/// The operator's defaults, for what `project.json` does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultLimits {
    /// Memory, bytes.
    pub memory_bytes: Option<u64>,
    /// CPU, thousandths.
    pub cpu_millis: Option<u64>,
    /// Processes.
    pub pids: Option<u64>,
    /// Workspace, bytes.
    pub disk_bytes: Option<u64>,
}

impl Default for DefaultLimits {
    fn default() -> Self {
        DefaultLimits {
            memory_bytes: Some(2 << 30),
            cpu_millis: None,
            pids: Some(1024),
            disk_bytes: Some(10 << 30),
        }
    }
}

impl Limits {
    /// The limits of a build of `project` (a valid descriptor has valid
    /// quantities: [`ProjectDescriptor::parse`] checked them).
    pub fn resolve(project: Option<&ProjectDescriptor>, defaults: DefaultLimits) -> Limits {
        let r = project.and_then(|p| p.descriptor.resources.as_ref());
        let memory = r
            .and_then(|r| r.memory.as_deref())
            .and_then(|q| parse_bytes("resources.memory", q).ok());
        let cpu = r
            .and_then(|r| r.cpu.as_deref())
            .and_then(|q| parse_cpu_millis("resources.cpu", q).ok());
        let disk = r
            .and_then(|r| r.disk.as_deref())
            .and_then(|q| parse_bytes("resources.disk", q).ok());
        Limits {
            memory_bytes: memory.or(defaults.memory_bytes),
            cpu_millis: cpu.or(defaults.cpu_millis),
            pids: r.and_then(|r| r.pids).or(defaults.pids),
            disk_bytes: disk.or(defaults.disk_bytes),
            network: project
                .and_then(|p| p.descriptor.network)
                .unwrap_or_default(),
        }
    }
}

/// A limit a build ran into, named for its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// The kernel killed a process for memory.
    Memory(u64),
    /// A process could not start: too many at once.
    Pids(u64),
    /// The workspace is full.
    Disk(u64),
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitHit::Memory(b) => write!(
                f,
                "the build reached its memory limit of {} (resources.memory) and a process was killed",
                HumanBytes(*b)
            ),
            LimitHit::Pids(n) => write!(
                f,
                "the build reached its limit of {n} processes (resources.pids); no more could start"
            ),
            LimitHit::Disk(b) => write!(
                f,
                "the build's workspace reached its limit of {} (resources.disk) and is full",
                HumanBytes(*b)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu_millis("c", "500m").ok(), Some(500));
        assert_eq!(parse_cpu_millis("c", "2").ok(), Some(2000));
        assert_eq!(parse_cpu_millis("c", "1.5").ok(), Some(1500));
        assert_eq!(parse_cpu_millis("c", ".25").ok(), Some(250));
        for bad in ["", "m", "abc", "1.2345", "-1", "0", "0m", "1e3"] {
            assert!(parse_cpu_millis("c", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn byte_quantities() {
        assert_eq!(parse_bytes("m", "512Mi").ok(), Some(512 << 20));
        assert_eq!(parse_bytes("m", "1G").ok(), Some(1_000_000_000));
        assert_eq!(parse_bytes("m", "4096").ok(), Some(4096));
        for bad in ["", "Mi", "1.5Gi", "-1", "0", "1Zi", "99999999999999Ti"] {
            assert!(parse_bytes("m", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn human_bytes() {
        assert_eq!(HumanBytes(512 << 20).to_string(), "512 MiB");
        assert_eq!(HumanBytes(1536 << 20).to_string(), "1.5 GiB");
        assert_eq!(HumanBytes(100).to_string(), "100 B");
    }

    #[test]
    fn the_descriptor_wins_over_the_defaults() {
        let p = ProjectDescriptor::parse(
            br#"{"buildImage": "x", "resources": {"memory": "256Mi", "pids": 64}, "network": "none"}"#,
        )
        .expect("valid");
        let l = Limits::resolve(Some(&p), DefaultLimits::default());
        assert_eq!(l.memory_bytes, Some(256 << 20));
        assert_eq!(l.pids, Some(64));
        assert_eq!(l.disk_bytes, Some(10 << 30), "the default");
        assert_eq!(l.network, Network::None);
        let l = Limits::resolve(None, DefaultLimits::default());
        assert_eq!(l.network, Network::Outbound);
    }
}
