#!/usr/bin/env bash
# sparrow beside llama.cpp and candle on one GGUF file: same file, same prompt token ids, same
# thread counts, alternating runs (round robin), one table of medians and ratios, and a JSON
# file of every raw run.
#
#   bench/compare.sh MODEL.gguf [--threads "1 2"] [--reps 5] [--prompt-tokens 128]
#                    [--gen-tokens 128] [--engines "sparrow llama.cpp candle"] [--json OUT]
#                    [--wait-quiet SECONDS] [--retry-busy N] [--no-build] [--sparrow PATH]
#
# What it installs / builds (and says so as it goes):
#   llama.cpp  llama-cpp-python==0.3.36 through pip, built from source for this CPU
#              (CMAKE_ARGS=-DGGML_NATIVE=ON, or on CPUs with AMX every other extension named,
#              see below; about 10 minutes on 2 cores), if it is missing, another version, or
#              built with AMX on such a CPU; numpy if missing. Runner: bench/llama_cpp_bench.py.
#   candle     the crate bench/candle (candle-core/candle-transformers 0.11, own workspace and
#              target dir), cargo build --release with RUSTFLAGS="-C target-cpu=native" (llama.cpp
#              is built native too; candle picks its x86 SIMD kernels at compile time).
#   sparrow    cargo build --release -p sparrow-demo (incremental; --no-build skips it, and so
#              does --sparrow PATH, a binary built elsewhere), then
#              checks that `sparrow bench --help` works: if the bench subcommand is missing the
#              script stops, unless sparrow is left out with --engines "llama.cpp candle".
#
# Prompt ids: made once with `sparrow tokenize` from the same text `sparrow bench` uses (BOS where
# the model adds one, then the text's tokens repeated and cut at P), falling back to llama.cpp's
# tokenizer when sparrow is not built; llama.cpp and candle get them with --tokens, and sparrow
# too if its bench subcommand has a --tokens flag.
#
# Timings: each engine times its own prompt batch and decode steps (llama.cpp: its perf
# counters; candle and sparrow: their own timers around the forward passes).
#
# Quiet machine: on 2 cores a background build halves a 1-thread figure and can wreck a 2-thread
# one (spinning worker threads), so before each run the script waits up to --wait-quiet seconds
# (default 30; 0: no wait) for the machine to idle, measures the CPU time other processes used
# during the run, and runs a disturbed rep again up to --retry-busy times (default 2); runs still
# disturbed are flagged in the table. See bench/README.md.
#
# Environment: PYTHON (default python3), CARGO (default cargo).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CARGO="${CARGO:-cargo}"
LLAMA_CPP_PYTHON_VERSION="0.3.36"

say() { echo "compare.sh: $*" >&2; }
die() { echo "compare.sh: ERROR: $*" >&2; exit 1; }
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

model=""
threads="1 2"
reps=5
ptoks=128
gtoks=128
engines="sparrow llama.cpp candle"
json_out=""
sparrow=""
wait_quiet=30
retry_busy=2
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --reps) reps="$2"; shift 2 ;;
        --prompt-tokens) ptoks="$2"; shift 2 ;;
        --gen-tokens) gtoks="$2"; shift 2 ;;
        --engines) engines="$2"; shift 2 ;;
        --json) json_out="$2"; shift 2 ;;
        --wait-quiet) wait_quiet="$2"; shift 2 ;;
        --retry-busy) retry_busy="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        --sparrow) sparrow="$2"; build=0; shift 2 ;;
        -h|--help) usage ;;
        -*) say "unknown option $1"; usage ;;
        *) [ -z "$model" ] || usage; model="$1"; shift ;;
    esac
done
[ -n "$model" ] || usage
[ -f "$model" ] || die "no such model file: $model"
model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"
has() { case " $engines " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for e in $engines; do
    case "$e" in sparrow|llama.cpp|candle) ;; *) die "unknown engine '$e' (sparrow, llama.cpp, candle)" ;; esac
done

