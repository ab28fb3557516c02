//! Data-parallel training over MPI with ZeRO-1 sharded optimizer state (cargo feature
//! `mpi`): [`ShardedRmsProp`].
//!
//! Each rank owns one equal, aligned run of the model's flat element space
//! ([`layout::ShardLayout`]) and keeps the parameters and slots of that run in an
//! ordinary [`RmsProp`] on its own backend (CPU or GPU), whose variables are the pieces
//! of the tensors the run covers. A step:
//!
//! 1. every rank checks its input and says so, with which gradients it has (one
//!    all-gather): a rank's bad input, or ranks disagreeing on missing gradients, is an
//!    error on every rank, not a hang;
//! 2. the gradients are reduce-scattered (mean over ranks): an all-to-all of shard
//!    blocks, each rank summing what it receives in rank order, so a run repeats bit
//!    for bit (skipped when the caller says the gradients are already averaged);
//! 3. with the non-finite guard or loss scaling, every rank's verdict is all-gathered
//!    and the step is applied or skipped by all;
//! 4. when clipping by a norm, each rank's per-tensor sums of squares are all-gathered
//!    and added in rank order (a tensor's norm spans shards), and the clip factors
//!    are handed to the shard's optimizer;
//! 5. the shard steps (every Keras option as in one process: the pieces are its
//!    variables, the exclusions apply by name), every rank says whether it could, and
//!    the parameters are all-gathered, so every rank holds the whole updated model.
//!
//! Every method that communicates must be called by every rank, in the same order.

mod checkpoint;
mod comm;
mod layout;

use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator;

use crate::backend::Backend;
use crate::config::RmsPropConfig;
use crate::error::{Error, Result};
use crate::gpu::GpuOptions;
use crate::groups::{check_names, TensorTable};
use crate::loss_scale::LossScaleConfig;
use crate::math::{effective_gradient, next_loss_scale, ClipFactors, LossScaleState};
use crate::optimizer::RmsProp;
use crate::plan::{clip_factors, iterations, plan_step};
use crate::slot::Slot;
use crate::variable::{check_gradients, Variable, VariableSpec};
use crate::variant::Variant;
use layout::ShardLayout;

pub use checkpoint::{merge_sharded_checkpoint, split_checkpoint};

/// Keras' RMSprop, data-parallel over the ranks of an MPI communicator, each rank
/// keeping only its shard of the optimizer state (DeepSpeed's ZeRO-1).
///
/// Every rank builds it with the same config and variables, and every rank calls each
/// method (they communicate) with its own gradients. After a step every rank holds the
/// whole updated model ([`ShardedRmsProp::variables`]).
///
/// ```no_run
/// use fused_rmsprop::{Backend, GpuOptions, RmsPropConfig, ShardedRmsProp, Variable};
/// let universe = fused_rmsprop::mpi::initialize().unwrap();
/// let world = universe.world();
/// let w = Variable::new("w", &[1000], vec![0.5; 1000]).unwrap();
/// let config = RmsPropConfig::default().with_momentum(0.9).with_clipnorm(1.0);
/// let mut opt = ShardedRmsProp::new(&world, config, vec![w], Backend::Cpu, &GpuOptions::default()).unwrap();
/// let my_gradient = vec![0.1f32; 1000]; // this rank's batch
/// opt.apply_gradients(&[Some(&my_gradient)]).unwrap(); // averaged over the ranks
/// assert!(opt.model()[0][0] < 0.5);
/// ```
pub struct ShardedRmsProp {
    comm: SimpleCommunicator,
    rank: usize,
    config: RmsPropConfig,
    /// The config of the shard's optimizer: the same, but with loss scaling its
    /// `loss_scale_factor` is the dynamic scale, applied here.
    inner_config: RmsPropConfig,
    specs: Vec<VariableSpec>,
    layout: ShardLayout,
    pieces: Vec<layout::Piece>,
    /// The shard's optimizer (`None` when the shard holds no element).
    shard: Option<RmsProp>,
    excluded: Vec<String>,
    /// Each tensor's group and whether it is frozen, from the config's param groups
    /// (the shards apply the exclusions).
    table: TensorTable,
    /// The whole model after the last all-gather.
    model: Vec<Vec<f32>>,
    /// Steps applied and skipped (the shard's optimizer counts only applied ones).
    raw: u64,
    skipped: u64,
    guard: bool,
    averaged: bool,
    loss_scaling: Option<(LossScaleConfig, LossScaleState)>,
}

