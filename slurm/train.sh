#!/bin/bash
# Train facedist on a Slurm allocation: one `accelerate launch` per node (srun), which starts the
# node's processes; resumes from the latest checkpoint in output_dir, so a requeued job continues.
#
#   sbatch slurm/train.sh [CONFIG.yaml] [key=value ...]        submit from the repository root
#   sbatch -N 4 --gpus-per-node=8 slurm/train.sh configs/effnetv2b0_triplet_2000ids.yaml output_dir=runs/big
#
# Preemption: Slurm sends SIGUSR1 to this script SIGNAL_SECONDS (--signal below) before the time limit;
# the script passes it to the training processes, which all stop after the current step, write a
# checkpoint, and the main one runs `scontrol requeue`; the requeued job resumes there (--resume auto)
# and appends to the same log. SIGTERM to this script (scancel -b, a preempting scheduler) does the same.
# If any process dies, srun --kill-on-bad-exit ends the others; collectives time out after
# train.timeout_s instead of hanging; `sbatch` again resumes from the latest complete checkpoint.
#
# #SBATCH lines (override any of them on the sbatch command line):
#   --nodes              machines; the global batch is nodes x processes per node x P x M images
#   --gpus-per-node      GPUs per node: enable the line below on GPU partitions (one process per GPU, NCCL);
#                        without GPUs every node runs CPU_PROCS_PER_NODE processes over gloo
#   --exclusive          whole nodes: all their CPUs for data loading (data.num_workers per process)
#   --time, --signal     time limit; B:USR1@300 = tell this script 5 min before it (time to checkpoint)
#   --output             log file, one per job id, appended to across requeues (--open-mode=append)
#
# Environment variables (exported when you call sbatch; defaults in brackets):
#   CONFIG             facedist config when no CONFIG.yaml argument is given [configs/demo.yaml]
#   REPO               repository root containing facedist/ [the directory sbatch was called from]
#   PYTHON             interpreter with facedist installed [REPO/.venv/bin/python if present, else python3]
#   GPUS_PER_NODE      GPUs (= processes) per node [SLURM_GPUS_ON_NODE, else nvidia-smi's count, else 0]
#   CPU_PROCS_PER_NODE processes per node on CPU-only nodes [1]
#   MAIN_PORT          rendezvous port on the first node [20000 + job id mod 10000]
#   LAUNCH_CONFIG      accelerate config template [launch/multi_node.yaml]
#   RESUME             --resume value of the first start [auto]; a requeued restart (SLURM_RESTART_COUNT > 0)
#                      always resumes auto, from what this job itself last wrote
#   NCCL_* / GLOO_SOCKET_IFNAME   passed through to the processes (network interface choice; docs/cluster.md)
#
#SBATCH --job-name=facedist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
##SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
[[ -d facedist ]] || { echo "train.sh: $REPO has no facedist/ (submit from the repository root or set REPO)" >&2; exit 2; }
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=python3
  [[ -x .venv/bin/python ]] && PYTHON=$PWD/.venv/bin/python
fi
config=${CONFIG:-configs/demo.yaml}
if [[ ${1:-} == *.yaml || ${1:-} == *.yml ]]; then config=$1; shift; fi
[[ -f $config ]] || { echo "train.sh: config $config not found" >&2; exit 2; }

nodes=${SLURM_JOB_NUM_NODES:-1}
main_addr=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | head -n 1)
port=${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}
if [[ -z ${GPUS_PER_NODE:-} ]]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
  if [[ $GPUS_PER_NODE == 0 ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
  fi
fi
if ((GPUS_PER_NODE > 0)); then
  per_node=$GPUS_PER_NODE
  export ACCELERATE_USE_CPU=false  # NCCL
else
  per_node=${CPU_PROCS_PER_NODE:-1}
  export ACCELERATE_USE_CPU=true  # gloo; Accelerate counts the processes only with this set
fi
resume=${RESUME:-auto}
if ((${SLURM_RESTART_COUNT:-0} > 0)); then resume=auto; fi  # RESUME=PATH must not roll a requeued job back again
echo "train.sh: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s) x $per_node process(es)," \
     "main $main_addr:$port, config $config, resume $resume, overrides: $*"

# Each node's launcher ignores SIGUSR1 (an ignored signal stays ignored across exec), so when srun passes
# the signal to every process of the step, torchrun's agent survives it and the trainers, which install
# their own handler, checkpoint and exit. SLURM_NODEID is evaluated on each node. Steps do not inherit
# the job's CPUs per task (Slurm >= 22.05), so the launcher is given all of the node's allocated CPUs.
srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 \
  --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
  bash -c 'trap "" USR1; exec "$0" -m accelerate.commands.launch --config_file "$1" \
             --num_machines "$2" --num_processes "$3" --machine_rank "$SLURM_NODEID" \
             --main_process_ip "$4" --main_process_port "$5" "${@:6}"' \
  "$PYTHON" "${LAUNCH_CONFIG:-launch/multi_node.yaml}" "$nodes" "$((nodes * per_node))" "$main_addr" "$port" \
  facedist/train.py --config "$config" --resume "$resume" "$@" &
srun_pid=$!

# Bash runs a trap only between commands, so wait in the background and pass signals on from here.
# SIGTERM is passed on as SIGUSR1: torchrun's agent would answer SIGTERM by killing the trainers.
signalled=0
forward() { signalled=1; echo "train.sh: $1 received, asking the trainers to checkpoint and stop"; kill -USR1 "$srun_pid" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while :; do
  signalled=0
  status=0
  wait "$srun_pid" || status=$?
  ((signalled)) || break  # srun ended (not a signal interrupting `wait`)
done
echo "train.sh: srun exited with status $status"
exit "$status"
