#!/usr/bin/env python3
"""PEFT adapters (LoRA / rsLoRA / rank+alpha patterns / DoRA / SHiRA) on tiny-llama, with
transformers logits, llama.cpp GGUF LoRA conversions + logits, and merged dense models.

Base model: tiny-llama of tests/gen/tiny_models.py (HF folder --base-dir, default
/tmp/tiny_hf/tiny-llama; its GGUFs are committed in tests/fixtures/tiny/). Step 0 proves the
HF folder is the one those GGUFs came from: it re-converts it to an f32 GGUF in a temp dir
(same converter + same monkeypatch as tiny_models.py) and requires the sha256 recorded for
tiny-llama.f32 in tests/fixtures/tiny/index.json; it also recomputes the transformers base
logits and requires them to equal the committed hf.tiny-llama.s<J>.logits.f32. If the folder
is missing it is rebuilt with tiny_models.py's build_tokenizer/build_model (seed 42) first.
Any mismatch aborts.

What it makes (in OUT_DIR, default tests/fixtures/adapters/):
    <adapter>/adapter_config.json, <adapter>/adapter_model.safetensors
        PEFT save_pretrained output (F32 tensors; PEFT's README.md model card is deleted;
        target_modules in adapter_config.json is re-written sorted because PEFT writes
        list(set), whose order depends on PYTHONHASHSEED -- nothing else is touched).
    hf.<adapter>.unmerged.s<J>.logits.f32
        transformers logits of PeftModel.from_pretrained(base, <adapter>) (adapter re-loaded
        from the saved folder, i.e. exactly what the files say), unmerged forward.
    hf.<adapter>.merged.s<J>.logits.f32
        same model after merge_and_unload().
    <adapter>.lora.f32.gguf
        llama.cpp's convert_lora_to_gguf.py --outtype f32 --base <base-dir> output (only where
        the converter accepts the adapter; refusals are recorded in index.json).
    llamacpp.<adapter>.f32.kvf32.s<J>.logits.f32
        llama-cpp-python on tests/fixtures/tiny/tiny-llama.f32.gguf + that GGUF LoRA
        (llama_adapter_lora_init + llama_set_adapters_lora, user scale 1.0), f32 KV cache.
    merged-lora_plain.f32.gguf, merged-shira.f32.gguf
        merge_and_unload() of lora_plain / shira saved as HF and converted with
        convert_hf_to_gguf.py --outtype f32 (same monkeypatch as tiny_models.py): dense
        "fine-tuned" models for "finetuned minus base" adapter extraction tests.
    index.json
        everything else: versions, base GGUF paths + sha256, token sequences, and per adapter
        the config facts, per-module effective r / alpha / scaling as PEFT computed them,
        safetensors keys, GGUF LoRA tensor list + metadata (or the converter's refusal),
        logits files and max-abs-diff numbers.
    Logits files: little-endian f32, row-major [n_tokens, vocab=512]; row i = logits after
    consuming tokens[0..=i]. Sequences: s0, s1 of tests/fixtures/tiny/index.json (tiny-llama).

Adapters (all on q/k/v/o/gate/up/down_proj unless said; bias "none"; dropout 0; weights are
NOT PEFT's init -- they are overwritten after get_peft_model with a torch.Generator seeded per
adapter, see fill_lora / fill_shira):
    lora_plain     LoRA r=8, lora_alpha=16
    lora_patterns  LoRA r=4, lora_alpha=8, rank_pattern {"q_proj": 8,
                   "model.layers.1.mlp.down_proj": 2}, alpha_pattern {"v_proj": 32,
                   "model.layers.0.self_attn.o_proj": 3}
    lora_rslora    LoRA r=8, lora_alpha=16, use_rslora=True (scaling alpha/sqrt(r))
    lora_dora      DoRA r=4 (lora_alpha default 8), use_dora=True; magnitude vector set to
                   ||W + s*B@A||_row * (1 + 0.05*N(0,1)) so that DoRA != plain LoRA
    lora_qv        LoRA r=4, lora_alpha=8, q_proj and v_proj only (partial target)
    shira          SHiRA (ShiraConfig) r=1, i.e. nnz = in+out per matrix (the smallest PEFT
                   allows: 2.3% of gate/up/down, 3.1% of q/o, 4.7% of k/v). The mask is
                   PEFT's random_mask recipe (randperm prefix) but seeded per module
                   (config.mask_fn replaced; seed = SHIRA_MASK_SEED + module index) so no two
                   modules share a mask; the indices are saved in the file, so loading does
                   not depend on the mask function.
    LoRA A ~ N(0, 1/in), B ~ N(0, 1) * C / (scaling * sqrt(r)); SHiRA values ~ N(0, 1) *
    C * sqrt(out / nnz). Hence ||delta W||_F ~= C * ||W||_F for every module whatever its
    scaling (a runtime that gets a scaling wrong by a factor k gets delta W wrong by k).
    C = DELTA_REL (0.05).

Checks the script makes (it aborts on failure): PEFT's per-module r / alpha / scaling are the
expected ones (rank_pattern / alpha_pattern / rslora resolved as documented in index.json
"peft_scaling"); an independent merge from the saved safetensors with those formulas gives
logits bit-identical to merge_and_unload(); every GGUF LoRA tensor equals its safetensors
lora_A / lora_B (lora_b of attn_q / attn_k row-permuted like the base q/k weights).
Determinism: two runs (different PYTHONHASHSEED) produced byte-identical output files,
index.json included; nothing in the output is known to be nondeterministic.

Converters (llama.cpp tree of llama-cpp-python 0.3.36): convert_lora_to_gguf.py is run
unpatched (it overrides set_vocab, so the tokenizer monkeypatch is not needed there);
convert_hf_to_gguf.py runs with tiny_models.py's get_vocab_base_pre -> "gpt-2" patch.

Transformers side: float32, attn_implementation="eager", torch.no_grad(), CPU,
use_cache=False, torch.set_num_threads(2). llama.cpp side: tests/gen/llama_cpp_greedy.py's
LlamaCppRunner (n_ctx 256, n_batch 256, n_threads 2, flash attention off, type_k = type_v =
f32), the whole sequence as one batch with logits for every position.

Regenerate (from the repository root)
    python3 tests/gen/adapter_fixtures.py \
        --llama-cpp-dir /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp \
        --base-dir /tmp/tiny_hf/tiny-llama --out-dir tests/fixtures/adapters
    (llama.cpp tree: see tests/gen/tiny_models.py "Inputs"; merged HF folders go to a temp
    dir and are not kept.)

Versions used: Python 3.11.7, torch 2.15.0 (default PyPI wheel, CPU), transformers 5.24.0,
peft 0.21.2, safetensors 0.8.0, numpy 2.4.6, llama-cpp-python 0.3.36 (GGML_NATIVE build; its
vendored llama.cpp converters + gguf-py).
"""

