# Interoperability: a PEFT LoRA adapter applied on the fly by mergestream
# (`model: BASE+ADAPTER`, linear with weight 1) against PEFT's own
# merge_and_unload on transformers' model (float32 on the CPU), for the
# adapter kinds gen_model writes: plain, rsLoRA, DoRA, embedding LoRA,
# modules_to_save, per-module rank and alpha patterns. Every weight must agree
# to 1e-6 of its tensor's largest value (B A summed in another order).
# Optional and heavy: runs only when MS_INTEROP_VENV names a Python
# environment with torch, transformers and peft (mergekit's, see
# interop_mergekit.sh), else skips (77).
source "$(dirname "$0")/lib.bash"

V=${MS_INTEROP_VENV:-}
if [ -z "$V" ] || ! "$V/bin/python" -c 'import torch, transformers, peft, safetensors' 2>/dev/null; then
  echo "MS_INTEROP_VENV does not name an environment with torch, transformers and peft: skipped"
  exit 77
fi
cd "$WORK"
"$MS_GEN" base base --preset tiny --dtype f32 --seed 1

cat > reference.py <<'PYEOF'
"""reference.py BASE ADAPTER OURS: PEFT's merge_and_unload against our merged
weights; one line; exit 1 when a weight differs by more than 1e-6 of its
tensor's largest value."""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import load_file

base, adapter, ours = sys.argv[1:4]
m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
want = PeftModel.from_pretrained(m, adapter).merge_and_unload().state_dict()
got = load_file(ours)
if set(want) != set(got):
    sys.exit(f"the tensor names differ: {sorted(set(want) ^ set(got))}")
worst, same, total = 0.0, 0, 0
for k, v in got.items():
    w = want[k].float()
    worst = max(worst, ((w - v).abs().max() / w.abs().max()).item())
    same += int((w == v).sum())
    total += v.numel()
ok = worst <= 1e-6
print(f"{100.0 * same / total:.2f}% the same bits, worst {worst:.3g} of the largest value: {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PYEOF

fails=0
for variant in "plain:" "rslora:--rslora" "dora:--dora" "embeddings:--embeddings" \
  "modules_to_save:--modules-to-save lm_head,model.norm" \
  "patterns:--rank-pattern v_proj=2,o_proj=8 --alpha-pattern q_proj=3"; do
  name=${variant%%:*}
  read -r -a flags <<< "${variant#*:}"
  "$MS_GEN" lora base "lora_$name" --seed 7 --rank 4 --targets all-linear "${flags[@]}"
  printf 'merge_method: linear\nmodels:\n  - model: ./base+./lora_%s\n    parameters: {weight: 1}\ndtype: float32\n' \
    "$name" > "$name.yml"
  "$MS_BIN" merge "$name.yml" -o "out_$name" --quiet
  printf '%-16s ' "$name:"
  "$V/bin/python" reference.py base "lora_$name" "out_$name/model.safetensors" 2> "ref_$name.err" ||
    { fails=$((fails + 1)); tail -3 "ref_$name.err"; }
done
[ "$fails" -eq 0 ] || fail "$fails adapter kind(s) disagree with PEFT"
echo "interop_peft: ok"
