//! Starting, signalling and reaping container processes.
//!
//! Every container process leads its own process group, so signals reach whatever it forked
//! (shells, worker pools) the way a container's cgroup would. PR_SET_PDEATHSIG makes the kernel
//! kill the leader if the agent dies without cleaning up, and a `<container>.pid` file plus the
//! `KUBETUNE_POD_UID` marker in the environment lets the next agent find and kill any group
//! members that outlived it (see [`reap_orphans`]).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};

/// Env var set in every container process so orphans can be recognised after an agent restart.
pub const POD_UID_ENV: &str = "KUBETUNE_POD_UID";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("exec: {0:?}: executable file not found in $PATH")]
    NotFound(String),
    #[error("cannot open log file {path}: {source}")]
    Log { path: PathBuf, source: std::io::Error },
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
}

/// Everything needed to start one container process.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The command word, resolved against the env's `PATH` at start (like an entrypoint).
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
}

/// How a process ended, as container runtimes report it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exit {
    /// Exit status, or 128 + signal number when killed by a signal.
    pub code: i32,
    pub signal: Option<i32>,
}

pub struct Running {
    child: Child,
    pub pid: i32,
    /// Log file length when this run started: the fallback termination message reads from here.
    pub log_offset: u64,
    pid_file: PathBuf,
}

/// Resolves a command word like a container entrypoint: paths containing `/` are used as they
/// are (relative to `cwd`), bare names are searched in `path` (a `$PATH` value).
pub fn resolve_program(word: &str, path: &str, cwd: &Path) -> Result<PathBuf, ProcessError> {
    if word.contains('/') {
        return Ok(cwd.join(word));
    }
    std::env::split_paths(OsStr::new(path))
        .map(|dir| dir.join(word))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| ProcessError::NotFound(word.into()))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub fn spawn(spec: &LaunchSpec) -> Result<Running, ProcessError> {
    let path = spec.env.get("PATH").map(String::as_str).unwrap_or_default();
    let program = resolve_program(&spec.program, path, &spec.cwd)?;
    let log_err = |source| ProcessError::Log {
        path: spec.log.clone(),
        source,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(log_err)?;
    let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let stderr = log.try_clone().map_err(log_err)?;
    let mut command = Command::new(&program);
    command
        .args(&spec.args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.cwd)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            // If the agent thread that forked us dies, take the process down with it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| ProcessError::Spawn {
        program: spec.program.clone(),
        source,
    })?;
    let pid = child.id().map_or(0, |p| p as i32);
    // Best effort: losing the pid file only weakens orphan cleanup after a crash.
    if let Err(e) = std::fs::write(&spec.pid_file, pid.to_string()) {
        tracing::warn!(path = %spec.pid_file.display(), error = %e, "cannot write pid file");
    }
    Ok(Running {
        child,
        pid,
        log_offset,
        pid_file: spec.pid_file.clone(),
    })
}

/// Sends `signal` to the whole process group led by `pid`.
pub fn signal_group(pid: i32, signal: i32) {
    if pid > 0 {
        // SAFETY: plain syscall; ESRCH (group already gone) is expected and ignored.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

impl Running {
    /// Waits for the leader to exit, then kills what is left of its group: a container ends
    /// when its main process does.
    pub async fn wait(&mut self) -> Exit {
        let status = self.child.wait().await;
        signal_group(self.pid, libc::SIGKILL);
        let _ = std::fs::remove_file(&self.pid_file);
        match status {
            Ok(status) => exit_of(status),
            Err(e) => {
                tracing::warn!(pid = self.pid, error = %e, "waiting for process failed");
                Exit {
                    code: 128,
                    signal: None,
                }
            }
        }
    }

    /// SIGTERM to the group, SIGKILL after `grace`; returns how the process ended.
    pub async fn stop(&mut self, grace: Duration) -> Exit {
        signal_group(self.pid, libc::SIGTERM);
        if let Ok(exit) = tokio::time::timeout(grace, self.wait()).await {
            return exit;
        }
        signal_group(self.pid, libc::SIGKILL);
        self.wait().await
    }
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit { code, signal: None },
        (None, Some(signal)) => Exit {
            code: 128 + signal,
            signal: Some(signal),
        },
        (None, None) => Exit {
            code: 128,
            signal: None,
        },
    }
}

/// Last `max_lines` lines / `max_bytes` bytes of `log` from `offset` on (kubelet's
/// FallbackToLogsOnError limits are 80 lines and 2048 bytes).
pub fn log_tail(log: &Path, offset: u64, max_lines: usize, max_bytes: usize) -> String {
    let Ok(bytes) = std::fs::read(log) else {
        return String::new();
    };
    let start = (offset as usize).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(max_lines)..].join("\n");
    if tail.len() <= max_bytes {
        return tail;
    }
    let mut cut = tail.len() - max_bytes;
    while !tail.is_char_boundary(cut) {
        cut += 1;
    }
    tail[cut..].to_owned()
}

