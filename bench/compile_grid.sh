#!/usr/bin/env bash
# The README's memory table from real compiles (p3o_jax/cli/compile_check.py): the RL update
# of 4 models x 5 targets x 4 modes, then the other stages and other targets. EXP=tldr
# settings (64 prompts x 2 responses, 4 minibatches, 512 + 53 tokens; f32 params and AdamW,
# bf16 compute), FSDP over every device. Appends to $OUT (one JSON line per program) and skips
# a command already there; ~0.5-17 min per 6.9B / 8B program on 2 CPU cores (GPU fastest, v4
# megacore and LoRA slowest) and 4-12 GiB of host memory (the 6.9B's TPU sampler: over 16).
#   MAX_RSS_GIB=8 bash bench/compile_grid.sh [OUT]     (default bench/compile_check.jsonl)
# PYTHON: the interpreter (default: the Makefile's .venv/bin/python).
OUT=${1:-bench/compile_check.jsonl}
REMAT=policy.remat=block LORA=rl.lora.rank=8 TOP=rl.train_top_layers=2
STREAMED=rl.sampler_gather_once=false
UPD=programs=rl_update
run() {
  while [ -e "${PAUSE:-/nonexistent}" ]; do sleep 5; done   # PAUSE=file: wait while it exists
  grep -qF "\"args\": \"$*\"" "$OUT" 2>/dev/null && return   # done in an earlier pass
  ${PYTHON:-.venv/bin/python} -m p3o_jax.cli.compile_check jsonl="$OUT" "$@" > "$OUT.log" 2>&1 &
  local pid=$! rss
  while kill -0 $pid 2>/dev/null; do    # MAX_RSS_GIB: stop a compile that needs more host memory
    rss=$(awk '/VmRSS/{print $2}' /proc/$pid/status 2>/dev/null)
    if [ "${rss:-0}" -gt $(( ${MAX_RSS_GIB:-1000} * 1048576 )) ]; then
      kill $pid
      echo "{\"args\": \"$*\", \"skipped\": \"over ${MAX_RSS_GIB} GiB of host memory while compiling\"}" >> "$OUT"
    fi
    sleep 2
  done
  grep -E '^\{|does not fit|^error' "$OUT.log"
}
# the RL update (the program that decides fit): models x targets x (full, remat, top 2, LoRA)
for model in pythia-6.9b llama-3-8b pythia-2.8b pythia-1b; do
  for target in h100-x8 v4-32 v5e-16 v5e-8 v4-8; do
    for mode in "" $REMAT $TOP $LORA; do
      run model=$model target=$target $UPD $mode
    done
  done
done
# combinations for the 16 GiB chips
run model=pythia-6.9b target=v5e-16 $UPD $LORA $REMAT
run model=llama-3-8b target=v5e-16 $UPD $LORA $REMAT
run model=llama-3-8b target=v5e-16 $UPD $REMAT policy.param_dtype=bfloat16
# every other stage of the 6.9B (one a process: less host memory); the sampler also gathering
# block by block at each decode step
for program in sft_step rm_step rl_generate rl_score; do
  run model=pythia-6.9b target=h100-x8 programs=$program
  run model=pythia-6.9b target=v4-32 programs=$program
  run model=pythia-6.9b target=v5e-16 programs=$program $REMAT
done
run model=pythia-6.9b target=h100-x8 programs=rl_generate $STREAMED
run model=pythia-6.9b target=v5e-16 programs=rl_generate $REMAT $STREAMED
# Llama-3-8B's sampler and scoring on the TPU slices where its update fits (v5e-16: top 2)
for program in rl_generate rl_score; do
  run model=llama-3-8b target=v4-32 programs=$program
done
run model=llama-3-8b target=v5e-16 programs=rl_generate $TOP $STREAMED
run model=llama-3-8b target=v5e-16 programs=rl_score $TOP
# the other targets
for target in v5p-8 v6e-8 a100-80gb-x8 h100-x1; do
  run model=pythia-1b target=$target $UPD
done
run model=pythia-6.9b target=a100-80gb-x8 $UPD $REMAT
run model=pythia-2.8b target=v5p-8 $UPD
run model=pythia-2.8b target=v6e-8 $UPD $REMAT
