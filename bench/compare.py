#!/usr/bin/env python3
"""Round-robin driver of bench/compare.sh (run that; it installs and builds what this needs).

Runs each engine as a fresh process per repetition on the same GGUF file, the same prompt ids
and thread counts: for each thread count, rep 1 of every engine, then rep 2, ... (the engine
that goes first rotates each rep). Prints one table of medians and ratios and writes every raw
run to a JSON file.

Each run also records how busy the rest of the machine was while it ran: CPU time of the whole
machine (/proc/stat) minus the CPU time of the engine process (getrusage of children), as a
fraction of wall time x cores ("foreign" load). Runs with more than --foreign-limit of foreign
load are flagged in the table footer: on a 2-core machine a compile or another benchmark in the
background halves a 1-thread figure and ruins a 2-thread one (spinning worker threads). With
--wait-quiet S the driver waits (up to S seconds) for the machine to go idle before each run;
with --retry-busy N a run that was disturbed anyway is discarded (kept in the JSON) and run again,
at most N times.
"""
import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NCPU = os.cpu_count() or 1
TICK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"compare: {msg}", file=sys.stderr, flush=True)


def cpu_busy_s():
    """Seconds of non-idle CPU time of the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    steal = v[7] if len(v) > 7 else 0
    return (sum(v[:8]) - idle - steal) / TICK


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(max_s, limit_cores=0.10):
    """Wait until the machine's busy CPU over 1 s is under limit_cores cores, at most max_s."""
    t_end = time.time() + max_s
    while True:
        b0 = cpu_busy_s()
        time.sleep(1.0)
        busy = cpu_busy_s() - b0
        if busy < limit_cores or time.time() >= t_end:
            return busy