/// Kills process groups a previous agent left behind under `state_dir`.
///
/// The group leader may be gone while its children live on (PR_SET_PDEATHSIG only covers the
/// leader), so every process in the recorded group is checked. A process is only trusted if
/// it still carries the pod's `KUBETUNE_POD_UID` marker, so a recycled pid of an unrelated
/// process is never signalled.
pub fn reap_orphans(state_dir: &Path) {
    let Ok(pods) = std::fs::read_dir(state_dir.join("pods")) else {
        return;
    };
    for pod in pods.flatten() {
        let uid = pod
            .file_name()
            .to_string_lossy()
            .rsplit('_')
            .next()
            .unwrap_or_default()
            .to_owned();
        let marker = format!("{POD_UID_ENV}={uid}");
        let Ok(files) = std::fs::read_dir(pod.path()) else {
            continue;
        };
        for file in files
            .flatten()
            .filter(|f| f.path().extension() == Some(OsStr::new("pid")))
        {
            if let Ok(Ok(pgid)) = std::fs::read_to_string(file.path()).map(|s| s.trim().parse::<i32>()) {
                for pid in group_members(pgid).into_iter().filter(|pid| has_env(*pid, &marker)) {
                    tracing::warn!(pid, pod = %pod.file_name().to_string_lossy(), "killing a process left by a previous agent");
                    // SAFETY: plain syscall on a pid verified to belong to this pod.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            let _ = std::fs::remove_file(file.path());
        }
    }
}

/// Pids whose process group is `pgid`, from /proc/<pid>/stat.
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // Fields after the command name (which may contain spaces) closed by ')':
            // state ppid pgrp ...
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                return false;
            };
            rest.split_whitespace().nth(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
        })
        .collect()
}

fn has_env(pid: i32, marker: &str) -> bool {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    environ.split(|b| *b == 0).any(|var| var == marker.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_limits_lines_and_bytes_from_offset() {
        let dir = std::env::temp_dir().join(format!("kubetune-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = dir.join("c.log");
        let old = "old run\n";
        let body: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, format!("{old}{body}")).expect("write log");
        let tail = log_tail(&log, old.len() as u64, 80, 2048);
        assert!(tail.starts_with("line 21\n"));
        assert!(tail.ends_with("line 100"));
        assert_eq!(log_tail(&log, old.len() as u64, 80, 8), "line 100");
        assert_eq!(log_tail(&log, 0, 1000, 7), "ine 100");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn finds_own_process_group_members() {
        // SAFETY: getpgrp has no preconditions.
        let pgid = unsafe { libc::getpgrp() };
        assert!(group_members(pgid).contains(&(std::process::id() as i32)));
    }

    #[test]
    fn resolves_programs_from_path() {
        let sh = resolve_program("sh", "/nonexistent:/bin:/usr/bin", Path::new("/")).expect("sh exists");
        assert!(sh.ends_with("sh"));
        assert!(matches!(
            resolve_program("no-such-binary-xyz", "/bin", Path::new("/")),
            Err(ProcessError::NotFound(_))
        ));
        assert_eq!(
            resolve_program("./run", "/bin", Path::new("/pod")).expect("path"),
            PathBuf::from("/pod/./run")
        );
    }
}
