//! Process-group environment and the TCP rendezvous that starts a multi-process group.
//!
//! The variables are torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`), so the same binary runs under `torchrun`, under SLURM (`srun`
//! with those variables exported) or under the trainer's own `--nproc-per-node` launcher.
//!
//! The rendezvous only has to move a few bytes once (NCCL's 128-byte unique id): rank 0 listens at
//! `MASTER_ADDR` (port: [`DistEnv::rendezvous_port`]), every other rank connects (retrying until the deadline, because rank
//! 0 may start later), says who it is, and receives the payload. Rank 0 waits for everyone, so a rank
//! that never starts turns into an error naming it instead of a hang inside NCCL's init.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::CommError;

/// Where this process sits in a multi-process group, read from torchrun-style variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Rank on this node; also the CUDA device index this process uses.
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    /// Host of rank 0's rendezvous listener.
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
    /// Port of rank 0's rendezvous listener: `BURN_MOE_RDZV_PORT` if set; otherwise
    /// `MASTER_PORT + 1` under torchrun (whose agent already serves its own store on
    /// `MASTER_PORT`, detected by `TORCHELASTIC_RUN_ID`), else `MASTER_PORT`.
    pub rendezvous_port: u16,
}

impl DistEnv {
    /// Reads the process environment. `Ok(None)` when `RANK` and `WORLD_SIZE` are both unset (a
    /// plain single-process run); an error when they are set but inconsistent.
    pub fn from_env() -> Result<Option<Self>, CommError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`from_env`](Self::from_env) with an explicit variable lookup (tests, launchers).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, CommError> {
        let rank = get("RANK");
        let world = get("WORLD_SIZE");
        if rank.is_none() && world.is_none() {
            return Ok(None);
        }
        let num = |name: &str, default: Option<usize>| -> Result<usize, CommError> {
            match get(name) {
                Some(v) => v.trim().parse::<usize>().map_err(|_| {
                    CommError::Setup(format!("environment variable {name}={v:?} is not a non-negative integer"))
                }),
                None => default
                    .ok_or_else(|| CommError::Setup(format!("environment variable {name} is not set"))),
            }
        };
        let rank = num("RANK", None)?;
        let world_size = num("WORLD_SIZE", None)?;
        if world_size == 0 || rank >= world_size {
            return Err(CommError::Setup(format!(
                "RANK={rank} is not in 0..WORLD_SIZE={world_size}"
            )));
        }
        let local_rank = num("LOCAL_RANK", Some(rank))?;
        let local_world_size = num("LOCAL_WORLD_SIZE", Some(world_size))?;
        if local_rank >= local_world_size {
            return Err(CommError::Setup(format!(
                "LOCAL_RANK={local_rank} is not in 0..LOCAL_WORLD_SIZE={local_world_size}"
            )));
        }
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_string());
        let port = num("MASTER_PORT", Some(29500))?;
        let master_port = u16::try_from(port)
            .map_err(|_| CommError::Setup(format!("MASTER_PORT={port} is not a TCP port")))?;
        let rendezvous_port = match get("BURN_MOE_RDZV_PORT") {
            Some(_) => {
                let p = num("BURN_MOE_RDZV_PORT", None)?;
                u16::try_from(p).map_err(|_| CommError::Setup(format!("BURN_MOE_RDZV_PORT={p} is not a TCP port")))?
            }
            None if get("TORCHELASTIC_RUN_ID").is_some() => master_port.checked_add(1).ok_or_else(|| {
                CommError::Setup(format!("MASTER_PORT={master_port} leaves no port for the rendezvous (MASTER_PORT + 1)"))
            })?,
            None => master_port,
        };
        Ok(Some(Self { rank, world_size, local_rank, local_world_size, master_addr, master_port, rendezvous_port }))
    }

    /// The variables that describe this process, for a launcher to set on a child.
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("BURN_MOE_RDZV_PORT", self.rendezvous_port.to_string()),
        ]
    }
}

const MAGIC: &[u8; 8] = b"bmoe-rdv";

