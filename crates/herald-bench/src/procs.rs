//! The services as child processes: spawn, readiness (spawn → `/readyz` 200), CPU and peak
//! RSS from `/proc`, and a polite stop (SIGTERM, then SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// One running service.
pub struct Service {
    pub name: &'static str,
    pub child: Child,
    pub pid: u32,
    pub spawned: Instant,
    /// Spawn → first 200 from its readiness URL.
    pub ready_after: Option<Duration>,
    ready_url: String,
}

/// Where the release binaries are: `--bin-dir`, else the directory of this executable
/// (`cargo build --release --workspace --bins` puts them all in one `target/release`).
pub fn bin_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating herald-bench")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("herald-bench has no directory")
}

impl Service {
    /// Starts `binary` from `dir` with `env` on top of this process's environment (minus any
    /// `HERALD_*` of the caller's own, so a developer's shell cannot change the run).
    pub fn spawn(
        name: &'static str,
        dir: &Path,
        binary: &str,
        env: &[(String, String)],
        ready_url: String,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let path = dir.join(binary);
        if !path.exists() {
            bail!(
                "{} not found: build the services first (cargo build --release --workspace --bins)",
                path.display()
            );
        }
        let mut command = Command::new(&path);
        for (key, _) in std::env::vars() {
            if key.starts_with("HERALD_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let spawned = Instant::now();
        let pid = child.id();
        Ok(Self {
            name,
            child,
            pid,
            spawned,
            ready_after: None,
            ready_url,
        })
    }

    /// Polls the readiness URL every 2 ms until it answers 200 (or the process exits).
    pub async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        limit: Duration,
    ) -> anyhow::Result<()> {
        loop {
            if let Ok(response) = http
                .get(&self.ready_url)
                .timeout(Duration::from_millis(500))
                .send()
                .await
                && response.status().is_success()
            {
                self.ready_after = Some(self.spawned.elapsed());
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited during start-up ({status}); see its log",
                    self.name
                );
            }
            if self.spawned.elapsed() > limit {
                bail!("{} not ready within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, up to 5 s to finish, then SIGKILL.
    pub async fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        for _ in 0..100 {
            if !self.alive() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU seconds of a process so far (`/proc/<pid>/stat` fields 14 and 15, in
/// USER_HZ = 100 ticks a second).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow the last ')'.
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: f64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: f64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Peak resident set size in KiB (`VmHWM` of `/proc/<pid>/status`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// CPU seconds used so far by each process whose command name is `comm` (Postgres backends,
/// RabbitMQ's `beam.smp`), by pid, for context: Herald's cost includes the work it gives them.
pub fn cpu_by_pid(comm: &str) -> std::collections::HashMap<u32, f64> {
    let mut found = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(command) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if command.trim_end() == comm
            && let Some(cpu) = cpu_seconds(pid)
        {
            found.insert(pid, cpu);
        }
    }
    found
}

/// Busy and total CPU seconds of the whole machine (`/proc/stat`, first line).
pub fn machine_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = values.iter().sum();
    // idle and iowait are fields 4 and 5.
    let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
    Some(((total - idle) / 100.0, total / 100.0))
}

/// The 1-minute load average.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A free local port (bound, then released: another process could take it in between, which
/// on a developer machine is rare enough).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
