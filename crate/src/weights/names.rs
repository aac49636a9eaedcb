//! Which checkpoint tensor feeds which model parameter, for both Phi-2 naming schemes:
//! today's transformers names (`model.layers.N.self_attn.q_proj.weight`, ...) and the older
//! uploads (`transformer.h.N.mixer.Wqkv.weight`, q, k and v stacked along the output rows).

use crate::config::PhiConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerParam {
    InputLayernormWeight,
    InputLayernormBias,
    QProjWeight,
    QProjBias,
    KProjWeight,
    KProjBias,
    VProjWeight,
    VProjBias,
    DenseWeight,
    DenseBias,
    Fc1Weight,
    Fc1Bias,
    Fc2Weight,
    Fc2Bias,
}

/// One model parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    EmbedTokens,
    Layer(usize, LayerParam),
    FinalLayernormWeight,
    FinalLayernormBias,
    LmHeadWeight,
    LmHeadBias,
}

impl LayerParam {
    pub const ALL: [LayerParam; 14] = [
        LayerParam::InputLayernormWeight,
        LayerParam::InputLayernormBias,
        LayerParam::QProjWeight,
        LayerParam::QProjBias,
        LayerParam::KProjWeight,
        LayerParam::KProjBias,
        LayerParam::VProjWeight,
        LayerParam::VProjBias,
        LayerParam::DenseWeight,
        LayerParam::DenseBias,
        LayerParam::Fc1Weight,
        LayerParam::Fc1Bias,
        LayerParam::Fc2Weight,
        LayerParam::Fc2Bias,
    ];

    fn suffix(self) -> &'static str {
        match self {
            LayerParam::InputLayernormWeight => "input_layernorm.weight",
            LayerParam::InputLayernormBias => "input_layernorm.bias",
            LayerParam::QProjWeight => "self_attn.q_proj.weight",
            LayerParam::QProjBias => "self_attn.q_proj.bias",
            LayerParam::KProjWeight => "self_attn.k_proj.weight",
            LayerParam::KProjBias => "self_attn.k_proj.bias",
            LayerParam::VProjWeight => "self_attn.v_proj.weight",
            LayerParam::VProjBias => "self_attn.v_proj.bias",
            LayerParam::DenseWeight => "self_attn.dense.weight",
            LayerParam::DenseBias => "self_attn.dense.bias",
            LayerParam::Fc1Weight => "mlp.fc1.weight",
            LayerParam::Fc1Bias => "mlp.fc1.bias",
            LayerParam::Fc2Weight => "mlp.fc2.weight",
            LayerParam::Fc2Bias => "mlp.fc2.bias",
        }
    }

    /// Linear weights are stored `[out, in]` in checkpoints.
    pub fn is_linear_weight(self) -> bool {
        matches!(
            self,
            LayerParam::QProjWeight
                | LayerParam::KProjWeight
                | LayerParam::VProjWeight
                | LayerParam::DenseWeight
                | LayerParam::Fc1Weight
                | LayerParam::Fc2Weight
        )
    }
}

impl Slot {
    /// Every parameter a model of this config needs.
    pub fn all(config: &PhiConfig) -> Vec<Slot> {
        let mut slots = vec![Slot::EmbedTokens];
        for layer in 0..config.num_hidden_layers {
            slots.extend(LayerParam::ALL.iter().map(|&p| Slot::Layer(layer, p)));
        }
        slots.extend([
            Slot::FinalLayernormWeight,
            Slot::FinalLayernormBias,
            Slot::LmHeadWeight,
            Slot::LmHeadBias,
        ]);
        slots
    }

