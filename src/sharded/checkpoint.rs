//! Sharded checkpoints: a folder holding one checkpoint per rank (its shard's
//! optimizer, written atomically as any checkpoint) and `manifest.json` (written by
//! rank 0 once every shard is on disk, atomically): the config, the variables, the
//! number of ranks, the counters, the loss scale, the CRC32C of every shard file, and
//! its own CRC32C (of its compact JSON without the `digest` field). Restores, merges
//! and splits check them all before they change anything; manifests written before the
//! digests (`fused-rmsprop-sharded/1`) are read unverified.
//!
//! A sharded checkpoint restores into the same number of ranks
//! ([`ShardedRmsProp::restore_checkpoint`]). [`merge_sharded_checkpoint`] turns it into
//! one single-process checkpoint and [`split_checkpoint`] turns a single-process
//! checkpoint into a sharded one for any number of ranks (no MPI needed for either):
//! the reshard step between world sizes. Compact slots (bf16, int8) are decoded and
//! encoded again on the way (their pieces start on whole blocks, so int8 blocks keep
//! their scales).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::layout::ShardLayout;
use super::ShardedRmsProp;
use crate::backend::{Backend, LossScaling};
use crate::checkpoint::{specs_from_json, specs_to_json, write_atomically};
use crate::checkpoint_file::hex;
use crate::config::RmsPropConfig;
use crate::error::{Error, Result};
use crate::gpu::GpuOptions;
use crate::loss_scale::LossScaleConfig;
use crate::math::LossScaleState;
use crate::optimizer::RmsProp;
use crate::variable::{Variable, VariableSpec};
use crate::variant::Variant;

/// The `format` of a manifest (with digests).
const MANIFEST_FORMAT: &str = "fused-rmsprop-sharded/2";
/// The format before digests: read unverified.
const UNVERIFIED_FORMAT: &str = "fused-rmsprop-sharded/1";

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: Arc::new(e),
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The file name of rank `r` of `ranks` in a sharded checkpoint.
fn shard_name(r: usize, ranks: usize) -> String {
    format!("shard-{r:05}-of-{ranks:05}.safetensors")
}

/// The file of rank `r` of `ranks` in a sharded checkpoint.
fn shard_file(dir: &Path, r: usize, ranks: usize) -> PathBuf {
    dir.join(shard_name(r, ranks))
}

impl Manifest {
    /// Rank `r`'s shard file, read and checked against the manifest's digest.
    fn read_shard(&self, dir: &Path, r: usize) -> Result<(PathBuf, Vec<u8>)> {
        let path = shard_file(dir, r, self.ranks);
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        if let Some(expected) = self.shards.get(r).copied().flatten() {
            if crc32c::crc32c(&bytes) != expected {
                return Err(Error::ChecksumMismatch {
                    path: path.display().to_string(),
                    what: "the shard file (the manifest's record of it)".into(),
                });
            }
        }
        Ok((path, bytes))
    }
}

/// What a manifest says.
struct Manifest {
    config: RmsPropConfig,
    specs: Vec<VariableSpec>,
    ranks: usize,
    raw: u64,
    skipped: u64,
    excluded: Vec<String>,
    loss_scaling: Option<(LossScaleConfig, LossScaleState)>,
    /// The CRC32C of each rank's shard file (`None` for a rank without a shard, and for
    /// every rank in a manifest from before the digests).
    shards: Vec<Option<u32>>,
}

impl Manifest {
    fn to_json(&self) -> Result<Value> {
        let shards: serde_json::Map<String, Value> = self
            .shards
            .iter()
            .enumerate()
            .filter_map(|(r, d)| Some((shard_name(r, self.ranks), Value::from(hex((*d)?)))))
            .collect();
        let mut v = json!({
            "format": MANIFEST_FORMAT,
            "keras_config": self.config.to_json()?,
            "variables": specs_to_json(&self.specs),
            "ranks": self.ranks,
            "raw_iterations": self.raw,
            "skipped_steps": self.skipped,
            "exclude_from_weight_decay": self.excluded,
            "loss_scaling": self.loss_scaling.map(|(c, s)| json!({
                "initial_scale": f64::from(c.initial_scale),
                "dynamic_growth_steps": c.dynamic_growth_steps,
                "scale": f64::from(s.scale),
                "counter": s.counter,
            })),
            "shards": shards,
        });
        let digest = hex(crc32c::crc32c(v.to_string().as_bytes()));
        v["digest"] = Value::from(digest);
        Ok(v)
    }

    fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| corrupt(&path, e.to_string()))?;
        let mut v: Value =
            serde_json::from_str(&text).map_err(|e| corrupt(&path, e.to_string()))?;
        let verified = match v["format"].as_str() {
            Some(MANIFEST_FORMAT) => true,
            Some(UNVERIFIED_FORMAT) => false,
            _ => return Err(corrupt(&path, "unknown format")),
        };
        let ranks = v["ranks"]
            .as_u64()
            .ok_or_else(|| corrupt(&path, "`ranks` is not a count"))? as usize;
        let mut shards = vec![None; ranks];
        if verified {
            // written as `write` writes it, byte for byte: whitespace is bytes too
            let canonical =
                serde_json::to_string_pretty(&v).map_err(|e| corrupt(&path, e.to_string()))?;
            if text != canonical {
                return Err(corrupt(
                    &path,
                    "not as written (changed whitespace or order)",
                ));
            }
            let digest = match v.as_object_mut().and_then(|o| o.remove("digest")) {
                Some(Value::String(d)) => d,
                _ => return Err(corrupt(&path, "no digest")),
            };
            if hex(crc32c::crc32c(v.to_string().as_bytes())) != digest {
                return Err(Error::ChecksumMismatch {
                    path: path.display().to_string(),
                    what: "the manifest".into(),
                });
            }
            let listed = v["shards"]
                .as_object()
                .ok_or_else(|| corrupt(&path, "no shard digests"))?;
            for (r, slot) in shards.iter_mut().enumerate() {
                if let Some(d) = listed.get(&shard_name(r, ranks)) {
                    let d = d
                        .as_str()
                        .and_then(|d| u32::from_str_radix(d, 16).ok())
                        .ok_or_else(|| corrupt(&path, "a shard digest is not hex"))?;
                    *slot = Some(d);
                }
            }
            if shards.iter().flatten().count() != listed.len() {
                return Err(corrupt(&path, "the shard digests name other files"));
            }
        }
        let count = |k: &str| {
            v[k].as_u64()
                .ok_or_else(|| corrupt(&path, format!("`{k}` is not a count")))
        };
        let specs = specs_from_json(&path, &v["variables"])?;
        let excluded = v["exclude_from_weight_decay"]
            .as_array()
            .ok_or_else(|| corrupt(&path, "exclude_from_weight_decay is not a list"))?
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| corrupt(&path, "an exclusion is not a string"))
            })
            .collect::<Result<Vec<_>>>()?;
        let loss_scaling = match &v["loss_scaling"] {
            Value::Null => None,
            ls => {
                let number = |k: &str| {
                    ls[k]
                        .as_f64()
                        .ok_or_else(|| corrupt(&path, format!("loss_scaling.{k} is not a number")))
                };
                let config = LossScaleConfig {
                    initial_scale: number("initial_scale")? as f32,
                    dynamic_growth_steps: number("dynamic_growth_steps")? as u32,
                };
                let state = LossScaleState {
                    scale: number("scale")? as f32,
                    counter: number("counter")? as u32,
                };
                Some((config, state))
            }
        };
        Ok(Manifest {
            config: RmsPropConfig::from_json(&v["keras_config"])?,
            specs,
            ranks,
            shards,
            raw: count("raw_iterations")?,
            skipped: count("skipped_steps")?,
            excluded,
            loss_scaling,
        })
    }

    /// Writes `dir/manifest.json` atomically.
    fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join("manifest.json");
        let text = serde_json::to_string_pretty(&self.to_json()?)
            .map_err(|e| corrupt(&path, e.to_string()))?;
        write_atomically(&path, text.as_bytes())
    }
}

