//! The process group of a data-parallel run: one process (rank) per device, launched by `mpirun`, a hostfile
//! or Slurm's `srun`, talking through MPI (Open MPI via rsmpi, cargo feature `mpi`). Without that feature, or
//! outside a launcher, the group is this process alone and every operation is the identity.
//!
//! What the trainer needs from the group is small: all-reduce a buffer of f32 (gradients, loss terms, a stop
//! flag), all-gather rows (the contrastive loss's embeddings), and a barrier that sleeps instead of spinning
//! (a rank waiting while rank 0 evaluates must leave the core to it).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

/// A group of processes training one model together; every rank calls every operation in the same order.
pub trait Group: Send + Sync {
    /// This process's index in the group, 0-based.
    fn rank(&self) -> usize;
    /// Processes in the group.
    fn size(&self) -> usize;
    /// This process's index among the group's processes on its machine (picks the GPU).
    fn local_rank(&self) -> usize;
    /// Element-wise sum over the group, in place; every rank gets the result.
    fn sum(&self, values: &mut [f32]);
    /// Every rank's `local` (all the same length), concatenated in rank order.
    fn gather(&self, local: &[f32]) -> Vec<f32>;
    /// Waits until every rank has arrived, sleeping between polls.
    fn wait_for_all(&self);
    /// Ends every process of the group with `code` (after this rank printed why).
    fn abort(&self, code: i32) -> !;
}

/// This process alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Group for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn sum(&self, _: &mut [f32]) {}
    fn gather(&self, local: &[f32]) -> Vec<f32> {
        local.to_vec()
    }
    fn wait_for_all(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Helpers every caller of a [`Group`] shares.
pub trait GroupExt: Group {
    /// Rank 0 writes the run folder (metrics, checkpoints, grids, evaluations); the others only compute.
    fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// True on every rank when `flag` is true on any (a stop request seen by one rank stops all at the same
    /// step). Waits politely first: this is where ranks catch up with rank 0 after it evaluated.
    fn any(&self, flag: bool) -> bool {
        if self.size() == 1 {
            return flag;
        }
        self.wait_for_all();
        let mut v = [flag as u8 as f32];
        self.sum(&mut v);
        v[0] > 0.0
    }

    /// The group's mean of `values`, in place.
    fn mean(&self, values: &mut [f32]) {
        if self.size() > 1 {
            self.sum(values);
            let n = self.size() as f32;
            values.iter_mut().for_each(|v| *v /= n);
        }
    }

    /// The rows of `local` `[b, d]` from every rank, `[size * b, d]` in rank order, with this rank's own rows
    /// the live tensor (gradients flow to them) and the other ranks' rows constants.
    fn gather_rows(&self, local: Tensor<2>) -> Tensor<2> {
        if self.size() == 1 {
            return local;
        }
        let [b, d] = local.dims();
        let device = local.device();
        let host = local.clone().detach().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 rows");
        let all = Tensor::<2>::from_data(TensorData::new(self.gather(&host), [self.size() * b, d]), &device);
        let (r, n) = (self.rank(), self.size());
        let mut parts = Vec::with_capacity(3);
        if r > 0 {
            parts.push(all.clone().narrow(0, 0, r * b));
        }
        parts.push(local);
        if r + 1 < n {
            parts.push(all.narrow(0, (r + 1) * b, (n - r - 1) * b));
        }
        Tensor::cat(parts, 0)
    }

    /// The factor that turns this rank's mean over its `local` items into its share of the group's mean over
    /// all items: `size * local / total`, so that the group's mean of the scaled values is the global mean.
    /// (For per-item means over equal shares it is 1; for a mean over a varying number of caption tokens it
    /// is not.)
    fn share(&self, local: usize) -> f64 {
        if self.size() == 1 {
            return 1.0;
        }
        let mut v = [local as f32];
        self.sum(&mut v);
        if v[0] == 0.0 { 1.0 } else { self.size() as f64 * local as f64 / v[0] as f64 }
    }
}

impl<G: Group + ?Sized> GroupExt for G {}

/// Replaces `grads` of `module`'s parameters, and `extra` values riding along (loss terms, a clock), by
/// their means over the group, in one all-reduce of one buffer. Alone, nothing happens.
pub fn mean_gradients<M: Module>(module: &M, grads: &mut GradientsParams, extra: &mut [f32], group: &dyn Group) {
    if group.size() == 1 {
        return;
    }
    struct Pack<'a>(&'a GradientsParams, Vec<f32>);
    impl ModuleVisitor for Pack<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                self.1.extend(g.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 gradient"));
            }
        }
    }
    struct Unpack<'a>(&'a mut GradientsParams, &'a [f32], usize);
    impl ModuleVisitor for Unpack<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.remove::<D>(param.id) {
                let (shape, device) = (g.shape(), g.device());
                let n = shape.num_elements();
                let data = TensorData::new(self.1[self.2..self.2 + n].to_vec(), shape);
                self.0.register(param.id, Tensor::<D>::from_data(data, &device));
                self.2 += n;
            }
        }
    }
    let mut pack = Pack(grads, Vec::new());
    module.visit(&mut pack);
    let mut buffer = pack.1;
    let n = buffer.len();
    buffer.extend_from_slice(extra);
    group.mean(&mut buffer);
    module.visit(&mut Unpack(grads, &buffer[..n], 0));
    extra.copy_from_slice(&buffer[n..]);
}