# --- sparrow -----------------------------------------------------------------------------------
sparrow="${sparrow:-$root/target/release/sparrow}"
sparrow_tokens=0
if has sparrow; then
    if [ "$build" = 1 ]; then
        say "sparrow: cargo build --release -p sparrow-demo (incremental)"
        (cd "$root" && "$CARGO" build --release --quiet -p sparrow-demo) || die "building sparrow failed"
    fi
    [ -x "$sparrow" ] || die "no sparrow binary at $sparrow"
    if ! bench_help="$("$sparrow" bench --help 2>&1)"; then
        echo "$bench_help" >&2
        die "'sparrow bench' is missing from $sparrow: build a sparrow with the bench subcommand, or leave sparrow out: --engines \"llama.cpp candle\""
    fi
    if grep -q -- '--tokens' <<<"$bench_help"; then sparrow_tokens=1; fi
    say "sparrow: $sparrow ($([ $sparrow_tokens = 1 ] && echo 'bench takes --tokens: same prompt ids' || echo 'bench uses its own prompt text; ids below made the same way'))"
fi

# --- llama.cpp: llama-cpp-python built for this CPU --------------------------------------------
have_numpy=1; "$PYTHON" -c 'import numpy' 2>/dev/null || have_numpy=0
if [ "$have_numpy" = 0 ]; then
    say "installing numpy (pip)"
    "$PYTHON" -m pip install --quiet numpy >&2
fi
llama_version="$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)"
llama_info="$("$PYTHON" -c 'import llama_cpp as l; print(l.llama_print_system_info().decode())' 2>/dev/null || true)"
# Build flags: -march=native, except on CPUs with AMX (Sapphire Rapids and later), where
# ggml's AMX matrix product crashes this version (SIGSEGV in ggml_backend_amx_mul_mat on the
# first batch; llama.cpp issue 20824): there every ISA extension the CPU reports is named
# instead, AMX left out.
llama_cmake="-DGGML_NATIVE=ON"
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    llama_cmake="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI \
                avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        case "$cpu_flags" in *" ${pair%%:*} "*) llama_cmake="$llama_cmake -DGGML_${pair##*:}=ON" ;; esac
    done
fi
if has llama.cpp && { [ "$llama_version" != "$LLAMA_CPP_PYTHON_VERSION" ] \
        || case "$llama_cmake" in *AMX_INT8=OFF*) [[ "$llama_info" == *"AMX_INT8 = 1"* ]] ;; *) false ;; esac; }; then
    say "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (found: ${llama_version:-none}${llama_info:+, $llama_info}),"
    say "built from source with CMAKE_ARGS=\"$llama_cmake\": this compiles llama.cpp, about 10 minutes on 2 cores"
    CMAKE_ARGS="$llama_cmake" FORCE_CMAKE=1 "$PYTHON" -m pip install --force-reinstall --no-deps \
        --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
    llama_version="$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')"
    llama_info="$("$PYTHON" -c 'import llama_cpp as l; print(l.llama_print_system_info().decode())')"
fi
if has llama.cpp; then
    say "llama.cpp: llama-cpp-python $llama_version ($("$PYTHON" -c 'import llama_cpp as l; print(l.llama_print_system_info().decode().strip())' 2>/dev/null))"
fi

# --- candle: bench/candle built native ---------------------------------------------------------
candle_rustflags="-C target-cpu=native"
candle_version=""
if has candle; then
    say "candle: building bench/candle (cargo build --release, RUSTFLAGS=\"$candle_rustflags\"; incremental, the first build takes ~6 minutes on 2 cores)"
    (cd "$here/candle" && CARGO_TARGET_DIR="$here/candle/target" RUSTFLAGS="$candle_rustflags" \
        "$CARGO" build --release --quiet) \
        || die "building bench/candle failed"
    candle_version="$(awk '/^name = "candle-transformers"/{getline; gsub(/[^0-9.]/,""); print; exit}' "$here/candle/Cargo.lock")"
    say "candle: candle-transformers $candle_version"
fi

