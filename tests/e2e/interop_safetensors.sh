# Interoperability: the Hugging Face `safetensors` Python package (its Rust
# validator) reads what gen_model and the shard writer produce: single and
# sharded models, F32/F16/BF16, a PEFT adapter. Skipped (77) when python3 with
# safetensors and numpy is missing; MS_PYTHON may name another interpreter
# (e.g. a virtual environment's), else MS_INTEROP_VENV's is used when set.
source "$(dirname "$0")/lib.bash"

PY=${MS_PYTHON:-${MS_INTEROP_VENV:+$MS_INTEROP_VENV/bin/python}}
PY=${PY:-python3}
"$PY" -c 'import safetensors, numpy' 2>/dev/null || { echo "safetensors/numpy not installed: skipped"; exit 77; }

"$MS_GEN" base "$WORK/single" --preset tiny --dtype bf16 --seed 1
"$MS_GEN" base "$WORK/sharded" --preset tiny --dtype f32 --seed 2 --shard-size 40K
"$MS_GEN" finetune "$WORK/single" "$WORK/ft16" --seed 3 --dtype f16 --extra-vocab 4
"$MS_GEN" lora "$WORK/single" "$WORK/lora" --seed 4 --rank 4 --targets all-linear

"$PY" - "$WORK" <<'PYEOF' || fail "the safetensors package disagrees"
import glob, json, os, struct, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

work = sys.argv[1]

def raw_tensors(path):
    """Our own reading of the file: header JSON and raw bytes per tensor."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    assert n % 8 == 0, f"{path}: header length {n} not a multiple of 8"
    header = json.loads(data[8:8 + n])
    assert list(header)[0] == "__metadata__" and header["__metadata__"]["format"] == "pt"
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = (info["dtype"], info["shape"], data[8 + n + b:8 + n + e])
    return out

def check_file(path):
    raw = raw_tensors(path)
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}, f.metadata()
        assert sorted(f.keys()) == sorted(raw), path
        for name in f.keys():
            sl = f.get_slice(name)
            dtype, shape, _ = raw[name]
            assert sl.get_dtype() == dtype and list(sl.get_shape()) == shape, name
    if all(v[0] != "BF16" for v in raw.values()):  # numpy has no bfloat16
        arrays = load_file(path)
        for name, arr in arrays.items():
            assert arr.tobytes() == raw[name][2], f"{path}: {name} bytes differ"
    return raw

single = check_file(f"{work}/single/model.safetensors")
assert "lm_head.weight" in single

shards = sorted(glob.glob(f"{work}/sharded/model-*-of-*.safetensors"))
assert len(shards) > 1, shards
index = json.load(open(f"{work}/sharded/model.safetensors.index.json"))
names = {}
for s in shards:
    for name in check_file(s):
        names[name] = os.path.basename(s)
assert index["weight_map"] == names, "index weight_map"
assert index["metadata"]["total_size"] == sum(
    len(v[2]) for s in shards for v in raw_tensors(s).values())

ft = check_file(f"{work}/ft16/model.safetensors")
assert ft["model.embed_tokens.weight"][1][0] == single["model.embed_tokens.weight"][1][0] + 4
lora = check_file(f"{work}/lora/adapter_model.safetensors")
assert any(k.endswith("mlp.down_proj.lora_B.weight") for k in lora)
print("safetensors interop OK:", len(shards), "shards")
PYEOF
