//! A Burn module's float parameters in visiting order: taken out with their gradients
//! ([`gather`]), and put back with their new values ([`install`]).
//!
//! Both walk the module with Burn's own visitor and mapper, which visit the parameters
//! in the same order, and name each parameter by its module path joined with `.`
//! (`layers.0.weight`), as Burn's param groups do.

use ::burn::backend::ir::TensorId;
use ::burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use ::burn::optim::GradientsParams;
use ::burn::tensor::{DType, Device, GradientCheckpointingStrategy, Tensor, TensorData};

/// One float parameter as the step sees it: its identity, its current value (on the
/// inner, non-autodiff backend) and its gradient, both rank-erased.
pub(crate) struct Taken {
    pub(crate) id: ParamId,
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) value: ErasedTensor,
    pub(crate) grad: Option<ErasedTensor>,
}

/// A parameter's new value: tensor data for Burn to upload, or a tensor holding it (on
/// Burn's wgpu backend, with its fusion handle's id, for the next step to recognize).
// One per parameter per step, moved once into its place: boxing would cost an
// allocation each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum NewValue {
    Data(TensorData, Device),
    Tensor(ErasedTensor, TensorId),
}

/// A tensor whose rank lives in a field rather than in its type.
#[derive(Clone)]
pub(crate) struct ErasedTensor {
    pub(crate) dispatch: burn::backend::DispatchTensor,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
}

impl ErasedTensor {
    pub(crate) fn of<const D: usize>(tensor: Tensor<D>) -> Self {
        ErasedTensor {
            shape: tensor.shape().to_vec(),
            dtype: tensor.dtype(),
            device: tensor.device(),
            dispatch: tensor.into_dispatch(),
        }
    }

    /// The tensor again, at the rank it had.
    pub(crate) fn into_tensor<const D: usize>(self) -> Tensor<D> {
        Tensor::from_dispatch(self.dispatch)
    }
}

/// Every float parameter of `module`, with the gradient `grads` holds for it (removed
/// from `grads`).
pub(crate) fn gather<M: Module>(module: &M, grads: &mut GradientsParams) -> Vec<Taken> {
    let mut visitor = Gatherer {
        grads,
        path: Vec::new(),
        taken: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.taken
}

struct Gatherer<'a> {
    grads: &'a mut GradientsParams,
    path: Vec<String>,
    taken: Vec<Taken>,
}

impl ModuleVisitor for Gatherer<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val().inner();
        let name = if self.path.is_empty() {
            format!("{}", param.id)
        } else {
            self.path.join(".")
        };
        let grad = self.grads.remove::<D>(param.id).map(ErasedTensor::of);
        let value = ErasedTensor::of(value);
        self.taken.push(Taken {
            id: param.id,
            name,
            shape: value.shape.clone(),
            dtype: value.dtype,
            device: value.device.clone(),
            value,
            grad,
        });
    }
}

/// `module` with parameter `i` (in [`gather`]'s order) set to `new[i]` where it is
/// `Some`; the others are left as they are. Each new value keeps the autodiff state
/// its parameter had (gradient required, checkpointing strategy, distributed), as
/// Burn's own optimizers keep it. With `keep_old`, also gives the replaced values (on
/// the inner backend) for the caller to release at once (else each is dropped as it is
/// replaced).
pub(crate) fn install<M: Module>(
    module: M,
    new: Vec<Option<NewValue>>,
    keep_old: bool,
) -> (M, Vec<ErasedTensor>) {
    let mut mapper = Installer {
        keep_old,
        old: Vec::new(),
        new: new.into_iter(),
    };
    let module = module.map(&mut mapper);
    (module, mapper.old)
}

struct Installer {
    keep_old: bool,
    old: Vec<ErasedTensor>,
    new: std::vec::IntoIter<Option<NewValue>>,
}

impl ModuleMapper for Installer {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(Some(new)) = self.new.next() else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let distributed = tensor.is_distributed();
        let checkpointing: Option<GradientCheckpointingStrategy> =
            tensor.gradient_checkpointing_strategy();
        if self.keep_old {
            self.old.push(ErasedTensor::of(tensor.inner()));
        } else {
            drop(tensor);
        }
        let new: Tensor<D> = match new {
            NewValue::Data(data, device) => {
                // in the data's own type (without one, Burn takes the device's default)
                let dtype = data.dtype();
                Tensor::from_data(data, (&device, dtype))
            }
            NewValue::Tensor(tensor, _) => tensor.into_tensor(),
        };
        let mut value = Tensor::from_inner(new);
        if let Some(strategy) = checkpointing {
            value = value.with_gradient_checkpointing_strategy(strategy);
        }
        if require_grad {
            value = value.require_grad();
        }
        if distributed {
            value = value.set_distributed(id);
        }
        Param::from_mapped_value(id, value, mapper)
    }
}
