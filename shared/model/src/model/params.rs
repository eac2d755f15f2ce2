//! Parameters by Hugging Face name: list them, mark which train, read their gradients and replace their values.
//!
//! Names come from the module tree (the field names mirror Hugging Face's), with two translations: the position of a
//! decoder layer in `model.layers` becomes the layer's index in the full model (an emulator keeps a subset of the
//! layers under their original names), and enum variants (`LinearWeight::Dense`) do not appear.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;

use super::LlamaForCausalLM;

/// A tensor by Hugging Face name, flattened: `(name, values, shape)`.
pub type FlatTensor = (String, Vec<f32>, Vec<usize>);

/// One float parameter, flattened.
#[derive(Debug, Clone)]
pub struct NamedParam {
    /// Hugging Face name (`model.layers.28.mlp.up_proj.weight`).
    pub name: String,
    /// The shape as stored in the module (linear weights are `[in, out]`).
    pub shape: Vec<usize>,
    /// The values, flattened row-major.
    pub value: Tensor<1>,
    /// Whether the parameter is trained.
    pub trainable: bool,
}

/// Tracks the module path during a visit or a map.
#[derive(Default)]
struct Path {
    parts: Vec<(String, bool)>,
    layer_ids: Vec<usize>,
}

impl Path {
    fn enter(&mut self, name: &str, container: &str) {
        self.parts.push((name.to_string(), container.starts_with("Enum:")));
    }

    fn exit(&mut self) {
        self.parts.pop();
    }

    /// The current parameter's Hugging Face name.
    fn name(&self) -> String {
        let parts: Vec<&str> = self
            .parts
            .iter()
            .filter(|(_, is_enum)| !is_enum)
            .map(|(n, _)| n.as_str())
            .collect();
        let mut out = Vec::with_capacity(parts.len());
        let mut i = 0;
        while i < parts.len() {
            out.push(parts[i].to_string());
            if i + 1 < parts.len() && parts[i] == "layers" && out.len() == 2 && out[0] == "model" {
                let pos: usize = parts[i + 1].parse().unwrap_or(usize::MAX);
                let id = self.layer_ids.get(pos).copied().unwrap_or(pos);
                out.push(id.to_string());
                i += 1;
            }
            i += 1;
        }
        out.join(".")
    }
}

struct Collect {
    path: Path,
    out: Vec<NamedParam>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let shape = value.dims().to_vec();
        let n: usize = shape.iter().product();
        self.out.push(NamedParam {
            name: self.path.name(),
            shape,
            value: value.reshape([n]),
            trainable: param.is_require_grad(),
        });
    }
}

struct Grads<'a> {
    path: Path,
    grads: &'a burn::tensor::Gradients,
    out: Vec<(String, Tensor<1>)>,
}

impl ModuleVisitor for Grads<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !param.is_require_grad() {
            return;
        }
        if let Some(g) = param.val().grad(self.grads) {
            let n = g.shape().num_elements();
            self.out.push((self.path.name(), g.reshape([n])));
        }
    }
}

/// What a [`Rewrite`] does to each float parameter.
enum Action<'a> {
    /// Train exactly the parameters whose name passes.
    Trainable(&'a dyn Fn(&str) -> bool),
    /// Replace values by name (flattened; the shape is kept).
    Replace(&'a mut HashMap<String, Tensor<1>>),
}

struct Rewrite<'a> {
    path: Path,
    action: Action<'a>,
}

impl ModuleMapper for Rewrite<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.name();
        match &mut self.action {
            Action::Trainable(pred) => param.set_require_grad(pred(&name)),
            Action::Replace(values) => match values.remove(&name) {
                Some(v) if v.dims()[0] != param.shape().num_elements() => {
                    values.insert(name, v);
                    param
                }
                Some(v) => {
                    let trainable = param.is_require_grad();
                    param
                        .map(|old| v.reshape(old.dims()).set_require_grad(trainable))
                        .set_require_grad(trainable)
                }
                None => param,
            },
        }
    }
}

impl LlamaForCausalLM {
    /// Every float parameter under its Hugging Face name, in module order.
    pub fn named_params(&self) -> Vec<NamedParam> {
        let mut c = Collect {
            path: self.path(),
            out: Vec::new(),
        };
        self.visit(&mut c);
        c.out
    }

