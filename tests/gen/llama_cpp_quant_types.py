"""Records which type llama.cpp's quantizer gives each tensor of SmolLM2-135M-Instruct for
each file type sparrow's `quantize` offers, so that a test can check sparrow's per-tensor
choices (convert.rs, TypePlan) against llama.cpp's `llama_tensor_get_type`.

Run: python3 tests/gen/llama_cpp_quant_types.py SmolLM2-135M-Instruct.Q4_1.gguf
Writes tests/fixtures/quantize/llama_cpp_types.json: {ftype: {tensor name: ggml type name}}.
Uses llama-cpp-python 0.3.36 (llama_model_quantize with allow_requantize) and gguf.
"""
import json
import os
import sys
import tempfile

import gguf
import llama_cpp as lc

FTYPES = {
    "Q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": lc.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": lc.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q5_0": lc.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q5_1": lc.LLAMA_FTYPE_MOSTLY_Q5_1,
    "Q4_K_S": lc.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q4_K_M": lc.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_S": lc.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "Q5_K_M": lc.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": lc.LLAMA_FTYPE_MOSTLY_Q6_K,
    "F16": lc.LLAMA_FTYPE_MOSTLY_F16,
}

src = sys.argv[1]
out = {}
with tempfile.TemporaryDirectory() as d:
    for name, ft in FTYPES.items():
        dst = os.path.join(d, name + ".gguf")
        p = lc.llama_model_quantize_default_params()
        p.ftype = ft
        p.allow_requantize = True
        p.nthread = 2
        rc = lc.llama_model_quantize(src.encode(), dst.encode(), p)
        assert rc == 0, f"quantize {name} failed: {rc}"
        r = gguf.GGUFReader(dst)
        out[name] = {t.name: t.tensor_type.name for t in r.tensors}
        print(name, sorted(set(out[name].values())))
path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "quantize", "llama_cpp_types.json")
with open(path, "w") as f:
    json.dump({"source": os.path.basename(src), "llama_cpp_python": lc.__version__, "types": out}, f, indent=0)
