//! The model's hyper-parameters, read from a Hugging Face `config.json`.
//!
//! Both styles are accepted: the hub's microsoft/phi-2 file (top-level `rope_theta` and
//! `partial_rotary_factor`) and transformers 5 (`rope_parameters: {rope_theta,
//! partial_rotary_factor, rope_type}`). Settings this implementation cannot run are rejected
//! with an error naming the field, never silently ignored.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhiConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub eos_token_id: Option<u32>,
}

impl PhiConfig {
    /// Microsoft's published Phi-2.
    pub fn phi2() -> Self {
        PhiConfig {
            vocab_size: 51200,
            hidden_size: 2560,
            intermediate_size: 10240,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            max_position_embeddings: 2048,
            layer_norm_eps: 1e-5,
            rope_theta: 10000.0,
            partial_rotary_factor: 0.4,
            eos_token_id: Some(50256),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rotary dims per head, as transformers computes them: `int(head_dim * factor)`.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.partial_rotary_factor) as usize
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::format("config.json", format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::format("config.json", "expected a JSON object"))?;
        Self::from_json(obj)
    }

    fn from_json(obj: &Map<String, Value>) -> Result<Self> {
        if let Some(model_type) = obj.get("model_type").and_then(Value::as_str) {
            if model_type != "phi" {
                return Err(Error::config(
                    "model_type",
                    format!("`{model_type}` is not supported; only `phi` (Phi-1/1.5/2) is"),
                ));
            }
        }
        let rope = obj.get("rope_parameters").and_then(Value::as_object);
        if let Some(rope) = rope {
            if let Some(kind) = rope.get("rope_type").and_then(Value::as_str) {
                if kind != "default" {
                    return Err(Error::config(
                        "rope_parameters.rope_type",
                        format!("`{kind}` scaling is not supported; only `default`"),
                    ));
                }
            }
        }
        // A value may sit at the top level (hub style) or inside rope_parameters (transformers 5).
        let rope_field = |name: &str, default: f64| -> Result<f64> {
            match (obj.get(name), rope.and_then(|r| r.get(name))) {
                (Some(v), _) if !v.is_null() => number(v, name),
                (_, Some(v)) => number(v, &format!("rope_parameters.{name}")),
                _ => Ok(default),
            }
        };

        let config = PhiConfig {
            vocab_size: required_usize(obj, "vocab_size")?,
            hidden_size: required_usize(obj, "hidden_size")?,
            intermediate_size: required_usize(obj, "intermediate_size")?,
            num_hidden_layers: required_usize(obj, "num_hidden_layers")?,
            num_attention_heads: required_usize(obj, "num_attention_heads")?,
            max_position_embeddings: optional_usize(obj, "max_position_embeddings")?
                .unwrap_or(2048),
            layer_norm_eps: match obj.get("layer_norm_eps") {
                Some(v) => number(v, "layer_norm_eps")?,
                None => 1e-5,
            },
            rope_theta: rope_field("rope_theta", 10000.0)?,
            partial_rotary_factor: rope_field("partial_rotary_factor", 0.5)?,
            eos_token_id: optional_usize(obj, "eos_token_id")?.map(|id| id as u32),
        };

        if let Some(kv) = optional_usize(obj, "num_key_value_heads")? {
            if kv != config.num_attention_heads {
                return Err(Error::config(
                    "num_key_value_heads",
                    format!(
                        "{kv} differs from num_attention_heads {}: grouped-query attention is not supported",
                        config.num_attention_heads
                    ),
                ));
            }
        }
        if obj.get("qk_layernorm").and_then(Value::as_bool) == Some(true) {
            return Err(Error::config(
                "qk_layernorm",
                "true is not supported (Phi-2 has no Q/K LayerNorm)",
            ));
        }
        if obj.get("tie_word_embeddings").and_then(Value::as_bool) == Some(true) {
            return Err(Error::config(
                "tie_word_embeddings",
                "true is not supported: Phi has a separate lm_head",
            ));
        }
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
            if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                return Err(Error::config(
                    "hidden_act",
                    format!("`{act}` is not supported; only `gelu_new` (tanh GELU)"),
                ));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields that the model code relies on.
    // `!(x > 0.0)` on purpose: NaN must fail these checks too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::config(field, "must be greater than 0"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::config(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0) {
            return Err(Error::config(
                "partial_rotary_factor",
                format!("{} is outside (0, 1]", self.partial_rotary_factor),
            ));
        }
        let rotary = self.rotary_dim();
        if rotary == 0 || !rotary.is_multiple_of(2) {
            return Err(Error::config(
                "partial_rotary_factor",
                format!(
                    "gives {rotary} rotary dims of head_dim {}; rotary dims must be even and non-zero",
                    self.head_dim()
                ),
            ));
        }
        if !(self.rope_theta > 0.0) {
            return Err(Error::config("rope_theta", "must be greater than 0"));
        }
        if !(self.layer_norm_eps > 0.0) {
            return Err(Error::config("layer_norm_eps", "must be greater than 0"));
        }
        Ok(())
    }
}

