#!/usr/bin/env python3
"""Perplexity reference figures from llama.cpp's own perplexity tool (llama-perplexity).

    python3 tests/gen/llama_cpp_perplexity.py LLAMA_PERPLEXITY MODEL.gguf NAME [--chunks N]

runs `LLAMA_PERPLEXITY -m MODEL -f tests/fixtures/perplexity/kjv-genesis.txt -c 512 -b 512
-t 2 -fa off [--chunks N]` and writes tests/fixtures/perplexity/NAME.json with the running
estimates it prints ("[1]x,[2]y,...") and its final "PPL = x +/- y".

llama-perplexity is built from the llama.cpp sources that llama-cpp-python 0.3.36 vendors:
    cmake -S vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    ninja -C build llama-perplexity
"""
import argparse
import hashlib
import json
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures", "perplexity")
TEXT = os.path.join(FIXTURES, "kjv-genesis.txt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tool")
    ap.add_argument("model")
    ap.add_argument("name")
    ap.add_argument("--chunks", type=int, default=-1)
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    cmd = [a.tool, "-m", a.model, "-f", TEXT, "-c", str(a.ctx), "-b", str(a.ctx), "-t", "2",
           "-fa", "off", "--chunks", str(a.chunks)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    running = [float(x) for x in re.findall(r"\[\d+\](\d+\.\d+),", out)]
    m = re.search(r"Final estimate: PPL = (\d+\.\d+) \+/- (\d+\.\d+)", out)
    if not m or not running:
        raise SystemExit(f"no perplexity in the output:\n{out}")
    with open(a.model, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    rec = {
        "generator": "tests/gen/llama_cpp_perplexity.py",
        "tool": "llama-perplexity from the llama.cpp vendored by llama-cpp-python 0.3.36",
        "command": " ".join(["llama-perplexity"] + cmd[1:2] + [os.path.basename(a.model)]
                            + ["-f", "tests/fixtures/perplexity/kjv-genesis.txt"] + cmd[5:]),
        "model": os.path.basename(a.model),
        "model_sha256": sha,
        "ctx": a.ctx,
        "chunks": len(running),
        "running": running,
        "ppl": float(m.group(1)),
        "ppl_stderr": float(m.group(2)),
    }
    os.makedirs(FIXTURES, exist_ok=True)
    path = os.path.join(FIXTURES, f"{a.name}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    print(f"{path}: PPL {rec['ppl']} over {rec['chunks']} chunks")


if __name__ == "__main__":
    main()
