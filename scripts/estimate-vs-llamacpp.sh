#!/usr/bin/env bash
# Compares `hbmalloc estimate --json` with the buffer sizes llama.cpp itself reports, on a machine
# with an NVIDIA GPU and a CUDA build of llama.cpp. Not run in CI (no GPU there).
#
#   LLAMA_CPP_BIN=build/llama/bin bash scripts/estimate-vs-llamacpp.sh [OUT.md]
#
# Needs: python3 with numpy and the gguf package (llama.cpp's gguf-py on PYTHONPATH, as
# scripts/gpu-llama.sh sets it; gpu-stage/py-gguf and .whl/py-gguf are tried first, where
# scripts/install-test-deps.sh puts it), a llama.cpp build
# (llama-completion, else llama-cli, in LLAMA_CPP_BIN), and the hbmalloc CLI ($HBMALLOC_CLI, else
# gpu-stage/hbmalloc, else target/release/hbmalloc, built with cargo where cargo exists).
#
# For each case it writes a small random-weight GGUF (a GQA llama; a Gemma-2 model, whose even
# layers slide over the default 4096-token window; a Gemma-3 model, five of whose seven layers
# slide over 256 tokens), runs llama.cpp for one token with every layer on GPU 0,
# and reads, from the last model load in its log:
#   load_tensors:   <buf> model buffer size = X MiB     (weights, per buffer)
#   llama_kv_cache: <buf> KV buffer size = X MiB        (per buffer; one per cache, two with SWA)
#   llama_kv_cache: size = X MiB (N cells, ...)         (each cache's K + V)
#   <func>: <buft> compute buffer size = X MiB          (graph reserve, per buffer type)
# Buffers named CUDA0 are GPU0; CPU, CPU_Mapped, CPU_REPACK and CUDA_Host are the CPU.
#
# Tolerances (a row outside its tolerance is FAIL, and the script exits 1):
#   weights, KV: 0.01 MiB, llama.cpp's printed precision (the estimate is exact; the CUDA
#                buffer of a quantized KV tensor adds under 0.5 KiB of row padding, well inside
#                it for these models, and the "size" lines have none);
#   compute:     COMPUTE_TOL_PCT percent (default 5, the issue's target) of llama.cpp's figure:
#                the estimate replays llama.cpp's graph reserve (docs/estimate.md, "Compute
#                buffers"); CPU-only (NGL=0) it agrees to 0.01 MiB, the GPU split is modelled
#                but unmeasured.
# A log without the lines above prints the lines it looked at, and counts as a failure.
# The table goes to stdout and to OUT.md (default: estimate-vs-llamacpp.md). About 15 runs of a
# few seconds each.
set -euo pipefail
cd "$(dirname "$0")/.."

out_md="${1:-estimate-vs-llamacpp.md}"
# NGL=0 with a CPU-only build of llama.cpp: everything on the CPU (checks weights, KV and the CPU
# compute buffer on a machine without a GPU); default 99, every layer on GPU0.
NGL=${NGL:-99}
bin_dir="${LLAMA_CPP_BIN:?set LLAMA_CPP_BIN to the folder holding llama.cpp binaries}"
compute_tol="${COMPUTE_TOL_PCT:-5}"
cli=""
for c in llama-completion llama-cli; do
    if [[ -x "$bin_dir/$c" ]]; then cli="$bin_dir/$c"; break; fi
done
[[ -n "$cli" ]] || { echo "estimate-vs-llamacpp: no llama-completion or llama-cli in $bin_dir" >&2; exit 2; }
export PYTHONPATH="$PWD/gpu-stage/py-gguf:$PWD/.whl/py-gguf${PYTHONPATH:+:$PYTHONPATH}"
if ! py_err=$(python3 -c "import gguf, numpy" 2>&1); then
    echo "estimate-vs-llamacpp: python3 needs numpy and gguf (with PyYAML), PYTHONPATH=$PYTHONPATH:" >&2
    echo "$py_err" | tail -3 >&2
    exit 2
