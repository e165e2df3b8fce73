# slices with several sources merged by the recipe's method (ties, dare_ties,
# slerp, linear), checked against the same merge done on whole models: a
# slice over every layer, and slices of one layer each, give the whole-model
# merge's bytes; a slice that starts later renumbers its layers; a slice's
# own parameters, t and base_model (mergekit's per-slice keys) give the same
# bytes as the equivalent per-source or whole-model recipe; the slice errors
# a user meets (exit 2, the key and its line).
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

# slerp with a gradient: one full slice == the whole-model slerp, every
# tensor (mergekit 0.1.5 reads the tensors outside the layers at t = 0, as
# the whole-model merge does)
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
diff "$WORK/slerp1.h" "$WORK/slerp.h" > /dev/null || fail "slerp1: the final norm or lm_head (t = 0) differs"
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

# a slice's own parameters (mergekit: the source's, then the slice's, then the
# top level's): the same numbers given per slice == ties2's per-source ones ==
# the whole-model merge; the wrong top-level values must lose to them
cat > "$WORK/ties3.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 1]}
      - {model: ./models/ft1, layer_range: [0, 1]}
      - {model: ./models/ft2, layer_range: [0, 1], parameters: {weight: 0.4, density: 0.7}}
    parameters: {weight: 0.6, density: 0.5, lambda: 0.9}
    residual_weight: 0.5
  - sources:
      - {model: ./models/base, layer_range: [1, 2]}
      - {model: ./models/ft1, layer_range: [1, 2], parameters: {density: 0.5}}
      - {model: ./models/ft2, layer_range: [1, 2], parameters: {weight: 0.4}}
    parameters:
      weight: [0.6, 0.6]
      density:
        - filter: no_such_tensor
          value: 0.1
        - value: 0.7
      lambda: 0.9
parameters: {lambda: 0.5, weight: 3, density: 0.2}
EOR
"$MS_BIN" merge "$WORK/ties3.yml" -o "$WORK/ties3" 2> "$WORK/ties3.err" || { cat "$WORK/ties3.err" >&2; fail "ties3 failed"; }
grep -q "ties3.yml:9: residual_weight in slices\[0\] has no effect" "$WORK/ties3.err" || fail "ties3: no residual_weight warning naming its line"
"$MS_BIN" verify "$WORK/ties3" --quiet
hashes "$WORK/ties3" | diff - "$WORK/ties.h" > /dev/null || fail "ties with per-slice parameters differs from the whole-model ties"
same_bytes "$WORK/ties2" "$WORK/ties3"

# slerp's t per slice (no top-level t): scalars in two one-layer slices give
# layer 0 and the embeddings of the whole-model slerp at t = 0.3 and layer 1,
# the final norm and lm_head (the last slice's t) of the one at t = 0.6; a
# gradient [0.3, 0.6] over one two-layer slice the same, but the final norm
# and lm_head at the gradient's t = 0, 0.3 (mergekit 0.1.5)
printf 'merge_method: slerp\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft1\nparameters: {t: 0.6}\n' > "$WORK/slerpd.yml"
cat > "$WORK/slerp3.yml" <<'EOR'
merge_method: slerp
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 1]}
      - {model: ./models/ft1, layer_range: [0, 1]}
    parameters: {t: 0.3}
  - sources:
      - {model: ./models/base, layer_range: [1, 2]}
      - {model: ./models/ft1, layer_range: [1, 2]}
    parameters: {t: 0.6}
EOR
cat > "$WORK/slerp4.yml" <<'EOR'
merge_method: slerp
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 2]}
      - {model: ./models/ft1, layer_range: [0, 2]}
    parameters:
      t: [0.3, 0.6]
parameters: {t: 0.95}
EOR
merge slerpd; merge slerp3; merge slerp4
hashes "$WORK/slerpc" > "$WORK/slerpc.h"; hashes "$WORK/slerpd" > "$WORK/slerpd.h"
{ grep -E '^(model\.layers\.0\.|model\.embed_tokens)' "$WORK/slerpc.h"
  grep -vE '^(model\.layers\.0\.|model\.embed_tokens)' "$WORK/slerpd.h"; } | sort > "$WORK/slerp34.want"
