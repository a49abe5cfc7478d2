#!/usr/bin/env python3
"""Tiny random llama / qwen2 models: HF transformers logits vs GGUFs converted by llama.cpp.

What it makes (in OUT_DIR, default tests/fixtures/tiny/):
    tiny-llama.f32.gguf, tiny-llama.f16.gguf, tiny-llama.q8_0.gguf, tiny-qwen2.f32.gguf
        converted by llama.cpp's own convert_hf_to_gguf.py (all tensor handling, including
        the llama q/k row permutation for RoPE and the f16 / q8_0 quantization, is llama.cpp's)
    hf.<model>.s<J>.logits.f32
        transformers logits for token sequence J: little-endian f32, row-major
        [n_tokens, vocab] (row i = logits after consuming tokens[0..=i])
    llamacpp.<model>.<outtype>.s<J>.logits.f32            (llama.cpp, default f16 KV cache)
    llamacpp.<model>.<outtype>.kvf32.s<J>.logits.f32      (llama.cpp, f32 KV cache; f32 GGUFs)
        same layout, llama-cpp-python on the GGUF, all positions in one batch
    index.json
        per case: gguf file + sha256, arch, outtype, vocab size, hparams, the token sequences,
        the logits files and the max |llama.cpp - transformers| observed per sequence.

Models (random weights, fixed seeds):
    tiny-llama: LlamaForCausalLM, vocab 512, hidden 64, 2 layers, 4 heads / 2 KV heads
        (GQA, head_dim 16), intermediate 128, rope_theta 10000, rms_norm_eps 1e-5,
        untied lm_head, max_position_embeddings 256.
    tiny-qwen2: Qwen2ForCausalLM, same sizes but 4 heads / 1 KV head, rope_theta 1e6,
        rms_norm_eps 1e-6, q/k/v biases, tied embeddings.
    Weights are re-drawn (not HF's default std 0.02, which gives near-uniform logits):
    linear weights ~ N(0, 1/fan_in) (untied lm_head: N(0, 9/fan_in)), embeddings ~ N(0, 0.4^2),
    biases ~ N(0, 0.1^2),
    RMSNorm weights ~ 1 + N(0, 0.1^2) -- so logits spread over several units and every
    parameter matters.
    Tokenizer: byte-level BPE (GPT-2 pre-tokenizer regex, no prefix space) trained with the
    `tokenizers` library on the small corpus embedded below, vocab 512, special tokens
    <|endoftext|> (bos/eos, id 0), <|im_start|>, <|im_end|>.

Patch to llama.cpp's converter (the only one): our freshly trained tokenizer has a
pre-tokenizer hash that convert_hf_to_gguf.py does not know, so it would refuse it. We
monkeypatch conversion.base.TextModel.get_vocab_base_pre to return "gpt-2" (our tokenizer
uses exactly the GPT-2 ByteLevel regex, which is what llama.cpp's "gpt-2" pre-type
implements). Nothing else of the converter is touched; it runs in a subprocess.

Tokenization cross-check: index.json "tokenization" lists a few strings with the ids from the
HF tokenizer and from llama.cpp's tokenizer on tiny-llama.f32.gguf (parse_special on, no BOS
added) and whether they agree -- usable as tokenizer fixtures for the "gpt-2" pre-type.

Token sequences: s0 = BOS + tokenizer.encode(a sentence) (the text is in index.json), s1/s2 =
16 and 24 ids drawn uniformly from [0, 512) with numpy seed 1234.

Transformers side: float32, attn_implementation="eager", torch.no_grad(), CPU.
llama.cpp side: tests/gen/llama_cpp_greedy.py's LlamaCppRunner (n_ctx 256, the sequence as
one batch with logits for every position, n_threads 2, flash attention off).

Inputs
    the llama.cpp source tree of llama-cpp-python 0.3.36 (for convert_hf_to_gguf.py + gguf-py):
        pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d /tmp/lcp
        tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
Regenerate (from the repository root)
    python3 tests/gen/tiny_models.py \
        --llama-cpp-dir /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp \
        --work-dir /tmp/tiny_hf --out-dir tests/fixtures/tiny
    (HF model folders go to --work-dir and are not committed.)

Versions used: Python 3.11.7, torch 2.15.0 (default PyPI wheel, run on CPU), transformers
5.24.0, tokenizers 0.23.3, numpy 2.4.6, sentencepiece 0.2.3, protobuf 7.36.2,
llama-cpp-python 0.3.36 (GGML_NATIVE build; its vendored llama.cpp converter + gguf-py).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Sparrow is a small runtime that runs language models on phones and laptops. It memory-maps the
weights, patches adapters into them, and runs quantized matrix products on the CPU or the GPU.
Once upon a time there was a little bird who lived in a tall tree near the river. Every morning
the bird sang a song to the sun, and every evening it counted the stars until it fell asleep.
def add(a, b):
    return a + b

for i in range(10):
    print(i, i * i)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 512 1024 3.14159 2.71828
The weather today is sunny with a light breeze from the west. Tomorrow it may rain in the hills.
Attention is computed from queries, keys and values; the keys are rotated by their positions.
Der Hund schläft. Le chat dort. El pájaro canta. Привет мир. こんにちは世界。
Users ask questions and the assistant answers them politely, briefly and correctly.
"""