    /// The shape as checkpoints store it (linear weights `[out, in]`).
    pub fn shape(self, config: &PhiConfig) -> Vec<usize> {
        let (h, i, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        match self {
            Slot::EmbedTokens => vec![v, h],
            Slot::LmHeadWeight => vec![v, h],
            Slot::LmHeadBias => vec![v],
            Slot::FinalLayernormWeight | Slot::FinalLayernormBias => vec![h],
            Slot::Layer(_, p) => match p {
                LayerParam::Fc1Weight => vec![i, h],
                LayerParam::Fc1Bias => vec![i],
                LayerParam::Fc2Weight => vec![h, i],
                LayerParam::QProjWeight
                | LayerParam::KProjWeight
                | LayerParam::VProjWeight
                | LayerParam::DenseWeight => vec![h, h],
                _ => vec![h],
            },
        }
    }

    pub fn is_linear_weight(self) -> bool {
        match self {
            Slot::LmHeadWeight => true,
            Slot::Layer(_, p) => p.is_linear_weight(),
            _ => false,
        }
    }

    /// The transformers name, used in messages.
    pub fn hf_name(self) -> String {
        match self {
            Slot::EmbedTokens => "model.embed_tokens.weight".into(),
            Slot::Layer(n, p) => format!("model.layers.{n}.{}", p.suffix()),
            Slot::FinalLayernormWeight => "model.final_layernorm.weight".into(),
            Slot::FinalLayernormBias => "model.final_layernorm.bias".into(),
            Slot::LmHeadWeight => "lm_head.weight".into(),
            Slot::LmHeadBias => "lm_head.bias".into(),
        }
    }
}

/// Where a checkpoint tensor goes. A fused QKV tensor feeds three slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    One(Slot),
    /// Rows `[0, h)`, `[h, 2h)`, `[2h, 3h)` of a stacked q/k/v weight or bias.
    FusedQkv {
        layer: usize,
        bias: bool,
    },
    /// Buffers some checkpoints carry that the model recomputes (rotary inverse frequencies).
    Ignored,
}

impl Target {
    /// The parameters this tensor feeds, each with its third of a fused q/k/v tensor.
    pub fn slots(&self) -> Vec<(Slot, Option<usize>)> {
        match *self {
            Target::Ignored => vec![],
            Target::One(slot) => vec![(slot, None)],
            Target::FusedQkv { layer, bias } => {
                use LayerParam::*;
                let params = if bias {
                    [QProjBias, KProjBias, VProjBias]
                } else {
                    [QProjWeight, KProjWeight, VProjWeight]
                };
                params
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| (Slot::Layer(layer, p), Some(i)))
                    .collect()
            }
        }
    }
}

/// Maps a checkpoint name to its target; `None` for a name that is not part of a Phi model.
pub fn target(name: &str, config: &PhiConfig) -> Option<Target> {
    if name.ends_with("rotary_emb.inv_freq") {
        return Some(Target::Ignored);
    }
    let slot = match name {
        "model.embed_tokens.weight" | "transformer.embd.wte.weight" => Slot::EmbedTokens,
        "model.final_layernorm.weight" | "lm_head.ln.weight" => Slot::FinalLayernormWeight,
        "model.final_layernorm.bias" | "lm_head.ln.bias" => Slot::FinalLayernormBias,
        "lm_head.weight" | "lm_head.linear.weight" => Slot::LmHeadWeight,
        "lm_head.bias" | "lm_head.linear.bias" => Slot::LmHeadBias,
        _ => return layer_target(name, config),
    };
    Some(Target::One(slot))
}

/// The transformers name of a llama.cpp GGUF tensor name (`blk.N.attn_qkv.weight`, ...);
/// a fused `attn_qkv` maps to the older fused `Wqkv` name.
pub fn hf_name_of_gguf(name: &str) -> Option<String> {
    let (base, kind) = name.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match base {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.final_layernorm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let (layer, part) = base.strip_prefix("blk.")?.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            match part {
                "attn_qkv" => format!("transformer.h.{layer}.mixer.Wqkv"),
                _ => {
                    let suffix = match part {
                        "attn_norm" => "input_layernorm",
                        "attn_q" => "self_attn.q_proj",
                        "attn_k" => "self_attn.k_proj",
                        "attn_v" => "self_attn.v_proj",
                        "attn_output" => "self_attn.dense",
                        "ffn_up" => "mlp.fc1",
                        "ffn_down" => "mlp.fc2",
                        _ => return None,
                    };
                    format!("model.layers.{layer}.{suffix}")
                }
            }
        }
    };
    Some(format!("{hf}.{kind}"))
}

