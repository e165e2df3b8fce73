# Interoperability: `mergestream perplexity` and `mergestream hessian` against
# Hugging Face transformers' own forward pass (torch, float32 on the CPU), on
# generated float32 models: Llama with and without tied embeddings, Llama with
# llama3 rope scaling, Mistral without and with a sliding window, and Qwen2
# with q/k/v biases; then configs transformers 5 reads its own way: a tied
# config over a checkpoint that also has lm_head.weight (the head is
# lm_head.weight) and both rope_scaling and rope_parameters (rope_scaling is
# used), each with our one warning line. Calibration
# lines of different lengths go through mergestream in padded batches of 4
# and through transformers one unpadded line at a time. The mean token NLL
# must agree to 1e-7 relative, and every layer's statistics H = 2/N sum x x^T
# (transformers' side gathered by hooks on each Linear's input) to 1e-5 of
# the statistic's largest value (ours sum in fp32, the reference in fp64).
# Then transformers loads a sharded merge output as it is.
# Optional and heavy: runs only when MS_INTEROP_VENV names a Python
# environment with torch, transformers and safetensors (mergekit's, see
# interop_mergekit.sh), else skips (77).
source "$(dirname "$0")/lib.bash"

V=${MS_INTEROP_VENV:-}
if [ -z "$V" ] || ! "$V/bin/python" -c 'import torch, transformers, safetensors' 2>/dev/null; then
  echo "MS_INTEROP_VENV does not name an environment with torch and transformers: skipped"
  exit 77
fi
PY="$V/bin/python"
cd "$WORK"

# 12 lines of 3 to 70 token ids (vocab 1024)
awk 'BEGIN { srand(3); for (i = 0; i < 12; i++) { n = 3 + int(rand() * 68); s = "";
  for (j = 0; j < n; j++) s = s (j ? " " : "") int(rand() * 1024); print s } }' > calib.txt

"$MS_GEN" base llama --preset small --dtype f32 --seed 5
"$MS_GEN" base tied --preset small --dtype f32 --seed 6 --tie-embeddings
"$MS_GEN" base llama3 --preset small --dtype f32 --seed 7
"$MS_GEN" base mistral --preset small --dtype f32 --seed 8
"$MS_GEN" base qwen2 --preset small --dtype f32 --seed 9
"$MS_GEN" base mistral8 --preset small --dtype f32 --seed 10
"$MS_GEN" base ropeboth --preset small --dtype f32 --seed 11
# the architectures gen_model does not write: config.json edits, and Qwen2's
# q/k/v biases added to the weights
"$PY" - <<'PYEOF'
import json, shutil, torch
from safetensors.torch import load_file, save_file

def edit(d, f):
    c = json.load(open(d + "/config.json"))
    f(c)
    json.dump(c, open(d + "/config.json", "w"), indent=1)

def llama3(c):
    c["rope_theta"] = 500000.0
    c["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}

def mistral(c):
    c.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)

def mistral8(c):
    c.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8)

def tiedhead(c):
    c["tie_word_embeddings"] = True