impl ShardedRmsProp {
    /// Saves the state into the folder `dir` (created if needed): every rank its shard,
    /// then rank 0 the manifest. Collective; an error on any rank is an error on all.
    pub fn save_checkpoint(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let ranks = self.layout.ranks;
        let saved = std::fs::create_dir_all(dir)
            .map_err(|e| io(dir, e))
            .and_then(|()| match &self.shard {
                Some(shard) => shard
                    .save_checkpoint_digest(&shard_file(dir, self.rank, ranks))
                    .map(Some),
                None => Ok(None),
            });
        let digest = self.agree(saved)?;
        // every rank's digest (a flag byte, then the CRC32C), for the manifest
        let mut mine = vec![u8::from(digest.is_some())];
        mine.extend(digest.unwrap_or(0).to_le_bytes());
        let all = super::comm::all_gather_bytes(&self.comm, &mine);
        let shards = all
            .chunks_exact(5)
            .map(|c| (c[0] == 1).then(|| u32::from_le_bytes([c[1], c[2], c[3], c[4]])))
            .collect();
        let written = if self.rank == 0 {
            self.manifest(shards).write(dir)
        } else {
            Ok(())
        };
        self.agree(written)
    }

    fn manifest(&self, shards: Vec<Option<u32>>) -> Manifest {
        Manifest {
            config: self.config.clone(),
            specs: self.specs.clone(),
            ranks: self.layout.ranks,
            raw: self.raw,
            skipped: self.skipped,
            excluded: self.excluded.clone(),
            loss_scaling: self.loss_scaling,
            shards,
        }
    }

    /// Restores a sharded checkpoint saved by the same number of ranks with the same
    /// variables and options (to change the number of ranks, see
    /// [`merge_sharded_checkpoint`] and [`split_checkpoint`]). Collective; on any
    /// error every rank returns one.
    pub fn restore_checkpoint(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let ranks = self.layout.ranks;
        let manifest = Manifest::read(dir).and_then(|m| {
            if m.ranks != ranks {
                return Err(corrupt(
                    dir,
                    format!(
                        "saved by {} ranks, this run has {ranks}: merge or split it first",
                        m.ranks
                    ),
                ));
            }
            if m.specs != self.specs || m.config.to_json()? != self.config.to_json()? {
                return Err(corrupt(dir, "saved with other variables or options"));
            }
            if m.loss_scaling.is_some() != self.loss_scaling.is_some() {
                return Err(corrupt(dir, "loss scaling differs"));
            }
            Ok(m)
        });
        let restored = manifest.and_then(|m| {
            if let Some(shard) = &mut self.shard {
                let (path, bytes) = m.read_shard(dir, self.rank)?;
                shard.restore_checkpoint_read(&path, &bytes)?;
            }
            Ok(m)
        });
        let m = self.agree(restored)?;
        self.raw = m.raw;
        self.skipped = m.skipped;
        self.loss_scaling = m.loss_scaling;
        self.exclude_from_weight_decay(&m.excluded);
        self.gather_model()
    }
}

/// The shard optimizers' config: with loss scaling, the dynamic scale replaces
/// `loss_scale_factor`.
fn shard_config(m: &Manifest) -> RmsPropConfig {
    match m.loss_scaling {
        Some(_) => RmsPropConfig {
            loss_scale_factor: None,
            ..m.config.clone()
        },
        None => m.config.clone(),
    }
}

