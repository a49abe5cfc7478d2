"""Writes reference fixtures for sparrow's block formats (runtime/src/quant) from code nobody
here wrote: ggml itself (the libggml*.so shipped in llama-cpp-python 0.3.36, called through
ctypes) for quantized bytes and dot products, and the `gguf` Python package's numpy
dequantizers for float output.

What it makes, in tests/fixtures/quant/ (all little-endian, raw, no headers):
  weights.f32             ROWS x N float32 inputs (N = 512: two K-quant super-blocks, sixteen
                          32-blocks), rows chosen for edge cases (see ROWS below)
  acts.f32                ACT_ROWS x N float32 activation inputs
  <T>.w.bin               ggml's quantization of weights.f32 to type T, for the 11 weight
                          types and the activation formats Q8_1 and Q8_K
  <T>.w.deq.f32           dequantization of <T>.w.bin (source named in index.json)
  <A>.a.bin, <A>.a.deq.f32  the same for acts.f32 and each activation type A
                          (F32, F16, BF16, Q8_0, Q8_1, Q8_K)
  index.json              shapes, row names, files, sources, tool versions, and for every
                          weight type ggml's vec_dot of each weight row with each activation
                          row (as f32 bit patterns, "0x..." strings, so JSON keeps them exact);
                          under "bulk", SHA-256 digests of ggml's quantization (and of the
                          reference dequantization) of BULK_ROWS x BULK_N values that the Rust
                          test regenerates bit for bit (bulk_input below: splitmix64 and exact
                          float32 operations only). Too large to commit as bytes, this catches
                          the rare rounding decisions that a different float operation order in
                          the K-quant scale searches flips, which a few rows do not.

Sources:
  quantize    ggml_quantize_chunk(type, src, dst, 0, nrows, N, imatrix=NULL), which with no
              importance matrix runs ggml's quantize_row_*_ref; Q8_1 and Q8_K are activation
              formats that ggml_quantize_chunk refuses, so they come from the exported
              quantize_row_q8_1_ref / quantize_row_q8_K_ref. Output buffers are zeroed first
              (quantize_row_q8_K_ref leaves bsums untouched for an all-zero block).
  dequantize  gguf.quants.dequantize for every type it knows; gguf-py has no Q8_1 or Q8_K:
              Q8_K uses ggml's exported dequantize_row_q8_K, Q8_1 (which has no to_float in
              ggml either) d * q computed here in numpy float32. For every type that has a
              ggml to_float, the generator also checks that it agrees bit for bit with the
              dequantization stored, and records the result.
  vec_dot     libggml-cpu's ggml_vec_dot_<w>_<a> as dispatched on this machine (what
              llama.cpp runs; SIMD on x86-64), None for Q8_1 and Q8_K (ggml has none). Not
              the exported ggml_vec_dot_*_generic symbols: in the libggml-cpu.so of
              llama-cpp-python 0.3.36, ggml_vec_dot_q5_0_q8_0_generic returns wrong sums for
              levels below 16 (the (int8_t) cast is lost; the vendored C source is right, and
              GCC 12.2 at -O3 -march=native reproduces the fault, -O3 alone does not).

Run (from anywhere; takes a second):
    python3 tests/gen/quant_fixtures.py
Needs numpy, gguf (0.19.x) and llama-cpp-python 0.3.36 installed (only its shared libraries
are used). Set GGML_LIB_DIR to use another directory holding libggml-base.so / libggml-cpu.so.
The output is deterministic (fixed seeds); rerunning must leave git clean.
"""
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "quant")
N = 512

