# Interoperability: the same recipes through mergekit (mergekit-yaml, torch
# on the CPU) and through mergestream, on generated float32 models (one
# bfloat16 pair), compared tensor by tensor. Optional and heavy (mergekit
# pulls torch): it runs only when MS_INTEROP_VENV names a Python environment
# with mergekit installed (its bin/mergekit-yaml and bin/python), else it
# skips (77). Set it up with:
#   python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit
#
# What must hold, per recipe (bench/RESULTS.md has the figures):
#   same values    mergekit's own slerp example (bf16 models, a slice, t
#                  gradients per filter); ties (gradients, filters, slices,
#                  added tokens with tokenizer_source base, int8_mask,
#                  out_dtype bfloat16); dare_ties and dare_linear at density
#                  1; task_arithmetic (also with parameters it does not use,
#                  ignored as mergekit ignores them); ram, ramplus_tl;
#                  passthrough slices
#   a few ulps     linear, a LoRA adapter applied (mergekit through PEFT),
#                  slerp (scalar, gradients, slices), model_stock (and
#                  filter_wise), nearswap, sce, multislerp, karcher, nuslerp
#                  (every mode): every element within 1e-6 of its tensor's
#                  largest |value| (fp32 sums in another order)
#   documented     breadcrumbs, breadcrumbs_ties: equal magnitudes at a
#                  selection boundary go by index here, by torch's sort there;
#                  ties over a LoRA input: its deltas differ in the last bits,
#                  which can reorder magnitudes at the boundary (at most 0.01%
#                  of the elements each); arcee_fusion: mergekit estimates
#                  its quantile threshold from a random sample, we select
#                  exactly (at most 0.5%)
# DARE and DELLA draw from different random streams: only DARE at density 1
# (nothing dropped: the consensus and the rescale's skip) is compared.
source "$(dirname "$0")/lib.bash"

V=${MS_INTEROP_VENV:-}
if [ -z "$V" ] || [ ! -x "$V/bin/mergekit-yaml" ] ||
  ! "$V/bin/python" -c 'import safetensors, torch' 2>/dev/null; then
  echo "MS_INTEROP_VENV does not name an environment with mergekit: skipped"
  exit 77
fi

cd "$WORK"
"$MS_GEN" base base --preset tiny --dtype f32 --seed 1 # 2 layers
"$MS_GEN" finetune base ft1 --seed 2
"$MS_GEN" finetune base ft2 --seed 3
"$MS_GEN" finetune base ft_vocab --seed 5 --extra-vocab 4 # added tokens
"$MS_GEN" lora base lora --seed 7 --rank 4 --targets all-linear
"$MS_GEN" base base16 --preset tiny --dtype bf16 --seed 1 # for mergekit's own slerp example
"$MS_GEN" finetune base16 ft16 --seed 2

cat > compare.py <<'PYEOF'
"""compare.py OURS THEIRS BUDGET: every tensor of both, element by element;
prints one line; exits 1 when the bits differ (BUDGET "same") or when more
than the fraction BUDGET of the elements differ by more than 1e-6 of their
tensor's largest |value|."""
import glob, sys
import torch
from safetensors.torch import load_file

def load(d):
    out = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        out.update(load_file(f))
    return out

ours, theirs = load(sys.argv[1]), load(sys.argv[2])
exact = sys.argv[3] == "same"
budget = 0.0 if exact else float(sys.argv[3])
if set(ours) != set(theirs):
    sys.exit(f"the tensor names differ: {sorted(set(ours) ^ set(theirs))}")
total = equal = beyond = 0
worst = 0.0
for name in sorted(ours):
    a, b = ours[name], theirs[name]
    if a.shape != b.shape or a.dtype != b.dtype:
        sys.exit(f"{name}: {a.dtype}{tuple(a.shape)} here, {b.dtype}{tuple(b.shape)} in mergekit's")
    x, y = a.double(), b.double()
    d = (x - y).abs() / max(float(x.abs().max()), 1e-30)
    total += a.numel()
    equal += int(((x == y) | (x.isnan() & y.isnan())).sum())
    beyond += int((d > 1e-6).sum())
    worst = max(worst, float(d.max()))
