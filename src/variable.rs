//! Variables as users give them: a name, a shape, and (optionally) starting values.

use crate::error::{Error, Result};

/// A variable's name and shape (`[]` is a scalar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariableSpec {
    /// The name, matched by `exclude_from_weight_decay` substrings.
    pub name: String,
    /// The shape; the element count is its product (1 for `[]`).
    pub shape: Vec<usize>,
}

impl VariableSpec {
    /// A spec from a name and shape.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        VariableSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// Number of elements (saturating; an absurd shape is refused when the optimizer is
    /// built, with [`Error::ModelTooLarge`]).
    pub fn len(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// True when the shape has a zero dimension.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A variable with its starting values (flat, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Variable {
    /// Name and shape.
    pub spec: VariableSpec,
    /// The values; `values.len() == spec.len()`.
    pub values: Vec<f32>,
}

impl Variable {
    /// A variable; fails when `values` does not fill `shape`.
    ///
    /// ```
    /// use fused_rmsprop::Variable;
    /// assert!(Variable::new("w", &[2, 2], vec![1.0; 4]).is_ok());
    /// assert!(Variable::new("w", &[2, 2], vec![1.0; 3]).is_err());
    /// ```
    pub fn new(name: impl Into<String>, shape: &[usize], values: Vec<f32>) -> Result<Self> {
        let spec = VariableSpec::new(name, shape);
        check_len(&spec, values.len())?;
        Ok(Variable { spec, values })
    }

    /// A variable from an `ndarray` array (any dimensionality).
    pub fn from_array(name: impl Into<String>, array: ndarray::ArrayViewD<'_, f32>) -> Self {
        Variable {
            spec: VariableSpec::new(name, array.shape()),
            values: array.iter().copied().collect(),
        }
    }
}

/// Checks one step's gradients against the variables: one per variable
/// ([`Error::CountMismatch`]), each of its variable's length ([`Error::GradientLength`]),
/// at least one present ([`Error::NoGradients`]).
pub(crate) fn check_gradients<T>(specs: &[VariableSpec], grads: &[Option<&[T]>]) -> Result<()> {
    check_gradient_lens(specs, grads.iter().map(|g| g.map(<[T]>::len)))
}

/// [`check_gradients`] on the gradients' lengths (`None`: no gradient).
pub(crate) fn check_gradient_lens(
    specs: &[VariableSpec],
    lens: impl ExactSizeIterator<Item = Option<usize>> + Clone,
) -> Result<()> {
    if lens.len() != specs.len() {
        return Err(Error::CountMismatch {
            what: "gradients",
            expected: specs.len(),
            found: lens.len(),
        });
    }
    for (len, spec) in lens.clone().zip(specs) {
        if let Some(len) = len {
            if len != spec.len() {
                return Err(Error::GradientLength {
                    name: spec.name.clone(),
                    expected: spec.len(),
                    found: len,
                });
            }
        }
    }
    if lens.into_iter().all(|len| len.is_none()) {
        return Err(Error::NoGradients);
    }
    Ok(())
}

/// Fails with [`Error::ValueLength`] when `found` does not match the spec.
pub(crate) fn check_len(spec: &VariableSpec, found: usize) -> Result<()> {
    if spec.len() != found {
        return Err(Error::ValueLength {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            expected: spec.len(),
            found,
        });
    }
    Ok(())
}
