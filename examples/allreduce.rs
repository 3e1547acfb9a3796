//! The time of the one all-reduce a data-parallel step makes, at a given gradient size.
//!
//! ```bash
//! cargo build --release --features mpi --example allreduce
//! mpirun -np 2 target/release/examples/allreduce 4399104 20   # LoRA r8 all-linear on Qwen2.5-0.5B
//! ```
//! Prints, on rank 0, the mean and best time of `reps` all-reduces of `floats` f32 values (plus
//! the 13 metric slots the trainer appends) and the bandwidth that amounts to.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let floats: usize = args.next().map_or(Ok(4_399_104), |s| s.parse())?;
    let reps: usize = args.next().map_or(Ok(20), |s| s.parse())?;
    let dist = lorafold::dist::from_env()?;
    let mut buf = vec![1.0f32; floats + 13];
    dist.all_reduce_sum(&mut buf)?; // warm-up: connections and buffers
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        buf.iter_mut().for_each(|x| *x = 1.0);
        dist.barrier()?;
        let t0 = std::time::Instant::now();
        dist.all_reduce_sum(&mut buf)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    if buf[0] != dist.size() as f32 {
        return Err(format!("sum is {} on rank {}, expected {}", buf[0], dist.rank(), dist.size()).into());
    }
    if dist.rank() == 0 {
        let mean = times.iter().sum::<f64>() / reps as f64;
        let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let mb = (buf.len() * 4) as f64 / 1e6;
        println!(
            "all-reduce of {} f32 ({mb:.1} MB) over {} ranks ({}): mean {:.2} ms, best {:.2} ms ({:.2} GB/s of buffer at the mean)",
            buf.len(),
            dist.size(),
            dist.backend(),
            mean * 1e3,
            best * 1e3,
            mb / 1e3 / mean
        );
    }
    Ok(())
}