impl std::fmt::Debug for ShardedRmsProp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedRmsProp")
            .field("rank", &self.rank)
            .field("ranks", &self.layout.ranks)
            .field("pieces", &self.pieces)
            .field("raw", &self.raw)
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}

/// The outcome a rank reports at a step's checkpoints.
const OK: u8 = 0;
const FAILED: u8 = 1;

impl ShardedRmsProp {
    /// Builds the sharded optimizer over `comm`'s ranks (a duplicate of it carries this
    /// optimizer's traffic). Every rank passes the same config and variables (names,
    /// shapes and values; checked) and gets its shard on `backend`.
    pub fn new<C: Communicator>(
        comm: &C,
        config: RmsPropConfig,
        variables: Vec<Variable>,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<Self> {
        Self::build(comm, config, None, variables, backend, gpu)
    }

    /// [`ShardedRmsProp::new`] inside Keras' dynamic loss scaling
    /// (`LossScaleOptimizer`): a step with a non-finite gradient on any rank is skipped
    /// by all and halves the scale; the gradients are divided by the scale as it is.
    pub fn with_loss_scaling<C: Communicator>(
        comm: &C,
        config: RmsPropConfig,
        scaling: LossScaleConfig,
        variables: Vec<Variable>,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<Self> {
        scaling.validate()?;
        Self::build(comm, config, Some(scaling), variables, backend, gpu)
    }

    fn build<C: Communicator>(
        comm: &C,
        config: RmsPropConfig,
        scaling: Option<LossScaleConfig>,
        variables: Vec<Variable>,
        backend: Backend,
        gpu: &GpuOptions,
    ) -> Result<Self> {
        // with loss scaling the dynamic scale divides the gradients, here, in place of
        // `loss_scale_factor` (as in one process)
        let inner_config = match scaling {
            Some(_) => RmsPropConfig {
                loss_scale_factor: None,
                ..config.clone()
            },
            None => config.clone(),
        };
        let comm = comm.duplicate();
        let (rank, ranks) = (comm.rank() as usize, comm.size() as usize);
        let specs: Vec<VariableSpec> = variables.iter().map(|v| v.spec.clone()).collect();
        let layout = ShardLayout::new(&specs, ranks);
        let pieces = layout.pieces(rank);
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let local = config.validate().and_then(|()| {
            check_names(&config.param_groups, &names)?;
            pieces
                .iter()
                .map(|p| {
                    let v = &variables[p.tensor];
                    p.variable(&v.spec.name, &v.values)
                })
                .collect::<Result<Vec<_>>>()
        });
        // every rank must start from the same model: compare a digest of it
        let digest = model_digest(&config, &variables);
        let shard = local.and_then(|vars| {
            if vars.is_empty() {
                Ok(None)
            } else {
                RmsProp::for_shard(inner_config.clone(), vars, backend, gpu).map(Some)
            }
        });
        let status = match &shard {
            Ok(_) => OK,
            Err(_) => FAILED,
        };
        let mut record = vec![status];
        record.extend(digest.to_le_bytes());
        let all = comm::all_gather_bytes(&comm, &record);
        let shard = settle(rank, &all, record.len(), shard)?;
        if let Some(r) = all
            .chunks(record.len())
            .position(|rec| rec[1..] != record[1..])
        {
            return Err(Error::Sharded {
                rank: r,
                reason: "its config or starting variables differ from rank 0's".into(),
            });
        }
        let table = TensorTable::resolve(None, &config.param_groups, &names, &[]);
        Ok(ShardedRmsProp {
            comm,
            rank,
            inner_config,
            config,
            model: variables.into_iter().map(|v| v.values).collect(),
            specs,
            layout,
            pieces,
            shard,
            excluded: Vec::new(),
            table,
            raw: 0,
            skipped: 0,
            guard: false,
            averaged: false,
            loss_scaling: scaling.map(|c| {
                (
                    c,
                    LossScaleState {
                        scale: c.initial_scale,
                        counter: 0,
                    },
                )
            }),
        })
    }

    /// Skips steps whose gradients (on any rank) hold a NaN or an infinity, on every
    /// rank together (opt-in, as [`RmsProp::set_non_finite_guard`]).
    pub fn set_non_finite_guard(&mut self, enabled: bool) {
        self.guard = enabled;
    }

    /// Says the gradients each rank passes are already averaged over the ranks (your
    /// own all-reduce ran): the step uses this rank's share of them as they are and
    /// sends no gradient over the network.
    pub fn set_gradients_averaged(&mut self, averaged: bool) {
        self.averaged = averaged;
    }

    /// Keras' `exclude_from_weight_decay(var_names=...)`: adds substrings (as
    /// [`RmsProp::exclude_from_weight_decay`]); a variable whose name contains any of
    /// them takes no weight decay.
    pub fn exclude_from_weight_decay<S: AsRef<str>>(&mut self, var_names: &[S]) {
        self.excluded
            .extend(var_names.iter().map(|s| s.as_ref().to_string()));
        if let Some(shard) = &mut self.shard {
            shard.exclude_from_weight_decay(var_names);
        }
    }

    /// The weight-decay exclusion substrings given so far.
    pub fn excluded(&self) -> &[String] {
        &self.excluded
    }

    /// This rank (0-based) and the number of ranks.
    pub fn rank(&self) -> (usize, usize) {
        (self.rank, self.layout.ranks)
    }

    /// The elements of the model this rank's state covers, as `(variable, range)`.
    pub fn shard(&self) -> Vec<(usize, std::ops::Range<usize>)> {
        self.pieces
            .iter()
            .map(|p| (p.tensor, p.elements.clone()))
            .collect()
    }

    /// Elements of the flat space each rank owns (all ranks alike; the model padded to
    /// whole runs of 256 per tensor, split evenly).
    pub fn shard_len(&self) -> usize {
        self.layout.shard_len
    }

    /// Bytes this rank's slots take (a `1 / ranks` share of one process's).
    pub fn state_bytes(&self) -> u64 {
        self.shard.as_ref().map_or(0, RmsProp::state_bytes)
    }

    /// Keras' `iterations`.
    pub fn iterations(&self) -> u64 {
        iterations(&self.config, self.raw)
    }

    /// Steps applied (accumulation steps included).
    pub fn raw_iterations(&self) -> u64 {
        self.raw
    }

    /// Steps the guard or loss scaling skipped.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// The dynamic loss scale now (`None` without loss scaling).
    pub fn loss_scale(&self) -> Option<f32> {
        self.loss_scaling.map(|(_, s)| s.scale)
    }

    /// The whole model as of the last step, on every rank (a copy, as
    /// [`RmsProp::variables`] returns; [`ShardedRmsProp::model`] lends it).
    pub fn variables(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.model.clone())
    }

    /// One variable of the whole model (a copy).
    pub fn variable(&self, i: usize) -> Result<Vec<f32>> {
        self.model.get(i).cloned().ok_or(Error::NoSuchVariable(i))
    }

    /// The whole model as of the last step, on every rank, without copying it.
    pub fn model(&self) -> &[Vec<f32>] {
        &self.model
    }

    /// The variables' names and shapes.
    pub fn specs(&self) -> &[VariableSpec] {
        &self.specs
    }

    /// The config.
    pub fn config(&self) -> &RmsPropConfig {
        &self.config
    }

    /// One step: `grads[i]` is this rank's gradient of variable `i` (`None`: none this
    /// step, as every rank must agree). The gradients are averaged over the ranks.
    pub fn apply_gradients(&mut self, grads: &[Option<&[f32]>]) -> Result<()> {
        let ranks = self.layout.ranks;
        let n = self.specs.len();
        // 1. everyone's input and which gradients it has
        let local = check_gradients(&self.specs, grads);
        let mut record = vec![if local.is_ok() { OK } else { FAILED }];
        record.extend((0..n.div_ceil(8)).map(|k| {
            (0..8)
                .filter(|&b| grads.get(8 * k + b).is_some_and(Option::is_some))
                .fold(0u8, |acc, b| acc | (1 << b))
        }));
        let all = comm::all_gather_bytes(&self.comm, &record);
        settle(self.rank, &all, record.len(), local)?;
        // a frozen tensor's gradient takes no part (in no norm, no non-finite check)
        let unfrozen = self.table.unfrozen(grads.iter().copied());
        let grads = &unfrozen[..];
        if let Some(r) = all
            .chunks(record.len())
            .position(|rec| rec[1..] != record[1..])
        {
            return Err(Error::Sharded {
                rank: r,
                reason: format!(
                    "ranks disagree on which gradients are missing (rank {r} and rank {})",
                    self.rank
                ),
            });
        }
        // 2. this rank's share of the mean gradient
        let mut flat = vec![0.0f32; self.layout.total()];
        for (t, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                let at = self.layout.offsets[t];
                flat[at..at + g.len()].copy_from_slice(g);
            }
        }
        let shard_range = self.layout.shard(self.rank);
        let mut shard_grads = if self.averaged || ranks == 1 {
            flat[shard_range].to_vec()
        } else {
            comm::reduce_scatter_mean(&self.comm, &flat, self.layout.shard_len)
        };
        // 3. apply or skip, decided together
        let s = plan_step(&self.inner_config, self.raw);
        let check = plan_step(&self.config, self.raw);
        if self.guard || self.loss_scaling.is_some() {
            let bad = grads
                .iter()
                .flatten()
                .flat_map(|g| g.iter())
                .chain(&shard_grads)
                .any(|&x| !(x / check.loss_scale).is_finite());
            let verdicts = comm::all_gather_bytes(&self.comm, &[u8::from(bad)]);
            let finite = verdicts.iter().all(|&b| b == 0);
            if let Some((config, state)) = &mut self.loss_scaling {
                let scale = state.scale;
                *state = next_loss_scale(*state, finite, config.dynamic_growth_steps);
                if finite {
                    for x in &mut shard_grads {
                        *x /= scale;
                    }
                }
            }
            if !finite {
                self.skipped += 1;
                return Ok(());
            }
        }
        // 4. norms across shards
        let variant = Variant::of(&self.inner_config);
        let clips = if variant.clip.needs_norm() && s.is_update_step != 0 {
            Some(self.clip_factors(&shard_grads, grads, &s, variant)?)
        } else {
            None
        };
        // 5. the shard's step, everyone's outcome, the model gathered
        let stepped = match &mut self.shard {
            None => Ok(()),
            Some(shard) => {
                let owned: Vec<Option<&[f32]>> = self
                    .pieces
                    .iter()
                    .map(|p| {
                        grads[p.tensor]
                            .is_some()
                            .then(|| &shard_grads[p.at..p.at + p.elements.len()])
                    })
                    .collect();
                shard.set_external_clips(
                    clips.map(|c| self.pieces.iter().map(|p| c[p.tensor]).collect()),
                );
                shard.apply_shard_gradients(&owned)
            }
        };
        self.agree(stepped)?;
        self.raw += 1;
        self.gather_model()
    }

