#!/usr/bin/env bash
# One experiment over every host of a Cloud TPU VM pod slice (v4-16, v4-32, v5e-16, ...), run
# from any machine with gcloud. Every worker gets this checkout and runs the same `make train`
# at the same time; jax.distributed.initialize() finds the other workers by itself (libtpu and
# the VM's metadata, p3o_jax/distributed.py), and the mesh spans all chips of the slice.
#
#   scripts/tpu_pod.sh TPU_NAME ZONE [EXP] ["key=value ..."]
#   scripts/tpu_pod.sh my-v4-32 us-central2-b tldr \
#       "out_dir=/mnt/shared/runs/tldr base_model=EleutherAI/pythia-2.8b-deduped"
#
# out_dir must be a folder all workers share (Filestore/NFS, or a gcsfuse mount of a bucket):
# each host writes its own shards of every checkpoint there. Logs, metrics and the summary
# come from worker 0. A worker that dies stops the others (JAX's heartbeat); running the same
# command again resumes from the last checkpoint.
set -euo pipefail
NAME=${1:?usage: $0 TPU_NAME ZONE [EXP] [ARGS]}
ZONE=${2:?usage: $0 TPU_NAME ZONE [EXP] [ARGS]}
EXP=${3:-tldr}
ARGS=${4:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=p3o_jax

gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command "mkdir -p $DEST"
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
    "$ROOT"/{Makefile,pyproject.toml,requirements.txt,requirements-test.txt,p3o_jax,experiments,scripts} \
    "$NAME:$DEST/"
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
    --command "cd $DEST && make train ACCEL=tpu EXP=$EXP ARGS='$ARGS'"