fn number(value: &Value, field: &str) -> Result<f64> {
    value
        .as_f64()
        .ok_or_else(|| Error::config(field, format!("expected a number, found {value}")))
}

fn optional_usize(obj: &Map<String, Value>, field: &str) -> Result<Option<usize>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            Error::config(field, format!("expected a non-negative integer, found {v}"))
        }),
    }
}

fn required_usize(obj: &Map<String, Value>, field: &str) -> Result<usize> {
    optional_usize(obj, field)?.ok_or_else(|| Error::config(field, "missing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB_PHI2: &str = r#"{
        "architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": 51200,
        "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "gelu_new",
        "max_position_embeddings": 2048, "layer_norm_eps": 1e-05, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.4, "qk_layernorm": false, "tie_word_embeddings": false,
        "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": "float16"
    }"#;

    #[test]
    fn reads_hub_style_phi2() {
        let config = PhiConfig::from_json_str(HUB_PHI2).unwrap();
        assert_eq!(config, PhiConfig::phi2());
        assert_eq!(config.head_dim(), 80);
        assert_eq!(config.rotary_dim(), 32);
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let text = HUB_PHI2
            .replace(r#""rope_theta": 10000.0,"#, "")
            .replace(
                r#""partial_rotary_factor": 0.4,"#,
                r#""rope_parameters": {"rope_theta": 500.0, "partial_rotary_factor": 0.5, "rope_type": "default"},"#,
            );
        let config = PhiConfig::from_json_str(&text).unwrap();
        assert_eq!(config.rope_theta, 500.0);
        assert_eq!(config.partial_rotary_factor, 0.5);
        assert_eq!(config.rotary_dim(), 40);
    }

    fn error_field(text: &str) -> String {
        match PhiConfig::from_json_str(text) {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn rejects_what_it_cannot_run_naming_the_field() {
        let qk = HUB_PHI2.replace(r#""qk_layernorm": false"#, r#""qk_layernorm": true"#);
        assert_eq!(error_field(&qk), "qk_layernorm");
        let gqa = HUB_PHI2.replace(
            r#""num_key_value_heads": 32"#,
            r#""num_key_value_heads": 8"#,
        );
        assert_eq!(error_field(&gqa), "num_key_value_heads");
        let act = HUB_PHI2.replace("gelu_new", "relu");
        assert_eq!(error_field(&act), "hidden_act");
        let missing = HUB_PHI2.replace(r#""hidden_size": 2560,"#, "");
        assert_eq!(error_field(&missing), "hidden_size");
        let wrong_type = HUB_PHI2.replace(r#""vocab_size": 51200"#, r#""vocab_size": "big""#);
        assert_eq!(error_field(&wrong_type), "vocab_size");
        let indivisible = HUB_PHI2
            .replace(
                r#""num_attention_heads": 32,"#,
                r#""num_attention_heads": 30,"#,
            )
            .replace(
                r#""num_key_value_heads": 32"#,
                r#""num_key_value_heads": 30"#,
            );
        assert_eq!(error_field(&indivisible), "num_attention_heads");
    }

    #[test]
    fn malformed_json_is_a_format_error() {
        assert!(matches!(
            PhiConfig::from_json_str("{ not json"),
            Err(Error::Format { .. })
        ));
    }
}