WEIGHT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
ACT_FORMATS = ["Q8_1", "Q8_K"]
ACT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q8_1", "Q8_K"]
VEC_DOT_TYPE = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q8_0": "Q8_0", "Q4_0": "Q8_0", "Q5_0": "Q8_0",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1", "Q8_1": "Q8_1",
    "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "Q8_K": "Q8_K",
}
GGML_DOT = {
    "F32": "ggml_vec_dot_f32", "F16": "ggml_vec_dot_f16", "BF16": "ggml_vec_dot_bf16",
    "Q8_0": "ggml_vec_dot_q8_0_q8_0",
    "Q4_0": "ggml_vec_dot_q4_0_q8_0", "Q5_0": "ggml_vec_dot_q5_0_q8_0",
    "Q4_1": "ggml_vec_dot_q4_1_q8_1", "Q5_1": "ggml_vec_dot_q5_1_q8_1",
    "Q4_K": "ggml_vec_dot_q4_K_q8_K", "Q5_K": "ggml_vec_dot_q5_K_q8_K",
    "Q6_K": "ggml_vec_dot_q6_K_q8_K",
}


def weight_rows():
    """Named rows of N floats, each aimed at a path of the quantizers."""
    rng = np.random.RandomState(20240601)
    rows = {}
    rows["gaussian"] = rng.standard_normal(N)
    rows["uniform_small"] = rng.uniform(-0.02, 0.02, N)  # typical trained-weight magnitudes
    r = rng.standard_normal(N)
    r[rng.choice(N, 8, replace=False)] *= 40.0
    rows["outliers"] = r
    # First super-block all zero (zero scales; Q8_K's early exit); the second sparse, with
    # whole 16/32-wide sub-blocks zero next to non-zero ones (K-quant sub-block scale 0).
    r = np.zeros(N)
    sparse = rng.standard_normal(256) * (rng.uniform(size=256) < 0.15)
    sparse[64:96] = 0.0
    r[256:] = sparse
    rows["zero_then_sparse"] = r
    # 1e-7: f16 scales in the subnormal range; 1e-20: below f16 and below GROUP_MAX_EPS.
    rows["tiny"] = np.concatenate([rng.standard_normal(256) * 1e-7, rng.standard_normal(256) * 1e-20])
    # Constant blocks: max == min (Q4_1/Q5_1 d = 0, make_qkx2_quants early exit).
    rows["constant"] = np.concatenate([np.full(256, 0.37), np.full(256, -1.25)])
    # Rounding ties: each 32-block starts with -127, so Q8_0/Q8_1 (d = 1) and Q8_K (iscale = 1)
    # see exact halves (roundf rounds them away from zero, nearest_int to even).
    j = np.arange(N)
    rows["ties"] = np.where(j % 32 == 0, -127.0, ((j * 37) % 253 - 126) * 0.5)
    # Magnitudes over decades per 32-block; even blocks all positive (min > 0 paths).
    blk = j // 32
    scale = 10.0 ** ((blk % 7) - 3)
    pos = rng.uniform(0.5, 1.5, N)
    rows["decades"] = np.where(blk % 2 == 0, pos, rng.standard_normal(N)) * scale
    return {k: v.astype(np.float32) for k, v in rows.items()}


def act_rows():
    rng = np.random.RandomState(7)
    j = np.arange(N)
    rows = {
        "gaussian": rng.standard_normal(N),
        "relu": np.maximum(rng.standard_normal(N), 0.0) * 3.0,
        "ties": np.where(j % 32 == 5, 127.0, ((j * 53) % 251 - 125) * 0.5),
    }
    return {k: v.astype(np.float32) for k, v in rows.items()}


BULK_ROWS = 1024
BULK_N = 256