def ropeboth(c):
    c["rope_theta"] = 500.0
    c["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 77.0}
    c["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}

def qwen2(c):
    c.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False, sliding_window=None)
    for k in ("attention_bias", "mlp_bias", "head_dim"):
        c.pop(k, None)

edit("llama3", llama3)
edit("mistral", mistral)
edit("qwen2", qwen2)
edit("mistral8", mistral8)
shutil.copytree("llama", "tiedhead")
edit("tiedhead", tiedhead)
edit("ropeboth", ropeboth)
t = load_file("qwen2/model.safetensors")
g = torch.Generator().manual_seed(0)
layers = json.load(open("qwen2/config.json"))["num_hidden_layers"]
for l in range(layers):
    for p in "qkv":
        w = t[f"model.layers.{l}.self_attn.{p}_proj.weight"]
        t[f"model.layers.{l}.self_attn.{p}_proj.bias"] = torch.randn(w.shape[0], generator=g) * 0.1
save_file(t, "qwen2/model.safetensors", metadata={"format": "pt"})
PYEOF

cat > reference.py <<'PYEOF'
"""reference.py MODEL CALIB OUR_NLL OUR_HESSIANS: transformers' mean NLL and
input statistics against ours; one line; exit 1 when they disagree."""
import sys, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file

model_dir, calib, our_nll, hess = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
m.eval()
sums = {}

def hook(name):
    def gather(mod, inp):
        x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
        s = sums.setdefault(name, [0, 0])
        s[0] = s[0] + x.T @ x
        s[1] += x.shape[0]
    return gather

for name, mod in m.named_modules():
    if isinstance(mod, torch.nn.Linear):
        mod.register_forward_pre_hook(hook(name))
total, n = 0.0, 0
for line in open(calib):
    ids = torch.tensor([[int(t) for t in line.split()]])
    with torch.no_grad():
        logp = torch.log_softmax(m(ids).logits.double()[0, :-1], -1)
    total -= logp.gather(1, ids[0, 1:, None]).sum().item()
    n += ids.shape[1] - 1
nll = total / n
ours = load_file(hess)
worst, missing = 0.0, []
for name, (xtx, rows) in sums.items():
    key = name
    for proj, shared in ((".q_proj", ".qkv_input"), (".k_proj", ".qkv_input"), (".v_proj", ".qkv_input"),
                         (".gate_proj", ".gate_up_input"), (".up_proj", ".gate_up_input")):
        key = key.replace(proj, shared)
    if key not in ours:
        missing.append(key)
        continue
    want = 2.0 * xtx / rows
    got = ours[key].double()
    got = torch.triu(got) + torch.triu(got, 1).T  # only the upper triangle is specified
    worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
rel = abs(our_nll - nll) / abs(nll)
ok = rel <= 1e-7 and worst <= 1e-5 and not missing
print(f"mean NLL {our_nll:.10g} vs {nll:.10g} (relative {rel:.2g}); H: worst {worst:.3g} of the largest value "
      f"over {len(sums)} linear layers{'; missing ' + ', '.join(missing) if missing else ''}: {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PYEOF

fails=0
for d in llama tied llama3 mistral qwen2 mistral8 tiedhead ropeboth; do
  nll=$("$MS_BIN" perplexity "$d" --calib calib.txt --batch-size 4 --device cpu --json --quiet 2> "ppl_$d.err" |
    grep -oE '"mean_nll":[[:space:]]*[-0-9.e+]+' | grep -oE '[-0-9.e+]+$') ||
    { cat "ppl_$d.err" >&2; fail "perplexity of $d failed"; }
  "$MS_BIN" hessian "$d" --calib calib.txt --batch-size 4 --device cpu -o "h_$d" --quiet
  printf '%-8s ' "$d:"
  "$PY" reference.py "$d" calib.txt "$nll" "h_$d/hessians.safetensors" 2> "ref_$d.err" ||
    { fails=$((fails + 1)); tail -3 "ref_$d.err"; }
done
[ "$fails" -eq 0 ] || fail "$fails model(s) disagree with transformers"
[ "$(grep -c 'warning: .*lm_head.weight is present: the head is lm_head.weight, not model.embed_tokens.weight' \
  ppl_tiedhead.err)" -eq 1 ] || { cat ppl_tiedhead.err >&2; fail "tiedhead: not one warning on the head"; }
[ "$(grep -c 'warning: .*both rope_scaling and rope_parameters .*using rope_scaling' ppl_ropeboth.err)" -eq 1 ] ||
  { cat ppl_ropeboth.err >&2; fail "ropeboth: not one warning on the rope objects"; }
! grep -h 'warning' ppl_llama.err ppl_mistral8.err || fail "a warning for a plain config"

# a merge's output directory (bf16, three shards and an index) is a model
# transformers loads as it is: the class and dtype from config.json, every
# weight the bytes of our shards
"$MS_GEN" base b16 --preset tiny --dtype bf16 --seed 1
"$MS_GEN" finetune b16 ft16 --seed 2
printf 'merge_method: ties\nbase_model: ./b16\nmodels:\n  - model: ./ft16\n    parameters: {weight: 1, density: 0.3}\n' > ties.yml
"$MS_BIN" merge ties.yml -o merged --out-shard-size 100KB --quiet
[ -f merged/model.safetensors.index.json ] || fail "the merge wrote no shard index"
"$PY" - <<'PYEOF' || fail "transformers does not load the merged model as written"
import glob, torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file
m = AutoModelForCausalLM.from_pretrained("merged")
assert type(m).__name__ == "LlamaForCausalLM" and m.dtype == torch.bfloat16, (type(m).__name__, m.dtype)
ours = {}
for f in glob.glob("merged/*.safetensors"):
    ours.update(load_file(f))
state = m.state_dict()
assert set(state) == set(ours), set(state) ^ set(ours)
for k, v in ours.items():
    assert torch.equal(state[k], v), k
m(torch.tensor([[1, 2, 3]]))
print(f"transformers loads the merged model: {len(ours)} tensors as written, bfloat16")
PYEOF
echo "interop_transformers: ok"