fi
hbm="${HBMALLOC_CLI:-}"
for c in gpu-stage/hbmalloc target/release/hbmalloc; do
    [[ -z "$hbm" && -x $c ]] && hbm="$PWD/$c"
done
if [[ -z "$hbm" ]]; then
    command -v cargo >/dev/null || { echo "estimate-vs-llamacpp: no hbmalloc CLI and no cargo" >&2; exit 2; }
    cargo build --release --bin hbmalloc
    hbm="$PWD/target/release/hbmalloc"
fi

# Options this llama.cpp build knows: --fit (newer builds fit the run to free memory unless told
# not to, which would change what is measured) and -no-cnv (no chat loop).
help_text="$("$cli" --help 2>&1 || true)"
extra=()
grep -q -- '--fit ' <<<"$help_text" && extra+=(-fit off)
grep -q -- '-no-cnv' <<<"$help_text" && extra+=(-no-cnv)
# The library's own info lines (the buffer sizes) come at common's "trace" verbosity, 4, in builds
# with --verbosity: at the default (3) a 2026-12 build printed none of them.
grep -q -- '--verbosity' <<<"$help_text" && extra+=(-lv 4)
work="$(mktemp -d)"
# LLAMA_LOG_DIR: keep llama.cpp's logs there (gpu-check brings them back with its own).
keep_logs() { [[ -n ${LLAMA_LOG_DIR:-} ]] && mkdir -p "$LLAMA_LOG_DIR" && cp "$work"/*.log "$LLAMA_LOG_DIR"/ 2>/dev/null; rm -rf "$work"; }
trap keep_logs EXIT

# write_model FILE ARCH N_LAYER N_EMBD N_HEAD N_HEAD_KV HEAD_DIM N_FF N_VOCAB SLIDING_WINDOW
write_model() {
python3 - "$@" <<'PY'
import sys, numpy as np, gguf
path, arch = sys.argv[1], sys.argv[2]
n_layer, n_embd, n_head, n_kv, hd, n_ff, n_vocab, swa = map(int, sys.argv[3:])
rng = np.random.default_rng(0)
w = gguf.GGUFWriter(path, arch)
w.add_block_count(n_layer); w.add_embedding_length(n_embd); w.add_feed_forward_length(n_ff)
w.add_head_count(n_head); w.add_head_count_kv(n_kv); w.add_context_length(8192)
w.add_key_length(hd); w.add_value_length(hd)
w.add_rope_dimension_count(hd); w.add_layer_norm_rms_eps(1e-6)
if swa: w.add_sliding_window(swa)
w.add_tokenizer_model("llama")
toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
toks += [f"t{i}" for i in range(n_vocab - len(toks))]
w.add_token_list(toks); w.add_token_scores([0.0] * n_vocab)
w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
w.add_bos_token_id(1); w.add_eos_token_id(2)
f16 = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float16)
f32 = lambda n: np.ones(n, dtype=np.float32)
gemma = arch in ("gemma2", "gemma3")
w.add_tensor("token_embd.weight", f16(n_vocab, n_embd))
for i in range(n_layer):
    w.add_tensor(f"blk.{i}.attn_norm.weight", f32(n_embd))
    w.add_tensor(f"blk.{i}.attn_q.weight", f16(n_head * hd, n_embd))
    w.add_tensor(f"blk.{i}.attn_k.weight", f16(n_kv * hd, n_embd))
    w.add_tensor(f"blk.{i}.attn_v.weight", f16(n_kv * hd, n_embd))
    w.add_tensor(f"blk.{i}.attn_output.weight", f16(n_embd, n_head * hd))
    if arch == "gemma3":
        w.add_tensor(f"blk.{i}.attn_q_norm.weight", f32(hd))
        w.add_tensor(f"blk.{i}.attn_k_norm.weight", f32(hd))
    if gemma:
        w.add_tensor(f"blk.{i}.post_attention_norm.weight", f32(n_embd))
    w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(n_embd))
    w.add_tensor(f"blk.{i}.ffn_gate.weight", f16(n_ff, n_embd))
    w.add_tensor(f"blk.{i}.ffn_up.weight", f16(n_ff, n_embd))
    w.add_tensor(f"blk.{i}.ffn_down.weight", f16(n_embd, n_ff))
    if gemma:
        w.add_tensor(f"blk.{i}.post_ffw_norm.weight", f32(n_embd))
w.add_tensor("output_norm.weight", f32(n_embd))
if not gemma:  # Gemma ties its output to the token embeddings
    w.add_tensor("output.weight", f16(n_vocab, n_embd))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
PY
}

failures=0
# compare NAME FILE CTX FA CTK CTV
compare() {
    local name="$1" file="$2" ctx="$3" fa="$4" ctk="$5" ctv="$6" log="$work/$1.log"
    # One token of a tiny model takes seconds; 60 s means a hang, not a slow run.
    if ! timeout 60 "$cli" -m "$file" -c "$ctx" -ngl "$NGL" -fa "$fa" -ctk "$ctk" -ctv "$ctv" -n 1 \
        -p "hi" --no-warmup "${extra[@]}" >"$log" 2>&1 </dev/null; then
        echo "estimate-vs-llamacpp: llama.cpp failed (or hung) for $name; the end of its log:" >&2
        tail -20 "$log" >&2
        failures=$((failures + 1))
        echo "| $name | - | run | - | - | - | FAIL (llama.cpp exited non-zero) |" | tee -a "$out_md"
        return 0
    fi
    if ! "$hbm" estimate "$file" --ctx "$ctx" --ngl "$NGL" --fa "$fa" --ctk "$ctk" --ctv "$ctv" \
        --json >"$work/$name.json" 2>"$work/$name.err"; then
        echo "estimate-vs-llamacpp: hbmalloc estimate failed for $name: $(cat "$work/$name.err")" >&2
        failures=$((failures + 1))
        return 0
    fi
    local rc=0
    python3 - "$name" "$log" "$work/$name.json" "$compute_tol" <<'PY' | tee -a "$out_md" || rc=$?
import json, re, sys
name, log_path, est_path, tol_pct = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
lines = open(log_path, errors="replace").read().splitlines()
est = json.load(open(est_path))
MIB = 1 << 20
pats = {
    "model": re.compile(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB"),
    "KV": re.compile(r"(\S+) KV buffer size\s*=\s*([\d.]+) MiB"),
    "compute": re.compile(r"(\S+) compute buffer size\s*=\s*([\d.]+) MiB"),
}
kv_total = re.compile(r"llama_kv_cache: size\s*=\s*([\d.]+) MiB")
# Only the last model load counts (a build that dry-runs a fit loads more than once): a model
# buffer line after any KV or compute line starts over.
got = {k: {} for k in pats}
kv_sizes = []
for line in lines:
    m = pats["model"].search(line)
    if m and (got["KV"] or got["compute"]):
        got = {k: {} for k in pats}
        kv_sizes = []
    for kind, pat in pats.items():
        m = pat.search(line)
        if m:
            got[kind][m.group(1)] = got[kind].get(m.group(1), 0.0) + float(m.group(2))
    m = kv_total.search(line)
    if m:
        kv_sizes.append(float(m.group(1)))
missing = [k for k in pats if not got[k]] + ([] if kv_sizes else ["llama_kv_cache: size"])
if missing:
    print(f"| {name} | - | parse | - | - | - | FAIL (no {', '.join(missing)} lines) |")
    looked = [l for l in lines if "buffer size" in l or "llama_kv_cache" in l or "load_tensors" in l]
    what = f"the {len(looked)} lines looked at" if looked else "none of its lines matched; its last lines"
    sys.stderr.write(f"estimate-vs-llamacpp: {name}: no {', '.join(missing)} line(s) in the log; {what}:\n")
    for l in looked or lines[-30:]:
        sys.stderr.write(f"    {l}\n")
    sys.exit(1)
names = {"CPU": ["CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host"], "GPU0": ["CUDA0"]}
bad = 0
def row(dev, kind, ours, theirs, ok, tol):
    global bad
    diff = ours - theirs
    pct = f"{100 * diff / theirs:+.1f}%" if theirs else "-"
    verdict = "ok" if ok else f"FAIL (tolerance {tol})"
    bad += not ok
    print(f"| {name} | {dev} | {kind} | {ours:.2f} | {theirs:.2f} | {diff:+.2f} ({pct}) | {verdict} |")
for kind, field in [("model", "weights_bytes"), ("KV", "kv_bytes"), ("compute", "compute_bytes")]:
    for d in est["devices"]:
        ours = d[field] / MIB
        theirs = sum(got[kind].get(n, 0.0) for n in names.get(d["name"], []))
        if ours == 0 and theirs == 0:
            continue
        if kind == "compute":
            ok = abs(ours - theirs) <= tol_pct / 100 * max(theirs, 0.01)
            row(d["name"], kind, ours, theirs, ok, f"{tol_pct:g}%")
        else:
            row(d["name"], kind, ours, theirs, abs(ours - theirs) <= 0.01 + 1e-9, "0.01 MiB")
ours = est["kv_bytes"] / MIB
row("all", "KV (size lines)", ours, sum(kv_sizes), abs(ours - sum(kv_sizes)) <= 0.01 * len(kv_sizes) + 1e-9, "0.01 MiB")
unmapped = sorted({n for kind in got for n in got[kind]} - {n for v in names.values() for n in v})
if unmapped:
    sys.stderr.write(f"estimate-vs-llamacpp: {name}: buffers not compared: {', '.join(unmapped)}\n")
sys.exit(1 if bad else 0)
PY
    if ((rc != 0)); then failures=$((failures + 1)); fi
    return 0
}

{
    echo "# hbmalloc estimate vs llama.cpp ($(basename "$cli"), $(date -u +%Y-%m-%d))"
    echo
    echo "Weights and KV must agree to 0.01 MiB; compute buffers to ${compute_tol}%."
    echo
    echo "| case | device | buffer | estimate MiB | llama.cpp MiB | difference | verdict |"
    echo "|---|---|---|---|---|---|---|"
} >"$out_md"
cat "$out_md"

write_model "$work/gqa.gguf" llama 4 512 8 2 64 1408 2000 0
# Gemma-2: no sliding_window key, so llama.cpp's default 4096; layers 0 and 2 slide, 1 and 3
# keep every cell; 128-wide heads; the output tied to the token embeddings. Flash attention
# only off: Gemma-2's attention soft-capping may turn it off in some builds.
write_model "$work/gemma2.gguf" gemma2 4 512 4 2 128 1408 2000 0
# Gemma-3: period 6, so layers 0-4 and 6 slide over 256 tokens and layer 5 keeps every cell.
write_model "$work/gemma3.gguf" gemma3 7 512 4 2 128 1408 2000 256
for ctx in 512 4096; do
    compare "gqa-c$ctx-f16" "$work/gqa.gguf" "$ctx" off f16 f16
    compare "gqa-c$ctx-f16-fa" "$work/gqa.gguf" "$ctx" on f16 f16
    compare "gqa-c$ctx-q8_0-fa" "$work/gqa.gguf" "$ctx" on q8_0 q8_0
    compare "gqa-c$ctx-q4_0-fa" "$work/gqa.gguf" "$ctx" on q4_0 q4_0
done
for ctx in 2048 8192; do
    compare "gemma2-swa-c$ctx-f16" "$work/gemma2.gguf" "$ctx" off f16 f16
done
for ctx in 1024 8192; do
    compare "gemma3-swa-c$ctx-f16" "$work/gemma3.gguf" "$ctx" off f16 f16
    compare "gemma3-swa-c$ctx-f16-fa" "$work/gemma3.gguf" "$ctx" on f16 f16
    compare "gemma3-swa-c$ctx-q8_0-fa" "$work/gemma3.gguf" "$ctx" on q8_0 q8_0
done
echo
echo "written: $out_md ($SECONDS s)"
if ((failures > 0)); then
    echo "estimate-vs-llamacpp: $failures case(s) outside tolerance or unreadable (see FAIL rows)" >&2
    exit 1
fi
echo "estimate-vs-llamacpp: every case within tolerance"