SEQ0_TEXT = "The little bird sang a song to the sun."

TOKENIZE_TEXTS = [
    SEQ0_TEXT,
    "Hello world! It's 2024, and we've got 3.14159 apples... don't we?",
    "def add(a, b):\n    return a + b\n\n\n  \t x",
    "<|im_start|>user\nDer Hund schläft. Привет 🙂<|im_end|>\n",
]

LLAMA_CFG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    attention_bias=False, mlp_bias=False,
)
QWEN2_CFG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu",
    use_sliding_window=False,
)

# (model, outtype, also run llama.cpp with an f32 KV cache)
CASES = [
    ("tiny-llama", "f32", True),
    ("tiny-llama", "f16", False),
    ("tiny-llama", "q8_0", False),
    ("tiny-qwen2", "f32", True),
]

GGML_TYPE_F32 = 0


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def build_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token=None,
        pad_token=None,
        add_prefix_space=False,
    )
    fast.save_pretrained(out_dir)
    return fast


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            elif p.ndim == 2 and name == "lm_head.weight":  # untied head only
                p.copy_(torch.randn(p.shape, generator=g) * 3.0 / np.sqrt(p.shape[1]))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                raise RuntimeError(f"unhandled parameter {name}")


def build_model(kind, hf_dir, seed):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind == "tiny-llama":
        cfg = LlamaConfig(**LLAMA_CFG, bos_token_id=0, eos_token_id=0)
        cls = LlamaForCausalLM
    else:
        cfg = Qwen2Config(**QWEN2_CFG, bos_token_id=0, eos_token_id=0)
        cls = Qwen2ForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).float().eval()
    init_weights(model, seed)
    if kind == "tiny-qwen2":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        for i in range(cfg.num_hidden_layers):
            a = model.model.layers[i].self_attn
            assert a.q_proj.bias is not None and a.k_proj.bias is not None and a.v_proj.bias is not None
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(hf_dir, safe_serialization=True)
    return model, cfg


