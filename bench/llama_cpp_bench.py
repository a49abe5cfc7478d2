#!/usr/bin/env python3
"""llama.cpp side of bench/compare.sh: prompt and decode speed of llama.cpp on a GGUF file,
through llama-cpp-python's low-level C API (llama_cpp.llama_*), measured by llama.cpp itself.

Usage: python3 bench/llama_cpp_bench.py MODEL.gguf --threads K --prompt-tokens P
           --gen-tokens G [--tokens ID,ID,...] [--no-warmup]
Prints one JSON line (see the end of main()).

What runs (the settings of tests/gen/llama_cpp_greedy.py, and of llama-bench's pp/tg tests):
CPU only, flash attention DISABLED, f16 KV cache (llama.cpp's default), n_batch = n_ubatch >= P
so the P prompt ids (the first P of --tokens; without --tokens a fixed synthetic sequence) go
through ONE llama_decode; then G single-token llama_decode calls, each fed the previous greedy
token (argmax of the raw last-position logits, read with llama_get_logits_ith(ctx, -1)).
n_threads = n_threads_batch = K. A warm-up (the prompt plus two single-token steps, then the KV
cache is cleared and the perf counters reset) runs first unless --no-warmup.

Timing. The figures that bench/compare.sh puts in its table are llama.cpp's OWN counters,
llama_perf_context(ctx): prompt tok/s = n_p_eval / t_p_eval_ms, decode tok/s = n_eval /
t_eval_ms. They time each llama_decode inside the library (from the start of the call until
the graph has been computed), so no Python is counted. (The context must be created with
no_perf = False; tests/gen/llama_cpp_greedy.py sets no_perf = True, so its counters read 0.)
The wall clock around each llama_decode + llama_get_logits_ith (per-call Python/ctypes
overhead included, but not the argmax) is reported as well, as wall_*; with a quiet machine
the two agree within a few percent (see bench/README.md).

Needs: llama-cpp-python==0.3.36 built for this CPU (CMAKE_ARGS=-DGGML_NATIVE=ON), numpy.
"""
import argparse
import json
import os
import sys
import time

# numpy's OpenBLAS would start its own worker threads (one per core); only argmax is used here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import llama_cpp as lc  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "gen"))
from llama_cpp_greedy import silence_llama_log  # noqa: E402


def parse_ids(s):
    s = s.strip().strip("[]")
    return [int(x) for x in s.split(",") if x.strip()]


class Bench:
    def __init__(self, model_path, n_threads, n_ctx, n_batch):
        silence_llama_log()
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        t0 = time.perf_counter()
        self.model = lc.llama_model_load_from_file(model_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp failed to load {model_path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.embeddings = False
        cp.no_perf = False  # we want llama.cpp's own timers
        self.settings = {
            "n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_batch,
            "n_threads": n_threads, "n_threads_batch": n_threads,
            "flash_attn": "disabled", "type_k": int(cp.type_k), "type_v": int(cp.type_v),
            "n_gpu_layers": 0,
        }
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp failed to create a context")
        self.load_s = time.perf_counter() - t0
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.n_past = 0

    def reset(self):
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        lc.llama_perf_context_reset(self.ctx)
        self.n_past = 0

    def fill(self, tokens):
        b = self.batch
        n = len(tokens)
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = int(t)
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i == n - 1 else 0

    def step(self, tokens):
        """One llama_decode of `tokens` as a batch; returns (next greedy id, wall seconds of
        llama_decode + llama_get_logits_ith)."""
        self.fill(tokens)
        t0 = time.perf_counter()
        rc = lc.llama_decode(self.ctx, self.batch)
        p = lc.llama_get_logits_ith(self.ctx, -1)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.n_past += len(tokens)
        # argmax straight on llama.cpp's buffer (no copy); ties -> lowest id
        tok = int(np.argmax(np.ctypeslib.as_array(p, shape=(self.n_vocab,))))
        return tok, dt

    def run(self, prompt, n_gen):
        self.reset()
        t_all = time.perf_counter()
        tok, wall_p = self.step(prompt)
        out = [tok]
        wall_d = 0.0
        t_loop = time.perf_counter()
        for _ in range(n_gen):
            tok, dt = self.step([tok])
            wall_d += dt
            out.append(tok)
        loop_s = time.perf_counter() - t_loop
        perf = lc.llama_perf_context(self.ctx)
        return {
            "tokens": out, "wall_prompt_s": wall_p, "wall_decode_s": wall_d,
            "wall_decode_loop_s": loop_s, "wall_total_s": time.perf_counter() - t_all,
            "perf": {k: getattr(perf, k) for k, _ in perf._fields_},
        }

    def close(self):
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=parse_ids, help="prompt ids, comma-separated (JSON array ok)")
    ap.add_argument("--no-warmup", action="store_true")
    a = ap.parse_args()

    P, G = a.prompt_tokens, a.gen_tokens
    n_ctx = max(512, -(-(P + G + 8) // 256) * 256)
    n_batch = max(512, P)
    b = Bench(a.model, a.threads, n_ctx, n_batch)
    if a.tokens is not None:
        if len(a.tokens) < P:
            sys.exit(f"llama_cpp_bench: --tokens has {len(a.tokens)} ids, --prompt-tokens asks for {P}")
        prompt = a.tokens[:P]
    else:
        prompt = [1 + (i * 7919) % (b.n_vocab - 1) for i in range(P)]
    if not a.no_warmup:
        b.run(prompt, 2)
    r = b.run(prompt, G)
    perf = r["perf"]
    if perf["n_p_eval"] != P or perf["n_eval"] != G:
        sys.exit(f"llama_cpp_bench: perf counters count {perf['n_p_eval']} prompt and "
                 f"{perf['n_eval']} decode tokens, expected {P} and {G}")
    out = {
        "engine": "llama.cpp",
        "model": a.model,
        "threads": a.threads,
        "prompt_tokens": P,
        "gen_tokens": G,
        "warmup": not a.no_warmup,
        "load_s": b.load_s,
        # table figures: llama.cpp's own counters
        "prompt_tokens_per_s": 1000.0 * perf["n_p_eval"] / perf["t_p_eval_ms"],
        "decode_tokens_per_s": 1000.0 * perf["n_eval"] / perf["t_eval_ms"] if G else 0.0,
        "perf": perf,
        # wall clock around llama_decode + llama_get_logits_ith (Python/ctypes included)
        "wall_prompt_tokens_per_s": P / r["wall_prompt_s"],
        "wall_decode_tokens_per_s": G / r["wall_decode_s"] if G else 0.0,
        # whole decode loop, argmax and batch filling included
        "wall_loop_decode_tokens_per_s": G / r["wall_decode_loop_s"] if G else 0.0,
        "settings": b.settings,
        "llama_cpp_python_version": lc.__version__,
        "system_info": lc.llama_print_system_info().decode(errors="replace").strip(),
        "tokens": r["tokens"],
    }
    b.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