import argparse
import ctypes
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import tiny_models  # noqa: E402  (CONVERT_WRAPPER, build_tokenizer, build_model, ...)

VOCAB = 512
DELTA_REL = 0.05
SHIRA_MASK_SEED = 7000
DORA_MAG_NOISE = 0.05
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGML_TYPE_F32 = 0
TINY_DIR = os.path.join(REPO, "tests", "fixtures", "tiny")
BASE_GGUF = "tests/fixtures/tiny/tiny-llama.f32.gguf"

ADAPTERS = [
    dict(name="lora_plain", kind="lora", seed=101,
         cfg=dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR)),
    dict(name="lora_patterns", kind="lora", seed=102,
         cfg=dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                  rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                  alpha_pattern={"v_proj": 32, "model.layers.0.self_attn.o_proj": 3})),
    dict(name="lora_rslora", kind="lora", seed=103,
         cfg=dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR)),
    dict(name="lora_dora", kind="dora", seed=104,
         cfg=dict(r=4, use_dora=True, target_modules=ALL_LINEAR)),
    dict(name="lora_qv", kind="lora", seed=105,
         cfg=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    dict(name="shira", kind="shira", seed=106,
         cfg=dict(r=1, random_seed=SHIRA_MASK_SEED, target_modules=ALL_LINEAR)),
]
MERGED_GGUFS = ["lora_plain", "shira"]

LORA_CONVERT_WRAPPER = r"""
import sys, runpy
lcpp = sys.argv[1]
sys.path[:0] = [lcpp + "/gguf-py", lcpp]
sys.argv = [lcpp + "/convert_lora_to_gguf.py"] + sys.argv[2:]
runpy.run_path(lcpp + "/convert_lora_to_gguf.py", run_name="__main__")
"""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def save_f32(path, arr):
    np.ascontiguousarray(arr, dtype="<f4").tofile(path)


def load_f32(path, n_tokens):
    return np.fromfile(path, dtype="<f4").reshape(n_tokens, VOCAB)


def maxabs(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- base model
def load_base(base_dir):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                         attn_implementation="eager")
    return m.float().eval()


def hf_logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32).numpy().copy()


def ensure_base(base_dir):
    if os.path.isfile(os.path.join(base_dir, "model.safetensors")):
        return "present"
    log(f"{base_dir} missing: rebuilding tiny-llama with tiny_models.py (seed 42)")
    os.makedirs(base_dir, exist_ok=True)
    tiny_models.build_tokenizer(base_dir)
    tiny_models.build_model("tiny-llama", base_dir, 42)
    return "rebuilt with tiny_models.build_tokenizer/build_model(seed 42)"


