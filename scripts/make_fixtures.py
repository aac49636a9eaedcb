#!/usr/bin/env python3
"""Write small random Phi checkpoints with Hugging Face reference outputs to tests/fixtures/.

Run from anywhere with a Python that has torch, transformers (5.x), safetensors and
tokenizers:

    python scripts/make_fixtures.py            # writes tests/fixtures/*
    python scripts/make_fixtures.py --verify   # also reloads each written fixture and compares

Needs crate/assets/tokenizer.json (scripts/build_tokenizer.py) first.

Every fixture directory is a Hugging Face layout: config.json, safetensors weights,
tokenizer.json (a copy of crate/assets/tokenizer.json) and reference.json:

    {"config_name": ..., "save_dtype": ..., "weights_format": ..., "min_margin_required": ...,
     "cases": [{"prompt": (phi-tok only), "ids": [...], "last_logits": [vocab floats],
                "prefix_len": k, "prefix_logits": [vocab floats] (last-position logits of
                ids[:k], k = len(ids) // 2; only when len(ids) > 1 and not phi-tok),
                "greedy_ids": [24 new ids], "greedy_text": (phi-tok only),
                "greedy_min_margin": min over steps of top1 - top2 logit}]}

References are computed in float32 with attn_implementation="eager", from the weights exactly
as stored (fp16/bf16 fixtures: the rounded weights, read back as float32). Greedy decoding
never stops at EOS (24 tokens always); seeds are searched deterministically so every greedy
step has a top1 - top2 margin of at least MIN_MARGIN, no greedy token is the config's EOS id,
each greedy output has at least MIN_DISTINCT distinct tokens, and (phi-tok) every greedy token
is a real tokenizer token (< 50295, so the text decodes).

Weights are NOT HF's default init (std 0.02 gives flat logits): linear weights
N(0, 1/fan_in), biases N(0, 0.1^2), LayerNorm weights 1 + N(0, 0.2^2), LayerNorm biases
N(0, 0.1^2), embeddings N(0, 1); lm_head weights are scaled by LM_HEAD_SCALE for sharper logits.
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import PhiConfig, PhiForCausalLM

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")
TOKENIZER = os.path.join(REPO_ROOT, "crate", "assets", "tokenizer.json")

NEW_TOKENS = 24
MIN_MARGIN = 1e-2       # stricter than the 1e-3 the tests need
MIN_DISTINCT = 8        # distinct tokens among the 24 greedy ones: no early collapse
LM_HEAD_SCALE = 2.0
MAX_SEED_TRIES = 200
TOKENIZER_TOKENS = 50295  # ids >= this are padding rows of Phi-2's 51200-entry vocab

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # fixed reduction order: same floats on every run of one machine


# --------------------------------------------------------------------------- model building

def make_config(vocab, hidden, heads, layers, inter, prf, eos, dtype):
    cfg = PhiConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        hidden_act="gelu_new",
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": prf},
        qk_layernorm=False,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )
    cfg.dtype = dtype
    return cfg


def random_state(cfg, seed):
    """Fresh float32 state dict in HF (model.*) naming, deterministic in seed."""
    torch.manual_seed(seed)
    model = PhiForCausalLM(cfg)  # only used for names and shapes
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        n = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("embed_tokens.weight"):
            t = n
        elif "layernorm" in name:
            t = 1.0 + 0.2 * n if name.endswith(".weight") else 0.1 * n
        elif p.dim() == 2:
            t = n / math.sqrt(p.shape[1])
            if name == "lm_head.weight":
                t = t * LM_HEAD_SCALE
        else:
            t = 0.1 * n
        state[name] = t.contiguous()
    return state


def round_to(state, dtype):
    return {k: v.to(dtype).to(torch.float32) for k, v in state.items()}


def build_model(cfg, state):
    model = PhiForCausalLM(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(torch.float32).eval()


def load_model(cfg, state):
    cfg = PhiConfig.from_dict(cfg.to_dict())
    cfg._attn_implementation = "eager"
    return build_model(cfg, state)


# --------------------------------------------------------------------------- references

def r7(t):
    return [float(f"{x:.7g}") for x in t.tolist()]


@torch.no_grad()
def last_logits(model, ids):
    return model(torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def reference_case(model, ids, tok=None, prompt=None, prefix=True):
    """One reference case, plus the quality facts the seed search needs."""
    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS,
        min_new_tokens=0, eos_token_id=None, pad_token_id=0, output_scores=True,
        return_dict_in_generate=True, use_cache=True,
    )
    seq = out.sequences[0].tolist()
    greedy = seq[len(ids):]
    assert len(greedy) == NEW_TOKENS, "generate stopped early"

    # Recompute every step without a KV cache: same argmax, and the margins.
    full = model(torch.tensor([seq])).logits[0].float()
    steps = full[len(ids) - 1:len(seq) - 1]
    top2 = steps.topk(2, dim=-1)
    if top2.indices[:, 0].tolist() != greedy:
        raise AssertionError("generate() and a full forward disagree")
    margin_full = (top2.values[:, 0] - top2.values[:, 1]).min().item()
    scores = torch.stack(out.scores)[:, 0].float()
    s2 = scores.topk(2, dim=-1).values
    margin_gen = (s2[:, 0] - s2[:, 1]).min().item()
    margin = min(margin_full, margin_gen)

    case = {}
    if prompt is not None:
        case["prompt"] = prompt
    case["ids"] = list(ids)
    case["last_logits"] = r7(full[len(ids) - 1])
    if prefix and len(ids) > 1:
        k = len(ids) // 2
        case["prefix_len"] = k
        case["prefix_logits"] = r7(last_logits(model, ids[:k]))
    case["greedy_ids"] = greedy
    if tok is not None:
        case["greedy_text"] = tok.decode(greedy, skip_special_tokens=False)
    case["greedy_min_margin"] = float(f"{margin:.7g}")
    return case


def case_ok(case, cfg, decodable_below=None):
    g = case["greedy_ids"]
    return (case["greedy_min_margin"] >= MIN_MARGIN
            and cfg.eos_token_id not in g
            and len(set(g)) >= MIN_DISTINCT
            and (decodable_below is None or max(g) < decodable_below))


# --------------------------------------------------------------------------- writing

def to_hub_style(cfg_dict):
    """The hub's microsoft/phi-2 config.json style: rope_theta / partial_rotary_factor at
    top level, no rope_parameters, torch_dtype instead of dtype."""
    d = dict(cfg_dict)
    rp = d.pop("rope_parameters")
    d["partial_rotary_factor"] = rp["partial_rotary_factor"]
    d["rope_scaling"] = None
    d["rope_theta"] = rp["rope_theta"]
    if "dtype" in d:
        d["torch_dtype"] = d.pop("dtype")
    d["transformers_version"] = "4.37.0"
    return dict(sorted(d.items()))


def write_json(path, obj, indent=None):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        if indent is None:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def write_reference(out, name, cfg, save_dtype, fmt, cases, seed):
    write_json(os.path.join(out, "reference.json"), {
        "config_name": name,
        "seed": seed,
        "save_dtype": save_dtype,
        "weights_format": fmt,
        "rotary_dim": int(cfg.hidden_size // cfg.num_attention_heads
                          * cfg.rope_parameters["partial_rotary_factor"]),
        "eos_token_id": cfg.eos_token_id,
        "min_margin_required": MIN_MARGIN,
        "generated_by": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "cases": cases,
    })


def fresh_dir(name):
    out = os.path.join(FIXTURES, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    shutil.copyfile(TOKENIZER, os.path.join(out, "tokenizer.json"))
    return out


def save_hf(cfg, state, out, save_dtype, max_shard_size=None):
    """save_pretrained in save_dtype (weights already rounded to it)."""
    model = build_model(cfg, state).to(getattr(torch, save_dtype))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, safe_serialization=True, **kw)
    gen = os.path.join(out, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)


def to_old_names(state, layers):
    old = {"transformer.embd.wte.weight": state["model.embed_tokens.weight"]}
    for i in range(layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        for s in ("weight", "bias"):
            old[q + "ln." + s] = state[p + "input_layernorm." + s]
            old[q + "mixer.Wqkv." + s] = torch.cat(
                [state[p + f"self_attn.{x}_proj." + s] for x in "qkv"], dim=0)
            old[q + "mixer.out_proj." + s] = state[p + "self_attn.dense." + s]
            old[q + "mlp.fc1." + s] = state[p + "mlp.fc1." + s]
            old[q + "mlp.fc2." + s] = state[p + "mlp.fc2." + s]
    for s in ("weight", "bias"):
        old["lm_head.ln." + s] = state["model.final_layernorm." + s]
        old["lm_head.linear." + s] = state["lm_head." + s]
    return old


def from_old_names(old, layers, hidden):
    st = {"model.embed_tokens.weight": old["transformer.embd.wte.weight"]}
    for i in range(layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        for s in ("weight", "bias"):
            st[p + "input_layernorm." + s] = old[q + "ln." + s]
            for j, x in enumerate("qkv"):
                st[p + f"self_attn.{x}_proj." + s] = old[q + "mixer.Wqkv." + s][j * hidden:(j + 1) * hidden]
            st[p + "self_attn.dense." + s] = old[q + "mixer.out_proj." + s]
            st[p + "mlp.fc1." + s] = old[q + "mlp.fc1." + s]
            st[p + "mlp.fc2." + s] = old[q + "mlp.fc2." + s]
    for s in ("weight", "bias"):
        st["model.final_layernorm." + s] = old["lm_head.ln." + s]
        st["lm_head." + s] = old["lm_head.linear." + s]
    return st


# --------------------------------------------------------------------------- fixtures

def search(name, cfg, base_seed, make_cases, variants):
    """Deterministic seed search. variants: list of (label, dtype-to-round-to or None).
    make_cases(model) -> list of cases. Returns (seed, f32 state, {label: cases})."""
    for seed in range(base_seed, base_seed + MAX_SEED_TRIES):
        state = random_state(cfg, seed)
        results, ok = {}, True
        for label, dt in variants:
            st = state if dt is None else round_to(state, dt)
            cases = make_cases(load_model(cfg, st))
            if not all(c["ok"] for c in cases):
                ok = False
                break
            results[label] = [{k: v for k, v in c.items() if k != "ok"} for c in cases]
        margins = [c["greedy_min_margin"] for r in results.values() for c in r]
        print(f"  {name}: seed {seed} {'ok' if ok else 'rejected'}"
              + (f" (min margin {min(margins):.4g})" if ok else ""))
        if ok:
            return seed, state, results
    sys.exit(f"{name}: no seed in {MAX_SEED_TRIES} tries passed")


def random_ids(cfg, seed, lengths):
    g = torch.Generator().manual_seed(seed)
    # avoid the EOS id in prompts
    return [torch.randint(0, cfg.vocab_size - 1, (n,), generator=g).tolist() for n in lengths]


def fixture_phi_tok(tok):
    name = "phi-tok"
    cfg = make_config(51200, 32, 2, 2, 64, 0.4, eos=50256, dtype="float16")
    prompts = ["Hello World", "def f():\n    return 1"]
    expected = [[15496, 2159], [4299, 277, 33529, 198, 50284, 7783, 352]]
    ids = [tok.encode(p).ids for p in prompts]
    assert ids == expected, ids

    def make_cases(model):
        cases = []
        for p, i in zip(prompts, ids):
            # no prefix_logits here: two more 51200-float arrays would add ~1 MB
            c = reference_case(model, i, tok=tok, prompt=p, prefix=False)
            c["ok"] = case_ok(c, cfg, decodable_below=TOKENIZER_TOKENS)
            cases.append(c)
        return cases

    seed, state, res = search(name, cfg, 1000, make_cases, [("fp16", torch.float16)])
    out = fresh_dir(name)
    save_hf(cfg, round_to(state, torch.float16), out, "float16", max_shard_size="4MB")
    cfg_path = os.path.join(out, "config.json")
    write_json(cfg_path, to_hub_style(json.load(open(cfg_path))), indent=2)
    write_reference(out, name, cfg, "float16", "hf-sharded", res["fp16"], seed)
    return out


def fixture_phi_80():
    cfg = make_config(1024, 160, 2, 3, 640, 0.4, eos=1023, dtype="float32")
    seqs = random_ids(cfg, 80, [1, 7, 19])

    def make_cases(model):
        cases = []
        for i in seqs:
            c = reference_case(model, i)
            c["ok"] = case_ok(c, cfg)
            cases.append(c)
        return cases

    # phi-80 (f32) and phi-80-old (bf16) share weights: both must pass for the same seed.
    seed, state, res = search("phi-80 + phi-80-old", cfg, 2000, make_cases,
                              [("f32", None), ("bf16", torch.bfloat16)])

    out = fresh_dir("phi-80")
    save_hf(cfg, state, out, "float32")
    write_reference(out, "phi-80", cfg, "float32", "hf", res["f32"], seed)

    out_old = fresh_dir("phi-80-old")
    old = to_old_names(state, cfg.num_hidden_layers)
    old = {k: v.to(torch.bfloat16).contiguous() for k, v in old.items()}
    save_file(old, os.path.join(out_old, "model.safetensors"), metadata={"format": "pt"})
    d = json.load(open(os.path.join(out, "config.json")))
    d["dtype"] = "bfloat16"
    write_json(os.path.join(out_old, "config.json"), d, indent=2)
    write_reference(out_old, "phi-80-old", cfg, "bfloat16", "old-phi-names", res["bf16"], seed)

    # The unsupported-config fixture: phi-80's config with qk_layernorm on, no weights.
    qk = os.path.join(FIXTURES, "phi-qkln")
    if os.path.isdir(qk):
        shutil.rmtree(qk)
    os.makedirs(qk)
    d = json.load(open(os.path.join(out, "config.json")))
    d["qk_layernorm"] = True
    write_json(os.path.join(qk, "config.json"), d, indent=2)
    return [out, out_old, qk]


def fixture_phi_odd(prf):
    name = "phi-odd"
    cfg = make_config(512, 48, 3, 2, 96, prf, eos=511, dtype="float32")
    seqs = random_ids(cfg, 512, [1, 7, 19])

    def make_cases(model):
        cases = []
        for i in seqs:
            c = reference_case(model, i)
            c["ok"] = case_ok(c, cfg)
            cases.append(c)
        return cases

    seed, state, res = search(name, cfg, 3000, make_cases, [("f32", None)])
    out = fresh_dir(name)
    save_hf(cfg, state, out, "float32")
    write_reference(out, name, cfg, "float32", "hf", res["f32"], seed)
    return out


def odd_rotary_supported():
    """Does HF's Phi run with an odd rotary dim (head_dim 16 x 0.7 = 11)?"""
    cfg = make_config(64, 48, 3, 1, 96, 0.7, eos=63, dtype="float32")
    cfg._attn_implementation = "eager"
    try:
        with torch.no_grad():
            PhiForCausalLM(cfg).eval()(torch.tensor([[1, 2, 3]]))
        return True, None
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------- verification