fn layer_target(name: &str, config: &PhiConfig) -> Option<Target> {
    let (rest, old_scheme) = if let Some(rest) = name.strip_prefix("model.layers.") {
        (rest, false)
    } else {
        (name.strip_prefix("transformer.h.")?, true)
    };
    let (index, suffix) = rest.split_once('.')?;
    let layer: usize = index.parse().ok()?;
    if layer >= config.num_hidden_layers {
        return None;
    }
    if !old_scheme {
        let param = LayerParam::ALL.into_iter().find(|p| p.suffix() == suffix)?;
        return Some(Target::One(Slot::Layer(layer, param)));
    }
    let param = match suffix {
        "ln.weight" => LayerParam::InputLayernormWeight,
        "ln.bias" => LayerParam::InputLayernormBias,
        "mixer.Wqkv.weight" => return Some(Target::FusedQkv { layer, bias: false }),
        "mixer.Wqkv.bias" => return Some(Target::FusedQkv { layer, bias: true }),
        "mixer.out_proj.weight" => LayerParam::DenseWeight,
        "mixer.out_proj.bias" => LayerParam::DenseBias,
        "mlp.fc1.weight" => LayerParam::Fc1Weight,
        "mlp.fc1.bias" => LayerParam::Fc1Bias,
        "mlp.fc2.weight" => LayerParam::Fc2Weight,
        "mlp.fc2.bias" => LayerParam::Fc2Bias,
        _ => return None,
    };
    Some(Target::One(Slot::Layer(layer, param)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_naming_schemes() {
        let config = PhiConfig::phi2();
        assert_eq!(
            target("model.layers.3.self_attn.dense.bias", &config),
            Some(Target::One(Slot::Layer(3, LayerParam::DenseBias)))
        );
        assert_eq!(
            target("transformer.h.3.mixer.out_proj.bias", &config),
            Some(Target::One(Slot::Layer(3, LayerParam::DenseBias)))
        );
        assert_eq!(
            target("transformer.h.0.mixer.Wqkv.weight", &config),
            Some(Target::FusedQkv {
                layer: 0,
                bias: false
            })
        );
        assert_eq!(
            target("lm_head.ln.weight", &config),
            Some(Target::One(Slot::FinalLayernormWeight))
        );
        assert_eq!(target("model.layers.32.mlp.fc1.weight", &config), None);
        assert_eq!(target("model.layers.x.mlp.fc1.weight", &config), None);
        assert_eq!(target("something.else", &config), None);
    }

    #[test]
    fn maps_gguf_names() {
        let config = PhiConfig::phi2();
        let via_gguf = |name: &str| target(&hf_name_of_gguf(name).unwrap(), &config);
        assert_eq!(
            via_gguf("token_embd.weight"),
            Some(Target::One(Slot::EmbedTokens))
        );
        assert_eq!(via_gguf("output.bias"), Some(Target::One(Slot::LmHeadBias)));
        assert_eq!(
            via_gguf("output_norm.weight"),
            Some(Target::One(Slot::FinalLayernormWeight))
        );
        assert_eq!(
            via_gguf("blk.7.ffn_down.weight"),
            Some(Target::One(Slot::Layer(7, LayerParam::Fc2Weight)))
        );
        assert_eq!(
            via_gguf("blk.2.attn_qkv.bias"),
            Some(Target::FusedQkv {
                layer: 2,
                bias: true
            })
        );
        assert_eq!(hf_name_of_gguf("blk.2.attn_rot.weight"), None);
        assert_eq!(hf_name_of_gguf("rope_freqs"), None);
    }

    #[test]
    fn every_slot_round_trips_through_its_hf_name() {
        let config = PhiConfig::phi2();
        let slots = Slot::all(&config);
        assert_eq!(slots.len(), 1 + 32 * 14 + 4);
        let params: usize = slots
            .iter()
            .map(|s| s.shape(&config).iter().product::<usize>())
            .sum();
        assert_eq!(params, 2_779_683_840);
        for slot in slots {
            assert_eq!(target(&slot.hf_name(), &config), Some(Target::One(slot)));
        }
    }
}
