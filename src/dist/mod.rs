//! Data-parallel training: the one collective a LoRA step needs, behind one trait.
//!
//! A data-parallel DPO step only exchanges the adapter gradients (and a few metrics): every rank
//! holds the whole model, scores its share of the global batch, and the ranks sum one flat f32
//! buffer per optimizer step. [`SingleProcess`] is the default (no exchange at all, so a
//! one-process run is the same computation as before distribution existed); `mpi` (cargo feature
//! `mpi`) runs under `mpirun`; `nccl` (features `cuda` + `nccl`) sums on the GPUs.

use std::rc::Rc;

use crate::error::{Error, Result};

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(all(feature = "cuda", feature = "nccl"))]
mod nccl;

/// The collective operations of data-parallel training. Every rank must make the same calls in
/// the same order; each blocks until all ranks have made it.
pub trait Collective {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replace `buf` on every rank by the element-wise sum of all ranks' `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Replace `buf` on every rank by rank `root`'s.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Wait until every rank has reached this call.
    fn barrier(&self) -> Result<()>;
    /// End every rank of the job with `code` (after an error on this rank, so the others do not
    /// wait forever in their next collective). Returns only for a single process.
    fn abort(&self, code: i32);
    /// What carries the collective, for the log (`mpi`, `nccl`, `single process`).
    fn backend(&self) -> &'static str;
}

impl std::fmt::Debug for dyn Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (rank {} of {})", self.backend(), self.rank(), self.size())
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _code: i32) {}
    fn backend(&self) -> &'static str {
        "single process"
    }
}

/// The collective used when none is given.
pub fn single() -> Rc<dyn Collective> {
    Rc::new(SingleProcess)
}

/// The world size an MPI launcher (`mpirun`, `mpiexec`, `srun`) announces in the environment, if
/// this process was started by one.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse::<usize>().ok())
}

/// The collective for this process: MPI when started by an MPI launcher with more than one rank
/// (and built with `--features mpi`), otherwise a single process. Call once per process.
pub fn from_env() -> Result<Rc<dyn Collective>> {
    match launcher_world_size() {
        Some(n) if n > 1 => launch(n),
        _ => Ok(single()),
    }
}

#[cfg(all(feature = "mpi", not(all(feature = "cuda", feature = "nccl"))))]
fn launch(_n: usize) -> Result<Rc<dyn Collective>> {
    Ok(Rc::new(mpi::Mpi::init()?))
}

/// With NCCL built in, the sums run on the GPUs unless `LORAFOLD_COLLECTIVE=mpi` asks for MPI.
#[cfg(all(feature = "cuda", feature = "nccl"))]
fn launch(_n: usize) -> Result<Rc<dyn Collective>> {
    let boot = mpi::Mpi::init()?;
    if std::env::var("LORAFOLD_COLLECTIVE").is_ok_and(|v| v == "mpi") {
        return Ok(Rc::new(boot));
    }
    Ok(Rc::new(nccl::Nccl::init(boot)?))
}

#[cfg(not(feature = "mpi"))]
fn launch(n: usize) -> Result<Rc<dyn Collective>> {
    Err(Error::Msg(format!(
        "started by an MPI launcher with {n} ranks, but this lorafold was built without MPI: \
         build it with `cargo build --release --features mpi` (OpenMPI or MPICH development files \
         needed), or run it without mpirun"
    )))
}

/// Split a u64 into four exactly representable f32 pieces (16 bits each).
fn pieces(x: u64) -> [f32; 4] {
    [0, 16, 32, 48].map(|s| ((x >> s) & 0xffff) as f32)
}

fn joined(p: &[f32]) -> u64 {
    p.iter()
        .enumerate()
        .fold(0u64, |acc, (i, &v)| acc | ((v as u64) << (16 * i)))
}

/// Every rank's value of each named u64 (fingerprints), gathered with one all-reduce: slot
/// `rank` of each row is filled by that rank only.
pub fn all_gather_u64(dist: &dyn Collective, values: &[u64]) -> Result<Vec<Vec<u64>>> {
    let (n, k) = (dist.size(), values.len());
    let mut buf = vec![0f32; n * k * 4];
    for (j, &v) in values.iter().enumerate() {
        let at = (dist.rank() * k + j) * 4;
        buf[at..at + 4].copy_from_slice(&pieces(v));
    }
    dist.all_reduce_sum(&mut buf)?;
    Ok((0..n)
        .map(|r| {
            (0..k)
                .map(|j| joined(&buf[(r * k + j) * 4..(r * k + j) * 4 + 4]))
                .collect()
        })
        .collect())
}

/// Refuse to start when the ranks disagree: each `(what, value)` must be the same on every rank
/// (the data fingerprint, the settings). The error names the first rank that differs from rank 0.
pub fn check_agreement(dist: &dyn Collective, items: &[(&str, u64)]) -> Result<()> {
    if dist.size() == 1 {
        return Ok(());
    }
    let values: Vec<u64> = items.iter().map(|(_, v)| *v).collect();
    let all = all_gather_u64(dist, &values)?;
    for (j, (what, _)) in items.iter().enumerate() {
        if let Some(r) = (1..all.len()).find(|&r| all[r][j] != all[0][j]) {
            return Err(Error::Msg(format!(
                "ranks disagree before training: rank {r}'s {what} ({:016x}) differs from rank 0's \
                 ({:016x}); every rank must run the same command on the same files",
                all[r][j], all[0][j]
            )));
        }
    }
    Ok(())
}

/// FNV-1a of a string (settings, as YAML).
pub fn hash_str(text: &str) -> u64 {
    let mut h = crate::util::Fnv1a::default();
    h.eat_bytes(text.as_bytes());
    h.finish()
}

/// The chunks of `n` items, `chunk` at a time, that `rank` of `size` handles: chunk `c` goes to
/// rank `c % size`, so each chunk is the same batch a single process would form.
pub fn my_chunks(n: usize, chunk: usize, rank: usize, size: usize) -> Vec<std::ops::Range<usize>> {
    let chunk = chunk.max(1);
    (0..n.div_ceil(chunk))
        .filter(|c| c % size == rank)
        .map(|c| c * chunk..((c + 1) * chunk).min(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_pieces_round_trip() {
        for x in [0u64, 1, 0xffff, 0x1234_5678_9abc_def0, u64::MAX] {
            assert_eq!(joined(&pieces(x)), x);
        }
    }

    #[test]
    fn chunks_cover_every_item_once() {
        for (n, chunk, size) in [(10, 3, 2), (7, 2, 3), (4, 4, 2), (0, 2, 2)] {
            let mut seen = vec![0; n];
            for r in 0..size {
                for range in my_chunks(n, chunk, r, size) {
                    assert!(range.len() <= chunk);
                    range.for_each(|i| seen[i] += 1);
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "n {n} chunk {chunk} size {size}: {seen:?}"
            );
        }
    }

    #[test]
    fn single_process_agrees_with_itself() {
        let d = SingleProcess;
        check_agreement(&d, &[("data", 7)]).unwrap();
        assert_eq!(all_gather_u64(&d, &[5, 6]).unwrap(), vec![vec![5, 6]]);
    }
}