# --- prompt token ids ----------------------------------------------------------------------------
# The text of `sparrow bench` (PROMPT_TEXT in demo/src/bench.rs, its one source), so that the ids
# given to llama.cpp and candle are the ones sparrow evaluates.
PROMPT_TEXT="$("$PYTHON" - "$root/demo/src/bench.rs" <<'PY'
import re, sys
m = re.search(r'const PROMPT_TEXT: &str = "(.*?)";', open(sys.argv[1]).read(), re.S)
if m:
    t = re.sub(r'\\\n\s*', '', m.group(1))  # Rust line continuations
    if '\\' not in t and '"' not in t:         # other escapes are not handled
        sys.stdout.write(t)
PY
)" || true
[ -n "$PROMPT_TEXT" ] || die "cannot read PROMPT_TEXT from demo/src/bench.rs (a plain string literal is expected)"
if [ -x "$sparrow" ] && "$sparrow" tokenize --help >/dev/null 2>&1; then
    tokenizer="sparrow tokenize"
    body="$("$sparrow" tokenize -m "$model" --no-add-special "$PROMPT_TEXT")"
    with_bos="$("$sparrow" tokenize -m "$model" "x")"
    plain="$("$sparrow" tokenize -m "$model" --no-add-special "x")"
else
    tokenizer="llama.cpp's tokenizer (no sparrow binary)"
    tok_py='import sys, json, llama_cpp as lc
cb = lc.llama_log_callback(lambda *a: None); lc.llama_log_set(cb, None)
lc.llama_backend_init(); mp = lc.llama_model_default_params(); mp.vocab_only = True
m = lc.llama_model_load_from_file(sys.argv[1].encode(), mp); v = lc.llama_model_get_vocab(m)
d = sys.argv[2].encode(); a = (lc.llama_token * (len(d) + 16))()
n = lc.llama_tokenize(v, d, len(d), a, len(d) + 16, sys.argv[3] == "1", False)
print(json.dumps([a[i] for i in range(n)]))'
    body="$("$PYTHON" -c "$tok_py" "$model" "$PROMPT_TEXT" 0)"
    with_bos="$("$PYTHON" -c "$tok_py" "$model" "x" 1)"
    plain="$("$PYTHON" -c "$tok_py" "$model" "x" 0)"
fi
ids="$("$PYTHON" - "$body" "$with_bos" "$plain" "$ptoks" <<'EOF'
import itertools, json, sys
body, with_bos, plain, n = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
# BOS: what the model's own tokenization puts before the text's tokens
k = next((i for i in range(len(with_bos) + 1) if with_bos[i:i + len(plain)] == plain), 0)
out = (with_bos[:k] + list(itertools.islice(itertools.cycle(body), n)))[:n]
print(json.dumps(out))
EOF
)"
say "prompt: $ptoks ids from $tokenizer (text of sparrow bench, repeated)"

# --- run ------------------------------------------------------------------------------------
if [ -z "$json_out" ]; then
    mkdir -p "$here/results"
    json_out="$here/results/compare-$(basename "$model" .gguf)-$(date +%Y%m%d-%H%M%S).json"
fi
meta="$("$PYTHON" -c 'import json,sys; print(json.dumps({"llama_cpp_python": sys.argv[1], "candle": sys.argv[2], "candle_rustflags": sys.argv[3], "prompt_tokenizer": sys.argv[4], "llama_cpp_system_info": sys.argv[5]}))' \
    "$llama_version" "$candle_version" "$candle_rustflags" "$tokenizer" "$llama_info")"
sp_flag=()
[ "$sparrow_tokens" = 1 ] && sp_flag=(--sparrow-tokens)
say "running: engines [$engines], threads [$threads], $reps reps round robin, prompt $ptoks, decode $gtoks"
# shellcheck disable=SC2086
exec "$PYTHON" "$here/compare.py" "$model" --threads $threads --reps "$reps" \
    --prompt-tokens "$ptoks" --gen-tokens "$gtoks" --tokens "$ids" --engines $engines \
    --sparrow "$sparrow" --candle "$here/candle/target/release/candle-bench" --json "$json_out" \
    --wait-quiet "$wait_quiet" --retry-busy "$retry_busy" --meta "$meta" ${sp_flag[@]+"${sp_flag[@]}"}