ok = equal == total if exact else beyond <= budget * total
print(f"{total} elements: {100.0 * equal / total:.3f}% the same values, {beyond} beyond 1e-6 of their "
      f"tensor's max, worst {worst:.3g}: {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PYEOF

fails=0
# check NAME BUDGET RECIPE-LINES... (BUDGET: "same", or compare.py's fraction);
# "dtype: float32" is appended unless the recipe sets a dtype
check() {
  local name=$1 budget=$2; shift 2
  printf '%s\n' "$@" > "$name.yml"
  grep -q '^dtype:' "$name.yml" || echo "dtype: float32" >> "$name.yml"
  "$MS_BIN" merge "$name.yml" -o "ours_$name" --quiet
  "$V/bin/mergekit-yaml" "$name.yml" "theirs_$name" --lora-merge-cache lora_cache > "mergekit_$name.log" 2>&1 ||
    { tail -5 "mergekit_$name.log"; fail "$name: mergekit failed"; }
  printf '%-18s ' "$name:"
  "$V/bin/python" compare.py "ours_$name" "theirs_$name" "$budget" || fails=$((fails + 1))
}

TWO=("models:" "  - model: ./ft1" "    parameters: {weight: 0.6, density: 0.3}"
     "  - model: ./ft2" "    parameters: {weight: 0.4, density: 0.5}")
W2=("models:" "  - model: ./ft1" "    parameters: {weight: 0.7}" "  - model: ./ft2" "    parameters: {weight: 0.3}")
SLERP_T=("  t:" "    - filter: self_attn" "      value: [0, 0.5, 0.3, 0.7, 1]" "    - filter: mlp"
         "      value: [1, 0.5, 0.7, 0.3, 0]" "    - value: 0.5")

check ties same "merge_method: ties" "base_model: ./base" "${TWO[@]}"
check ties_filters same "merge_method: ties" "base_model: ./base" "models:" "  - model: ./ft1" "    parameters:" \
  "      weight: [0.2, 0.8]" "      density:" "        - filter: mlp" "          value: 0.5" "        - value: 0.2" \
  "  - model: ./ft2" "    parameters: {weight: 0.5, density: 0.4}"
check ties_slices same "merge_method: ties" "base_model: ./base" "slices:" "  - sources:" \
  "      - {model: ./base, layer_range: [0, 2]}" \
  "      - {model: ./ft1, layer_range: [0, 2], parameters: {weight: 0.5, density: 0.3}}" \
  "      - {model: ./ft2, layer_range: [0, 2], parameters: {weight: 0.5, density: 0.6}}"
check ties_vocab same "merge_method: ties" "base_model: ./base" "models:" "  - model: ./ft_vocab" \
  "    parameters: {weight: 0.6, density: 0.3}" "  - model: ./ft2" "    parameters: {weight: 0.4, density: 0.5}" \
  "tokenizer_source: base"
check ties_int8_mask same "merge_method: ties" "base_model: ./base" "${TWO[@]}" \
  "parameters: {int8_mask: true, normalize: true}"
check ties_out_bf16 same "merge_method: ties" "base_model: ./base" "${TWO[@]}" "out_dtype: bfloat16"
D1=("models:" "  - model: ./ft1" "    parameters: {weight: 0.6, density: 1.0}"
    "  - model: ./ft2" "    parameters: {weight: 0.4, density: 1.0}")
check dare_ties_d1 same "merge_method: dare_ties" "base_model: ./base" "${D1[@]}"
check dare_linear_d1 same "merge_method: dare_linear" "base_model: ./base" "${D1[@]}"
check ties_lambda same "merge_method: ties" "base_model: ./base" "${TWO[@]}" "parameters: {normalize: false, lambda: 0.8}"
check task_arithmetic same "merge_method: task_arithmetic" "base_model: ./base" "models:" "  - model: ./ft1" \
  "    parameters: {weight: 0.6}" "  - model: ./ft2" "    parameters: {weight: -0.4}" "parameters: {lambda: 1.3}"
check leftovers same "merge_method: task_arithmetic" "base_model: ./base" "${TWO[@]}" "  - model: ./base" \
  "    parameters: {weight: 0.5}" "parameters: {gamma: 0.1}"
check ram same "merge_method: ram" "base_model: ./base" "models:" "  - model: ./ft1" "  - model: ./ft2"
check ramplus_tl same "merge_method: ramplus_tl" "base_model: ./base" "models:" "  - model: ./ft1" "  - model: ./ft2"
check passthrough same "merge_method: passthrough" "slices:" "  - sources:" "      - model: ./ft1" \
  "        layer_range: [0, 2]" "  - sources:" "      - model: ./ft2" "        layer_range: [1, 2]"
check linear 0 "merge_method: linear" "${W2[@]}"
check linear_unnormalized 0 "merge_method: linear" "models:" "  - model: ./ft1" "    parameters: {weight: 0.6}" \
  "  - model: ./ft2" "    parameters: {weight: 0.7}" "parameters: {normalize: false}"
check lora 0 "merge_method: linear" "models:" "  - model: ./base+./lora" "    parameters: {weight: 1.0}"
check slerp 0 "merge_method: slerp" "base_model: ./base" "models:" "  - model: ./base" "  - model: ./ft1" \
  "parameters: {t: 0.3}"
check slerp_gradient 0 "merge_method: slerp" "base_model: ./base" "models:" "  - model: ./base" \
  "  - model: ./ft1" "parameters:" "${SLERP_T[@]}"
check slerp_slices 0 "merge_method: slerp" "base_model: ./base" "slices:" "  - sources:" \
  "      - {model: ./base, layer_range: [0, 2]}" "      - {model: ./ft1, layer_range: [0, 2]}" \
  "    parameters:" "      t: [0.3, 0.6]" "parameters: {t: 0.95}"
check slerp_example_bf16 same "slices:" "  - sources:" "      - model: ./base16" "        layer_range: [0, 2]" \
  "      - model: ./ft16" "        layer_range: [0, 2]" "merge_method: slerp" "base_model: ./base16" "parameters:" \
  "${SLERP_T[@]}" "dtype: bfloat16"
check model_stock 0 "merge_method: model_stock" "base_model: ./base" "models:" "  - model: ./ft1" "  - model: ./ft2"
check model_stock_fw 0 "merge_method: model_stock" "base_model: ./base" "models:" "  - model: ./ft1" \
  "  - model: ./ft2" "parameters: {filter_wise: true}"
check nearswap 0 "merge_method: nearswap" "base_model: ./base" "models:" "  - model: ./ft1" "parameters: {t: 0.001}"
check sce 0 "merge_method: sce" "base_model: ./base" "models:" "  - model: ./ft1" "  - model: ./ft2" \
  "parameters: {select_topk: 0.4}"
check multislerp 0 "merge_method: multislerp" "base_model: ./base" "${W2[@]}"
check karcher 0 "merge_method: karcher" "models:" "  - model: ./ft1" "  - model: ./ft2" "  - model: ./base"
check nuslerp 0 "merge_method: nuslerp" "${W2[@]}"
check nuslerp_base 0 "merge_method: nuslerp" "base_model: ./base" "${W2[@]}"
check nuslerp_rows 0 "merge_method: nuslerp" "${W2[@]}" "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}"
check nuslerp_cols 0 "merge_method: nuslerp" "${W2[@]}" "parameters: {nuslerp_flatten: false}"
check breadcrumbs 1e-4 "merge_method: breadcrumbs" "base_model: ./base" "${TWO[@]}" "parameters: {gamma: 0.05}"
check breadcrumbs_ties 1e-4 "merge_method: breadcrumbs_ties" "base_model: ./base" "${TWO[@]}" "parameters: {gamma: 0.05}"
check lora_ties 1e-4 "merge_method: ties" "base_model: ./base" "models:" "  - model: ./base+./lora" \
  "    parameters: {weight: 1.0, density: 0.5}" "  - model: ./ft1" "    parameters: {weight: 0.5, density: 0.5}"
check arcee_fusion 5e-3 "merge_method: arcee_fusion" "base_model: ./base" "models:" "  - model: ./ft1"
[ "$fails" -eq 0 ] || fail "$fails method(s) disagree with mergekit beyond what is documented"
echo "interop_mergekit: ok"
