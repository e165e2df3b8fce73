# slices with several sources merged by the recipe's method (ties, dare_ties,
# slerp, linear), checked against the same merge done on whole models: a
# slice over every layer, and slices of one layer each, give the whole-model
# merge's bytes; a slice that starts later renumbers its layers; the slice
# errors a user meets (exit 2, the key and its line).
source "$(dirname "$0")/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset tiny --dtype bf16 --seed 41   # 2 layers
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 42
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 43 --dtype f16
hashes() { "$MS_BIN" inspect "$1" --hash | awk 'length($NF) == 16 && $NF ~ /^[0-9a-f]+$/ {print $1, $NF}' | sort; }
merge() { "$MS_BIN" merge "$WORK/$1.yml" -o "$WORK/$1" --quiet && "$MS_BIN" verify "$WORK/$1" --quiet; }
layers_of() { grep '^model\.layers\.' "$1"; }

# whole-model references
cat > "$WORK/ties.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: ./models/ft2
    parameters: {weight: 0.4, density: 0.7}
parameters: {lambda: 0.9}
EOR
cat > "$WORK/dare.yml" <<'EOR'
merge_method: dare_ties
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: ./models/ft2
    parameters: {weight: 0.4, density: 0.7}
random_seed: 7
EOR
cat > "$WORK/slerp.yml" <<'EOR'
merge_method: slerp
base_model: ./models/base
models:
  - model: ./models/base
  - model: ./models/ft1
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.8]
    - value: 0.35
EOR
for r in ties dare slerp; do merge "$r"; hashes "$WORK/$r" > "$WORK/$r.h"; done

# one slice over every layer == the whole-model merge, byte for byte
cat > "$WORK/ties1.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
slices:
  - sources:
      - model: ./models/ft1
        layer_range: [0, 2]
        parameters: {weight: 0.6, density: 0.5}
      - model: ./models/base
        layer_range: [0, 2]
      - model: ./models/ft2
        layer_range: [0, 2]
        parameters: {weight: 0.4, density: 0.7}
parameters: {lambda: 0.9}
EOR
merge ties1
hashes "$WORK/ties1" | diff - "$WORK/ties.h" > /dev/null || fail "ties over one full slice differs from the whole-model ties"
same_bytes "$WORK/ties" "$WORK/ties1"
grep -qE '"num_hidden_layers":[[:space:]]*2' "$WORK/ties1/config.json" || fail "ties1: num_hidden_layers not 2"

# two one-layer slices [0, 1) and [1, 2) == the whole-model merge
cat > "$WORK/ties2.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 1]}
      - {model: ./models/ft1, layer_range: [0, 1], parameters: {weight: 0.6, density: 0.5}}
      - {model: ./models/ft2, layer_range: [0, 1], parameters: {weight: 0.4, density: 0.7}}
  - sources:
      - {model: ./models/base, layer_range: [1, 2]}
      - {model: ./models/ft1, layer_range: [1, 2], parameters: {weight: 0.6, density: 0.5}}
      - {model: ./models/ft2, layer_range: [1, 2], parameters: {weight: 0.4, density: 0.7}}
parameters: {lambda: 0.9}
EOR
merge ties2
hashes "$WORK/ties2" | diff - "$WORK/ties.h" > /dev/null || fail "ties over two one-layer slices differs from the whole-model ties"

# dare_ties: the random masks follow the output tensor and the source's slot
sed -e 's/^merge_method: ties/merge_method: dare_ties/' -e 's/^parameters: {lambda: 0.9}/random_seed: 7/' \
  "$WORK/ties1.yml" > "$WORK/dare1.yml"
merge dare1
hashes "$WORK/dare1" | diff - "$WORK/dare.h" > /dev/null || fail "dare_ties over one full slice differs from the whole-model merge"

# slerp with a gradient: one full slice == the whole-model slerp for the layer
# tensors (mergekit plans the final norm and lm_head at t = 1 for slices)
cat > "$WORK/slerp1.yml" <<'EOR'
merge_method: slerp
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 2]}
      - {model: ./models/ft1, layer_range: [0, 2]}
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.8]
    - value: 0.35
EOR
merge slerp1
hashes "$WORK/slerp1" > "$WORK/slerp1.h"
diff <(layers_of "$WORK/slerp1.h") <(layers_of "$WORK/slerp.h") > /dev/null || fail "slerp layers over one full slice differ from the whole-model slerp"
[ "$(layers_of "$WORK/slerp1.h" | wc -l)" -gt 10 ] || fail "slerp1: too few layer tensors"
grep -v '^model\.layers\.' "$WORK/slerp1.h" | grep -q embed_tokens || fail "slerp1: no embed_tokens"
diff <(grep embed_tokens "$WORK/slerp1.h") <(grep embed_tokens "$WORK/slerp.h") > /dev/null || fail "slerp1: embed_tokens (t = 0) differs"
# scalar t: two one-layer slices == the whole-model slerp, every tensor
printf 'merge_method: slerp\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\nparameters: {t: 0.3}\n' > "$WORK/slerpc.yml"
cat > "$WORK/slerp2.yml" <<'EOR'
merge_method: slerp
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/ft1, layer_range: [0, 1]}
      - {model: ./models/base, layer_range: [0, 1]}
  - sources:
      - {model: ./models/base, layer_range: [1, 2]}
      - {model: ./models/ft1, layer_range: [1, 2]}
