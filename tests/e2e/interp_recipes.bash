# The interpolation and model-soup methods' usual recipes, shared by
# tests/e2e/merge_methods.sh and tests/gpu/test_gpu_interp_cli.sh (source it
# after lib.bash and after generating $WORK/models/{base,ft1,ft2,ft3}).
# write_recipe NAME: the recipe text on stdin, models relative to $WORK
write_recipe() { cat > "$WORK/$1.yml"; }

write_recipe slerp <<'EOR'
merge_method: slerp
base_model: ./models/base
models:
  - model: ./models/base
  - model: ./models/ft1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
EOR
write_recipe nuslerp <<'EOR'
merge_method: nuslerp
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 0.4}
  - model: ./models/ft2
    parameters: {weight: 0.6}
EOR
write_recipe nuslerp_rows <<'EOR'
merge_method: nuslerp
models:
  - model: ./models/ft1
    parameters: {weight: [0.2, 0.8]}
  - model: ./models/ft3
    parameters: {weight: 1}
parameters: {nuslerp_flatten: false}
out_dtype: float32
EOR
write_recipe nuslerp_cols <<'EOR'
merge_method: nuslerp
base_model: ./models/base
models:
  - model: ./models/ft2
    parameters: {weight: 1}
  - model: ./models/ft3
    parameters: {weight: 1}
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
EOR
write_recipe multislerp <<'EOR'
merge_method: multislerp
base_model: ./models/base
models:
  - model: ./models/ft1
    parameters: {weight: 1}
  - model: ./models/ft2
    parameters: {weight: 0.5}
  - model: ./models/ft3
    parameters: {weight: 0.25}
EOR
write_recipe karcher <<'EOR'
merge_method: karcher
models:
  - model: ./models/ft1
  - model: ./models/ft2
  - model: ./models/ft3
parameters:
  max_iter: 50
  tol: 1e-9
dtype: float16
EOR
write_recipe model_stock <<'EOR'
merge_method: model_stock
base_model: ./models/base
models:
  - model: ./models/ft1
  - model: ./models/ft2
  - model: ./models/ft3
dtype: bfloat16
EOR
write_recipe model_stock_fw <<'EOR'
merge_method: model_stock
base_model: ./models/base
models:
  - model: ./models/ft1
  - model: ./models/ft2
parameters: {filter_wise: true}
EOR
write_recipe nearswap <<'EOR'
merge_method: nearswap
base_model: ./models/base
models:
  - model: ./models/ft2
parameters: {t: 0.0005}
EOR
write_recipe sce <<'EOR'
merge_method: sce
base_model: ./models/base
models:
  - model: ./models/ft1
  - model: ./models/ft2
  - model: ./models/ft3
parameters: {select_topk: 0.3}
EOR
write_recipe ram <<'EOR'
merge_method: ram
base_model: ./models/base
models:
  - model: ./models/ft1
  - model: ./models/ft3
EOR
write_recipe ramplus_tl <<'EOR'
merge_method: ramplus_tl
base_model: ./models/base
models:
  - model: ./models/ft1
  - model: ./models/ft3
parameters: {epsilon: 1e-4, r: 0.5}
EOR
write_recipe arcee_fusion <<'EOR'
merge_method: arcee_fusion
base_model: ./models/base
models:
  - model: ./models/base
  - model: ./models/ft1
dtype: bfloat16
EOR
