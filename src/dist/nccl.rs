//! The NCCL collective (cargo features `cuda` + `nccl`, with `mpi` to start the ranks): the sums
//! run on the GPUs, over NVLink or the network as NCCL chooses. MPI starts the ranks and hands
//! rank 0's NCCL id to the others; the step's buffer then goes host → GPU → NCCL all-reduce →
//! host. Built only where CUDA is installed; not yet run on GPUs (see the README).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::mpi::Mpi;
use super::Collective;
use crate::error::{Error, Result};

pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    boot: Mpi,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Msg(format!("NCCL {what}: {e:?}"))
}

impl Nccl {
    /// One communicator over MPI's ranks, on GPU `OMPI_COMM_WORLD_LOCAL_RANK` (or `LOCAL_RANK`)
    /// of this machine.
    pub fn init(boot: Mpi) -> Result<Nccl> {
        let local = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "LOCAL_RANK"]
            .iter()
            .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        let ctx = CudaContext::new(local).map_err(|e| nccl_err("opening the GPU", e))?;
        let stream = ctx.default_stream();
        // Rank 0's id, 128 bytes, sent as 128 exactly representable f32 values.
        let mut id_buf = [0f32; 128];
        if boot.rank() == 0 {
            let id = Id::new().map_err(|e| nccl_err("creating the id", e))?;
            for (d, &c) in id_buf.iter_mut().zip(id.internal().iter()) {
                *d = c as u8 as f32;
            }
        }
        boot.broadcast(&mut id_buf, 0)?;
        let mut raw = [0 as core::ffi::c_char; 128];
        for (r, &v) in raw.iter_mut().zip(&id_buf) {
            *r = v as u8 as core::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), boot.rank(), boot.size(), Id::uninit(raw))
            .map_err(|e| nccl_err("joining the communicator", e))?;
        Ok(Nccl { comm, stream, boot })
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mut dev = self
            .stream
            .clone_htod(&*buf)
            .map_err(|e| nccl_err("copying to the GPU", e))?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| nccl_err("all-reduce", e))?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| nccl_err("copying from the GPU", e))?;
        self.stream.synchronize().map_err(|e| nccl_err("synchronising", e))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.boot.broadcast(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        self.boot.barrier()
    }
    fn abort(&self, code: i32) {
        self.boot.abort(code)
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
}