parameters: {t: 0.3}
EOR
merge slerpc; merge slerp2
hashes "$WORK/slerp2" | diff - <(hashes "$WORK/slerpc") > /dev/null || fail "slerp over two one-layer slices differs from the whole-model slerp"
same_bytes "$WORK/slerpc" "$WORK/slerp2"

# renumbering: layer 1 of every source becomes output layer 0, twice over
cat > "$WORK/shift.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/base, layer_range: [1, 2]}
      - {model: ./models/ft1, layer_range: [1, 2], parameters: {weight: 0.6, density: 0.5}}
      - {model: ./models/ft2, layer_range: [1, 2], parameters: {weight: 0.4, density: 0.7}}
  - sources:
      - {model: ./models/base, layer_range: [0, 2]}
      - {model: ./models/ft1, layer_range: [0, 2], parameters: {weight: 0.6, density: 0.5}}
      - {model: ./models/ft2, layer_range: [0, 2], parameters: {weight: 0.4, density: 0.7}}
parameters: {lambda: 0.9}
EOR
merge shift
grep -qE '"num_hidden_layers":[[:space:]]*3' "$WORK/shift/config.json" || fail "shift: num_hidden_layers not 3"
hashes "$WORK/shift" > "$WORK/shift.h"
n=0
while read -r name hash; do
  case "$name" in
    model.layers.*)
      layer=$(echo "$name" | cut -d. -f3); rest=$(echo "$name" | cut -d. -f4-)
      if [ "$layer" -eq 0 ]; then sl=1; else sl=$((layer - 1)); fi
      want=$(awk -v n="model.layers.$sl.$rest" '$1 == n {print $2}' "$WORK/ties.h") ;;
    *) want=$(awk -v n="$name" '$1 == n {print $2}' "$WORK/ties.h") ;;
  esac
  [ "$hash" = "$want" ] || fail "shift: $name: $hash, the whole-model merge has $want"
  n=$((n + 1))
done < "$WORK/shift.h"
[ "$n" -eq "$(( $(wc -l < "$WORK/ties.h") + $(grep -c '^model\.layers\.1\.' "$WORK/ties.h") ))" ] || fail "shift: $n tensors"

# linear without a base: every source is merged; layout from the first source
cat > "$WORK/lin1.yml" <<'EOR'
merge_method: linear
slices:
  - sources:
      - {model: ./models/ft1, layer_range: [0, 2], parameters: {weight: 0.25}}
      - {model: ./models/ft2, layer_range: [0, 2], parameters: {weight: 0.75}}
EOR
printf 'merge_method: linear\nmodels:\n  - {model: ./models/ft1, parameters: {weight: 0.25}}\n  - {model: ./models/ft2, parameters: {weight: 0.75}}\n' > "$WORK/lin.yml"
merge lin; merge lin1
hashes "$WORK/lin1" | diff - <(hashes "$WORK/lin") > /dev/null || fail "linear over one full slice differs from the whole-model linear"

# errors: exit 2, one line naming the key and its line
cat > "$WORK/len.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 2]}
      - {model: ./models/ft1, layer_range: [0, 1], parameters: {weight: 1}}
EOR
expect_fail 2 "len.yml:6: slices\[0\]\.sources\[1\]\.layer_range \[0, 1\) spans 1 layers but sources\[0\]'s spans 2" \
  "$MS_BIN" merge "$WORK/len.yml" -o "$WORK/o1"
cat > "$WORK/nobase.yml" <<'EOR'
merge_method: slerp
base_model: ./models/base
parameters: {t: 0.5}
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 1]}
      - {model: ./models/ft1, layer_range: [0, 1]}
  - sources:
      - {model: ./models/ft1, layer_range: [1, 2]}
EOR
expect_fail 2 "nobase.yml:8: slices\[1\] does not list the base_model './models/base'" "$MS_BIN" merge "$WORK/nobase.yml" -o "$WORK/o2"
cat > "$WORK/oob.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/ft1, layer_range: [0, 2], parameters: {weight: 1}}
      - {model: ./models/base, layer_range: [1, 3]}
EOR
expect_fail 2 "oob.yml:4: slices\[0\] layer_range \[1, 3\) is out of bounds: './models/base' has 2 layers" \
  "$MS_BIN" merge "$WORK/oob.yml" -o "$WORK/o3"
[ ! -e "$WORK/o1" ] && [ ! -e "$WORK/o2" ] && [ ! -e "$WORK/o3" ] || fail "a failed merge left an output"
echo "merge_slices: ok"