    /// Per-tensor clip factors of this update step: each rank's sums of squared
    /// effective gradients over its pieces, all-gathered and added in rank order.
    fn clip_factors(
        &self,
        shard_grads: &[f32],
        grads: &[Option<&[f32]>],
        s: &crate::math::StepScalars,
        variant: Variant,
    ) -> Result<Vec<ClipFactors>> {
        let n = self.specs.len();
        let accumulators = match (&self.shard, variant.accumulate) {
            (Some(shard), true) => shard.slot(Slot::Accumulator)?,
            _ => None,
        };
        let mut mine = vec![0.0f64; n];
        for (k, p) in self.pieces.iter().enumerate() {
            if grads[p.tensor].is_none() {
                continue;
            }
            let g = &shard_grads[p.at..p.at + p.elements.len()];
            mine[p.tensor] = match &accumulators {
                Some(acc) => g
                    .iter()
                    .zip(&acc[k])
                    .map(|(&g, &a)| f64::from(effective_gradient::<true>(g, a, s)).powi(2))
                    .sum(),
                None => g
                    .iter()
                    .map(|&g| f64::from(effective_gradient::<false>(g, 0.0, s)).powi(2))
                    .sum(),
            };
        }
        let all = comm::all_gather_f64(&self.comm, &mine);
        let sums: Vec<f64> = (0..n)
            .map(|t| all.chunks(n).map(|rank| rank[t]).sum())
            .collect();
        Ok(clip_factors(variant.clip, &sums, s))
    }