def convert_hf(lcpp_dir, hf_dir, outfile):
    tiny_models.convert(lcpp_dir, hf_dir, "f32", outfile)


def verify_base(lcpp_dir, base_dir, tiny_index, seqs):
    case = next(c for c in tiny_index["cases"] if c["name"] == "tiny-llama.f32")
    want = case["gguf_sha256"]
    if sha256_file(os.path.join(TINY_DIR, case["gguf"])) != want:
        raise SystemExit("committed tests/fixtures/tiny/tiny-llama.f32.gguf does not match "
                         "its own index.json sha256")
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "tiny-llama.f32.gguf")
        convert_hf(lcpp_dir, base_dir, out)
        got = sha256_file(out)
    if got != want:
        raise SystemExit(f"BASE MISMATCH: {base_dir} converts to sha256 {got}, but "
                         f"tests/fixtures/tiny/index.json says tiny-llama.f32 is {want}")
    base = load_base(base_dir)
    diffs = []
    for j, ids in enumerate(seqs):
        ref = load_f32(os.path.join(TINY_DIR, case["sequences"][j]["transformers_logits"]),
                       len(ids))
        diffs.append(maxabs(hf_logits(base, ids), ref))
    if max(diffs) > 1e-5:
        raise SystemExit(f"BASE MISMATCH: transformers logits differ from committed ones: {diffs}")
    log(f"base verified: reconverted f32 GGUF sha256 {got}; |hf - committed hf| = {diffs}")
    return {"reconverted_f32_gguf_sha256": got, "expected_sha256": want, "match": True,
            "max_abs_diff_vs_committed_hf_logits": diffs}


# ----------------------------------------------------------------------------- adapters
def make_config(spec):
    from peft import LoraConfig, ShiraConfig

    cfg = dict(spec["cfg"])
    if spec["kind"] == "shira":
        return ShiraConfig(task_type="CAUSAL_LM", **cfg)
    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **cfg)


def lora_modules(peft_model):
    from peft.tuners.lora import LoraLayer
    from peft.tuners.shira import ShiraLayer

    out = []
    for name, mod in peft_model.named_modules():
        if isinstance(mod, (LoraLayer, ShiraLayer)) and "default" in getattr(mod, "r", {}):
            out.append((name.replace("base_model.model.", "", 1), mod))
    return out


def fill_lora(peft_model, seed, dora):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(peft_model):
            r, s = m.r["default"], m.scaling["default"]
            a = m.lora_A["default"].weight
            b = m.lora_B["default"].weight
            fin, fout = a.shape[1], b.shape[0]
            a.copy_(torch.randn(a.shape, generator=g) / math.sqrt(fin))
            b.copy_(torch.randn(b.shape, generator=g) * DELTA_REL / (s * math.sqrt(r)))
            if dora:
                w = m.get_base_layer().weight
                norm = torch.linalg.norm(w + s * (b @ a), dim=1)
                mag = m.lora_magnitude_vector["default"].weight
                assert mag.shape == (fout,), mag.shape
                mag.copy_(norm * (1.0 + DORA_MAG_NOISE * torch.randn(fout, generator=g)))


def shira_mask_fn(name_of):
    """PEFT's random_mask recipe, but with a per-module seed (SHIRA_MASK_SEED + index)."""
    def mask_fn(base_layer, r, random_seed=None, **kwargs):
        idx_mod = name_of[id(base_layer)]
        out_f, in_f = base_layer.weight.shape
        n = r * (in_f + out_f)
        gen = torch.Generator().manual_seed(SHIRA_MASK_SEED + idx_mod)
        idx = torch.randperm(out_f * in_f, generator=gen)[:n]
        mask = torch.zeros(out_f * in_f, dtype=base_layer.weight.dtype)
        mask[idx] = 1
        return mask.view(out_f, in_f).to(base_layer.weight.device)
    return mask_fn


