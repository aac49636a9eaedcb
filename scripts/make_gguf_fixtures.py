#!/usr/bin/env python3
"""Write small GGUF test fixtures (and JSON references) into tests/fixtures/gguf/.

Run from the repository root (or anywhere) with a Python that has numpy, safetensors and
gguf-py (PyPI `gguf`, tested with 0.19.0):

    /tmp/pyenv/bin/python scripts/make_gguf_fixtures.py            # writes tests/fixtures/gguf/*
    /tmp/pyenv/bin/python scripts/make_gguf_fixtures.py --verify   # also re-reads and prints them
    /tmp/pyenv/bin/python scripts/make_gguf_fixtures.py --logits   # only phi-80-q4_0.logits.json

--logits also needs torch and transformers (5.x; made with 5.24.0, torch 2.15.0) and
tests/fixtures/phi-80/reference.json; it reads the phi-80-q4_0.gguf on disk and writes nothing
else, so rerun it whenever that file is regenerated.

Needs tests/fixtures/phi-80/{model.safetensors,config.json} (scripts/make_fixtures.py) and
crate/assets/tokenizer.json (scripts/build_tokenizer.py). Output is deterministic: running it
twice gives byte-identical files.

Files written:

  phi-80-q4_0.gguf            general.architecture = "phi2"; the SAME weights as the HF fixture
                              tests/fixtures/phi-80/model.safetensors, in llama.cpp's phi2 naming.
                              Layer 0 uses a fused blk.0.attn_qkv (q, k, v concatenated along the
                              output rows); layers 1.. use separate attn_q / attn_k / attn_v.
                              Linear weights (attn_q/k/v/qkv, attn_output, ffn_up, ffn_down, output)
                              are Q4_0 (gguf.quants.quantize), token_embd is Q8_0, norms and all
                              biases F32. Tokenizer metadata as llama.cpp writes it for phi-2
                              (full 50295-token GPT-2/CodeGen vocab even though vocab_size = 1024).
  phi-80-q4_0.reference.json  per tensor: name, ggml_type (name), ggml_type_id, shape_out_in
                              ([out, in], or [n] for 1-D), ne (GGUF dims order), n_bytes,
                              data_offset (absolute file offset), sha256_f32le (sha256 of the
                              gguf-py-dequantized values as float32 little-endian, row-major
                              [out, in]), first8, hf_source (HF tensor name(s)), max_abs_err_vs_hf;
                              Q4_0 tensors also requant_roundtrip_identical (whether quantizing the
                              dequantized values again gives identical bytes; information only).
                              Plus "metadata": every key with its GGUF value-type code and value
                              (arrays: element type, length, first/last few items).
  phi-80-q4_0.logits.json     (--logits) what transformers' PhiForCausalLM (float32, eager)
                              computes with every weight replaced by gguf-py's dequantization of
                              the GGUF tensor (attn_qkv split into q/k/v rows; token_embd, Q8_0,
                              requantized to Q4_0 first since the bundle stores it 4-bit): the
                              4-bit bundle's expected outputs. {"generator", "note", ...,
                              "cases": [{"ids", "last_logits", "greedy_ids",
                              "greedy_min_margin"}]}, ids and greedy lengths from
                              tests/fixtures/phi-80/reference.json.
  phi-2-vocab.gguf            general.architecture = "phi2" with microsoft/phi-2's hyperparameters and
                              tokenizer metadata, no tensors: the token list as llama.cpp's
                              converter writes it for phi-2, padded to the model's 51 200 rows.
                              Ids 0..50255 NORMAL (1), <|endoftext|> 50256 CONTROL (3), the 38
                              whitespace-run tokens 50257..50294 USER_DEFINED (4), and
                              "[PAD50295]".."[PAD51199]" UNUSED (5). Tests rebuild a tokenizer from
                              it and compare with crate/assets/tokenizer.json.
  kquants.gguf                general.architecture = "kquant-test"; tensors made from random raw
                              block bytes (numpy default_rng(SEED)) with the f16 scale fields forced
                              to finite values in [0.001, 0.1]: q4_k Q4_K [3, 512], q5_k Q5_K
                              [2, 256], q6_k Q6_K [2, 512], q8_0 Q8_0 [3, 64], f16 F16 [3, 5],
                              f32 F32 [2, 3], bf16 BF16 [2, 4] (shapes given as [rows, cols];
                              GGUF ne is the reverse). Also test.* metadata keys of every scalar
                              value type and a few array types, for parser tests.
  kquants.reference.json      as above, plus "values": every dequantized value (row-major).
"""

