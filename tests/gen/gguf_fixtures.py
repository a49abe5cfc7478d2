"""Writes GGUF fixtures with the `gguf` Python package (the reference writer) for sparrow's
reader tests, and a JSON description of what was written.

Makes tests/fixtures/gguf/all_types.gguf: one metadata key of every GGUF value type, arrays of
every element type (and nested arrays; the package refuses empty arrays,
so sparrow's own writer/reader round trip covers those), and one small tensor of every
ggml block type sparrow supports (random bytes for the quantized types, so the check is on
layout, offsets and sizes, not on values), plus all_types.json:
  {"metadata": {key: {"type": <gguf type name>, "value": ...}},
   "tensors": [{"name", "shape" (ggml order), "type", "n_bytes", "sha256"}]}

Run: python3 tests/gen/gguf_fixtures.py   (gguf 0.19.0, numpy)
"""
import hashlib
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "gguf")
os.makedirs(OUT, exist_ok=True)
path = os.path.join(OUT, "all_types.gguf")

w = gguf.GGUFWriter(path, arch="llama")
meta = {}


def put(key, vtype, value, sub_type=None):
    if vtype == V.ARRAY:
        w.add_key_value(key, value, vtype, sub_type=sub_type)
    else:
        w.add_key_value(key, value, vtype)
    meta[key] = {"type": vtype.name, "value": value}


put("test.u8", V.UINT8, 200)
put("test.i8", V.INT8, -100)
put("test.u16", V.UINT16, 60000)
put("test.i16", V.INT16, -30000)
put("test.u32", V.UINT32, 4000000000)
put("test.i32", V.INT32, -2000000000)
put("test.f32", V.FLOAT32, 0.15625)
put("test.bool_true", V.BOOL, True)
put("test.bool_false", V.BOOL, False)
put("test.string", V.STRING, "héllo wörld ✓ \n tabs\t")
put("test.empty_string", V.STRING, "")
put("test.u64", V.UINT64, 18000000000000000000)
put("test.i64", V.INT64, -9000000000000000000)
put("test.f64", V.FLOAT64, -2.5e-300)
put("test.arr_u8", V.ARRAY, [0, 1, 255], V.UINT8)
put("test.arr_i8", V.ARRAY, [-128, 0, 127], V.INT8)
put("test.arr_u16", V.ARRAY, [0, 65535], V.UINT16)
put("test.arr_i16", V.ARRAY, [-32768, 32767], V.INT16)
put("test.arr_u32", V.ARRAY, [1, 2, 3, 4294967295], V.UINT32)
put("test.arr_i32", V.ARRAY, [-1, 0, 1], V.INT32)
put("test.arr_f32", V.ARRAY, [0.5, -1.25, 3.0], V.FLOAT32)
put("test.arr_bool", V.ARRAY, [True, False, True], V.BOOL)
put("test.arr_str", V.ARRAY, ["a", "", "ü€😀"], V.STRING)
put("test.arr_u64", V.ARRAY, [0, 18446744073709551615], V.UINT64)
put("test.arr_i64", V.ARRAY, [-9223372036854775808, 9223372036854775807], V.INT64)
put("test.arr_f64", V.ARRAY, [1e300, -0.0], V.FLOAT64)
put("test.arr_nested", V.ARRAY, [[1, 2], [3]], V.ARRAY)

rng = np.random.default_rng(1234)
tensors = []
specs = [
    ("t.f32", Q.F32, (3, 8)),
    ("t.f16", Q.F16, (2, 16)),
    ("t.bf16", Q.BF16, (4, 4)),
    ("t.q8_0", Q.Q8_0, (2, 64)),
    ("t.q4_0", Q.Q4_0, (3, 32)),
    ("t.q4_1", Q.Q4_1, (1, 32)),
    ("t.q5_0", Q.Q5_0, (2, 32)),
    ("t.q5_1", Q.Q5_1, (2, 64)),
    ("t.q4_k", Q.Q4_K, (2, 256)),
    ("t.q5_k", Q.Q5_K, (1, 512)),
    ("t.q6_k", Q.Q6_K, (3, 256)),
    ("t.vec", Q.F32, (7,)),
    ("t.3d", Q.F32, (2, 3, 4)),
]
for name, qt, shape in specs:
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    n_bytes = int(np.prod(shape)) // bs * ts
    raw = rng.integers(0, 256, size=n_bytes, dtype=np.uint8)
    if qt in (Q.F32,):
        data = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, data)
        raw = data.tobytes()
    elif qt == Q.F16:
        data = rng.standard_normal(shape).astype(np.float16)
        w.add_tensor(name, data)
        raw = data.tobytes()
    else:
        # byte shape: (..., row bytes); the writer records the element shape.
        byte_shape = (*shape[:-1], shape[-1] // bs * ts)
        data = raw.reshape(byte_shape)
        w.add_tensor(name, data, raw_dtype=qt)
        raw = data.tobytes()
    tensors.append({
        "name": name,
        "shape": list(reversed(shape)),  # ggml order: row length first
        "type": qt.name,
        "n_bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    })

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

meta["general.architecture"] = {"type": "STRING", "value": "llama"}
with open(os.path.join(OUT, "all_types.json"), "w") as f:
    json.dump({"gguf_version": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0",
               "metadata": meta, "tensors": tensors}, f, indent=1)
print("wrote", path, os.path.getsize(path), "bytes")