    /// All-gathers the parameters into [`ShardedRmsProp::variables`].
    fn gather_model(&mut self) -> Result<()> {
        let values = match &self.shard {
            Some(shard) => Some(shard.variables()?),
            None => None,
        };
        self.model = self.gather(values)?;
        Ok(())
    }

    /// The whole model's array from each rank's pieces of it (`None`: this rank has
    /// none, or could not read them: an error on every rank).
    fn gather(&self, pieces: Option<Vec<Vec<f32>>>) -> Result<Vec<Vec<f32>>> {
        let mut shard = vec![0.0f32; self.layout.shard_len];
        if let Some(values) = &pieces {
            for (p, v) in self.pieces.iter().zip(values) {
                shard[p.at..p.at + v.len()].copy_from_slice(v);
            }
        }
        let flat = comm::all_gather_f32(&self.comm, &shard);
        Ok(self
            .layout
            .offsets
            .iter()
            .zip(&self.layout.lens)
            .map(|(&at, &len)| flat[at..at + len].to_vec())
            .collect())
    }

    /// Keras' `finalize_variable_values`: every variable assigned its EMA (with
    /// `use_ema`), then the model gathered.
    pub fn finalize_variable_values(&mut self) -> Result<()> {
        let done = match &mut self.shard {
            Some(shard) => shard.finalize_variable_values(),
            None => Ok(()),
        };
        self.agree(done)?;
        self.gather_model()
    }

