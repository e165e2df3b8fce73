# The original system's best method, end to end: Hessians captured with
# `mergestream hessian` from calibration tokens through each fine-tune, then
# ties_sparsegpt / dare_sparsegpt / regmean merges that read them.
source "$(dirname "$0")/lib.bash"

M="$WORK/models"
"$MS_GEN" base "$M/base" --preset tiny --dtype bf16 --seed 1
"$MS_GEN" finetune "$M/base" "$M/ft1" --seed 2
"$MS_GEN" finetune "$M/base" "$M/ft2" --seed 3
write_calib "$WORK/calib.txt" 12 24 7
for m in ft1 ft2; do
  "$MS_BIN" hessian "$M/$m" --calib "$WORK/calib.txt" -o "$WORK/h_$m" --quiet
done

write_hessian_recipes
sed 's/ties_sparsegpt/ties/; s/, hessian: .\/h_ft[12]//' "$WORK/ties_sparsegpt.yml" > "$WORK/ties.yml"

for m in ties_sparsegpt dare_sparsegpt regmean; do
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/out_$m" --quiet
  "$MS_BIN" verify "$WORK/out_$m" --quiet
  evict_cache "$M"
  "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/t1_$m" --threads 1 --io pread --direct-io --quiet
  same_bytes "$WORK/out_$m" "$WORK/t1_$m"
  # two compute workers (what a GPU gets): the factorisations share the cpu
  # pool under a lock and the saliency cache across tensors
  MERGESTREAM_COMPUTE_WORKERS=2 "$MS_BIN" merge "$WORK/$m.yml" -o "$WORK/w2_$m" --quiet
  same_bytes "$WORK/out_$m" "$WORK/w2_$m"
done
"$MS_BIN" merge "$WORK/ties.yml" -o "$WORK/out_ties" --quiet
# saliency picks other entries than magnitude: the outputs must differ
cmp -s "$WORK/out_ties/model.safetensors" "$WORK/out_ties_sparsegpt/model.safetensors" \
  && fail "ties_sparsegpt gave the same bytes as ties: the Hessians were not used"

# a hessian directory that does not exist, and hessian on a method that takes none
sed 's|./h_ft1|./h_missing|' "$WORK/ties_sparsegpt.yml" > "$WORK/missing.yml"
expect_fail 2 "missing.yml:5: .*h_missing" "$MS_BIN" merge "$WORK/missing.yml" -o "$WORK/o1"
sed 's/ties_sparsegpt/ties/' "$WORK/ties_sparsegpt.yml" > "$WORK/wrong.yml"
expect_fail 2 "wrong.yml:5: .*hessian" "$MS_BIN" merge "$WORK/wrong.yml" -o "$WORK/o2"
# a Hessian-aware method with no `hessian:` on any model: an error, not a silent plain merge
for m in ties_sparsegpt regmean; do
  sed 's/, hessian: [^}]*}/}/; s/{hessian: [^}]*}/{}/' "$WORK/$m.yml" > "$WORK/none_$m.yml"
  expect_fail 2 "none_$m.yml:1: merge_method '$m' needs \`hessian: DIR\` on at least one model" \
    "$MS_BIN" merge "$WORK/none_$m.yml" -o "$WORK/o_none"
done

# Hessians written in shards (as for a large model) and `hessian:` naming the
# file itself: the same bytes as the single-file directories
"$MS_BIN" hessian "$M/ft1" --calib "$WORK/calib.txt" -o "$WORK/hs_ft1" --out-shard-size 40K --quiet
[ -f "$WORK/hs_ft1/hessians.safetensors.index.json" ] || fail "no sharded Hessians"
# inspect reads them as the directory or as its index file, every shard's statistics listed
for p in "$WORK/hs_ft1" "$WORK/hs_ft1/hessians.safetensors.index.json"; do
  "$MS_BIN" inspect "$p" > "$WORK/hs.txt" || fail "inspect $p"
  grep -q "safetensors index, .* in [2-9][0-9]* files" "$WORK/hs.txt" || fail "inspect $p: $(tail -1 "$WORK/hs.txt")"
  grep -q "^model.layers.0.mlp.down_proj " "$WORK/hs.txt" || fail "inspect $p lists no down_proj statistic"
done
sed 's|./h_ft1}|./hs_ft1}|; s|./h_ft2}|./h_ft2/hessians.safetensors}|' "$WORK/regmean.yml" > "$WORK/split.yml"
[ "$(grep -cE 'hs_ft1|hessians.safetensors' "$WORK/split.yml")" -eq 2 ] || fail "split.yml was not rewritten"
"$MS_BIN" merge "$WORK/split.yml" -o "$WORK/out_split" --quiet
same_bytes "$WORK/out_regmean" "$WORK/out_split"

# a directory that holds no Hessians, and Hessians of a model of another shape:
# exit 3 naming the directory, or the statistic, the weight and both shapes
mkdir "$WORK/h_empty"
sed 's|./h_ft1|./h_empty|' "$WORK/regmean.yml" > "$WORK/empty.yml"
expect_fail 3 "h_empty: no hessians.safetensors or hessians.safetensors.index.json" \
  "$MS_BIN" merge "$WORK/empty.yml" -o "$WORK/o3"
"$MS_GEN" base "$M/narrow" --preset tiny --dtype bf16 --seed 4 --hidden 32 --heads 4 --kv-heads 2
"$MS_BIN" hessian "$M/narrow" --calib "$WORK/calib.txt" -o "$WORK/h_narrow" --quiet
sed 's|./h_ft1|./h_narrow|' "$WORK/regmean.yml" > "$WORK/narrow.yml"
want="h_narrow/hessians.safetensors: Hessian 'model.layers.0.self_attn.qkv_input' for 'model.layers.0.self_attn.q_proj.weight' is F32 \[32, 32\]; the weight needs F32 \[64, 64\]"
expect_fail 3 "$want" "$MS_BIN" merge "$WORK/narrow.yml" -o "$WORK/o4"
expect_fail 3 "$want" "$MS_BIN" merge "$WORK/narrow.yml" -o "$WORK/o4" --dry-run # from the headers, while planning
[ ! -e "$WORK/o3" ] && [ ! -e "$WORK/o4" ] || fail "a failed merge left its output directory"
echo "merge_hessian: ok"
