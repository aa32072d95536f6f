//! The process launcher behind `--nproc-per-node`, driven with `/bin/sh` workers.
#![cfg(unix)]

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use trainer::launch::{LaunchConfig, LaunchError, run_workers};

fn config(n: usize) -> LaunchConfig {
    LaunchConfig { nproc_per_node: n, nnodes: 1, node_rank: 0, master_addr: "127.0.0.1".into(), master_port: 29400 }
}

fn sh(script: &str) -> Vec<OsString> {
    vec!["-c".into(), script.into()]
}

#[test]
fn workers_see_torchrun_variables() {
    let script = r#"test "$WORLD_SIZE" = 3 && test "$LOCAL_RANK" = "$RANK" && test "$LOCAL_WORLD_SIZE" = 3 \
        && test "$MASTER_ADDR" = 127.0.0.1 && test "$MASTER_PORT" = 29400 && test "$BURN_MOE_WORKER" = 1"#;
    run_workers(&config(3), Path::new("/bin/sh"), &sh(script), Duration::from_secs(2)).unwrap();
}

#[test]
fn first_failure_stops_the_others_and_keeps_its_exit_code() {
    // Rank 1 fails at once; ranks 0 and 2 would sleep for a minute.
    let start = Instant::now();
    let err = run_workers(&config(3), Path::new("/bin/sh"), &sh(r#"if [ "$RANK" = 1 ]; then exit 7; fi; sleep 60"#), Duration::from_secs(2))
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    match &err {
        LaunchError::WorkerFailed { rank, .. } => assert_eq!(*rank, 1),
        other => panic!("unexpected {other}"),
    }
    assert_eq!(err.exit_code(), 7);
    assert!(err.to_string().contains("worker rank 1"), "{err}");
}

#[test]
fn bad_node_rank_is_rejected() {
    let mut c = config(2);
    c.nnodes = 2;
    c.node_rank = 2;
    let err = run_workers(&c, Path::new("/bin/sh"), &sh("true"), Duration::from_secs(1)).unwrap_err();
    assert!(err.to_string().contains("--node-rank 2 is not in 0..--nnodes 2"), "{err}");
    // Node 1 of 2 with 2 workers each holds global ranks 2 and 3.
    c.node_rank = 1;
    assert_eq!(c.worker_env(1).rank, 3);
    assert_eq!(c.worker_env(1).world_size, 4);
}
