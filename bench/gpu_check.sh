#!/usr/bin/env bash
# The GPU checks of "Stable Diffusion on a GPU" in one command, for a session lent the GPU machine:
#   bash bench/gpu_check.sh OUT_DIR                 # on the GPU (about 8 minutes on an H200, not yet timed)
#   TINY=1 bash bench/gpu_check.sh /tmp/gpu-dry     # the same path on the CPU, tiny configs (a dry run)
# 1. every method in bf16 and fp16 end to end on a tiny pipeline (tests marked cuda);
# 2. bench/sd_gpu.py on the SD v1.4 architecture, bf16, with and without gradient checkpointing,
#    scaled to NUM_IMAGES images per set (the full recipe's time is projected from the measured rates),
#    then once with --adversarial;
# 3. bench/attack_sd.py: attack time per prompt and peak memory (UnlearnDiffAtk, concept inversion) on that
#    architecture in bf16, without and with gradient checkpointing;
# 4. bench/memory.py: the computed per-process memory table, step 2's measured peaks beside its SD 1.x rows;
# 5. bench/masked_adam_step.py on CUDA: the step time of --optimizer-state masked against dense, and the
#    device-to-host synchronisations of one step (torch.cuda's sync debug mode).
set -euo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
n=${NUM_IMAGES:-96}
py=${PYTHON:-python}
size=()
batch=8  # bench/sd_gpu.py's train batch (the paper's)
if [ -n "${TINY:-}" ]; then size=(--tiny --generation-steps 2 --max-train-steps 3 --train-batch-size 2); n=4; batch=2; fi
"$py" -m pytest -q -m cuda tests/ 2>&1 | tail -n 15 | tee "$out/cuda_tests.txt"
for ckpt in --gradient-checkpointing ""; do
    name=sd_gpu_bf16${ckpt:+_checkpointing}
    "$py" bench/sd_gpu.py "${size[@]}" --mixed-precision bf16 --num-images "$n" $ckpt --out "$out/$name.json"
done
# 2b. adversarial SalUn (the recipe's inner attack inside training), bf16 with checkpointing; its own name
#     keeps it out of step 4's glob
"$py" bench/sd_gpu.py "${size[@]}" --mixed-precision bf16 --num-images "$n" --gradient-checkpointing --adversarial \
    --out "$out/sd_gpu_adversarial_bf16.json"
"$py" bench/attack_sd.py ${TINY:+--tiny} --out "$out/attack_sd.json"
"$py" bench/attack_sd.py ${TINY:+--tiny} --gradient-checkpointing --out "$out/attack_sd_checkpointing.json"
# 4. the computed per-process memory table, with the measured peaks of step 2 beside its SD 1.x rows
"$py" bench/memory.py --batch "$batch" --measured "$out"/sd_gpu_bf16*.json --out "$out/memory.json"
# 5. MaskedAdam's step on the full-size SD 1.x UNet: time, state and host syncs per step (the CPU in a dry run)
if [ -n "${TINY:-}" ]; then device=cpu; else device=cuda; fi
"$py" bench/masked_adam_step.py ${TINY:+--tiny} --device "$device" --out "$out/masked_adam_step_$device.json"
