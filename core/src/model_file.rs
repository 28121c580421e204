//! An ov3 model file: every parameter under its checkpoint name (`encoder.blocks.0.attn.qkv.weight`...) in
//! safetensors, with the model config, the tokenizer and the parameter ids in the metadata. The same file
//! serves training checkpoints, `ov3 eval`/`reconstruct`, the shipped demo checkpoint and `ov3 export`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::{Device, Tensor};

use crate::config::ModelConfig;
use crate::model::Ov3;
use crate::params::{dotted, named_values};
use crate::tokenizer::{BYTES_SPEC, Tokenizer};
use crate::weights::{Weights, WeightsError, save_tensors};
pub use safetensors::Dtype;

/// Metadata keys.
pub const CONFIG_KEY: &str = "ov3_model_config";
pub const TOKENIZER_KEY: &str = "ov3_tokenizer";
pub const PARAM_IDS_KEY: &str = "ov3_param_ids";

/// Writes `model` (atomically) with its config. Parameter ids are kept so that a saved optimizer state,
/// which burn keys by parameter id, finds its parameters again after loading.
pub fn save_model(path: &Path, model: &Ov3, cfg: &ModelConfig) -> Result<(), WeightsError> {
    save_model_as(path, model, cfg, Dtype::F32)
}

/// [`save_model`] with the tensors stored as `dtype` (F16 for shipped checkpoints and web bundles).
pub fn save_model_as(path: &Path, model: &Ov3, cfg: &ModelConfig, dtype: Dtype) -> Result<(), WeightsError> {
    let values = named_values(model);
    // Never write a model that cannot be used: a NaN or infinite weight is refused, named.
    for (name, _, v) in &values {
        if let Some(index) = v.iter().position(|x| !x.is_finite()) {
            let value = v[index];
            return Err(WeightsError::NonFinite { path: path.display().to_string(), key: name.clone(), index, value });
        }
    }
    let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> =
        values.iter().map(|(name, shape, v)| (name.as_str(), shape.clone(), v.clone())).collect();
    let ids: BTreeMap<String, u64> = param_ids(model);
    let metadata = HashMap::from([
        (CONFIG_KEY.to_string(), serde_json::to_string(cfg).map_err(|e| invalid(path, e.to_string()))?),
        (TOKENIZER_KEY.to_string(), model.tokenizer.spec()),
        (PARAM_IDS_KEY.to_string(), serde_json::to_string(&ids).map_err(|e| invalid(path, e.to_string()))?),
    ]);
    save_tensors(path, &tensors, Some(metadata), dtype)
}

/// Reads a model file: its config from the metadata, then every parameter by name (missing, unexpected
/// and mis-shaped keys are errors naming the key).
pub fn load_model(path: &Path, device: &Device) -> Result<(Ov3, ModelConfig), WeightsError> {
    model_from_weights(&Weights::open(path)?, device)
}

/// [`load_model`] from the bytes of a model file (the browser fetches them); `name` is for messages.
pub fn load_model_bytes(bytes: Vec<u8>, name: &str, device: &Device) -> Result<(Ov3, ModelConfig), WeightsError> {
    model_from_weights(&Weights::from_bytes(bytes, name.to_string())?, device)
}

fn model_from_weights(weights: &Weights, device: &Device) -> Result<(Ov3, ModelConfig), WeightsError> {
    let cfg = model_config(weights)?;
    // Files from before tokenizers were recorded are byte-level.
    let tokenizer = Tokenizer::from_spec(weights.metadata(TOKENIZER_KEY).unwrap_or(BYTES_SPEC))
        .map_err(|e| weights.invalid(format!("tokenizer: {e}")))?;
    if !tokenizer.matches(&cfg) {
        return Err(weights.invalid(format!(
            "the model's vocabulary ({} ids) does not fit its {} tokenizer",
            cfg.vocab_size,
            tokenizer.describe()
        )));
    }
    let ids: BTreeMap<String, u64> = match weights.metadata(PARAM_IDS_KEY) {
        Some(json) => serde_json::from_str(json).map_err(|e| weights.invalid(format!("bad parameter ids: {e}")))?,
        None => BTreeMap::new(),
    };
    let mut model = Ov3::new(&cfg, device);
    model.tokenizer = tokenizer;
    let mut loader = Loader { weights, ids: &ids, stack: Vec::new(), error: None };
    let model = model.map(&mut loader);
    if let Some(e) = loader.error {
        return Err(e);
    }
    weights.finish()?;
    Ok((model, cfg))
}

/// The model config stored in a model file.
pub fn model_config(weights: &Weights) -> Result<ModelConfig, WeightsError> {
    let json = weights
        .metadata(CONFIG_KEY)
        .ok_or_else(|| weights.invalid("not an ov3 model file (no model config in its metadata)"))?;
    let cfg: ModelConfig = serde_json::from_str(json).map_err(|e| weights.invalid(format!("bad model config: {e}")))?;
    cfg.validate().map_err(|e| weights.invalid(e))?;
    Ok(cfg)
}

/// checkpoint name -> burn parameter id.
pub fn param_ids<M: Module>(module: &M) -> BTreeMap<String, u64> {
    struct Ids(Vec<String>, BTreeMap<String, u64>);
    impl burn::module::ModuleVisitor for Ids {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.1.insert(dotted(&self.0), param.id.val());
        }
    }
    let mut v = Ids(Vec::new(), BTreeMap::new());
    module.visit(&mut v);
    v.1
}

/// Replaces every parameter by the file's tensor of the same name, keeping its trainability.
struct Loader<'a> {
    weights: &'a Weights,
    ids: &'a BTreeMap<String, u64>,
    stack: Vec<String>,
    error: Option<WeightsError>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = dotted(&self.stack);
        let (id, tensor, mapper) = param.consume();
        let shape: [usize; D] = tensor.dims();
        let id = self.ids.get(&name).map(|&v| ParamId::from(v)).unwrap_or(id);
        match self.weights.tensor::<D>(&name, shape, &tensor.device()) {
            Ok(loaded) => {
                let loaded = if tensor.is_require_grad() { loaded.require_grad() } else { loaded };
                Param::from_mapped_value(id, loaded, mapper)
            }
            Err(e) => {
                self.error.get_or_insert(e);
                Param::from_mapped_value(id, tensor, mapper)
            }
        }
    }
}

fn invalid(path: &Path, reason: String) -> WeightsError {
    WeightsError::Invalid { path: path.display().to_string(), reason }
}
