//! LoRA (Hu et al.): `y = x·W + scale · dropout(x)·A·B` on targeted projections, with PEFT-compatible import/export.

use std::path::Path;

use burn::module::Param;
use burn::nn::DropoutConfig;
use burn::tensor::{Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AdapterError;
use crate::load::{write_f32_safetensors, F32Tensor};
use crate::model::{LlamaForCausalLM, LoraBranch};

/// Which projections LoRA adapts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module name suffixes, as PEFT matches them (`q_proj` matches `model.layers.3.self_attn.q_proj`).
    Names(Vec<String>),
    /// `all-linear`: every decoder projection (not the LM head).
    Preset(String),
}

/// LoRA settings; the fields and their meaning are PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scaling numerator: the update is multiplied by `lora_alpha / r` (or `/ √r` with `use_rslora`).
    pub lora_alpha: f64,
    /// Projections to adapt.
    pub target_modules: TargetModules,
    /// Dropout probability on the LoRA branch input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Rank-stabilised scaling `lora_alpha / √r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Only these decoder layers (full-model indices) are adapted; all when absent. Offsite-tuning + LoRA sets it to
    /// the emulator's adapter layers.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
}

impl LoraConfig {
    /// The factor applied to `x·A·B`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), AdapterError> {
        if self.r == 0 {
            return Err(AdapterError::Config("r must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(AdapterError::Config(format!(
                "lora_dropout {} must be in [0, 1)",
                self.lora_dropout
            )));
        }
        if let TargetModules::Preset(p) = &self.target_modules {
            if p != "all-linear" {
                return Err(AdapterError::Config(format!(
                    "target_modules `{p}`: a string must be `all-linear` (regular expressions are not supported)"
                )));
            }
        }
        Ok(())
    }

    /// Whether the projection with this Hugging Face module name is adapted.
    pub fn targets(&self, module: &str) -> bool {
        if let Some(layers) = &self.layers_to_transform {
            let layer = crate::model::layer_of(module);
            if !layer.is_some_and(|i| layers.contains(&i)) {
                return false;
            }
        }
        match &self.target_modules {
            TargetModules::Preset(_) => true,
            TargetModules::Names(names) => names.iter().any(|n| module == n || module.ends_with(&format!(".{n}"))),
        }
    }

    /// Reads PEFT's `adapter_config.json`, refusing options this implementation would silently get wrong.
    pub fn from_peft_json(text: &str) -> Result<Self, AdapterError> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| AdapterError::Config(format!("not JSON: {e}")))?;
        let peft_type = v.get("peft_type").and_then(|x| x.as_str()).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(AdapterError::Config(format!(
                "peft_type `{peft_type}` (supported: LORA)"
            )));
        }
        let refuse = |key: &str, ok: &dyn Fn(&serde_json::Value) -> bool| match v.get(key) {
            Some(x) if !x.is_null() && !ok(x) => Err(AdapterError::Config(format!("`{key}` = {x} is not supported"))),
            _ => Ok(()),
        };
        let is_false = |x: &serde_json::Value| x == &json!(false);
        let is_empty = |x: &serde_json::Value| x.as_object().is_some_and(|o| o.is_empty());
        refuse("use_dora", &is_false)?;
        refuse("fan_in_fan_out", &is_false)?;
        refuse("lora_bias", &is_false)?;
        refuse("bias", &|x| x == "none")?;
        refuse("rank_pattern", &is_empty)?;
        refuse("alpha_pattern", &is_empty)?;
        refuse("layers_pattern", &|x| x == "layers" || x == &json!(["layers"]))?;
        refuse("modules_to_save", &|_| false)?;
        let config = Self {
            r: v.get("r")
                .and_then(|x| x.as_u64())
                .ok_or_else(|| AdapterError::Config("missing `r`".into()))? as usize,
            lora_alpha: v
                .get("lora_alpha")
                .and_then(|x| x.as_f64())
                .ok_or_else(|| AdapterError::Config("missing `lora_alpha`".into()))?,
            target_modules: serde_json::from_value(v.get("target_modules").cloned().unwrap_or(json!(null)))
                .map_err(|e| AdapterError::Config(format!("`target_modules`: {e}")))?,
            lora_dropout: v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0),
            use_rslora: v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
            layers_to_transform: match v.get("layers_to_transform") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::Number(n)) => Some(vec![n
                    .as_u64()
                    .ok_or_else(|| AdapterError::Config(format!("`layers_to_transform` = {n} is not a layer index")))?
                    as usize]),
                Some(x) => Some(
                    serde_json::from_value(x.clone())
                        .map_err(|e| AdapterError::Config(format!("`layers_to_transform`: {e}")))?,
                ),
            },
        };
        config.validate()?;
        Ok(config)
    }

    /// PEFT's `adapter_config.json` for this configuration. PEFT refuses `layers_to_transform` beside a string
    /// `target_modules`, so `all-linear` is written as the explicit projection names when layers are listed.
    pub fn to_peft_json(&self, base_model: Option<&str>) -> serde_json::Value {
        let targets = match (&self.target_modules, &self.layers_to_transform) {
            (TargetModules::Preset(_), Some(_)) => {
                let names: Vec<&str> = crate::model::PROJECTIONS
                    .iter()
                    .map(|p| p.rsplit('.').next().unwrap_or(p))
                    .collect();
                json!(names)
            }
            (t, _) => json!(t),
        };
        json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": targets, "use_rslora": self.use_rslora, "bias": "none",
            "fan_in_fan_out": false, "use_dora": false, "inference_mode": true, "init_lora_weights": true,
            "modules_to_save": null, "layers_to_transform": self.layers_to_transform, "rank_pattern": {}, "alpha_pattern": {},
        })
    }

    /// Attaches fresh LoRA branches to every targeted projection, initialised as PEFT does (A uniform in
    /// `±1/√in`, B zero, so the model is unchanged until trained). Returns the adapted module names.
    pub fn attach(&self, model: &mut LlamaForCausalLM) -> Result<Vec<String>, AdapterError> {
        self.validate()?;
        let targets: Vec<String> = model.linear_names().into_iter().filter(|n| self.targets(n)).collect();
        if targets.is_empty() {
            return Err(AdapterError::Mismatch(format!(
                "no projection matches {:?}",
                self.target_modules
            )));
        }
        let device = model.device();
        for name in &targets {
            let linear = model.linear_mut(name).expect("name from linear_names");
            let (inp, out) = (linear.in_features(), linear.out_features());
            let bound = 1.0 / (inp as f64).sqrt();
            let a = Tensor::<2>::random([inp, self.r], Distribution::Uniform(-bound, bound), &device);
            let b = Tensor::<2>::zeros([self.r, out], &device);
            linear.lora = Some(self.branch(a, b));
        }
        Ok(targets)
    }

    fn branch(&self, a: Tensor<2>, b: Tensor<2>) -> LoraBranch {
        LoraBranch {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            dropout: DropoutConfig::new(self.lora_dropout).init(),
            scale: self.scale(),
        }
    }
}