    /// `slot` of the whole model, gathered from every rank's shard (`None` when the
    /// config keeps no such slot).
    pub fn slot(&self, slot: Slot) -> Result<Option<Vec<Vec<f32>>>> {
        if !Variant::of(&self.config).keeps(slot) {
            return Ok(None);
        }
        let mine = match &self.shard {
            Some(shard) => shard.slot(slot).map(Option::unwrap_or_default),
            None => Ok(Vec::new()),
        };
        let mine = self.agree(mine)?;
        self.gather(Some(mine)).map(Some)
    }
}

impl ShardedRmsProp {
    /// `local` (this rank's outcome) when every rank's was OK; else an error on every
    /// rank (its own where it failed). One small all-gather.
    fn agree<T>(&self, local: Result<T>) -> Result<T> {
        let mine = [if local.is_ok() { OK } else { FAILED }];
        let all = comm::all_gather_bytes(&self.comm, &mine);
        settle(self.rank, &all, 1, local)
    }
}

/// This rank's `local` outcome if every rank's record (first byte) says OK; else this
/// rank's own error, or, when it was fine, an error naming the first rank that was not.
fn settle<T>(rank: usize, all: &[u8], record: usize, local: Result<T>) -> Result<T> {
    let failed = all.chunks(record).position(|r| r[0] != OK);
    match (local, failed) {
        (Err(e), _) => Err(e),
        (Ok(v), None) => Ok(v),
        (Ok(_), Some(r)) => Err(Error::Sharded {
            rank: r,
            reason: format!(
                "rank {r} failed (its own error is returned there); rank {rank} stopped with it"
            ),
        }),
    }
}

/// A digest of the config and the starting model (FNV-1a over their bytes).
fn model_digest(config: &RmsPropConfig, variables: &[Variable]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    // the Keras JSON (with our state key); a custom schedule without one: its Debug
    let text = config
        .to_json()
        .map(|v| v.to_string())
        .unwrap_or_else(|_| format!("{config:?}"));
    eat(text.as_bytes());
    for v in variables {
        eat(v.spec.name.as_bytes());
        for d in &v.spec.shape {
            eat(&d.to_le_bytes());
        }
        for x in &v.values {
            eat(&x.to_bits().to_le_bytes());
        }
    }
    h
}
