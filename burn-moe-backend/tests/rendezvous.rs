//! Process-group environment parsing and the TCP rendezvous (threads on localhost stand in for
//! processes).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use burn_moe_backend::dist::{CommError, DistEnv, rendezvous};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv { rank, world_size: world, local_rank: rank, local_world_size: world, master_addr: "127.0.0.1".into(), master_port: port, rendezvous_port: port }
}

#[test]
fn env_parsing_defaults_and_errors() {
    let vars = |pairs: &[(&str, &str)]| {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| m.get(k).cloned()
    };
    assert_eq!(DistEnv::from_lookup(vars(&[])).unwrap(), None);
    let e = DistEnv::from_lookup(vars(&[("RANK", "2"), ("WORLD_SIZE", "4")])).unwrap().unwrap();
    assert_eq!((e.rank, e.world_size, e.local_rank, e.master_port, e.rendezvous_port), (2, 4, 2, 29500, 29500));
    // Under torchrun the agent's store holds MASTER_PORT; ours moves one up unless told otherwise.
    let t = DistEnv::from_lookup(vars(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1234"), ("TORCHELASTIC_RUN_ID", "x")])).unwrap().unwrap();
    assert_eq!(t.rendezvous_port, 1235);
    let t = DistEnv::from_lookup(vars(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", "x"), ("BURN_MOE_RDZV_PORT", "777")])).unwrap().unwrap();
    assert_eq!(t.rendezvous_port, 777);
    let err = DistEnv::from_lookup(vars(&[("RANK", "4"), ("WORLD_SIZE", "4")])).unwrap_err();
    assert!(err.to_string().contains("RANK=4 is not in 0..WORLD_SIZE=4"), "{err}");
    let err = DistEnv::from_lookup(vars(&[("RANK", "0")])).unwrap_err();
    assert!(err.to_string().contains("WORLD_SIZE is not set"), "{err}");
    let err = DistEnv::from_lookup(vars(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
    assert!(err.to_string().contains("RANK=\"x\""), "{err}");
    let err = DistEnv::from_lookup(vars(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")])).unwrap_err();
    assert!(err.to_string().contains("MASTER_PORT=70000"), "{err}");
    // Round trip through the variables a launcher sets.
    let back = DistEnv::from_lookup(|k| e.to_vars().into_iter().find(|(n, _)| *n == k).map(|(_, v)| v)).unwrap().unwrap();
    assert_eq!(back, e);
}

#[test]
fn every_rank_receives_rank0_payload() {
    for world in [1usize, 2, 4] {
        let port = free_port();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    s.spawn(move || {
                        rendezvous(&env(r, world, port), 0, Duration::from_secs(10), || {
                            assert_eq!(r, 0, "only rank 0 makes the payload");
                            Ok((0..128u8).collect())
                        })
                        .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for p in got {
            assert_eq!(p, (0..128u8).collect::<Vec<_>>());
        }
    }
}

#[test]
fn missing_rank_is_named_after_the_timeout() {
    let port = free_port();
    let start = Instant::now();
    // World of 3; rank 2 never starts.
    let results: Vec<Result<Vec<u8>, CommError>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| s.spawn(move || rendezvous(&env(r, 3, port), 0, Duration::from_millis(800), || Ok(vec![1, 2, 3]))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    let err0 = results[0].as_ref().unwrap_err().to_string();
    assert!(err0.contains("rank(s) [2] did not connect"), "{err0}");
    let err1 = results[1].as_ref().unwrap_err().to_string();
    assert!(err1.contains("rank 1"), "{err1}");
}