@torch.no_grad()
def verify(out):
    """Reload a written fixture from disk and compare its last logits with reference.json."""
    ref = json.load(open(os.path.join(out, "reference.json")))
    if ref["weights_format"] == "old-phi-names":
        cfg = PhiConfig.from_pretrained(out)
        old = {k: v.float() for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
        model = load_model(cfg, from_old_names(old, cfg.num_hidden_layers, cfg.hidden_size))
    else:
        model = PhiForCausalLM.from_pretrained(out, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    worst = 0.0
    for c in ref["cases"]:
        got = last_logits(model, c["ids"])
        want = torch.tensor(c["last_logits"])
        worst = max(worst, (got - want).abs().max().item())
    print(f"  verify {os.path.basename(out)}: rotary "
          f"{model.model.layers[0].self_attn.rotary_ndims} max |diff| {worst:.3g}")
    assert worst < 1e-4, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--verify", action="store_true", help="reload written fixtures and compare")
    args = ap.parse_args()

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    tok = Tokenizer.from_file(TOKENIZER)
    os.makedirs(FIXTURES, exist_ok=True)

    supported, err = odd_rotary_supported()
    prf = 0.7 if supported else 0.625
    print(f"odd rotary dim 11 in HF: {'works' if supported else 'fails: ' + err}"
          f" -> phi-odd uses partial_rotary_factor {prf}")

    outs = [fixture_phi_tok(tok)]
    outs += fixture_phi_80()
    outs.append(fixture_phi_odd(prf))

    if args.verify:
        for o in outs:
            if os.path.exists(os.path.join(o, "reference.json")):
                verify(o)

    total = 0
    for o in outs:
        for f in sorted(os.listdir(o)):
            size = os.path.getsize(os.path.join(o, f))
            total += size
            print(f"  {os.path.relpath(os.path.join(o, f), REPO_ROOT):55s} {size:>10,d}")
    print(f"  total {total:,d} bytes")


if __name__ == "__main__":
    main()
