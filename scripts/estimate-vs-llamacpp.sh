#!/usr/bin/env bash
# Compares `hbmalloc estimate --json` with the buffer sizes llama.cpp itself reports, on a machine
# with an NVIDIA GPU and a CUDA build of llama.cpp. Not run in CI (no GPU there).
#
#   LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin bash scripts/estimate-vs-llamacpp.sh [OUT.md]
#
# Needs: python3 with the gguf and numpy packages (scripts/install-test-deps.sh puts gguf in
# .whl/py-gguf), a llama.cpp build (llama-completion or llama-cli in LLAMA_CPP_BIN), and
# target/release/hbmalloc (built here if missing). For each case it writes a small random-weight
# llama-architecture GGUF (GQA; a sliding-window variant), runs llama.cpp for one token, parses
#   "<dev> model buffer size = X MiB", "<dev> KV buffer size = X MiB", "<dev> compute buffer size = X MiB"
# and prints a table (estimate, llama.cpp, difference) per device and component to stdout and to
# OUT.md (default: estimate-vs-llamacpp.md). Weights and KV should agree to llama.cpp's printed
# 0.01 MiB; compute buffers are an approximation (docs/estimate.md) and their difference is what
# this script measures.
set -euo pipefail
cd "$(dirname "$0")/.."

out_md="${1:-estimate-vs-llamacpp.md}"
bin_dir="${LLAMA_CPP_BIN:?set LLAMA_CPP_BIN to the folder holding llama.cpp binaries}"
cli=""
for c in llama-completion llama-cli; do
    if [[ -x "$bin_dir/$c" ]]; then cli="$bin_dir/$c"; break; fi
done
[[ -n "$cli" ]] || { echo "no llama-completion or llama-cli in $bin_dir" >&2; exit 1; }
export PYTHONPATH="$PWD/.whl/py-gguf${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import gguf, numpy" || { echo "python3 needs gguf and numpy (scripts/install-test-deps.sh)" >&2; exit 1; }
[[ -x target/release/hbmalloc ]] || cargo build --release --bin hbmalloc
hbm="$PWD/target/release/hbmalloc"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# write_model FILE N_LAYER N_EMBD N_HEAD N_HEAD_KV N_FF N_VOCAB SLIDING_WINDOW
write_model() {
python3 - "$@" <<'PY'
import sys, numpy as np, gguf
path, n_layer, n_embd, n_head, n_kv, n_ff, n_vocab, swa = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
w = gguf.GGUFWriter(path, "llama")
w.add_block_count(n_layer); w.add_embedding_length(n_embd); w.add_feed_forward_length(n_ff)
w.add_head_count(n_head); w.add_head_count_kv(n_kv); w.add_context_length(8192)
w.add_rope_dimension_count(n_embd // n_head); w.add_layer_norm_rms_eps(1e-5)
if swa: w.add_sliding_window(swa)
w.add_tokenizer_model("llama")
toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
toks += [f"t{i}" for i in range(n_vocab - len(toks))]
w.add_token_list(toks); w.add_token_scores([0.0] * n_vocab)
w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
w.add_bos_token_id(1); w.add_eos_token_id(2)
f16 = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float16)
f32 = lambda n: np.ones(n, dtype=np.float32)
hd = n_embd // n_head
w.add_tensor("token_embd.weight", f16(n_vocab, n_embd))
for i in range(n_layer):
    w.add_tensor(f"blk.{i}.attn_norm.weight", f32(n_embd))
    w.add_tensor(f"blk.{i}.attn_q.weight", f16(n_head * hd, n_embd))
    w.add_tensor(f"blk.{i}.attn_k.weight", f16(n_kv * hd, n_embd))
    w.add_tensor(f"blk.{i}.attn_v.weight", f16(n_kv * hd, n_embd))
    w.add_tensor(f"blk.{i}.attn_output.weight", f16(n_embd, n_head * hd))
    w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(n_embd))
    w.add_tensor(f"blk.{i}.ffn_gate.weight", f16(n_ff, n_embd))
    w.add_tensor(f"blk.{i}.ffn_up.weight", f16(n_ff, n_embd))
    w.add_tensor(f"blk.{i}.ffn_down.weight", f16(n_embd, n_ff))
w.add_tensor("output_norm.weight", f32(n_embd))
w.add_tensor("output.weight", f16(n_vocab, n_embd))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
PY
}

# compare NAME FILE CTX FA CTK CTV
compare() {
    local name="$1" file="$2" ctx="$3" fa="$4" ctk="$5" ctv="$6" log="$work/$1.log"
    "$cli" -m "$file" -c "$ctx" -ngl 99 -fa "$fa" -ctk "$ctk" -ctv "$ctv" -n 1 -p "hi" \
        -no-cnv --no-warmup >"$log" 2>&1 </dev/null || { echo "llama.cpp failed for $name: see below" >&2; tail -20 "$log" >&2; return 1; }
    "$hbm" estimate "$file" --ctx "$ctx" --ngl 99 --fa "$fa" --ctk "$ctk" --ctv "$ctv" --json >"$work/$name.json"
    python3 - "$name" "$log" "$work/$name.json" <<'PY' | tee -a "$out_md"
import json, re, sys
name, log, est = sys.argv[1], open(sys.argv[2]).read(), json.load(open(sys.argv[3]))
mib = 1 << 20
def seen(kind):
    # llama.cpp prints e.g. "load_tensors:        CUDA0 model buffer size =   123.45 MiB".
    out = {}
    for dev, v in re.findall(rf"(\S+) {kind} buffer size =\s+([\d.]+) MiB", log):
        out[dev] = out.get(dev, 0.0) + float(v)
    return out
names = {"CPU": ["CPU", "CPU_Mapped", "CUDA_Host"], "GPU0": ["CUDA0"]}
for kind, field in [("model", "weights_bytes"), ("KV", "kv_bytes"), ("compute", "compute_bytes")]:
    got = seen(kind)
    for d in est["devices"]:
        ours = d[field] / mib
        theirs = sum(got.get(n, 0.0) for n in names.get(d["name"], []))
        if ours == 0 and theirs == 0:
            continue
        diff = ours - theirs
        pct = 100 * diff / theirs if theirs else float("inf")
        print(f"| {name} | {d['name']} | {kind} | {ours:.2f} | {theirs:.2f} | {diff:+.2f} ({pct:+.1f}%) |")
PY
}

{
    echo "# hbmalloc estimate vs llama.cpp ($(basename "$cli"), $(date -u +%Y-%m-%d))"
    echo
    echo "| case | device | buffer | estimate MiB | llama.cpp MiB | difference |"
    echo "|---|---|---|---|---|---|"
} >"$out_md"
cat "$out_md"

write_model "$work/gqa.gguf" 4 512 8 2 1408 2000 0
write_model "$work/swa.gguf" 4 512 8 2 1408 2000 256
for ctx in 512 4096; do
    compare "gqa-c$ctx-f16" "$work/gqa.gguf" "$ctx" off f16 f16
    compare "gqa-c$ctx-f16-fa" "$work/gqa.gguf" "$ctx" on f16 f16
    compare "gqa-c$ctx-q8_0-fa" "$work/gqa.gguf" "$ctx" on q8_0 q8_0
    compare "gqa-c$ctx-q4_0-fa" "$work/gqa.gguf" "$ctx" on q4_0 q4_0
done
compare "swa-c4096-f16" "$work/swa.gguf" 4096 off f16 f16
echo
echo "written: $out_md"
