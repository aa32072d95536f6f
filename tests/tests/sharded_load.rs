//! Loading checkpoint tensors straight into shards: every rank of an in-process group reads only its
//! block of each tensor from the memory-mapped safetensors files (`read_f32_block`), wraps it as a
//! `DTensor`, and the gathered tensor equals the whole tensor read in one piece.

use burn::tensor::{Tensor, TensorData};
use burn_moe_backend::dist::{CommConfig, Communicator, DTensor, Placement, ThreadComm, shard_range};
use burn_moe_tests::{Cpu, fixtures_dir};
use mixtral_burn::HfCheckpoint;

fn load_sharded(ckpt: &HfCheckpoint, name: &str, comm: &ThreadComm<Cpu>, placement: Placement) -> (Vec<usize>, Vec<f32>) {
    let shape = ckpt.files.shape(name).unwrap().to_vec();
    let groups = [comm];
    let (local, full) = match shape.len() {
        2 => {
            let global = [shape[0], shape[1]];
            let d = DTensor::<Cpu, 2>::from_local_fn(global, &groups, &[placement], |ranges| {
                let data = ckpt.files.read_f32_block(name, ranges).unwrap();
                Tensor::from_data(TensorData::new(data, [ranges[0].len(), ranges[1].len()]), &Default::default())
            })
            .unwrap();
            (d.to_local().dims().to_vec(), d.full_tensor(&groups).unwrap().into_data())
        }
        3 => {
            let global = [shape[0], shape[1], shape[2]];
            let d = DTensor::<Cpu, 3>::from_local_fn(global, &groups, &[placement], |ranges| {
                let data = ckpt.files.read_f32_block(name, ranges).unwrap();
                Tensor::from_data(TensorData::new(data, [ranges[0].len(), ranges[1].len(), ranges[2].len()]), &Default::default())
            })
            .unwrap();
            (d.to_local().dims().to_vec(), d.full_tensor(&groups).unwrap().into_data())
        }
        1 => {
            let d = DTensor::<Cpu, 1>::from_local_fn([shape[0]], &groups, &[placement], |ranges| {
                let data = ckpt.files.read_f32_block(name, ranges).unwrap();
                Tensor::from_data(TensorData::new(data, [ranges[0].len()]), &Default::default())
            })
            .unwrap();
            (d.to_local().dims().to_vec(), d.full_tensor(&groups).unwrap().into_data())
        }
        n => panic!("{name}: unexpected rank {n}"),
    };
    (local, full.convert::<f32>().to_vec::<f32>().unwrap())
}

#[test]
fn every_checkpoint_tensor_loads_into_shards_and_gathers_back_exactly() {
    for case in ["e4_k2", "fused_sharded_f16"] {
        let dir = fixtures_dir().join(case).join("model");
        let ckpt = HfCheckpoint::open(&dir).unwrap();
        let names: Vec<String> = ckpt.files.names().map(str::to_string).collect();
        for world in [3usize, 4] {
            let results = ThreadComm::<Cpu>::run_ranks(world, CommConfig::default(), |comm| {
                let rank = comm.rank();
                names
                    .iter()
                    .map(|name| {
                        let shape = ckpt.files.shape(name).unwrap().to_vec();
                        // FSDP-style Shard(0), then the last dim.
                        let (local, full) = load_sharded(&ckpt, name, &comm, Placement::Shard(0));
                        let want = ckpt.files.read_f32(name, &shape).unwrap();
                        assert_eq!(full, want, "{case} {name}: gathered shards differ from the tensor");
                        assert_eq!(local[0], shard_range(shape[0], comm.size(), rank).len(), "{case} {name}");
                        let (_, full_cols) = if shape.len() >= 2 {
                            load_sharded(&ckpt, name, &comm, Placement::Shard(shape.len() - 1))
                        } else {
                            (local, full)
                        };
                        assert_eq!(full_cols, want, "{case} {name}: last-dim shards");
                    })
                    .count()
            });
            for (rank, r) in results.into_iter().enumerate() {
                assert_eq!(r.unwrap_or_else(|e| panic!("{case} world {world} rank {rank}: {e}")), names.len());
            }
        }
    }
}