[ "$(grep -c '^model\.layers\.1\.' "$WORK/slerp34.want")" -gt 5 ] && grep -q '^lm_head' "$WORK/slerp34.want" ||
  fail "slerp34: the reference lacks layer 1 or lm_head"
cmp -s "$WORK/slerpc.h" "$WORK/slerpd.h" && fail "slerp at t = 0.3 and t = 0.6 give the same tensors: the check proves nothing"
hashes "$WORK/slerp3" | diff - "$WORK/slerp34.want" > /dev/null || fail "slerp with t per slice differs from the whole-model slerps"
{ grep -E '^model\.layers\.1\.' "$WORK/slerpd.h"
  grep -vE '^model\.layers\.1\.' "$WORK/slerpc.h"; } | sort > "$WORK/slerp4.want"
hashes "$WORK/slerp4" | diff - "$WORK/slerp4.want" > /dev/null || fail "slerp with a per-slice gradient differs from the whole-model slerps"

# a slice's own base_model: its source that is that model gives the base; the
# top-level base (here a wrong one, or none) takes no part == the whole-model
# ties on ft2's base
cat > "$WORK/tiesb.yml" <<'EOR'
merge_method: ties
base_model: ./models/ft2
models:
  - model: ./models/ft1
    parameters: {weight: 0.6, density: 0.5}
out_dtype: float32
EOR
cat > "$WORK/tiesb1.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/ft2, layer_range: [0, 2]}
      - {model: ./models/ft1, layer_range: [0, 2], parameters: {weight: 0.6, density: 0.5}}
    base_model: ./models/ft2
out_dtype: float32
EOR
grep -v '^base_model' "$WORK/tiesb1.yml" > "$WORK/tiesb2.yml"
merge tiesb; merge tiesb1; merge tiesb2
hashes "$WORK/tiesb" > "$WORK/tiesb.h"
hashes "$WORK/tiesb1" | diff - "$WORK/tiesb.h" > /dev/null || fail "ties with a slice's own base_model differs from the whole-model ties on that base"
hashes "$WORK/tiesb2" | diff - "$WORK/tiesb.h" > /dev/null || fail "ties with only a slice's base_model differs from the whole-model ties on that base"
diff <(hashes "$WORK/tiesb1") <(hashes "$WORK/ties") > /dev/null && fail "tiesb1 equals ties on the top-level base: the check proves nothing"

# errors: exit 2, one line naming the key and its line
cat > "$WORK/len.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 2]}
      - {model: ./models/ft1, layer_range: [0, 1], parameters: {weight: 1}}
EOR
expect_fail 2 "len.yml:6: slices\[0\]\.sources\[1\]\.layer_range \[0, 1\) spans 1 layer but sources\[0\]'s spans 2" \
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
cat > "$WORK/skey.yml" <<'EOR'
merge_method: ties
base_model: ./models/base
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 2]}
      - {model: ./models/ft1, layer_range: [0, 2], parameters: {weight: 1}}
    layers: 2
EOR
expect_fail 2 "skey.yml:7: unknown key 'layers' in slices\[0\]" "$MS_BIN" merge "$WORK/skey.yml" -o "$WORK/o4"
cat > "$WORK/sbase.yml" <<'EOR'
merge_method: ties
slices:
  - sources:
      - {model: ./models/base, layer_range: [0, 2]}
      - {model: ./models/ft1, layer_range: [0, 2], parameters: {weight: 1}}
    base_model: ./models/ft2
EOR
expect_fail 2 "sbase.yml:3: slices\[0\] does not list the base_model './models/ft2'" "$MS_BIN" merge "$WORK/sbase.yml" -o "$WORK/o5"
[ ! -e "$WORK/o1" ] && [ ! -e "$WORK/o2" ] && [ ! -e "$WORK/o3" ] && [ ! -e "$WORK/o4" ] && [ ! -e "$WORK/o5" ] ||
  fail "a failed merge left an output"
echo "merge_slices: ok"
