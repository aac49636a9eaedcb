#!/usr/bin/env python3
"""Writes a synthetic full-size Phi-2 checkpoint in Hugging Face layout (fp16, 2 shards, random
weights) for measuring `phi2 convert` on the real shapes. Needs numpy + safetensors.

    python3 scripts/make_synthetic_hf.py OUT_DIR     # ~5.6 GB
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

H, I, V, L = 2560, 10240, 51200, 32


def tensors():
    yield "model.embed_tokens.weight", (V, H)
    for n in range(L):
        p = f"model.layers.{n}."
        for name in ("input_layernorm.weight", "input_layernorm.bias"):
            yield p + name, (H,)
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            yield p + f"self_attn.{proj}.weight", (H, H)
            yield p + f"self_attn.{proj}.bias", (H,)
        yield p + "mlp.fc1.weight", (I, H)
        yield p + "mlp.fc1.bias", (I,)
        yield p + "mlp.fc2.weight", (H, I)
        yield p + "mlp.fc2.bias", (H,)
    yield "model.final_layernorm.weight", (H,)
    yield "model.final_layernorm.bias", (H,)
    yield "lm_head.weight", (V, H)
    yield "lm_head.bias", (V,)


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(tensors())
    half = len(names) // 2
    weight_map = {}
    for shard, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-{shard:05d}-of-00002.safetensors"
        data = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
                for name, shape in part}
        save_file(data, str(out / file))
        weight_map.update({name: file for name, _ in part})
        del data
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "phi", "vocab_size": V, "hidden_size": H, "intermediate_size": I,
              "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 32,
              "hidden_act": "gelu_new", "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
              "rope_theta": 10000.0, "partial_rotary_factor": 0.4, "qk_layernorm": False,
              "tie_word_embeddings": False, "bos_token_id": 50256, "eos_token_id": 50256}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(Path(__file__).resolve().parent.parent / "crate/assets/tokenizer.json", out / "tokenizer.json")


if __name__ == "__main__":
    main()