/// Distributes `payload()` (evaluated on rank 0 only) to every rank of `env`'s group.
///
/// Every rank of the job must call it once with the same `tag` (a small integer that keeps two
/// rendezvous of the same job apart, e.g. two successive process groups). Fails on every rank that
/// can tell within `timeout`, naming the ranks that never connected.
pub fn rendezvous(
    env: &DistEnv,
    tag: u32,
    timeout: Duration,
    payload: impl FnOnce() -> Result<Vec<u8>, CommError>,
) -> Result<Vec<u8>, CommError> {
    let addr = format!("{}:{}", env.master_addr, env.rendezvous_port);
    let deadline = Instant::now() + timeout;
    if env.world_size == 1 {
        return payload();
    }
    if env.rank == 0 {
        serve(env, &addr, tag, deadline, timeout, payload()?)
    } else {
        join(env, &addr, tag, deadline, timeout)
    }
}

fn setup_err(addr: &str, what: impl std::fmt::Display) -> CommError {
    CommError::Setup(format!("rendezvous at {addr}: {what}"))
}

fn serve(
    env: &DistEnv,
    addr: &str,
    tag: u32,
    deadline: Instant,
    timeout: Duration,
    payload: Vec<u8>,
) -> Result<Vec<u8>, CommError> {
    // Bind on all interfaces at the master port: MASTER_ADDR names this host as the others see it.
    let listener = TcpListener::bind(("0.0.0.0", env.rendezvous_port))
        .map_err(|e| setup_err(addr, format!("rank 0 cannot listen on port {}: {e}", env.rendezvous_port)))?;
    listener.set_nonblocking(true).map_err(|e| setup_err(addr, e))?;
    let mut waiting: BTreeSet<usize> = (1..env.world_size).collect();
    let mut peers = Vec::new();
    while !waiting.is_empty() {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| setup_err(addr, e))?;
                stream
                    .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10))))
                    .map_err(|e| setup_err(addr, e))?;
                let mut hello = [0u8; 20];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    // Not one of ours (a port scanner, a stale job): ignore it.
                    continue;
                }
                let peer_tag = u32::from_le_bytes(hello[8..12].try_into().unwrap());
                let rank = u64::from_le_bytes(hello[12..20].try_into().unwrap()) as usize;
                if peer_tag != tag {
                    return Err(setup_err(addr, format!("rank {rank} joined rendezvous {peer_tag}, expected {tag}")));
                }
                if !waiting.remove(&rank) {
                    return Err(setup_err(
                        addr,
                        format!("a process claims rank {rank}, which is out of range or already joined (world size {})", env.world_size),
                    ));
                }
                peers.push(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(setup_err(
                        addr,
                        format!("rank(s) {:?} did not connect within {timeout:?}", waiting.iter().collect::<Vec<_>>()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(setup_err(addr, e)),
        }
    }
    for mut stream in peers {
        let mut msg = (payload.len() as u64).to_le_bytes().to_vec();
        msg.extend_from_slice(&payload);
        stream.write_all(&msg).map_err(|e| setup_err(addr, format!("sending to a peer: {e}")))?;
    }
    Ok(payload)
}

fn join(env: &DistEnv, addr: &str, tag: u32, deadline: Instant, timeout: Duration) -> Result<Vec<u8>, CommError> {
    let target = addr
        .to_socket_addrs()
        .map_err(|e| setup_err(addr, format!("cannot resolve MASTER_ADDR: {e}")))?
        .next()
        .ok_or_else(|| setup_err(addr, "MASTER_ADDR resolves to nothing"))?;
    let mut stream = loop {
        match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return Err(setup_err(addr, format!("rank {} could not reach rank 0 within {timeout:?}: {e}", env.rank)));
            }
        }
    };
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&tag.to_le_bytes());
    hello.extend_from_slice(&(env.rank as u64).to_le_bytes());
    stream.write_all(&hello).map_err(|e| setup_err(addr, e))?;
    stream
        .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10))))
        .map_err(|e| setup_err(addr, e))?;
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).map_err(|e| {
        setup_err(addr, format!("rank {} got no reply from rank 0 within {timeout:?} (other ranks missing?): {e}", env.rank))
    })?;
    let mut payload = vec![0u8; u64::from_le_bytes(len) as usize];
    stream.read_exact(&mut payload).map_err(|e| setup_err(addr, e))?;
    Ok(payload)
}
