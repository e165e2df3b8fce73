# passthrough frankenmerges: slices of layers from several models stacked and
# renumbered, checked tensor by tensor against their sources (the embeddings
# from the first slice's source, the final norm and lm_head from the last
# one's, as mergekit); `scale` with a filter; the slice errors a user meets.
source "$(dirname "$0")/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset tiny --dtype bf16 --seed 1      # 2 layers
"$MS_GEN" finetune "$M/base" "$M/ft" --seed 2
hashes() { "$MS_BIN" inspect "$1" --hash | awk 'length($NF) == 16 && $NF ~ /^[0-9a-f]+$/ {print $1, $NF}' | sort; }

# 2x layer stacking: base layers 0-1, then ft's layers 0-1 -> 4 layers
cat > "$WORK/stack.yml" <<EOR
merge_method: passthrough
slices:
  - sources:
      - model: ./models/base
        layer_range: [0, 2]
  - sources:
      - model: ./models/ft
        layer_range: [0, 2]
EOR
"$MS_BIN" merge "$WORK/stack.yml" -o "$WORK/stack" --quiet
"$MS_BIN" verify "$WORK/stack" --quiet
grep -qE '"num_hidden_layers":[[:space:]]*4' "$WORK/stack/config.json" || fail "num_hidden_layers not 4"
hashes "$WORK/stack" > "$WORK/out.h"
hashes "$M/base" > "$WORK/base.h"
hashes "$M/ft" > "$WORK/ft.h"
n=0
while read -r name hash; do
  case "$name" in
    model.layers.*)
      layer=$(echo "$name" | cut -d. -f3); rest=$(echo "$name" | cut -d. -f4-)
      if [ "$layer" -lt 2 ]; then src="$WORK/base.h"; sl=$layer; else src="$WORK/ft.h"; sl=$((layer - 2)); fi
      want=$(awk -v n="model.layers.$sl.$rest" '$1 == n {print $2}' "$src") ;;
    *embed*) want=$(awk -v n="$name" '$1 == n {print $2}' "$WORK/base.h") ;; # the first slice's source
    *) want=$(awk -v n="$name" '$1 == n {print $2}' "$WORK/ft.h") ;;   # final norm, lm_head: the last slice's
  esac
  [ "$hash" = "$want" ] || fail "$name: $hash, its source has $want"
  n=$((n + 1))
done < "$WORK/out.h"
[ "$n" -eq 39 ] || fail "expected 39 tensors, got $n"
# (mergekit's rule: checked against mergekit 0.1.5 itself, bench/RESULTS.md)
# a base_model takes no part in a passthrough of slices: a warning, the same bytes
printf 'base_model: ./models/ft\n' | cat - "$WORK/stack.yml" > "$WORK/stack_base.yml"
"$MS_BIN" merge "$WORK/stack_base.yml" -o "$WORK/stack_base" --quiet 2> "$WORK/stack_base.err" ||
  { cat "$WORK/stack_base.err" >&2; fail "passthrough slices with a base_model failed"; }
grep -q "stack_base.yml:1: base_model takes no part in a passthrough of slices" "$WORK/stack_base.err" ||
  fail "no warning that base_model takes no part"
same_bytes "$WORK/stack" "$WORK/stack_base"

# scale with a filter: the scaled tensors change, the others stay copies
cat > "$WORK/scale.yml" <<EOR
merge_method: passthrough
slices:
  - sources:
      - model: ./models/ft
        layer_range: [0, 2]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
EOR
"$MS_BIN" merge "$WORK/scale.yml" -o "$WORK/scaled" --json --quiet > "$WORK/s.json"
# the two o_proj tensors are computed (on the GPU where there is one), the rest copied
computed=$(grep -oE '"tensors_(cpu|gpu)":[[:space:]]*[0-9]+' "$WORK/s.json" | awk -F: '{ n += $2 } END { print n + 0 }')
[ "$computed" = 2 ] || fail "expected the 2 o_proj tensors computed, got $computed"
hashes "$WORK/scaled" > "$WORK/scaled.h"
grep -v o_proj "$WORK/scaled.h" | diff - <(grep -v o_proj "$WORK/ft.h") > /dev/null || fail "unscaled tensors differ from the source"
grep o_proj "$WORK/scaled.h" | diff - <(grep o_proj "$WORK/ft.h") > /dev/null && fail "o_proj was not scaled"

