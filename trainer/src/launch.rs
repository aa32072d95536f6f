//! `--nproc-per-node N`: a torchrun-style launcher built into the trainer.
//!
//! The launcher re-executes the trainer binary N times with torchrun's variables (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) plus a marker
//! variable, so a worker knows it must not launch again. It watches the workers: the first one
//! that fails makes the launcher stop the others (SIGTERM, then SIGKILL after a grace period) and
//! return that worker's exit code; SIGINT/SIGTERM received by the launcher are forwarded. A worker
//! started by `torchrun` or `srun` instead sees the same variables and behaves the same.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use burn_moe_backend::dist::DistEnv;

/// Set on workers started by [`run_workers`]; its presence stops them from launching again.
pub const WORKER_MARKER: &str = "BURN_MOE_WORKER";

/// Where this node's workers sit in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Workers on this node (one per GPU).
    pub nproc_per_node: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's index, `0..nnodes`.
    pub node_rank: usize,
    /// Host of rank 0 (on node 0) as the other nodes reach it.
    pub master_addr: String,
    /// Rendezvous port on `master_addr`.
    pub master_port: u16,
}

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Bad launcher flags.
    #[error("launcher: {0}")]
    Invalid(String),
    /// A worker process could not be started.
    #[error("launcher: starting worker rank {rank} ({program}): {source}")]
    Spawn { rank: usize, program: String, source: std::io::Error },
    /// A worker exited unsuccessfully; the others were stopped.
    #[error("launcher: worker rank {rank} (local rank {local_rank}) failed with {status}; stopped the other workers")]
    WorkerFailed { rank: usize, local_rank: usize, status: ExitStatus },
    /// The launcher was interrupted and passed the signal on.
    #[error("launcher: interrupted by signal {signal}; forwarded to the workers")]
    Interrupted { signal: i32 },
}

impl LaunchError {
    /// The exit code the launcher process should end with (a failed worker's own code, or
    /// 128 + signal as shells do).
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::WorkerFailed { status, .. } => status.code().unwrap_or_else(|| {
                #[cfg(unix)]
                {
                    use std::os::unix::process::ExitStatusExt;
                    128 + status.signal().unwrap_or(0)
                }
                #[cfg(not(unix))]
                1
            }),
            LaunchError::Interrupted { signal } => 128 + signal,
            _ => 1,
        }
    }
}

impl LaunchConfig {
    /// Validates the flags.
    pub fn validate(&self) -> Result<(), LaunchError> {
        if self.nproc_per_node == 0 || self.nnodes == 0 {
            return Err(LaunchError::Invalid(format!(
                "--nproc-per-node {} and --nnodes {} must be at least 1",
                self.nproc_per_node, self.nnodes
            )));
        }
        if self.node_rank >= self.nnodes {
            return Err(LaunchError::Invalid(format!(
                "--node-rank {} is not in 0..--nnodes {}",
                self.node_rank, self.nnodes
            )));
        }
        Ok(())
    }

    /// The environment of local worker `local_rank`.
    pub fn worker_env(&self, local_rank: usize) -> DistEnv {
        DistEnv {
            rank: self.node_rank * self.nproc_per_node + local_rank,
            world_size: self.nnodes * self.nproc_per_node,
            local_rank,
            local_world_size: self.nproc_per_node,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
            rendezvous_port: self.master_port,
        }
    }
}

/// True in a process started by our launcher (which must therefore not launch again).
pub fn is_launched_worker() -> bool {
    std::env::var_os(WORKER_MARKER).is_some()
}

static SIGNAL: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

#[cfg(unix)]
fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

#[cfg(not(unix))]
fn install_signal_handlers() {}

fn send_signal(child: &Child, sig: i32) {
    #[cfg(unix)]
    // SAFETY: `kill` on a child's pid that we have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
    #[cfg(not(unix))]
    let _ = (child, sig);
}

/// Starts this node's workers (`program args…` with the worker environment) and supervises them.
///
/// Returns `Ok(())` when every worker exited with success.
pub fn run_workers(config: &LaunchConfig, program: &Path, args: &[OsString], grace: Duration) -> Result<(), LaunchError> {
    config.validate()?;
    install_signal_handlers();
    let mut children: Vec<(DistEnv, Option<Child>)> = Vec::new();
    for local in 0..config.nproc_per_node {
        let env = config.worker_env(local);
        let mut cmd = Command::new(program);
        cmd.args(args).env(WORKER_MARKER, "1");
        for (k, v) in env.to_vars() {
            cmd.env(k, v);
        }
        match cmd.spawn() {
            Ok(child) => children.push((env, Some(child))),
            Err(source) => {
                stop_all(&mut children, grace);
                return Err(LaunchError::Spawn { rank: env.rank, program: program.display().to_string(), source });
            }
        }
    }
    tracing::info!(workers = config.nproc_per_node, world_size = config.nnodes * config.nproc_per_node, "launched workers");
    loop {
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            for (_, child) in children.iter().filter_map(|(e, c)| c.as_ref().map(|c| (e, c))) {
                send_signal(child, sig);
            }
            stop_all(&mut children, grace);
            return Err(LaunchError::Interrupted { signal: sig });
        }
        let mut running = 0;
        for i in 0..children.len() {
            let Some(child) = children[i].1.as_mut() else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    children[i].1 = None;
                    if !status.success() {
                        let env = children[i].0.clone();
                        tracing::error!(rank = env.rank, %status, "worker failed; stopping the others");
                        stop_all(&mut children, grace);
                        return Err(LaunchError::WorkerFailed { rank: env.rank, local_rank: env.local_rank, status });
                    }
                }
                Ok(None) => running += 1,
                Err(_) => running += 1,
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to every live worker, SIGKILL to those still alive after `grace`, then reap them all.
fn stop_all(children: &mut [(DistEnv, Option<Child>)], grace: Duration) {
    #[cfg(unix)]
    for (_, child) in children.iter().filter_map(|(e, c)| c.as_ref().map(|c| (e, c))) {
        send_signal(child, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for (_, slot) in children.iter_mut() {
        if let Some(child) = slot.as_mut() {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        *slot = None;
    }
}