/// The group this process was launched in: MPI's world under a launcher when built with `--features mpi`,
/// else this process alone. Under a launcher without the feature it refuses to run N copies of one job.
pub fn join() -> Result<Box<dyn Group>, String> {
    let launched = launched_size();
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        return mpi_group::Mpi::init().map(|g| Box::new(g) as Box<dyn Group>);
    }
    match launched {
        Some(n) if n > 1 => Err(format!(
            "started as one of {n} processes (mpirun/srun), but this ov3 was built without MPI: every process \
             would train the whole job alone. Build with `cargo build --release -p ov3 --features mpi` \
             (needs libopenmpi-dev and libclang-dev), or run one process"
        )),
        _ => Ok(Box::new(Single)),
    }
}

/// The group size a launcher announced in the environment: Open MPI's `mpirun`, MPICH/Hydra, or a Slurm
/// job step started by `srun`.
fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
}

/// Gives each of the `ranks_here` processes on this machine its share of the cores for burn's CPU kernels
/// (flex's matmuls and reductions run on rayon's global pool, which takes every core by default: two ranks
/// on two cores would run four busy threads). `RAYON_NUM_THREADS`, when set, wins. Call before the first
/// tensor op.
#[cfg(feature = "mpi")]
fn share_cores(ranks_here: usize) {
    if ranks_here <= 1 || std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    crate::device::init_cpu_threads((cores / ranks_here).max(1));
}

#[cfg(feature = "mpi")]
mod mpi_group {
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    use mpi::environment::Universe;
    use mpi::topology::{Communicator, SimpleCommunicator};

    use super::Group;

    /// MPI's world communicator. MPI is called from the main thread only (`Threading::Funneled`): the data
    /// loader's threads never touch it.
    pub struct Mpi {
        // Finalizes MPI when dropped.
        _universe: Universe,
        rank: usize,
        size: usize,
        local_rank: usize,
    }

    impl Mpi {
        pub fn init() -> Result<Self, String> {
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or("MPI was already initialised in this process")?;
            let world = universe.world();
            let local = world.split_shared(world.rank());
            super::share_cores(local.size() as usize);
            Ok(Self {
                rank: world.rank() as usize,
                size: world.size() as usize,
                local_rank: local.rank() as usize,
                _universe: universe,
            })
        }
    }

    fn world() -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    impl Group for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn local_rank(&self) -> usize {
            self.local_rank
        }
        fn sum(&self, values: &mut [f32]) {
            let local = values.to_vec();
            world().all_reduce_into(&local[..], values, SystemOperation::sum());
        }
        fn gather(&self, local: &[f32]) -> Vec<f32> {
            let mut out = vec![0f32; local.len() * self.size];
            world().all_gather_into(local, &mut out[..]);
            out
        }
        fn wait_for_all(&self) {
            let mut request = world().immediate_barrier();
            loop {
                match request.test() {
                    Ok(_) => return,
                    Err(pending) => request = pending,
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        fn abort(&self, code: i32) -> ! {
            world().abort(code)
        }
    }
}