CONVERT_WRAPPER = r"""
import sys, runpy
lcpp = sys.argv[1]
sys.path[:0] = [lcpp + "/gguf-py", lcpp]
import conversion.base as _b
# Only patch: accept our freshly trained byte-level BPE tokenizer (GPT-2 regex) as "gpt-2".
_b.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [lcpp + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(lcpp + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert(lcpp_dir, hf_dir, outtype, outfile):
    cmd = [sys.executable, "-c", CONVERT_WRAPPER, lcpp_dir, hf_dir,
           "--outtype", outtype, "--outfile", outfile]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-8000:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed for {hf_dir} {outtype}")


def hf_logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32).numpy()


def llamacpp_logits(gguf_path, seqs, kv_f32):
    from llama_cpp_greedy import LlamaCppRunner

    kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if kv_f32 else {}
    r = LlamaCppRunner(gguf_path, n_ctx=256, n_batch=256, n_threads=2, **kw)
    assert r.n_vocab == VOCAB, r.n_vocab
    outs = []
    for ids in seqs:
        r.reset()
        outs.append(r.decode(ids, all_logits=True))
    settings = r.settings
    r.close()
    return outs, settings


def save_f32(path, arr):
    np.ascontiguousarray(arr, dtype="<f4").tofile(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp-dir", required=True,
                    help="llama.cpp source tree containing convert_hf_to_gguf.py and gguf-py/")
    ap.add_argument("--work-dir", default="/tmp/tiny_hf", help="where HF model folders go")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "..", "fixtures", "tiny"))
    args = ap.parse_args()
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)
    torch.set_num_threads(2)

    import llama_cpp
    import tokenizers
    import transformers

    models, hf_dirs, cfgs = {}, {}, {}
    fast = None
    for seed, kind in enumerate(["tiny-llama", "tiny-qwen2"], start=42):
        d = os.path.join(args.work_dir, kind)
        os.makedirs(d, exist_ok=True)
        fast = build_tokenizer(d)
        models[kind], cfgs[kind] = build_model(kind, d, seed)
        hf_dirs[kind] = d

    s0 = [0] + fast.encode(SEQ0_TEXT, add_special_tokens=False)
    rng = np.random.default_rng(1234)
    seqs = [s0, rng.integers(0, VOCAB, 16).tolist(), rng.integers(0, VOCAB, 24).tolist()]
    seqs = [[int(t) for t in s] for s in seqs]
    assert all(8 <= len(s) <= 24 for s in seqs), [len(s) for s in seqs]

    # transformers reference logits
    hf_files = {}
    for kind, model in models.items():
        hf_files[kind] = []
        for j, ids in enumerate(seqs):
            fn = f"hf.{kind}.s{j}.logits.f32"
            save_f32(os.path.join(out_dir, fn), hf_logits(model, ids))
            hf_files[kind].append(fn)

    cases = []
    for kind, outtype, also_kv_f32 in CASES:
        gguf_name = f"{kind}.{outtype}.gguf"
        gguf_path = os.path.join(out_dir, gguf_name)
        convert(args.llama_cpp_dir, hf_dirs[kind], outtype, gguf_path)
        runs = [("f16", False)] + ([("f32", True)] if also_kv_f32 else [])
        llama_runs = []
        for kv_name, kv_f32 in runs:
            outs, settings = llamacpp_logits(gguf_path, seqs, kv_f32)
            files, diffs = [], []
            for j, (ids, lg) in enumerate(zip(seqs, outs)):
                tag = f"{kind}.{outtype}" + (".kvf32" if kv_f32 else "")
                fn = f"llamacpp.{tag}.s{j}.logits.f32"
                save_f32(os.path.join(out_dir, fn), lg)
                files.append(fn)
                ref = np.fromfile(os.path.join(out_dir, hf_files[kind][j]), dtype="<f4")
                diffs.append(float(np.abs(lg.reshape(-1) - ref).max()))
            llama_runs.append({
                "kv_cache_type": kv_name,
                "settings": settings,
                "logits_files": files,
                "max_abs_diff_vs_transformers": diffs,
                "max_abs_diff_vs_transformers_all": max(diffs),
            })
            print(f"{gguf_name:24s} kv={kv_name}: max|llama.cpp - transformers| per seq = "
                  + ", ".join(f"{d:.3g}" for d in diffs), file=sys.stderr)
        cfg = cfgs[kind]
        cases.append({
            "name": f"{kind}.{outtype}",
            "gguf": gguf_name,
            "gguf_sha256": sha256_file(gguf_path),
            "gguf_bytes": os.path.getsize(gguf_path),
            "arch": "llama" if kind == "tiny-llama" else "qwen2",
            "hf_class": type(models[kind]).__name__,
            "outtype": outtype,
            "vocab_size": VOCAB,
            "hparams": {k: v for k, v in (LLAMA_CFG if kind == "tiny-llama" else QWEN2_CFG).items()},
            "head_dim": cfg.hidden_size // cfg.num_attention_heads,
            "sequences": [
                {"tokens": ids, "n_tokens": len(ids), "transformers_logits": hf_files[kind][j],
                 "shape": [len(ids), VOCAB]}
                for j, ids in enumerate(seqs)
            ],
            "llama_cpp": llama_runs,
            "max_abs_diff_llamacpp_vs_transformers": llama_runs[0]["max_abs_diff_vs_transformers_all"],
        })

    # tokenizer cross-check (HF tokenizer vs llama.cpp's tokenizer from the GGUF metadata)
    from llama_cpp_greedy import LlamaCppRunner
    r = LlamaCppRunner(os.path.join(out_dir, "tiny-llama.f32.gguf"), n_ctx=64, n_batch=64)
    tokenization = []
    for text in TOKENIZE_TEXTS:
        hf_ids = [int(t) for t in fast.encode(text, add_special_tokens=False)]
        lc_ids = r.tokenize(text, add_special=False, parse_special=True)
        tokenization.append({"text": text, "hf_ids": hf_ids, "llama_cpp_ids": lc_ids,
                             "agree": hf_ids == lc_ids})
        print(f"tokenize agree={hf_ids == lc_ids}: {text!r}", file=sys.stderr)
    r.close()

    # logits spread, to judge the diffs against
    spread = {k: float(np.std(np.fromfile(os.path.join(out_dir, v[0]), dtype="<f4")))
              for k, v in hf_files.items()}
    index = {
        "generator": "tests/gen/tiny_models.py",
        "versions": {
            "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__, "llama_cpp_python": llama_cpp.__version__,
        },
        "converter": "llama.cpp convert_hf_to_gguf.py from llama-cpp-python 0.3.36 sdist, "
                     "get_vocab_base_pre monkeypatched to return 'gpt-2'",
        "logits_format": "little-endian f32, row-major [n_tokens, vocab_size]; row i = logits "
                         "after token i",
        "transformers_settings": "float32, eager attention, no_grad, CPU, use_cache=False",
        "tokenizer": {"type": "byte-level BPE (GPT-2 regex)", "vocab_size": VOCAB,
                      "specials": {t: i for i, t in enumerate(SPECIALS)},
                      "seq0_text": SEQ0_TEXT, "seq0": "BOS(0) + encode(seq0_text)"},
        "tokenization": tokenization,
        "transformers_logit_std": spread,
        "cases": cases,
    }
    with open(os.path.join(out_dir, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