const PEFT_PREFIX: &str = "base_model.model.";

fn file_err(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Loads a PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`) into `model`, replacing any
/// LoRA branches it had. Every tensor must name a projection of the model with the right shape, and every
/// targeted projection must have both matrices.
pub fn import_peft(model: &mut LlamaForCausalLM, dir: &Path) -> Result<LoraConfig, AdapterError> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| file_err(&config_path, e.to_string()))?;
    let config = LoraConfig::from_peft_json(&text).map_err(|e| file_err(&config_path, e.to_string()))?;
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).map_err(|e| file_err(&path, e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_err(&path, e.to_string()))?;
    let mut matrices: std::collections::BTreeMap<String, [Option<F32Tensor>; 2]> = Default::default();
    for (key, view) in st.tensors() {
        let rest = key
            .strip_prefix(PEFT_PREFIX)
            .ok_or_else(|| file_err(&path, format!("unexpected tensor `{key}`")))?;
        let rest = rest.strip_suffix(".weight").unwrap_or(rest);
        let rest = rest.strip_suffix(".default").unwrap_or(rest);
        let (module, which) = match rest.rsplit_once('.') {
            Some((m, "lora_A")) => (m, 0),
            Some((m, "lora_B")) => (m, 1),
            _ => return Err(file_err(&path, format!("tensor `{key}` is not a LoRA matrix"))),
        };
        if model.linear(module).is_none() {
            return Err(AdapterError::Mismatch(format!(
                "tensor `{key}` names no projection of the model"
            )));
        }
        let values = match view.dtype() {
            safetensors::Dtype::F32 => crate::load::decode_f32(view.data()),
            safetensors::Dtype::F16 => crate::load::decode_f16(view.data()),
            safetensors::Dtype::BF16 => crate::load::decode_bf16(view.data()),
            other => {
                return Err(file_err(
                    &path,
                    format!("tensor `{key}` has unsupported type {other:?}"),
                ))
            }
        };
        matrices.entry(module.to_string()).or_default()[which] = Some(F32Tensor {
            data: values,
            shape: view.shape().to_vec(),
        });
    }
    let device = model.device();
    for name in model.linear_names() {
        if let Some(l) = model.linear_mut(&name) {
            l.lora = None;
        }
    }
    for (module, [a, b]) in matrices {
        let (
            Some(F32Tensor {
                data: a,
                shape: a_shape,
            }),
            Some(F32Tensor {
                data: b,
                shape: b_shape,
            }),
        ) = (a, b)
        else {
            return Err(AdapterError::Mismatch(format!("`{module}` lacks lora_A or lora_B")));
        };
        let linear = model.linear_mut(&module).expect("checked above");
        let (inp, out, r) = (linear.in_features(), linear.out_features(), config.r);
        if a_shape != [r, inp] || b_shape != [out, r] {
            return Err(AdapterError::Mismatch(format!(
                "`{module}`: lora_A {a_shape:?} / lora_B {b_shape:?}, expected [{r}, {inp}] / [{out}, {r}]"
            )));
        }
        if a.iter().chain(&b).any(|x| !x.is_finite()) {
            return Err(AdapterError::Mismatch(format!("`{module}` holds non-finite values")));
        }
        let a = Tensor::from_data(TensorData::new(crate::load::transpose(&a, r, inp), [inp, r]), &device);
        let b = Tensor::from_data(TensorData::new(crate::load::transpose(&b, out, r), [r, out]), &device);
        linear.lora = Some(config.branch(a, b));
    }
    Ok(config)
}

/// Writes the model's LoRA branches as a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads.
pub fn export_peft(
    model: &LlamaForCausalLM,
    config: &LoraConfig,
    base_model: Option<&str>,
    dir: &Path,
) -> Result<(), AdapterError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
    let mut tensors: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    for name in model.linear_names() {
        let Some(lora) = model.linear(&name).and_then(|l| l.lora.as_ref()) else {
            continue;
        };
        for (suffix, param) in [("lora_A", &lora.lora_a), ("lora_B", &lora.lora_b)] {
            let t = param.val();
            let [rows, cols] = t.dims();
            let values: Vec<f32> = t
                .into_data()
                .try_into_vec()
                .map_err(|e| AdapterError::Mismatch(format!("`{name}.{suffix}`: {e:?}")))?;
            // Stored [in, r] / [r, out]; PEFT wants [r, in] / [out, r].
            tensors.push((
                format!("{PEFT_PREFIX}{name}.{suffix}.weight"),
                crate::load::transpose(&values, rows, cols),
                vec![cols, rows],
            ));
        }
    }
    if tensors.is_empty() {
        return Err(AdapterError::Mismatch(
            "the model has no LoRA branches to export".into(),
        ));
    }
    let path = dir.join("adapter_model.safetensors");
    write_f32_safetensors(&path, tensors).map_err(|e| file_err(&path, e))?;
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config.to_peft_json(base_model)).expect("JSON value");
    std::fs::write(&path, text).map_err(|e| file_err(&path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_config_round_trip_and_refusals() {
        let c = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            lora_dropout: 0.05,
            use_rslora: false,
            layers_to_transform: Some(vec![0, 5]),
        };
        assert!(c.targets("model.layers.5.self_attn.q_proj"));
        assert!(!c.targets("model.layers.4.self_attn.q_proj"));
        assert!(!c.targets("model.layers.5.mlp.up_proj"));
        let back = LoraConfig::from_peft_json(&c.to_peft_json(Some("m")).to_string()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.scale(), 2.0);
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets("model.layers.0.self_attn.k_proj"));
        let dora = r#"{"r":4,"lora_alpha":8,"target_modules":["q_proj"],"use_dora":true}"#;
        assert!(LoraConfig::from_peft_json(dora)
            .unwrap_err()
            .to_string()
            .contains("use_dora"));
        let regex = r#"{"r":4,"lora_alpha":8,"target_modules":".*q_proj"}"#;
        assert!(LoraConfig::from_peft_json(regex)
            .unwrap_err()
            .to_string()
            .contains(".*q_proj"));
        let all = r#"{"r":4,"lora_alpha":8,"target_modules":"all-linear","use_rslora":true}"#;
        let all = LoraConfig::from_peft_json(all).unwrap();
        assert!(all.targets("model.layers.1.mlp.down_proj"));
        assert_eq!(all.scale(), 4.0);
    }

    /// PEFT's own constraint (peft 0.21 `LoraConfig.__post_init__`: "`layers_to_transform` cannot be used when
    /// `target_modules` is a str"): an all-linear adapter of some layers is written with explicit module names, and
    /// those names adapt exactly the projections `all-linear` does in those layers.
    #[test]
    fn all_linear_on_listed_layers_is_written_as_names_peft_accepts() {
        let c = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::Preset("all-linear".into()),
            lora_dropout: 0.0,
            use_rslora: false,
            layers_to_transform: Some(vec![0, 3]),
        };
        let json = c.to_peft_json(None);
        assert!(
            json["target_modules"].is_array() && json["layers_to_transform"].is_array(),
            "{json}"
        );
        let back = LoraConfig::from_peft_json(&json.to_string()).unwrap();
        for layer in 0..5 {
            for p in crate::model::PROJECTIONS {
                let name = format!("model.layers.{layer}.{p}");
                assert_eq!(back.targets(&name), c.targets(&name), "{name}");
            }
        }
        assert!(!back.targets("lm_head"));
        // Without listed layers the preset string stays (PEFT accepts it there).
        let all = LoraConfig {
            layers_to_transform: None,
            ..c
        };
        assert_eq!(all.to_peft_json(None)["target_modules"], "all-linear");
    }
}
