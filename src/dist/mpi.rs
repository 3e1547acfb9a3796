//! The MPI collective (cargo feature `mpi`), for `mpirun -np N lorafold dpo …`.

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives, Root};

use super::Collective;
use crate::error::{Error, Result};

/// MPI_COMM_WORLD; MPI is finalized when this is dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    // Kept alive for the whole run: dropping it finalizes MPI.
    _universe: Universe,
}

impl Mpi {
    pub fn init() -> Result<Mpi> {
        // Only the training thread calls MPI (rayon's workers never do).
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Msg("MPI was already initialised in this process".into()))?;
        Ok(Mpi {
            world: universe.world(),
            _universe: universe,
        })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        // MPI's default error handler aborts the job on failure, so there is no error to return.
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) {
        self.world.abort(code)
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
}