    /// Gradients of the trainable parameters that received one, flattened, by Hugging Face name.
    pub fn named_grads(&self, grads: &burn::tensor::Gradients) -> Vec<(String, Tensor<1>)> {
        let mut g = Grads {
            path: self.path(),
            grads,
            out: Vec::new(),
        };
        self.visit(&mut g);
        g.out
    }

    /// Trains exactly the parameters whose Hugging Face name passes `pred` (on an autodiff device); the others are
    /// frozen.
    pub fn with_trainable(self, pred: &dyn Fn(&str) -> bool) -> Self {
        let mut m = Rewrite {
            path: self.path(),
            action: Action::Trainable(pred),
        };
        self.map(&mut m)
    }

    /// Replaces parameter values by Hugging Face name (flattened, same element count). Names not in the model and
    /// values of the wrong size are left in `values`; the caller decides whether that is an error.
    pub fn replace_params(self, values: &mut HashMap<String, Tensor<1>>) -> Self {
        let mut m = Rewrite {
            path: self.path(),
            action: Action::Replace(values),
        };
        self.map(&mut m)
    }

    /// Sets parameters by Hugging Face name from `(name, values, shape)`, checking that every name is a parameter
    /// of the model with that shape: the module's own (`[in, out]` linear weights) or, with `hf_layout`, Hugging
    /// Face's (`[out, in]`, transposed here). Nothing is set unless everything fits.
    pub fn set_params(
        self,
        tensors: Vec<(String, Vec<f32>, Vec<usize>)>,
        hf_layout: bool,
    ) -> Result<Self, super::ModelError> {
        let bad = |m: String| super::ModelError::Input(m);
        let shapes: HashMap<String, Vec<usize>> = self.named_params().into_iter().map(|p| (p.name, p.shape)).collect();
        let device = self.device();
        let mut values = HashMap::with_capacity(tensors.len());
        for (name, data, shape) in tensors {
            let own = shapes
                .get(&name)
                .ok_or_else(|| bad(format!("`{name}` is not a parameter of the model")))?;
            let transposed = hf_layout && stored_transposed(&name, own);
            let expected: Vec<usize> = if transposed {
                own.iter().rev().copied().collect()
            } else {
                own.clone()
            };
            let n: usize = expected.iter().product();
            if shape != expected || data.len() != n {
                return Err(bad(format!(
                    "`{name}` has shape {shape:?} ({} values), the model's is {expected:?}",
                    data.len()
                )));
            }
            let data = if transposed {
                crate::load::transpose(&data, own[1], own[0])
            } else {
                data
            };
            values.insert(
                name,
                Tensor::<1>::from_data(burn::tensor::TensorData::new(data, [n]), &device),
            );
        }
        let model = self.replace_params(&mut values);
        match values.keys().next() {
            Some(left) => Err(bad(format!("`{left}` could not be set"))),
            None => Ok(model),
        }
    }

    /// The float parameters whose Hugging Face name passes `keep`, as f32 in Hugging Face's layout (linear and LoRA
    /// matrices back to `[out, in]`; embedding tables as stored): `(name, values, shape)` in module order.
    pub fn hf_tensors(&self, keep: &dyn Fn(&str) -> bool) -> Result<Vec<FlatTensor>, super::ModelError> {
        let mut out = Vec::new();
        for p in self.named_params() {
            if !keep(&p.name) {
                continue;
            }
            let data: Vec<f32> = p
                .value
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .map_err(|e| super::ModelError::Input(format!("`{}`: {e:?}", p.name)))?;
            out.push(if stored_transposed(&p.name, &p.shape) {
                let (r, c) = (p.shape[0], p.shape[1]);
                (p.name, crate::load::transpose(&data, r, c), vec![c, r])
            } else {
                (p.name, data, p.shape)
            });
        }
        Ok(out)
    }

    fn path(&self) -> Path {
        Path {
            parts: Vec::new(),
            layer_ids: self.model.layer_ids.clone(),
        }
    }
}

/// Whether a parameter is stored transposed in the module tree relative to Hugging Face (linear and LoRA matrices are
/// `[in, out]` here; embedding tables, the prompt encoder's included, are not).
fn stored_transposed(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && !name.ends_with("embed_tokens.weight") && !name.ends_with("embedding.weight")
}