def bulk_input():
    """BULK_ROWS x BULK_N float32 values, reproducible bit for bit in Rust (tests/tests/quant.rs
    `bulk_input`): u_k = (splitmix64(k) >> 40) / 2^24, value i = ((u_4i + u_4i+1) + u_4i+2)
    + u_4i+3 - 2 (roughly gaussian, sd 0.58), then per row r: all shifted by +2 when r % 5 == 0
    (all positive), every 37th value times 16 when r % 7 == 3 (outliers), everything times
    2^-(r % 6)."""
    m = np.uint64(0xFFFFFFFFFFFFFFFF)
    k = np.arange(BULK_ROWS * BULK_N * 4, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (k + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) & m
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & m
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & m
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    u = u.reshape(-1, 4)
    x = (((u[:, 0] + u[:, 1]) + u[:, 2]) + u[:, 3]) - np.float32(2.0)
    x = x.reshape(BULK_ROWS, BULK_N)
    for r in range(BULK_ROWS):
        if r % 5 == 0:
            x[r] = x[r] + np.float32(2.0)
        if r % 7 == 3:
            x[r, ::37] = x[r, ::37] * np.float32(16.0)
        x[r] = x[r] * np.float32(2.0 ** -(r % 6))
    assert x.dtype == np.float32
    return x


def load_ggml():
    d = os.environ.get("GGML_LIB_DIR")
    if not d:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("llama-cpp-python is not installed (or set GGML_LIB_DIR)")
        d = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    base = ctypes.CDLL(os.path.join(d, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(os.path.join(d, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    for f in ("quantize_row_q8_1_ref", "quantize_row_q8_K_ref", "dequantize_row_q8_K"):
        getattr(base, f).restype = None
        getattr(base, f).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    base.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init()
    return base, cpu


class TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def ggml_quantize(base, name, x, n_per_row=N):
    """ggml's reference quantization of the rows of x (float32 [rows, N]) to type `name`."""
    t = Q[name]
    # Sizes from ggml itself: gguf-py's GGML_QUANT_SIZES still gives Q8_1 the old 40-byte
    # block (f32 d and s); ggml's block_q8_1 has been 36 bytes (f16 d and s) for a long time.
    tr = base.ggml_get_type_traits(int(t)).contents
    bs, ts = tr.blck_size, tr.type_size
    rows = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    dst = np.zeros(rows * n_per_row // bs * ts, dtype=np.uint8)
    if name == "Q8_1":
        base.quantize_row_q8_1_ref(ptr(x), ptr(dst), x.size)
    elif name == "Q8_K":
        base.quantize_row_q8_K_ref(ptr(x), ptr(dst), x.size)
    else:
        n = base.ggml_quantize_chunk(int(t), ptr(x), ptr(dst), 0, rows, n_per_row, None)
        assert n == dst.size, (name, n, dst.size)
    return dst


def ggml_to_float(base, name, q, n_elems):
    tr = base.ggml_get_type_traits(int(Q[name])).contents
    if name == "Q8_K":
        out = np.zeros(n_elems, dtype=np.float32)
        base.dequantize_row_q8_K(ptr(q), ptr(out), n_elems)
        return out
    if not tr.to_float:
        return None
    out = np.zeros(n_elems, dtype=np.float32)
    TO_FLOAT(tr.to_float)(ptr(q), ptr(out), n_elems)
    return out


def reference_dequantize(base, name, q, n_elems):
    """(floats, source) for the bytes q of type `name`."""
    if name == "Q8_1":
        # block_q8_1: f16 d, f16 s, 32 x i8; x = d * q (as ggml's Q8_0 dequantizer computes it).
        b = q.reshape(-1, 36)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        qs = b[:, 4:].copy().view(np.int8).astype(np.float32)
        return (qs * d).reshape(-1), "numpy float32 d * q in this generator (no gguf-py or ggml Q8_1 dequantizer)"
    if name == "Q8_K":
        return ggml_to_float(base, name, q, n_elems), "ggml dequantize_row_q8_K (gguf-py has no Q8_K)"
    out = gguf.quants.dequantize(q, Q[name]).astype(np.float32, copy=False).reshape(-1)
    return out, "gguf.quants.dequantize"


def ggml_dot(cpu, wname, w_row, a_row):
    f = getattr(cpu, GGML_DOT[wname])
    f.restype = None
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                  ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    s = np.zeros(1, dtype=np.float32)
    f(N, ptr(s), 0, ptr(w_row), 0, ptr(a_row), 0, 1)
    return "0x%08x" % int(s.view(np.uint32)[0])


def write(name, arr):
    path = os.path.join(OUT, name)
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(arr).tobytes())
    return name


def main():
    base, cpu = load_ggml()
    os.makedirs(OUT, exist_ok=True)
    wrows = weight_rows()
    arows = act_rows()
    W = np.stack(list(wrows.values()))
    A = np.stack(list(arows.values()))
    index = {
        "n_per_row": N,
        "weight_rows": list(wrows.keys()),
        "act_rows": list(arows.keys()),
        "weights": write("weights.f32", W),
        "acts": write("acts.f32", A),
        "versions": {p: importlib.metadata.version(p) for p in ("gguf", "numpy", "llama_cpp_python")},
        "types": {},
        "activations": {},
    }

    def encode(name, x, suffix):
        q = ggml_quantize(base, name, x)
        deq, source = reference_dequantize(base, name, q, x.size)
        assert deq.size == x.size
        entry = {
            "id": int(Q[name]),
            "bytes": write(f"{name}.{suffix}.bin", q),
            "deq": write(f"{name}.{suffix}.deq.f32", deq.astype(np.float32)),
            "deq_source": source,
        }
        # Cross-checks recorded for the reader; the Rust test does not depend on them.
        tf = ggml_to_float(base, name, q, x.size)
        entry["ggml_to_float_agrees"] = None if tf is None else bool(
            np.array_equal(tf.view(np.uint32), deq.astype(np.float32).view(np.uint32)))
        try:
            gq = gguf.quants.quantize(x, Q[name])
            entry["gguf_quantize_agrees"] = bool(np.array_equal(np.asarray(gq).view(np.uint8).reshape(-1), q))
        except (NotImplementedError, gguf.quants.QuantError):
            entry["gguf_quantize_agrees"] = None
        return q, entry

    act_bytes = {}
    for name in ACT_TYPES:
        q, entry = encode(name, A, "a")
        act_bytes[name] = q.reshape(A.shape[0], -1)
        index["activations"][name] = entry

    for name in WEIGHT_TYPES + ACT_FORMATS:
        q, entry = encode(name, W, "w")
        entry["vec_dot_type"] = VEC_DOT_TYPE[name]
        if name in GGML_DOT:
            qw = q.reshape(W.shape[0], -1)
            qa = act_bytes[VEC_DOT_TYPE[name]]
            entry["ggml_dot_source"] = GGML_DOT[name]
            entry["ggml_dot"] = [[ggml_dot(cpu, name, np.ascontiguousarray(qw[i]), np.ascontiguousarray(qa[k]))
                                  for k in range(A.shape[0])] for i in range(W.shape[0])]
        else:
            entry["ggml_dot_source"] = None
            entry["ggml_dot"] = None
        index["types"][name] = entry

    xb = bulk_input()
    bulk = {"rows": BULK_ROWS, "n_per_row": BULK_N, "input_sha256": hashlib.sha256(xb.tobytes()).hexdigest(), "types": {}}
    for name in WEIGHT_TYPES + ACT_FORMATS:
        q = ggml_quantize(base, name, xb, BULK_N)
        deq, _ = reference_dequantize(base, name, q, xb.size)
        bulk["types"][name] = {
            "quant_sha256": hashlib.sha256(q.tobytes()).hexdigest(),
            "deq_sha256": hashlib.sha256(deq.astype(np.float32).tobytes()).hexdigest(),
        }
    index["bulk"] = bulk

    with open(os.path.join(OUT, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, p)) for p in os.listdir(OUT))
    bad = [f"{k}: {e}" for k, e in {**index["types"], **{"act " + k: v for k, v in index["activations"].items()}}.items()
           if e["ggml_to_float_agrees"] is False]
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {os.path.normpath(OUT)}")
    for k, e in index["types"].items():
        print(f"  {k:5} gguf quantize agrees: {e['gguf_quantize_agrees']}, ggml to_float agrees: {e['ggml_to_float_agrees']}")
    if bad:
        raise SystemExit("ggml to_float disagrees with the stored dequantization: " + "; ".join(bad))


if __name__ == "__main__":
    main()