def run_engine(name, cmd):
    b0, c0, t0 = cpu_busy_s(), children_cpu_s(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    busy, child = cpu_busy_s() - b0, children_cpu_s() - c0
    if p.returncode != 0:
        log(f"{name} failed (exit {p.returncode}): {shlex.join(cmd)}")
        sys.stderr.write(p.stderr[-4000:])
        sys.exit(1)
    out = p.stdout.strip()
    try:
        res = json.loads(out)
    except json.JSONDecodeError:
        res = json.loads(out.splitlines()[-1])
    foreign = max(0.0, busy - child) / (wall * NCPU)
    return {"wall_s": wall, "cpu_s": child, "machine_busy_s": busy,
            "foreign_cpu_frac": foreign, "command": shlex.join(cmd), "result": res}


def first_divergence(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, nargs="+", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--tokens", required=True, help="JSON array of prompt ids (exactly P)")
    ap.add_argument("--engines", nargs="+", default=["sparrow", "llama.cpp", "candle"])
    ap.add_argument("--sparrow", default=os.path.join(HERE, "..", "target", "release", "sparrow"))
    ap.add_argument("--sparrow-tokens", action="store_true",
                    help="sparrow bench accepts --tokens (else it uses its own prompt text)")
    ap.add_argument("--candle", default=os.path.join(HERE, "candle", "target", "release", "candle-bench"))
    ap.add_argument("--json", required=True, help="where to write all raw runs")
    ap.add_argument("--wait-quiet", type=float, default=0.0)
    ap.add_argument("--foreign-limit", type=float, default=0.10)
    ap.add_argument("--retry-busy", type=int, default=0,
                    help="run a rep again (at most this many times) when the machine was busy during it")
    ap.add_argument("--meta", default="{}", help="JSON object merged into the output's meta")
    a = ap.parse_args()

    ids = json.loads(a.tokens)
    P, G = a.prompt_tokens, a.gen_tokens
    assert len(ids) == P, f"{len(ids)} prompt ids for --prompt-tokens {P}"
    ids_arg = ",".join(map(str, ids))

    def cmd(engine, t):
        common = ["--threads", str(t), "--prompt-tokens", str(P), "--gen-tokens", str(G)]
        if engine == "sparrow":
            c = [a.sparrow, "bench", "-m", a.model] + common + ["--reps", "1", "--json"]
            return c + (["--tokens", ids_arg] if a.sparrow_tokens else [])
        if engine == "llama.cpp":
            return [sys.executable, os.path.join(HERE, "llama_cpp_bench.py"), a.model] + common + ["--tokens", ids_arg]
        if engine == "candle":
            return [a.candle, a.model] + common + ["--tokens", ids_arg]
        raise ValueError(engine)

    engines = a.engines
    runs, discarded = [], []
    n_total = len(a.threads) * a.reps * len(engines)
    k = 0
    for t in a.threads:
        for rep in range(a.reps):
            order = engines[rep % len(engines):] + engines[:rep % len(engines)]
            for pos, e in enumerate(order):
                k += 1
                for attempt in range(a.retry_busy + 1):
                    pre_busy = wait_quiet(a.wait_quiet) if a.wait_quiet > 0 else None
                    r = run_engine(e, cmd(e, t))
                    busy = r["foreign_cpu_frac"] > a.foreign_limit
                    retry = busy and attempt < a.retry_busy
                    r.update({"engine": e, "threads": t, "rep": rep + 1, "position_in_rep": pos,
                              "attempt": attempt + 1, "busy_cores_before": pre_busy, "discarded": retry})
                    (discarded if retry else runs).append(r)
                    res = r["result"]
                    flag = ("  (busy machine: discarded, running it again)" if retry
                            else "  (busy machine!)" if busy else "")
                    log(f"[{k}/{n_total}] {e:<9} threads={t} rep={rep + 1}: prompt "
                        f"{res['prompt_tokens_per_s']:8.1f} tok/s, decode {res['decode_tokens_per_s']:7.1f} tok/s, "
                        f"foreign load {100 * r['foreign_cpu_frac']:4.1f}%{flag}")
                    if not retry:
                        break

    # medians
    summary = []
    for t in a.threads:
        row = {"threads": t}
        for e in engines:
            rs = [r for r in runs if r["engine"] == e and r["threads"] == t]
            pp = [r["result"]["prompt_tokens_per_s"] for r in rs]
            dd = [r["result"]["decode_tokens_per_s"] for r in rs]
            row[e] = {"prompt_tokens_per_s": statistics.median(pp), "decode_tokens_per_s": statistics.median(dd),
                      "prompt_min": min(pp), "prompt_max": max(pp), "decode_min": min(dd), "decode_max": max(dd),
                      "busy_runs": sum(r["foreign_cpu_frac"] > a.foreign_limit for r in rs)}
            if e == "sparrow":
                rf = [r["result"].get("roofline_fraction") for r in rs]
                rf = [x for x in rf if x is not None]
                row[e]["roofline_fraction"] = statistics.median(rf) if rf else None
                row[e]["kernels"] = rs[0]["result"].get("kernels")
            if e == "llama.cpp":
                row[e]["wall_decode_tokens_per_s"] = statistics.median(
                    r["result"]["wall_decode_tokens_per_s"] for r in rs)
                row[e]["wall_prompt_tokens_per_s"] = statistics.median(
                    r["result"]["wall_prompt_tokens_per_s"] for r in rs)
        for e in engines:
            if e != "sparrow" and "sparrow" in engines:
                row[f"sparrow/{e}"] = {
                    k2: row["sparrow"][k2] / row[e][k2] for k2 in ("prompt_tokens_per_s", "decode_tokens_per_s")}
        if "llama.cpp" in engines and "candle" in engines:
            la = next(r for r in runs if r["engine"] == "llama.cpp" and r["threads"] == t)["result"]["tokens"]
            ca = next(r for r in runs if r["engine"] == "candle" and r["threads"] == t)["result"]["tokens"]
            row["greedy_tokens_llama_vs_candle_first_divergence"] = first_divergence(la, ca)
        summary.append(row)

    meta = json.loads(a.meta)
    meta.update({
        "model": os.path.abspath(a.model), "model_bytes": os.path.getsize(a.model),
        "prompt_tokens": P, "gen_tokens": G, "reps": a.reps, "threads": a.threads,
        "engines": engines, "prompt_ids": ids, "sparrow_gets_prompt_ids": a.sparrow_tokens,
        "cpu_count": NCPU, "machine": platform.machine(), "foreign_limit": a.foreign_limit,
        "wait_quiet_s": a.wait_quiet, "retry_busy": a.retry_busy,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    try:
        with open("/proc/cpuinfo") as f:
            meta["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs, "discarded_busy_runs": discarded}, f, indent=1)
        f.write("\n")

    # table
    name = os.path.basename(a.model)
    print()
    print(f"{name} ({os.path.getsize(a.model) / 1e6:.1f} MB): {P}-token prompt as one batch, then {G} "
          f"single-token decode steps; {a.reps} rep{'s' if a.reps != 1 else ''} per engine, round robin; "
          f"medians (min-max) in tokens/s")
    print()
    hdr = f"{'threads':>7}  {'engine':<20} {'prompt tok/s':>24} {'decode tok/s':>24}"
    print(hdr)
    print("-" * len(hdr))

    def cell(med, lo, hi):
        return f"{med:8.1f} ({lo:6.1f}-{hi:6.1f})"

    for row in summary:
        t = row["threads"]
        for e in engines:
            s = row[e]
            extra = ""
            if e == "sparrow" and s.get("roofline_fraction") is not None:
                extra = f"  roofline {100 * s['roofline_fraction']:.0f}%"
            if s["busy_runs"]:
                extra += f"  [{s['busy_runs']} busy run{'s' if s['busy_runs'] > 1 else ''}]"
            print(f"{t:>7}  {e:<20} {cell(s['prompt_tokens_per_s'], s['prompt_min'], s['prompt_max']):>24} "
                  f"{cell(s['decode_tokens_per_s'], s['decode_min'], s['decode_max']):>24}{extra}")
        for e in engines:
            key = f"sparrow/{e}"
            if key in row:
                print(f"{t:>7}  {key:<20} {row[key]['prompt_tokens_per_s']:>8.2f}x{'':15} "
                      f"{row[key]['decode_tokens_per_s']:>8.2f}x")
        print()

    notes = []
    if "llama.cpp" in engines:
        lw = ", ".join(f"{r['threads']}t prompt {r['llama.cpp']['wall_prompt_tokens_per_s']:.1f} / decode "
                       f"{r['llama.cpp']['wall_decode_tokens_per_s']:.1f}" for r in summary)
        info = meta.get("llama_cpp_system_info", "")
        feats = " ".join(f.split("=")[0].strip() for f in info.split("|") if f.strip().endswith("= 1"))
        notes.append(f"llama.cpp: llama-cpp-python {meta.get('llama_cpp_python', '?')} "
                     f"({feats.replace('CPU : ', '') or 'build features unknown'}), its own perf "
                     f"counters (llama_perf_context); flash attention off, f16 KV cache. Wall clock around "
                     f"llama_decode+get_logits, medians: {lw}.")
    if "candle" in engines:
        notes.append(f"candle: candle-transformers {meta.get('candle', '?')} quantized_llama, built with "
                     f"RUSTFLAGS='{meta.get('candle_rustflags', '-C target-cpu=native')}'; "
                     f"CANDLE_NUM_THREADS=RAYON_NUM_THREADS=threads; f32 KV cache.")
    if "sparrow" in engines:
        if a.sparrow_tokens:
            notes.append("sparrow: `sparrow bench --reps 1 --json --tokens IDS` (same prompt ids).")
        else:
            notes.append("sparrow: `sparrow bench --reps 1 --json` tokenizes its own built-in prompt text; "
                         "the ids given to the others are made the same way from the same text (BOS if the "
                         "model adds one, the text's tokens repeated, cut at P), so they should match; "
                         "the prompt content does not change speed for a fixed token count.")
    notes.append("Every engine: a fresh process per run, one untimed warm-up pass first; greedy argmax; "
                 "decode tok/s = G single-token steps / their time.")
    for row in summary:
        if "greedy_tokens_llama_vs_candle_first_divergence" in row:
            d = row["greedy_tokens_llama_vs_candle_first_divergence"]
            notes.append(f"{row['threads']}t greedy tokens llama.cpp vs candle: "
                         + ("identical" if d is None else f"first differ at generated token {d}"))
    if discarded:
        notes.append(f"{len(discarded)} run(s) discarded and run again: more than {100 * a.foreign_limit:.0f}% "
                     f"foreign CPU load while they ran (kept in the JSON under discarded_busy_runs).")
    busy = [r for r in runs if r["foreign_cpu_frac"] > a.foreign_limit]
    if busy:
        notes.append(f"WARNING: {len(busy)} of {len(runs)} runs had more than {100 * a.foreign_limit:.0f}% foreign "
                     f"CPU load (other processes); their figures are low. Rerun on a quiet machine "
                     f"(or with --wait-quiet SECONDS).")
    notes.append(f"raw runs: {a.json}")
    for n in notes:
        print("* " + n)


if __name__ == "__main__":
    main()