/// Merges the sharded checkpoint in `dir` into one single-process checkpoint at `out`
/// (a [`crate::LossScaleOptimizer`] checkpoint when the run had loss scaling), to
/// restore into one process or to [`split_checkpoint`] for another number of ranks.
pub fn merge_sharded_checkpoint(dir: impl AsRef<Path>, out: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    let m = Manifest::read(dir)?;
    let layout = ShardLayout::new(&m.specs, m.ranks);
    let mut values: Vec<Vec<f32>> = m.specs.iter().map(|s| vec![0.0; s.len()]).collect();
    let slots = Variant::of(&m.config).slots();
    let mut slot_values: Vec<Vec<Vec<f32>>> = slots.iter().map(|_| values.clone()).collect();
    for r in 0..m.ranks {
        let pieces = layout.pieces(r);
        if pieces.is_empty() {
            continue;
        }
        let (path, bytes) = m.read_shard(dir, r)?;
        let (shard, _) =
            RmsProp::load_shard_parts(&path, &bytes, Backend::Cpu, &GpuOptions::default())?;
        if shard.specs().len() != pieces.len() || shard.raw_iterations() != m.raw {
            return Err(corrupt(
                &path,
                "does not hold this rank's shard of the manifest",
            ));
        }
        let vars = shard.variables()?;
        for (p, v) in pieces.iter().zip(&vars) {
            values[p.tensor][p.elements.clone()].copy_from_slice(v);
        }
        for (k, &slot) in slots.iter().enumerate() {
            if let Some(s) = shard.slot(slot)? {
                for (p, v) in pieces.iter().zip(&s) {
                    slot_values[k][p.tensor][p.elements.clone()].copy_from_slice(v);
                }
            }
        }
    }
    let variables = m
        .specs
        .iter()
        .zip(values)
        .map(|(s, v)| Variable::new(s.name.clone(), &s.shape, v))
        .collect::<Result<Vec<_>>>()?;
    let mut opt = RmsProp::for_shard(
        shard_config(&m),
        variables,
        Backend::Cpu,
        &GpuOptions::default(),
    )?;
    opt.exclude_from_weight_decay(&m.excluded);
    for (k, &slot) in slots.iter().enumerate() {
        for (i, v) in slot_values[k].iter().enumerate() {
            opt.set_slot(slot, i, v)?;
        }
    }
    opt.set_counters(m.raw, m.skipped)?;
    match m.loss_scaling {
        Some((config, state)) => {
            let mut lso = crate::LossScaleOptimizer::new(opt, config)?;
            lso.inner_mut().set_loss_scaling(Some(LossScaling {
                state,
                growth_steps: config.dynamic_growth_steps,
                initial_scale: config.initial_scale,
            }))?;
            lso.save_checkpoint(out)
        }
        None => opt.save_checkpoint(out),
    }
}

/// Splits the single-process checkpoint at `path` into a sharded checkpoint for
/// `ranks` ranks in the folder `dir` (shard files and manifest).
pub fn split_checkpoint(path: impl AsRef<Path>, ranks: usize, dir: impl AsRef<Path>) -> Result<()> {
    let (path, dir) = (path.as_ref(), dir.as_ref());
    let (single, scaling) = RmsProp::load_parts(path, Backend::Cpu, &GpuOptions::default())?;
    let specs = single.specs().to_vec();
    let config = single.config().clone();
    let mut m = Manifest {
        shards: Vec::new(),
        config: config.clone(),
        specs: specs.clone(),
        ranks: ranks.max(1),
        raw: single.raw_iterations(),
        skipped: single.skipped_steps().skipped,
        excluded: single.excluded().to_vec(),
        loss_scaling: scaling.map(|ls| {
            (
                LossScaleConfig {
                    initial_scale: ls.initial_scale,
                    dynamic_growth_steps: ls.growth_steps,
                },
                ls.state,
            )
        }),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let layout = ShardLayout::new(&specs, m.ranks);
    let values = single.variables()?;
    let slots = Variant::of(&config).slots();
    let slot_values: Vec<Vec<Vec<f32>>> = slots
        .iter()
        .map(|&s| single.slot(s).map(Option::unwrap_or_default))
        .collect::<Result<_>>()?;
    for r in 0..m.ranks {
        let pieces = layout.pieces(r);
        if pieces.is_empty() {
            continue;
        }
        let vars = pieces
            .iter()
            .map(|p| p.variable(&specs[p.tensor].name, &values[p.tensor]))
            .collect::<Result<Vec<_>>>()?;
        let mut shard =
            RmsProp::for_shard(shard_config(&m), vars, Backend::Cpu, &GpuOptions::default())?;
        shard.exclude_from_weight_decay(&m.excluded);
        for (k, &slot) in slots.iter().enumerate() {
            for (i, p) in pieces.iter().enumerate() {
                shard.set_slot(slot, i, &slot_values[k][p.tensor][p.elements.clone()])?;
            }
        }
        shard.set_counters(m.raw, 0)?;
        let digest = shard.save_checkpoint_digest(&shard_file(dir, r, m.ranks))?;
        m.shards.resize(r, None);
        m.shards.push(Some(digest));
    }
    m.shards.resize(m.ranks, None);
    m.write(dir)
}
