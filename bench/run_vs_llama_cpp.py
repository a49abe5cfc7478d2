"""Prompt and decode speed of `sparrow run --json` beside llama.cpp (llama-cpp-python), on the
same model file, prompt and thread counts, alternating runs, medians.

llama.cpp runs in this process through its C API (tests/gen/llama_cpp_greedy.py's runner:
flash attention off, f16 KV cache, the prompt as one batch, then one token per decode call);
its time is measured around llama_decode + reading the logits (llama_get_logits_ith(-1)
waits for the computation). sparrow runs as a subprocess and reports its own timers, which
cover the same work (prompt batch; single-token decode steps).

Usage: python3 bench/run_vs_llama_cpp.py MODEL.gguf [--threads 1 2] [--reps 5] [--n 128]
       [--sparrow target/release/sparrow] [--json OUT.json]
Needs: pip install llama-cpp-python==0.3.36 (built with CMAKE_ARGS=-DGGML_NATIVE=ON), numpy.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "gen"))
from llama_cpp_greedy import LlamaCppRunner  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
          "wine making. Within fifty years, presses were operating in more than two hundred "
          "European cities, and the price of books fell sharply. Explain the main consequences "
          "of this invention for science, religion and politics, with examples.")


def run_llama(model, prompt, n, threads):
    r = LlamaCppRunner(model, n_ctx=1024, n_batch=512, n_threads=threads)
    try:
        toks = r.tokenize(prompt, add_special=True, parse_special=True)
        t0 = time.perf_counter()
        logits = r.decode(toks)
        tp = time.perf_counter() - t0
        td = 0.0
        out = []
        for i in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if i == n - 1:
                break
            t0 = time.perf_counter()
            logits = r.decode([tok])
            td += time.perf_counter() - t0
        return {"prompt_tokens": len(toks), "prompt_tps": len(toks) / tp, "decode_tps": (n - 1) / td, "tokens": out}
    finally:
        r.close()


def run_sparrow(exe, model, prompt, n, threads):
    cmd = [exe, "run", "-m", model, "-p", prompt, "-n", str(n), "--temp", "0", "--ignore-eos",
           "--threads", str(threads), "--json"]
    o = subprocess.run(cmd, check=True, capture_output=True, text=True)
    j = json.loads(o.stdout.strip().splitlines()[-1])
    return {"prompt_tokens": len(j["prompt_tokens"]), "prompt_tps": j["prompt_tokens_per_s"],
            "decode_tps": j["decode_tokens_per_s"], "tokens": j["tokens"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--sparrow", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "sparrow"))
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for t in a.threads:
        res = {"sparrow": [], "llama.cpp": []}
        for rep in range(a.reps):
            # alternate which goes first
            order = [("sparrow", run_sparrow), ("llama.cpp", run_llama)]
            if rep % 2:
                order.reverse()
            for name, fn in order:
                if name == "sparrow":
                    res[name].append(fn(a.sparrow, a.model, a.prompt, a.n, t))
                else:
                    res[name].append(fn(a.model, a.prompt, a.n, t))
        same = res["sparrow"][0]["tokens"] == res["llama.cpp"][0]["tokens"]
        for name in res:
            rows.append({
                "runtime": name, "threads": t, "prompt_tokens": res[name][0]["prompt_tokens"],
                "prompt_tps": statistics.median(r["prompt_tps"] for r in res[name]),
                "decode_tps": statistics.median(r["decode_tps"] for r in res[name]),
                "same_tokens_as_other": same,
            })
    base = {r["threads"]: r for r in rows if r["runtime"] == "llama.cpp"}
    print(f"model: {os.path.basename(a.model)}, {a.n} generated tokens, {a.reps} alternating reps, medians")
    print(f"{'runtime':<10} {'threads':>7} {'prompt tok':>10} {'prompt tok/s':>13} {'decode tok/s':>13} {'prompt x':>9} {'decode x':>9}")
    for r in rows:
        b = base[r["threads"]]
        print(f"{r['runtime']:<10} {r['threads']:>7} {r['prompt_tokens']:>10} {r['prompt_tps']:>13.1f} {r['decode_tps']:>13.1f}"
              f" {r['prompt_tps'] / b['prompt_tps']:>9.2f} {r['decode_tps'] / b['decode_tps']:>9.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