def fill_shira(peft_model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(peft_model):
            w = m.shira_weight["default"]
            nnz = w.shape[0]
            fout = m.out_features
            w.copy_(torch.randn(nnz, generator=g) * DELTA_REL * math.sqrt(fout / nnz))


def module_facts(peft_model, kind):
    facts = {}
    for name, m in lora_modules(peft_model):
        if kind == "shira":
            nnz = int(m.shira_weight["default"].shape[0])
            idx = m.shira_indices["default"]
            facts[name] = {"r": int(m.r["default"]), "nnz": nnz,
                           "shape_out_in": [m.out_features, m.in_features],
                           "density": nnz / (m.out_features * m.in_features),
                           "scaling": float(m.scaling["default"]),
                           "indices_dtype": str(idx.dtype).replace("torch.", ""),
                           "indices_row_major_sorted": bool(
                               np.all(np.diff(idx[0].numpy() * m.in_features + idx[1].numpy()) > 0))}
        else:
            facts[name] = {"r": int(m.r["default"]), "alpha": m.lora_alpha["default"],
                           "scaling": float(m.scaling["default"]),
                           "use_rslora": bool(m.use_rslora["default"]),
                           "use_dora": bool(m.use_dora["default"]),
                           "shape_out_in": [m.out_features, m.in_features]}
    return facts


def safetensors_listing(path):
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_slice(k)
            out[k] = {"dtype": t.get_dtype(), "shape": list(t.get_shape())}
    return out


def build_adapter(spec, base_dir, out_dir):
    from peft import get_peft_model

    base = load_base(base_dir)
    cfg = make_config(spec)
    if spec["kind"] == "shira":
        targets = [n for n, _ in base.named_modules() if n.split(".")[-1] in ALL_LINEAR]
        # id of the nn.Linear -> its index in model order (modules are not replaced yet)
        name_of = {id(base.get_submodule(n)): i for i, n in enumerate(targets)}
        cfg.mask_fn = shira_mask_fn(name_of)
    pm = get_peft_model(base, cfg)
    pm.eval()
    if spec["kind"] == "shira":
        fill_shira(pm, spec["seed"])
    else:
        fill_lora(pm, spec["seed"], dora=spec["kind"] == "dora")
    folder = os.path.join(out_dir, spec["name"])
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    pm.save_pretrained(folder, safe_serialization=True)
    readme = os.path.join(folder, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    cpath = os.path.join(folder, "adapter_config.json")
    with open(cpath) as f:
        conf = json.load(f)
    if isinstance(conf.get("target_modules"), list):
        conf["target_modules"] = sorted(conf["target_modules"])
    with open(cpath, "w") as f:
        f.write(json.dumps(conf, indent=2, sort_keys=True))
    return folder


def manual_merge_logits(base_dir, folder, facts, kind, seqs, ignore_dora=False):
    """Independent re-implementation of the merge from the saved files + documented formulas
    (LoRA W += s*B@A; DoRA W = m/||W+s*B@A||_row * (W+s*B@A); SHiRA W[row,col] += w)."""
    from safetensors.torch import load_file

    st = load_file(os.path.join(folder, "adapter_model.safetensors"))
    model = load_base(base_dir)
    with torch.no_grad():
        for mod, f in facts.items():
            pre = f"base_model.model.{mod}."
            w = model.get_submodule(mod).weight
            if kind == "shira":
                idx = st[pre + "shira_indices"].long()
                w[idx[0], idx[1]] += st[pre + "shira_weight"] * f["scaling"]
                continue
            new = w + f["scaling"] * (st[pre + "lora_B.weight"] @ st[pre + "lora_A.weight"])
            if kind == "dora" and not ignore_dora:
                mag = st[pre + "lora_magnitude_vector"]
                new = (mag / torch.linalg.norm(new, dim=1)).view(-1, 1) * new
            w.copy_(new)
    return [hf_logits(model, ids) for ids in seqs]


def reload_adapter(base_dir, folder):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_base(base_dir), folder)
    return pm.eval()


def check_patterns(spec, facts):
    """Assert that PEFT resolved rank/alpha patterns and scalings as expected."""
    c = spec["cfg"]
    for name, f in facts.items():
        short = name.split(".")[-1]
        if spec["name"] == "lora_patterns":
            r = 8 if short == "q_proj" else 2 if name == "model.layers.1.mlp.down_proj" else 4
            a = 32 if short == "v_proj" else 3 if name == "model.layers.0.self_attn.o_proj" else 8
        elif spec["kind"] == "shira":
            assert f["nnz"] == c["r"] * sum(f["shape_out_in"]) and f["scaling"] == 1.0, f
            continue
        else:
            r, a = c["r"], c.get("lora_alpha", 8)
        s = a / math.sqrt(r) if c.get("use_rslora") else a / r
        assert (f["r"], f["alpha"]) == (r, a), (name, f, r, a)
        assert abs(f["scaling"] - s) < 1e-12, (name, f, s)


# ----------------------------------------------------------------------------- llama.cpp
def convert_lora(lcpp_dir, folder, base_dir, outfile):
    cmd = [sys.executable, "-c", LORA_CONVERT_WRAPPER, lcpp_dir, "--outtype", "f32",
           "--base", base_dir, "--outfile", outfile, folder]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        if os.path.exists(outfile):
            os.remove(outfile)
        lines = [ln for ln in (res.stdout + res.stderr).splitlines()
                 if "ERROR" in ln or "Error" in ln or "error" in ln]
        info = {"returncode": res.returncode, "messages": lines[-6:]}
        if "KeyError: 'lora_alpha'" in res.stderr:
            # The converter reads lora_alpha before looking at any tensor. Probe what it
            # would do next with a copy whose adapter_config.json has lora_alpha added.
            with tempfile.TemporaryDirectory() as td:
                probe = os.path.join(td, os.path.basename(folder))
                shutil.copytree(folder, probe)
                cp = os.path.join(probe, "adapter_config.json")
                with open(cp) as f:
                    conf = json.load(f)
                conf["lora_alpha"] = 1.0
                with open(cp, "w") as f:
                    json.dump(conf, f)
                pout = os.path.join(td, "probe.gguf")
                cmd2 = cmd[:-3] + ["--outfile", pout, probe]
                r2 = subprocess.run(cmd2, capture_output=True, text=True)
                l2 = [ln for ln in (r2.stdout + r2.stderr).splitlines()
                      if "ERROR" in ln or "Error" in ln or "error" in ln]
                info["probe_with_lora_alpha_added"] = {
                    "returncode": r2.returncode, "messages": l2[-6:],
                    "wrote_gguf": os.path.exists(pout)}
        return False, info
    return True, None


def gguf_listing(lcpp_dir, path):
    sys.path.insert(0, os.path.join(lcpp_dir, "gguf-py"))
    from gguf import GGUFReader

    rd = GGUFReader(path)
    meta = {}
    for k, fld in rd.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            v = fld.contents()
        except Exception:  # noqa: BLE001
            v = None
        if isinstance(v, float):
            v = float(np.float32(v))
        meta[k] = {"type": fld.types[0].name if fld.types else None, "value": v}
    tensors = [{"name": t.name, "ne": [int(x) for x in t.shape], "ggml_type": t.tensor_type.name}
               for t in rd.tensors]
    return meta, tensors


GGUF_NAME = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute (q/k rows reordered for llama.cpp's RoPE)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def check_gguf_vs_safetensors(lcpp_dir, gguf_path, st_path, n_head=4, n_head_kv=2):
    """Each GGUF lora_a must equal lora_A; lora_b must equal lora_B, row-permuted for q/k."""
    sys.path.insert(0, os.path.join(lcpp_dir, "gguf-py"))
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    st = load_file(st_path)
    gg = {t.name: np.asarray(t.data) for t in GGUFReader(gguf_path).tensors}
    checked = 0
    for k, v in st.items():
        if not k.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        parts = k.split(".")  # base_model.model.model.layers.<L>.<blk>.<proj>.lora_X.weight
        layer, sub = int(parts[4]), parts[5] + "." + parts[6]
        ab = "lora_a" if parts[7] == "lora_A" else "lora_b"
        g = gg[f"blk.{layer}.{GGUF_NAME[sub]}.weight.{ab}"]
        want = v
        if ab == "lora_b" and sub == "self_attn.q_proj":
            want = llama_permute(v, n_head)
        elif ab == "lora_b" and sub == "self_attn.k_proj":
            want = llama_permute(v, n_head_kv)
        if g.shape != want.shape or not np.array_equal(g, want):
            raise SystemExit(f"GGUF tensor for {k} is not the expected (permuted) copy")
        checked += 1
    assert checked == len(gg), (checked, len(gg))
    return checked


def llamacpp_logits(gguf_path, seqs, lora_path=None):
    import llama_cpp as lc
    from llama_cpp_greedy import LlamaCppRunner

    r = LlamaCppRunner(gguf_path, n_ctx=256, n_batch=256, n_threads=2,
                       type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    assert r.n_vocab == VOCAB, r.n_vocab
    settings = dict(r.settings)
    if lora_path is not None:
        ad = lc.llama_adapter_lora_init(r.model, lora_path.encode())
        if not ad:
            r.close()
            raise RuntimeError(f"llama.cpp refused LoRA {lora_path}")
        arr = (lc.llama_adapter_lora_p_ctypes * 1)(ad)
        scales = (ctypes.c_float * 1)(1.0)
        rc = lc.llama_set_adapters_lora(r.ctx, arr, 1, scales)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora returned {rc}")
        settings["lora_user_scale"] = 1.0
    outs = []
    for ids in seqs:
        r.reset()
        outs.append(r.decode(ids, all_logits=True))
    r.close()
    return outs, settings


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp-dir", required=True)
    ap.add_argument("--base-dir", default="/tmp/tiny_hf/tiny-llama")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "tests", "fixtures", "adapters"))
    args = ap.parse_args()
    out_dir = os.path.abspath(args.out_dir)
    base_dir = os.path.abspath(args.base_dir)
    lcpp = os.path.abspath(args.llama_cpp_dir)
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(2)
    torch.manual_seed(0)

    import llama_cpp
    import peft
    import safetensors
    import transformers

    with open(os.path.join(TINY_DIR, "index.json")) as f:
        tiny_index = json.load(f)
    llama_case = next(c for c in tiny_index["cases"] if c["name"] == "tiny-llama.f32")
    seqs = [llama_case["sequences"][j]["tokens"] for j in (0, 1)]
    base_hf_files = [llama_case["sequences"][j]["transformers_logits"] for j in (0, 1)]
    base_hf = [load_f32(os.path.join(TINY_DIR, fn), len(s)) for fn, s in zip(base_hf_files, seqs)]

    base_state = ensure_base(base_dir)
    verification = verify_base(lcpp, base_dir, tiny_index, seqs)
    verification["base_dir_state"] = base_state

    # llama.cpp base run must reproduce the committed kvf32 logits (same build / settings)
    base_lc, _ = llamacpp_logits(os.path.join(REPO, BASE_GGUF), seqs)
    kv_run = next(r for r in llama_case["llama_cpp"] if r["kv_cache_type"] == "f32")
    verification["llamacpp_base_vs_committed_kvf32"] = [
        maxabs(lg, load_f32(os.path.join(TINY_DIR, kv_run["logits_files"][j]), len(seqs[j])))
        for j, lg in enumerate(base_lc)]
    log(f"llama.cpp base vs committed kvf32: {verification['llamacpp_base_vs_committed_kvf32']}")

    merged_tmp = tempfile.mkdtemp(prefix="adapter_merged_")
    entries = []
    for spec in ADAPTERS:
        name, kind = spec["name"], spec["kind"]
        log(f"=== {name}")
        folder = build_adapter(spec, base_dir, out_dir)
        pm = reload_adapter(base_dir, folder)
        facts = module_facts(pm, kind)
        check_patterns(spec, facts)
        with open(os.path.join(folder, "adapter_config.json")) as f:
            saved_cfg = json.load(f)
        st_list = safetensors_listing(os.path.join(folder, "adapter_model.safetensors"))
        bad = [k for k, v in st_list.items()
               if v["dtype"] not in ("F32", "I32")]
        assert not bad, bad

        unmerged = [hf_logits(pm, ids) for ids in seqs]
        merged_model = pm.merge_and_unload()
        merged_model.eval()
        merged = [hf_logits(merged_model, ids) for ids in seqs]
        files = {"merged": [], "unmerged": []}
        for j in range(len(seqs)):
            for tag, arr in (("merged", merged[j]), ("unmerged", unmerged[j])):
                fn = f"hf.{name}.{tag}.s{j}.logits.f32"
                save_f32(os.path.join(out_dir, fn), arr)
                files[tag].append(fn)
        d_mu = [maxabs(merged[j], unmerged[j]) for j in range(len(seqs))]
        d_mb = [maxabs(merged[j], base_hf[j]) for j in range(len(seqs))]
        log(f"{name}: max|merged-unmerged| {d_mu}  max|merged-base| {d_mb}")
        man = manual_merge_logits(base_dir, folder, facts, kind, seqs)
        d_man = [maxabs(man[j], merged[j]) for j in range(len(seqs))]
        assert max(d_man) < 1e-3, d_man
        d_nodora = None
        if kind == "dora":
            nd = manual_merge_logits(base_dir, folder, facts, kind, seqs, ignore_dora=True)
            d_nodora = [maxabs(nd[j], merged[j]) for j in range(len(seqs))]
        log(f"{name}: max|manual formula merge - peft merged| {d_man}; "
            f"dora-ignored-as-plain-lora vs merged {d_nodora}")

        if name in MERGED_GGUFS:
            mdir = os.path.join(merged_tmp, name)
            merged_model.save_pretrained(mdir, safe_serialization=True)
            for fn in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(base_dir, fn), os.path.join(mdir, fn))
            gname = f"merged-{name}.f32.gguf"
            convert_hf(lcpp, mdir, os.path.join(out_dir, gname))
            mlc, _ = llamacpp_logits(os.path.join(out_dir, gname), seqs)
            merged_gguf = {
                "file": gname, "sha256": sha256_file(os.path.join(out_dir, gname)),
                "bytes": os.path.getsize(os.path.join(out_dir, gname)),
                "made_by": "merge_and_unload() -> save_pretrained -> convert_hf_to_gguf.py "
                           "--outtype f32 (get_vocab_base_pre -> 'gpt-2' patch)",
                "llamacpp_kvf32_max_abs_diff_vs_hf_merged": [
                    maxabs(mlc[j], merged[j]) for j in range(len(seqs))],
            }
            log(f"{gname}: llama.cpp vs hf merged {merged_gguf['llamacpp_kvf32_max_abs_diff_vs_hf_merged']}")
        else:
            merged_gguf = None

        # GGUF LoRA
        gguf_name = f"{name}.lora.f32.gguf"
        gpath = os.path.join(out_dir, gguf_name)
        ok, refusal = convert_lora(lcpp, folder, base_dir, gpath)
        gguf_info = None
        lc_block = None
        if ok:
            meta, tensors = gguf_listing(lcpp, gpath)
            n_checked = check_gguf_vs_safetensors(
                lcpp, gpath, os.path.join(folder, "adapter_model.safetensors"))
            gguf_info = {"file": gguf_name, "sha256": sha256_file(gpath),
                         "bytes": os.path.getsize(gpath), "metadata": meta,
                         "tensors": tensors,
                         "tensor_layout": "GGUF ne order: lora_a ne=[in, r] (= safetensors "
                                          "lora_A [r, in]), lora_b ne=[r, out] (= lora_B "
                                          "[out, r]); values copied bit-exactly except that "
                                          "attn_q / attn_k lora_b rows are permuted like the "
                                          "base q/k weights (convert_hf_to_gguf LlamaModel."
                                          "permute, n_head 4 / n_head_kv 2); no scale baked in",
                         "tensors_checked_against_safetensors": n_checked}
            outs, settings = llamacpp_logits(os.path.join(REPO, BASE_GGUF), seqs, gpath)
            lfiles, dm, db = [], [], []
            for j, lg in enumerate(outs):
                fn = f"llamacpp.{name}.f32.kvf32.s{j}.logits.f32"
                save_f32(os.path.join(out_dir, fn), lg)
                lfiles.append(fn)
                dm.append(maxabs(lg, merged[j]))
                db.append(maxabs(lg, base_lc[j]))
            lc_block = {"base_gguf": BASE_GGUF, "lora_gguf": gguf_name, "settings": settings,
                        "logits_files": lfiles,
                        "max_abs_diff_vs_hf_merged": dm,
                        "max_abs_diff_vs_llamacpp_base": db}
            log(f"{name}: llama.cpp+lora vs hf merged {dm}")
        else:
            log(f"{name}: convert_lora_to_gguf.py refused: {refusal}")

        c = spec["cfg"]
        entry = {
            "name": name,
            "kind": kind,
            "peft_folder": name,
            "peft_type": saved_cfg.get("peft_type"),
            "seed": spec["seed"],
            "config": {
                "r": c["r"],
                "lora_alpha": saved_cfg.get("lora_alpha"),
                "rank_pattern": saved_cfg.get("rank_pattern"),
                "alpha_pattern": saved_cfg.get("alpha_pattern"),
                "use_rslora": saved_cfg.get("use_rslora"),
                "use_dora": saved_cfg.get("use_dora"),
                "bias": saved_cfg.get("bias"),
                "target_modules": saved_cfg.get("target_modules"),
                "random_seed": saved_cfg.get("random_seed"),
            },
            "modules": facts,
            "safetensors": st_list,
            "hf_logits": files,
            "max_abs_diff_merged_vs_unmerged": d_mu,
            "max_abs_diff_merged_vs_base": d_mb,
            "max_abs_diff_manual_formula_merge_vs_merged": d_man,
            "gguf_lora": gguf_info,
            "gguf_lora_refused": refusal,
            "llama_cpp": lc_block,
            "merged_gguf": merged_gguf,
        }
        if kind == "dora":
            entry["max_abs_diff_plain_lora_ignoring_magnitude_vs_merged"] = d_nodora
        if kind == "shira":
            entry["config"]["shira_nnz"] = {k: v["nnz"] for k, v in facts.items()}
            entry["config"]["mask"] = (f"PEFT random_mask recipe with per-module seed "
                                       f"{SHIRA_MASK_SEED}+module index (config.mask_fn replaced); "
                                       f"indices stored in the file")
        entries.append(entry)
    shutil.rmtree(merged_tmp)

    notes = gguf_notes(entries)
    for e in entries:
        e["gguf_lora_equivalent_to_peft"] = notes[e["name"]]["equivalent"]
        e["gguf_lora_note"] = notes[e["name"]]["note"]

    index = {
        "generator": "tests/gen/adapter_fixtures.py",
        "versions": {
            "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__,
            "llama_cpp_python": llama_cpp.__version__,
        },
        "converters": {
            "lora": "llama.cpp convert_lora_to_gguf.py (llama-cpp-python 0.3.36 sdist), "
                    "--outtype f32 --base <tiny-llama HF dir>, unpatched",
            "hf": "llama.cpp convert_hf_to_gguf.py, get_vocab_base_pre monkeypatched to "
                  "return 'gpt-2' (as tests/gen/tiny_models.py)",
        },
        "logits_format": "little-endian f32, row-major [n_tokens, vocab_size=512]; row i = "
                         "logits after token i",
        "transformers_settings": "float32, eager attention, no_grad, CPU, use_cache=False",
        "llama_cpp_settings": "LlamaCppRunner n_ctx 256, n_batch 256, n_threads 2, flash "
                              "attention off, type_k = type_v = f32 (0), one batch, lora "
                              "via llama_adapter_lora_init + llama_set_adapters_lora scale 1.0",
        "weight_init": f"LoRA A ~ N(0,1/in), B ~ N(0,1)*{DELTA_REL}/(scaling*sqrt(r)); "
                       f"DoRA magnitude = ||W + s*B@A||_row * (1 + {DORA_MAG_NOISE}*N(0,1)); SHiRA values "
                       f"~ N(0,1)*{DELTA_REL}*sqrt(out/nnz); torch.Generator seeded with "
                       "the adapter's seed, modules in named_modules() order",
        "base": {
            "hf_dir": "/tmp/tiny_hf/tiny-llama (tests/gen/tiny_models.py, not committed)",
            "gguf": {k: {"path": f"tests/fixtures/tiny/tiny-llama.{k}.gguf",
                         "sha256": next(c["gguf_sha256"] for c in tiny_index["cases"]
                                        if c["name"] == f"tiny-llama.{k}")}
                     for k in ("f32", "f16", "q8_0")},
            "hf_logits": [f"tests/fixtures/tiny/{fn}" for fn in base_hf_files],
            "verification": verification,
        },
        "sequences": [{"name": f"s{j}", "tokens": s, "n_tokens": len(s),
                       "shape": [len(s), VOCAB]} for j, s in enumerate(seqs)],
        "peft_scaling": "LoRA: scaling = alpha/r (use_rslora: alpha/sqrt(r)) with r = "
                        "rank_pattern[first key K in dict order whose regex "
                        "'(.*\\.)?(K)$' fully matches the module name, e.g. "
                        "'model.layers.0.self_attn.q_proj'] else r, alpha likewise from "
                        "alpha_pattern else lora_alpha; merged W' = W + scaling*B@A. DoRA: "
                        "W' = (m / ||W + scaling*B@A||_row) * (W + scaling*B@A), norm per "
                        "output row over the input dim. SHiRA: W' = W + scaling * "
                        "sparse(indices[0]=row, indices[1]=col, shira_weight), scaling fixed "
                        "at 1.0 (not stored in the adapter; only set_scale changes it).",
        "llama_cpp_lora_scaling": "per tensor: scale = user_scale * adapter.lora.alpha / rank, "
                                  "rank = ne[0] of lora_b (i.e. the tensor's own rank); "
                                  "alpha == 0 -> scale = user_scale. One alpha per file.",
        "adapters": entries,
    }
    with open(os.path.join(out_dir, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, ensure_ascii=False, indent=1)
        f.write("\n")
    log("done")


def gguf_notes(entries):
    notes = {}
    for e in entries:
        c = e["config"]
        if e["gguf_lora"] is None:
            notes[e["name"]] = {"equivalent": None,
                                "note": "convert_lora_to_gguf.py refused this adapter (see "
                                        "gguf_lora_refused); no GGUF LoRA written"}
            continue
        problems = []
        alpha = e["gguf_lora"]["metadata"]["adapter.lora.alpha"]["value"]
        for mod, f in e["modules"].items():
            ll_scale = alpha / f["r"]
            if abs(ll_scale - f["scaling"]) > 1e-6 * max(1.0, f["scaling"]):
                problems.append(f"{mod}: PEFT scaling {f['scaling']:.6g}, llama.cpp "
                                f"alpha/rank = {alpha:g}/{f['r']} = {ll_scale:.6g}")
        if not problems:
            note = ("equivalent: the converter writes only the global lora_alpha; every "
                    "module's PEFT scaling equals alpha/rank(tensor)")
            if c.get("rank_pattern"):
                note += " (rank_pattern needs nothing: ranks come from tensor shapes)"
            notes[e["name"]] = {"equivalent": True, "note": note}
        else:
            why = []
            if c.get("use_rslora"):
                why.append("use_rslora is ignored by convert_lora_to_gguf.py (llama.cpp uses "
                           "alpha/r, PEFT alpha/sqrt(r))")
            if c.get("alpha_pattern"):
                why.append("alpha_pattern is ignored by convert_lora_to_gguf.py (only the "
                           "global lora_alpha is written to adapter.lora.alpha)")
            notes[e["name"]] = {
                "equivalent": False,
                "note": "NOT equivalent to the PEFT adapter: " + "; ".join(why)
                        + ". Modules whose scale differs: " + "; ".join(problems)}
    return notes


if __name__ == "__main__":
    main()