# one model copied whole
printf 'merge_method: passthrough\nmodels:\n  - model: ./models/ft\n' > "$WORK/copy.yml"
"$MS_BIN" merge "$WORK/copy.yml" -o "$WORK/copy" --quiet
hashes "$WORK/copy" | diff - "$WORK/ft.h" > /dev/null || fail "passthrough of one model is not a copy"
# ... and with a base_model: the layers from the model, every other tensor
# (embeddings, final norm, lm_head) from the base
printf 'merge_method: passthrough\nbase_model: ./models/base\nmodels:\n  - model: ./models/ft\n' > "$WORK/copy_base.yml"
"$MS_BIN" merge "$WORK/copy_base.yml" -o "$WORK/copy_base" --quiet
hashes "$WORK/copy_base" > "$WORK/copy_base.h"
diff <(grep '^model\.layers\.' "$WORK/copy_base.h") <(grep '^model\.layers\.' "$WORK/ft.h") > /dev/null ||
  fail "passthrough with a base: layers are not the model's"
diff <(grep -v '^model\.layers\.' "$WORK/copy_base.h") <(grep -v '^model\.layers\.' "$WORK/base.h") > /dev/null ||
  fail "passthrough with a base: non-layer tensors are not the base's"
grep -vq '^model\.layers\.' "$WORK/copy_base.h" || fail "passthrough with a base: no non-layer tensors"

# a scale gradient in a slice runs over the slice's own layers (t = k / (n - 1)):
# layers 1..3 of a 4-layer model with scale [1, 0] are scaled 1, 0.5, 0, the
# same layers as the one-layer slices with those scales give
"$MS_GEN" base "$M/four" --preset tiny --layers 4 --dtype bf16 --seed 7
cat > "$WORK/grad.yml" <<EOR
merge_method: passthrough
slices:
  - sources:
      - model: ./models/four
        layer_range: [1, 4]
        parameters: {scale: [1.0, 0.0]}
EOR
cat > "$WORK/steps.yml" <<EOR
merge_method: passthrough
slices:
  - sources:
      - {model: ./models/four, layer_range: [1, 2], parameters: {scale: 1.0}}
  - sources:
      - {model: ./models/four, layer_range: [2, 3], parameters: {scale: 0.5}}
  - sources:
      - {model: ./models/four, layer_range: [3, 4], parameters: {scale: 0.0}}
EOR
"$MS_BIN" merge "$WORK/grad.yml" -o "$WORK/grad" --quiet
"$MS_BIN" merge "$WORK/steps.yml" -o "$WORK/steps" --quiet
diff <(hashes "$WORK/grad" | grep '^model\.layers\.') <(hashes "$WORK/steps" | grep '^model\.layers\.') > /dev/null ||
  fail "a slice's scale gradient is not read over the slice's layers"
hashes "$WORK/grad" | grep -q '^model\.layers\.0\.' || fail "no layers in the gradient output"

# errors: exit 2 naming the key and its line
printf 'merge_method: passthrough\nslices:\n  - sources:\n      - model: ./models/ft\n        layer_range: [0, 9]\n' > "$WORK/range.yml"
expect_fail 2 "range.yml:3: slices\[0\] layer_range \[0, 9\) is out of bounds" "$MS_BIN" merge "$WORK/range.yml" -o "$WORK/o1"
printf 'merge_method: passthrough\nslices:\n  - sources:\n      - model: ./models/ft\n        layer_range: [1, 1]\n' > "$WORK/empty.yml"
expect_fail 2 "empty.yml:5: .*layer_range must be" "$MS_BIN" merge "$WORK/empty.yml" -o "$WORK/o2"
printf 'merge_method: passthrough\nslices:\n  - sources:\n      - model: ./models/ft\n        layer_range: [0, 1]\n      - model: ./models/base\n        layer_range: [0, 1]\n' > "$WORK/two.yml"
expect_fail 2 "two.yml:4: .*several sources" "$MS_BIN" merge "$WORK/two.yml" -o "$WORK/o3"
printf 'merge_method: ties\nbase_model: ./models/base\nslices:\n  - sources:\n      - model: ./models/ft\n        layer_range: [0, 1]\n' > "$WORK/ties.yml"
expect_fail 2 "ties.yml:4: slices\[0\] does not list the base_model" "$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/o4"
# the last slice's source gives lm_head: a tied model has none
"$MS_GEN" base "$M/tied" --preset tiny --dtype bf16 --seed 5 --tie-embeddings
printf 'merge_method: passthrough\nslices:\n  - sources:\n      - model: ./models/base\n        layer_range: [0, 2]\n  - sources:\n      - model: ./models/tied\n        layer_range: [0, 1]\n' > "$WORK/tied.yml"
expect_fail 3 "tied.yml: tensor 'lm_head.weight' is missing from './models/tied' \(slices\[1\].sources\[0\]\)" \
  "$MS_BIN" merge "$WORK/tied.yml" -o "$WORK/o5"
echo "merge_passthrough: ok"