import argparse
import hashlib
import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import load_file

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_DIR = os.path.join(ROOT, "tests", "fixtures", "phi-80")
TOKENIZER = os.path.join(ROOT, "crate", "assets", "tokenizer.json")
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "gguf")

PHI_GGUF = "phi-80-q4_0.gguf"
PHI_LOGITS = "phi-80-q4_0.logits.json"
KQ_GGUF = "kquants.gguf"
SEED = 20240613
FUSED_QKV_LAYERS = {0}

EOT_ID = 50256
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
PHI2_VOCAB_GGUF = "phi-2-vocab.gguf"
PHI2_VOCAB_ROWS = 51200  # microsoft/phi-2's config.json vocab_size: the embedding's rows


# ----------------------------------------------------------------------------- helpers

def sha256_f32le(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def f32_list(values) -> list:
    # float32 -> Python float is exact; json writes the shortest repr of the double.
    return [float(v) for v in np.asarray(values, dtype=np.float32).ravel()]


def quant_bytes(arr: np.ndarray, qtype: QT) -> np.ndarray:
    """Quantize a float32 [rows, cols] array; returns uint8 [rows, bytes_per_row]."""
    q = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
    assert q.dtype == np.uint8, q.dtype
    return q


def add_raw(writer: gguf.GGUFWriter, name: str, raw: np.ndarray, qtype: QT) -> None:
    """Add already-quantized bytes (uint8 [rows, bytes_per_row]); the writer derives the
    element shape from the byte shape and stores ne reversed ([cols, rows])."""
    assert raw.dtype == np.uint8
    writer.add_tensor(name, raw, raw_dtype=qtype)


def write_gguf(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def field_value(field):
    """Decode a GGUFReader field to (type_code, value, elem_type_code|None)."""
    vtype = field.types[0]
    if vtype == VT.ARRAY:
        etype = field.types[1] if len(field.types) > 1 else None
        items = []
        for idx in field.data:
            part = field.parts[idx]
            if etype == VT.STRING:
                items.append(bytes(part).decode("utf-8"))
            else:
                v = part.tolist()[0]
                items.append(bool(v) if etype == VT.BOOL else v)
        return int(vtype), items, int(etype) if etype is not None else None
    part = field.parts[field.data[0]]
    if vtype == VT.STRING:
        return int(vtype), bytes(part).decode("utf-8"), None
    v = part.tolist()[0]
    if vtype == VT.BOOL:
        v = bool(v)
    return int(vtype), v, None


def metadata_summary(reader: gguf.GGUFReader, full_arrays: bool = False) -> dict:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue  # reader's pseudo-fields (version, tensor_count, kv_count)
        vtype, value, etype = field_value(field)
        if vtype == VT.ARRAY:
            entry = {"type": vtype, "elem_type": etype, "len": len(value)}
            if full_arrays or len(value) <= 16:
                entry["value"] = value
            else:
                entry["first"] = value[:8]
                entry["last"] = value[-4:]
                if etype == VT.STRING:
                    h = hashlib.sha256()
                    for s in value:
                        h.update(s.encode("utf-8") + b"\n")
                    entry["sha256_newline_joined"] = h.hexdigest()
            out[name] = entry
        else:
            if vtype == VT.FLOAT32:
                value = float(np.float32(value))
            out[name] = {"type": vtype, "value": value}
    return out


def tensor_reference(t, with_values: bool = False) -> tuple[dict, np.ndarray]:
    qtype = QT(int(t.tensor_type))
    deq = gguf.quants.dequantize(t.data, qtype).astype(np.float32, copy=False)
    ne = [int(x) for x in t.shape]
    shape_out_in = list(reversed(ne))
    deq = deq.reshape(shape_out_in)
    entry = {
        "name": t.name,
        "ggml_type": qtype.name,
        "ggml_type_id": int(qtype),
        "shape_out_in": shape_out_in,
        "ne": ne,
        "n_bytes": int(t.n_bytes),
        "data_offset": int(t.data_offset),
        "sha256_f32le": sha256_f32le(deq),
        "first8": f32_list(deq.ravel()[:8]),
    }
    if with_values:
        entry["values"] = f32_list(deq)
    return entry, deq


def dump_reader(path: str) -> None:
    r = gguf.GGUFReader(path)
    print(f"== {os.path.relpath(path, ROOT)} ({os.path.getsize(path)} bytes), "
          f"{len(r.tensors)} tensors, {len(r.fields)} fields, alignment {r.alignment}")
    for name, field in r.fields.items():
        vtype, value, etype = field_value(field)
        if vtype == VT.ARRAY:
            print(f"  kv {name}: ARRAY<{VT(etype).name}>[{len(value)}] {value[:4]!r}...")
        else:
            print(f"  kv {name}: {VT(vtype).name} {value!r}")
    for t in r.tensors:
        print(f"  tensor {t.name:24s} {QT(int(t.tensor_type)).name:5s} ne={list(map(int, t.shape))} "
              f"bytes={int(t.n_bytes)} off={int(t.data_offset)}")


def phi2_writer(out_path, name, *, context, embedding, feed_forward, blocks, heads, heads_kv,
                eps, rope_dims, tokens, types, merges) -> gguf.GGUFWriter:
    """A GGUF writer for architecture phi2 with its hyperparameters and tokenizer metadata
    written as llama.cpp's converter writes them (Phi2Model: add_bos_token = false, pre =
    "phi-2")."""
    w = gguf.GGUFWriter(out_path, "phi2")  # writes general.architecture first
    w.add_name(name)
    w.add_context_length(context)
    w.add_embedding_length(embedding)
    w.add_feed_forward_length(feed_forward)
    w.add_block_count(blocks)
    w.add_head_count(heads)
    w.add_head_count_kv(heads_kv)
    w.add_layer_norm_eps(eps)
    w.add_rope_dimension_count(rope_dims)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("phi-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(EOT_ID)
    w.add_eos_token_id(EOT_ID)
    w.add_unk_token_id(EOT_ID)
    w.add_add_bos_token(False)
    return w


# ----------------------------------------------------------------------------- A: phi-80

def load_vocab():
    with open(TOKENIZER, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok["model"]
    assert model["type"] == "BPE"
    id_to_tok = {}
    for s, i in model["vocab"].items():
        id_to_tok[i] = s
    added = {}
    for a in tok["added_tokens"]:
        if a["id"] in id_to_tok:
            assert id_to_tok[a["id"]] == a["content"], a
        id_to_tok[a["id"]] = a["content"]
        added[a["id"]] = a
    n = max(id_to_tok) + 1
    assert sorted(id_to_tok) == list(range(n)), "token ids are not contiguous"
    tokens = [id_to_tok[i] for i in range(n)]
    types = []
    for i in range(n):
        if i in added and added[i]["special"]:
            types.append(TOKEN_TYPE_CONTROL)
        elif i in added:
            types.append(TOKEN_TYPE_USER_DEFINED)
        else:
            types.append(TOKEN_TYPE_NORMAL)
    merges = []
    for m in model["merges"]:
        if isinstance(m, list):  # newer tokenizers.json format: ["a", "b"]
            assert len(m) == 2
            m = f"{m[0]} {m[1]}"
        assert m.count(" ") == 1, m
        merges.append(m)
    return tokens, types, merges


def load_hf():
    with open(os.path.join(HF_DIR, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    hf = load_file(os.path.join(HF_DIR, "model.safetensors"))
    hf = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in hf.items()}
    return cfg, hf


def phi_plan(cfg: dict, hf: dict) -> list:
    """What phi-80-q4_0.gguf holds, in file order: (gguf name, qtype, float32 array, hf source
    names). A fused attn_qkv has three sources, its rows concatenated in that order."""
    plan = []

    def lin(gname, hname, qt=QT.Q4_0):
        plan.append((gname + ".weight", qt, hf[hname + ".weight"], [hname + ".weight"]))
        plan.append((gname + ".bias", QT.F32, hf[hname + ".bias"], [hname + ".bias"]))

    def norm(gname, hname):
        plan.append((gname + ".weight", QT.F32, hf[hname + ".weight"], [hname + ".weight"]))
        plan.append((gname + ".bias", QT.F32, hf[hname + ".bias"], [hname + ".bias"]))

    plan.append(("token_embd.weight", QT.Q8_0, hf["model.embed_tokens.weight"],
                 ["model.embed_tokens.weight"]))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        norm(f"blk.{i}.attn_norm", f"{p}.input_layernorm")
        if i in FUSED_QKV_LAYERS:
            names = [f"{p}.self_attn.{x}_proj" for x in ("q", "k", "v")]
            plan.append((f"blk.{i}.attn_qkv.weight", QT.Q4_0,
                         np.concatenate([hf[n + ".weight"] for n in names], axis=0),
                         [n + ".weight" for n in names]))
            plan.append((f"blk.{i}.attn_qkv.bias", QT.F32,
                         np.concatenate([hf[n + ".bias"] for n in names], axis=0),
                         [n + ".bias" for n in names]))
        else:
            lin(f"blk.{i}.attn_q", f"{p}.self_attn.q_proj")
            lin(f"blk.{i}.attn_k", f"{p}.self_attn.k_proj")
            lin(f"blk.{i}.attn_v", f"{p}.self_attn.v_proj")
        lin(f"blk.{i}.attn_output", f"{p}.self_attn.dense")
        lin(f"blk.{i}.ffn_up", f"{p}.mlp.fc1")
        lin(f"blk.{i}.ffn_down", f"{p}.mlp.fc2")
    norm("output_norm", "model.final_layernorm")
    lin("output", "lm_head")

    used = {n for _, _, _, srcs in plan for n in srcs}
    assert used == set(hf), sorted(set(hf) ^ used)
    return plan


def make_phi(out_path: str, ref_path: str) -> None:
    cfg, hf = load_hf()

    n_embd = cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    n_layer = cfg["num_hidden_layers"]
    head_dim = n_embd // n_head
    rope = cfg.get("rope_parameters") or {}
    prf = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    rot_dims = int(head_dim * prf)
    assert rot_dims == 32, rot_dims
    assert not cfg.get("qk_layernorm", False)

    tokens, types, merges = load_vocab()
    assert len(tokens) == 50295 and len(merges) == 50000, (len(tokens), len(merges))
    assert tokens[EOT_ID] == "<|endoftext|>"
    assert types[EOT_ID] == TOKEN_TYPE_CONTROL
    assert all(t == TOKEN_TYPE_USER_DEFINED for t in types[50257:])

    w = phi2_writer(out_path, "phi-80 test fixture", context=cfg["max_position_embeddings"],
                    embedding=n_embd, feed_forward=cfg["intermediate_size"], blocks=n_layer,
                    heads=n_head, heads_kv=n_head_kv, eps=cfg["layer_norm_eps"],
                    rope_dims=rot_dims, tokens=tokens, types=types, merges=merges)

    plan = phi_plan(cfg, hf)
    for gname, qt, arr, _ in plan:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qt == QT.F32:
            w.add_tensor(gname, arr)
        else:
            add_raw(w, gname, quant_bytes(arr, qt), qt)
    write_gguf(w)

    # ---- reference, computed from what was actually written
    r = gguf.GGUFReader(out_path)
    by_name = {t.name: t for t in r.tensors}
    assert [t.name for t in r.tensors] == [p[0] for p in plan]
    entries = []
    for gname, qt, arr, srcs in plan:
        t = by_name[gname]
        assert QT(int(t.tensor_type)) == qt, (gname, t.tensor_type)
        entry, deq = tensor_reference(t)
        assert list(deq.shape) == list(arr.shape), (gname, deq.shape, arr.shape)
        entry["hf_source"] = srcs if len(srcs) > 1 else srcs[0]
        entry["max_abs_err_vs_hf"] = float(np.max(np.abs(deq - arr)))
        if qt == QT.F32:
            assert np.array_equal(deq, arr), gname
        if qt == QT.Q4_0:
            again = quant_bytes(deq, QT.Q4_0)
            entry["requant_roundtrip_identical"] = bool(np.array_equal(again, np.asarray(t.data)))
        entries.append(entry)

    ref = {
        "file": PHI_GGUF,
        "generator": "scripts/make_gguf_fixtures.py",
        "gguf_py_version": gguf_version(),
        "hf_fixture": "tests/fixtures/phi-80",
        "architecture": "phi2",
        "alignment": int(r.alignment),
        "fused_qkv_layers": sorted(FUSED_QKV_LAYERS),
        "notes": "sha256_f32le = sha256 of gguf-py dequantized values as float32 LE, row-major "
                 "[out, in] (= shape_out_in; ne is the GGUF order, reversed). Q4_0/Q8_0 made with "
                 "gguf.quants.quantize from the float32 HF weights; F32 tensors are the HF values "
                 "bit-exactly. attn_qkv rows = q rows, then k rows, then v rows.",
        "metadata": metadata_summary(r),
        "tensors": entries,
    }
    with open(ref_path, "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------- A2: q4 logits

def phi_dequantized_state(gguf_path: str, cfg: dict, hf: dict) -> tuple[dict, list]:
    """HF-named float32 arrays of what the bundle converted from gguf_path computes with:
    gguf-py's dequantized values, split back per phi_plan (fused attn_qkv rows: q, k, v).
    Tensors the bundle stores 4-bit but the GGUF holds as another type (token_embd, Q8_0)
    are Q4_0-requantized from the dequantized values first, as the converter does.
    Returns (state, names of the requantized HF tensors)."""
    plan = phi_plan(cfg, hf)
    r = gguf.GGUFReader(gguf_path)
    assert [t.name for t in r.tensors] == [p[0] for p in plan]
    state, requantized = {}, []
    for (gname, qt, arr, srcs), t in zip(plan, r.tensors):
        assert QT(int(t.tensor_type)) == qt, (gname, t.tensor_type)
        _, deq = tensor_reference(t)
        assert deq.shape == arr.shape, (gname, deq.shape, arr.shape)
        if deq.ndim == 2 and qt != QT.Q4_0:
            assert gname == "token_embd.weight", gname  # the only non-Q4_0 matrix
            cols = deq.shape[1]
            deq = gguf.quants.dequantize(quant_bytes(deq, QT.Q4_0), QT.Q4_0)
            deq = deq.astype(np.float32, copy=False).reshape(-1, cols)
            requantized += srcs
        rows = np.cumsum([hf[n].shape[0] for n in srcs])[:-1]
        for name, part in zip(srcs, np.split(deq, rows, axis=0)):
            assert part.shape == hf[name].shape, (name, part.shape)
            state[name] = np.ascontiguousarray(part)
    assert set(state) == set(hf)
    return state, requantized


def make_phi_logits(gguf_path: str, out_path: str) -> None:
    """transformers' PhiForCausalLM (float32, eager attention) on the weights of
    phi_dequantized_state, for the cases of tests/fixtures/phi-80/reference.json."""
    import torch
    import transformers
    from transformers import PhiConfig, PhiForCausalLM

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    cfg, hf = load_hf()
    state, requantized = phi_dequantized_state(gguf_path, cfg, hf)
    with open(os.path.join(HF_DIR, "reference.json"), encoding="utf-8") as f:
        hf_ref = json.load(f)

    def model_with(weights):
        config = PhiConfig.from_pretrained(HF_DIR)
        config._attn_implementation = "eager"
        model = PhiForCausalLM(config)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()},
                              strict=True)
        return model.to(torch.float32).eval()

    def r7(values):
        return [float(f"{x:.7g}") for x in values.tolist()]

    float_model, model = model_with(hf), model_with(state)
    eos = model.config.eos_token_id
    cases = []
    with torch.no_grad():
        for ref_case in hf_ref["cases"]:
            ids = ref_case["ids"]
            n_new = len(ref_case["greedy_ids"])
            x = torch.tensor([ids])
            # The loading path is right: the float weights give transformers' own reference.
            float_logits = float_model(x).logits[0, -1]
            check = float(np.max(np.abs(float_logits.numpy() - ref_case["last_logits"])))
            assert check < 1e-4, f"float model vs phi-80 reference: {check}"
            out = model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n_new,
                min_new_tokens=0, eos_token_id=None, pad_token_id=0, use_cache=True,
            )
            seq = out[0].tolist()
            greedy = seq[len(ids):]
            assert len(greedy) == n_new, "generate stopped early"
            # Every step again without a KV cache: same argmax, and the top1 - top2 margins.
            full = model(torch.tensor([seq])).logits[0]
            top2 = full[len(ids) - 1:len(seq) - 1].topk(2, dim=-1)
            assert top2.indices[:, 0].tolist() == greedy, "generate() and a full forward disagree"
            margin = (top2.values[:, 0] - top2.values[:, 1]).min().item()
            last = full[len(ids) - 1]
            drift = float((last - float_logits).abs().max())
            print(f"  ids={len(ids)}: max |logit| {float(last.abs().max()):.4g}, "
                  f"q4 vs float max |Δ| {drift:.4g}, greedy min margin {margin:.4g}, "
                  f"greedy == float greedy: {greedy == ref_case['greedy_ids']}"
                  + (f", EOS {eos} in greedy" if eos in greedy else ""))
            cases.append({
                "ids": ids,
                "last_logits": r7(last),
                "greedy_ids": greedy,
                "greedy_min_margin": float(f"{margin:.7g}"),
            })

    ref = {
        "generator": "scripts/make_gguf_fixtures.py --logits",
        "generated_by": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                        f"gguf-py {gguf_version()}",
        "gguf": PHI_GGUF,
        "hf_fixture": "tests/fixtures/phi-80",
        "eos_token_id": eos,
        "requantized_q4_0": requantized,
        "note": "transformers PhiForCausalLM (float32, eager attention) with every weight "
                "replaced by gguf-py's dequantized GGUF tensor (GGUFReader + "
                "gguf.quants.dequantize; fused blk.0.attn_qkv split into q, k, v rows). The "
                "tensors in requantized_q4_0 (not Q4_0 in the GGUF, 4-bit in our bundle) were "
                "first Q4_0-quantized with gguf.quants.quantize, as the converter does. Cases "
                "(ids, greedy length) are those of tests/fixtures/phi-80/reference.json; greedy "
                "decoding ignores EOS; greedy_min_margin = min over steps of top1 - top2 logit.",
        "cases": cases,
    }
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


# ----------------------------------------------------------------------------- B: k-quants

def random_blocks(rng, n_blocks: int, qtype: QT) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)

    def scale_f16(k):
        return rng.uniform(0.001, 0.1, size=(n_blocks, k)).astype(np.float16).view(np.uint8)

    if qtype in (QT.Q4_K, QT.Q5_K):   # d @0..2, dmin @2..4
        b[:, 0:4] = scale_f16(2)
    elif qtype == QT.Q6_K:            # d @208..210 (end of block)
        b[:, type_size - 2:type_size] = scale_f16(1)
    elif qtype == QT.Q8_0:            # d @0..2
        b[:, 0:2] = scale_f16(1)
    else:
        raise ValueError(qtype)
    return b


def make_kquants(out_path: str, ref_path: str) -> None:
    rng = np.random.default_rng(SEED)
    w = gguf.GGUFWriter(out_path, "kquant-test")
    w.add_name("k-quant decode test")
    # One key of each scalar value type, plus arrays, for GGUF parser tests.
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.15625)
    w.add_bool("test.bool_true", True)
    w.add_bool("test.bool_false", False)
    w.add_string("test.string", "héllo wörld ✓")
    w.add_uint64("test.u64", 18000000000000000000)
    w.add_int64("test.i64", -9000000000000000000)
    w.add_float64("test.f64", -2.718281828459045)
    w.add_key_value("test.arr_i32", [1, -2, 3], VT.ARRAY)                       # elem INT32
    w.add_key_value("test.arr_f32", [0.5, -1.25], VT.ARRAY)                     # elem FLOAT32
    w.add_key_value("test.arr_str", ["a", "", "b c"], VT.ARRAY)                 # elem STRING
    w.add_key_value("test.arr_u8", [1, 2, 255], VT.ARRAY, sub_type=VT.UINT8)
    w.add_key_value("test.arr_bool", [True, False, True], VT.ARRAY, sub_type=VT.BOOL)

    # name, qtype, [rows, cols]
    specs = [
        ("q4_k", QT.Q4_K, (3, 512)),
        ("q5_k", QT.Q5_K, (2, 256)),
        ("q6_k", QT.Q6_K, (2, 512)),
        ("q8_0", QT.Q8_0, (3, 64)),
        ("f16", QT.F16, (3, 5)),
        ("f32", QT.F32, (2, 3)),
        ("bf16", QT.BF16, (2, 4)),
    ]
    for name, qt, (rows, cols) in specs:
        if qt == QT.F16:
            arr = rng.uniform(-2.0, 2.0, size=(rows, cols)).astype(np.float16)
            w.add_tensor(name, arr)
        elif qt == QT.F32:
            arr = rng.uniform(-2.0, 2.0, size=(rows, cols)).astype(np.float32)
            w.add_tensor(name, arr)
        elif qt == QT.BF16:
            # bf16 bytes from random f32 (round-to-nearest-even via gguf-py); one value is an
            # exact small integer so the tie/sign paths are boring and the rest random.
            arr = rng.uniform(-2.0, 2.0, size=(rows, cols)).astype(np.float32)
            arr[0, 0] = -3.0
            add_raw(w, name, quant_bytes(arr, QT.BF16), QT.BF16)
        else:
            block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
            assert cols % block_size == 0
            nb = cols // block_size
            raw = random_blocks(rng, rows * nb, qt).reshape(rows, nb * type_size)
            add_raw(w, name, raw, qt)
    write_gguf(w)

    r = gguf.GGUFReader(out_path)
    entries = []
    for (name, qt, shape), t in zip(specs, r.tensors):
        assert t.name == name and QT(int(t.tensor_type)) == qt, (t.name, t.tensor_type)
        entry, deq = tensor_reference(t, with_values=True)
        assert tuple(deq.shape) == shape, (name, deq.shape)
        assert np.all(np.isfinite(deq)), name
        entries.append(entry)
    ref = {
        "file": KQ_GGUF,
        "generator": "scripts/make_gguf_fixtures.py",
        "gguf_py_version": gguf_version(),
        "seed": SEED,
        "architecture": "kquant-test",
        "alignment": int(r.alignment),
        "notes": "values / sha256_f32le from gguf.quants.dequantize, float32 LE, row-major "
                 "[rows, cols] (= shape_out_in). Quantized tensors are random block bytes with "
                 "f16 d/dmin fields forced into [0.001, 0.1].",
        "metadata": metadata_summary(r, full_arrays=True),
        "tensors": entries,
    }
    with open(ref_path, "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------- B: phi-2's vocab

def make_phi2_vocab(out_path: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py (get_vocab_base) lists one token per embedding row:
    ids the HF tokenizer lacks become "[PAD{id}]" typed UNUSED, added tokens keep their
    content (Phi-2's whitespace runs as raw spaces and tabs) typed USER_DEFINED, special ones
    CONTROL."""
    tokens, types, merges = load_vocab()
    assert len(tokens) == 50295, len(tokens)
    for i in range(len(tokens), PHI2_VOCAB_ROWS):
        tokens.append(f"[PAD{i}]")
        types.append(TOKEN_TYPE_UNUSED)

    w = phi2_writer(out_path, "phi-2 vocabulary (no tensors)", context=2048, embedding=2560,
                    feed_forward=10240, blocks=32, heads=32, heads_kv=32, eps=1e-5, rope_dims=32,
                    tokens=tokens, types=types, merges=merges)
    write_gguf(w)


def gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # pragma: no cover
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verify", action="store_true", help="re-read and print the written files")
    ap.add_argument("--logits", action="store_true",
                    help=f"only write {PHI_LOGITS} from the {PHI_GGUF} on disk "
                         "(needs torch and transformers too)")
    args = ap.parse_args()
    assert sys.byteorder == "little"
    os.makedirs(OUT_DIR, exist_ok=True)
    phi = os.path.join(OUT_DIR, PHI_GGUF)
    kq = os.path.join(OUT_DIR, KQ_GGUF)
    if args.logits:
        out = os.path.join(OUT_DIR, PHI_LOGITS)
        make_phi_logits(phi, out)
        print(f"wrote {os.path.relpath(out, ROOT)} ({os.path.getsize(out)} bytes)")
        return 0
    make_phi(phi, os.path.join(OUT_DIR, "phi-80-q4_0.reference.json"))
    make_kquants(kq, os.path.join(OUT_DIR, "kquants.reference.json"))
    vocab = os.path.join(OUT_DIR, PHI2_VOCAB_GGUF)
    make_phi2_vocab(vocab)
    for p in (phi, kq, vocab):
        print(f"wrote {os.path.relpath(p, ROOT)} ({os.path.getsize(p)} bytes)")
    if args.verify:
        dump_reader(phi)
        dump_reader(kq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
