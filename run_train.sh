#!/usr/bin/env bash
# Start a fine-tuning run; settings by environment variable (defaults in brackets).
#
#   bash run_train.sh                       the demo: embedded data and a small model, CPU is fine, no network
#   BASE_MODEL   hub id or local folder            [demo: demo/models/tiny-segformer, built on first use]
#   DATA_DIR     Kaggle-layout folder              [demo: demo/data, generated on first use]
#   EPOCHS, BATCH_SIZE, LR, IMAGE_SIZE, WARMUP, MIXED_PRECISION (no | fp16 | bf16)
#                passed as --epochs --train_batch_size --lr --image_size --warmup_steps --mixed_precision when set;
#                unset, trainer.py's defaults apply (one set, in `python trainer.py --help`: 15 epochs, batch 8,
#                lr 6e-5, 288 px, no warm-up, no mixed precision). With neither BASE_MODEL nor DATA_DIR set, the
#                demo preset applies instead (trainer.py --preset demo: a tiny random model on a CPU).
#   OUTPUT_DIR   [runs/<model>-<time>-<pid>]       LOG_FILE  [logs/<model>-<time>-<pid>.log] (refused while a live run
#                writes it)
#   GPUS         e.g. 0 or 0,1 (several -> accelerate launch --multi_gpu; refused unless those GPUs exist)
#                [unset: default device]
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   several machines [1 node]: run this script on each node with its
#                NODE_RANK (0 on the one at MASTER_ADDR) and the same OUTPUT_DIR (required, on a filesystem all nodes
#                share: Accelerate saves each rank's RNG state into the checkpoint); one process per GPU of GPUS (or
#                per visible GPU, or 1 without GPUs) on every node; see examples/slurm.sbatch
#   ACCELERATE_CONFIG  a yaml of `accelerate config`: started as `accelerate launch --config_file <it>` (its
#                processes, mixed precision, FSDP/DeepSpeed settings apply; GPUS still picks the devices)
#   DATASET      --dataset (gi, lgg, hf)       REPORT_TO  --report_to (tensorboard, wandb, mlflow, trackio, all)
#   HUB_MODEL_ID --push_to_hub --hub_model_id  (best/ is uploaded at the end; a failed push never fails the run)
#   FOLDS        cross-validation (giseg cv): "all" or e.g. "0,2": every fold in OUTPUT_DIR/fold_<k> with --final_eval,
#                then OUTPUT_DIR/cv_table.md; PARALLEL=N folds at a time (GPUS shared out among them), FINAL_MODEL=1
#                then trains OUTPUT_DIR/final on every case (--fold -1)
#   EXTRA_ARGS   passed to trainer.py, split at spaces (never glob-expanded), e.g. "--task multiclass --fold 1";
#                --output_dir, --base_model and --data_dir are refused there: set OUTPUT_DIR, BASE_MODEL, DATA_DIR
#   FOREGROUND=1 wait for the run and exit with its status (default: start it with nohup and return); switches
#                (FOREGROUND, FINAL_MODEL) take 1/0, yes/no, true/false, on/off; anything else is refused
#   RESUME       a run's output folder (runs/<name>): continue it from its latest checkpoint with its saved settings
#                (trainer.py --resume_run), appending to its log; EPOCHS etc. change what may change on a resume
#
# Before a run starts, trainer.py --check_only checks the arguments, the data folder and the model in the foreground
# (a few seconds): a mistake is one error line and a non-zero status, with no run folder or log left behind.
# Stop a background run with `kill <pid>` (the pid it prints; also in logs/<name>.pid): the trainer finishes its step,
# saves a resumable state and the log ends with `run end`; then RESUME=runs/<name> bash run_train.sh continues it.
#   PYTHON       interpreter [.venv/bin/python if present, else python3]
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ && "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "error: NNODES=$NNODES NODE_RANK=$NODE_RANK: expected NNODES >= 1 and 0 <= NODE_RANK < NNODES" >&2
  exit 2
fi
switch() {  # FOREGROUND=1/yes/true/on -> 1; 0/no/false/off/unset -> 0; anything else is refused, not ignored
  local value=${!1:-0}
  case "${value,,}" in
    1|yes|true|on) printf -v "$1" 1 ;;
    0|no|false|off|"") printf -v "$1" 0 ;;
    *) echo "error: $1=$value: expected 1 or 0 (yes/no, true/false, on/off)" >&2; exit 2 ;;
  esac
}
switch FOREGROUND
switch FINAL_MODEL
set -f  # EXTRA_ARGS is split at spaces and never glob-expanded: a '*' stays a '*'
# shellcheck disable=SC2206
EXTRA=(${EXTRA_ARGS:-})
set +f
for arg in ${EXTRA[@]+"${EXTRA[@]}"}; do
  case "$arg" in
    --output_dir|--output_dir=*|--base_model|--base_model=*|--data_dir|--data_dir=*)
      var=${arg%%=*}; var=${var#--}; var=${var^^}
      echo "error: EXTRA_ARGS: set $var=<value> instead of passing ${arg%%=*} there (this script names the run, its log and its messages after $var)" >&2
      exit 2 ;;
  esac
done
if [ "$NNODES" -gt 1 ] && { [ -z "${OUTPUT_DIR:-}" ] || [ -z "${MASTER_ADDR:-}" ]; }; then
  echo "error: NNODES=$NNODES: set OUTPUT_DIR (the same shared folder on every node) and MASTER_ADDR (the address of node 0)" >&2
  exit 2
fi

DEMO=0
if [ -n "${RESUME:-}" ]; then
  if [ ! -f "${RESUME%/}/run_config.json" ]; then
    echo "error: RESUME=$RESUME: no run_config.json there; pass the output folder of a run (runs/<name>)" >&2
    exit 2
  fi
  if [ -n "${BASE_MODEL:-}${DATA_DIR:-}" ] || { [ -n "${OUTPUT_DIR:-}" ] && [ "${OUTPUT_DIR%/}" != "${RESUME%/}" ]; }; then
    echo "error: RESUME=$RESUME continues that run with its own model, data and folder; unset BASE_MODEL, DATA_DIR and OUTPUT_DIR" >&2
    exit 2
  fi
  OUTPUT_DIR=${RESUME%/}
elif [ -z "${DATA_DIR:-}" ] && [ -z "${BASE_MODEL:-}" ]; then
  DEMO=1
fi
if [ -n "${RESUME:-}" ]; then
  :
elif [ -z "${DATA_DIR:-}" ]; then
  DATA_DIR=demo/data
  [ -f "$DATA_DIR/train.csv" ] || { echo "creating demo data in $DATA_DIR"; "$PYTHON" -m giseg demo-data --out "$DATA_DIR" >/dev/null; }
fi
if [ -z "${BASE_MODEL:-}" ] && [ -z "${RESUME:-}" ]; then
  BASE_MODEL=demo/models/tiny-segformer
  [ -f "$BASE_MODEL/config.json" ] || { echo "creating demo model in $BASE_MODEL"; \
    "$PYTHON" -m giseg make-tiny --family segformer --width 2 --out "$BASE_MODEL" >/dev/null; }
fi
PRESET=()
if [ "$DEMO" = 1 ]; then  # the demo preset's values are trainer.py's (python trainer.py --help: --preset)
  PRESET=(--preset demo)
  SETTINGS="demo preset (neither BASE_MODEL nor DATA_DIR set): trainer.py --preset demo for what is not set"
elif [ -n "${RESUME:-}" ]; then
  SETTINGS="resuming $OUTPUT_DIR with its saved settings (trainer.py --resume_run) for what is not set"
else
  SETTINGS="trainer.py's defaults for what is not set"
fi
if [ -n "${RESUME:-}" ]; then
  NAME="$(basename "$OUTPUT_DIR")"  # the run's own name: its log is logs/<name>.log, appended to
else
  NAME="$(basename "${BASE_MODEL%/}")-$(date +%Y%m%d-%H%M%S)-$$"  # the pid: two launches in one second differ
fi
if [ "$NNODES" -gt 1 ]; then
  NAME="$(basename "${OUTPUT_DIR%/}")-node$NODE_RANK"
fi
OUTPUT_DIR=${OUTPUT_DIR:-runs/$NAME}
LOG_FILE=${LOG_FILE:-logs/$NAME.log}

if [ -n "${GPUS:-}" ]; then  # the GPUs must exist: CUDA_VISIBLE_DEVICES with a missing id silently means CPU
  if ! [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    echo "error: GPUS=$GPUS: expected comma-separated GPU numbers, e.g. 0 or 0,1" >&2
    exit 2
  fi
  if command -v nvidia-smi >/dev/null; then
    FOUND=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  else
    FOUND=$(env -u CUDA_VISIBLE_DEVICES "$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  fi
  for id in ${GPUS//,/ }; do
    if [ "$FOUND" -eq 0 ]; then
      echo "error: GPUS=$GPUS: this machine has no CUDA GPU; unset GPUS to train on the CPU" >&2
      exit 2
    elif [ "$id" -ge "$FOUND" ]; then
      echo "error: GPUS=$GPUS: there is no GPU $id; this machine has $FOUND (0-$((FOUND - 1)))" >&2
      exit 2
    fi
  done
fi

if [ -n "${RESUME:-}" ]; then
  ARGS=(trainer.py --resume_run "$OUTPUT_DIR")
else
  ARGS=(trainer.py --base_model "$BASE_MODEL" --data_dir "$DATA_DIR" --output_dir "$OUTPUT_DIR" "${PRESET[@]}")
fi
SET=()
for pair in EPOCHS:--epochs BATCH_SIZE:--train_batch_size LR:--lr IMAGE_SIZE:--image_size WARMUP:--warmup_steps \
            MIXED_PRECISION:--mixed_precision DATASET:--dataset REPORT_TO:--report_to HUB_MODEL_ID:--hub_model_id; do
  var=${pair%%:*} flag=${pair#*:}
  if [ -n "${!var:-}" ]; then ARGS+=("$flag" "${!var}"); SET+=("$var=${!var}"); fi
done
[ -n "${HUB_MODEL_ID:-}" ] && ARGS+=(--push_to_hub)
ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
if [ -n "${ACCELERATE_CONFIG:-}" ] && [ ! -f "$ACCELERATE_CONFIG" ]; then
  echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG: no such file (write one with: accelerate config --config_file $ACCELERATE_CONFIG)" >&2
  exit 2
fi
[ -n "${GPUS:-}" ] && export CUDA_VISIBLE_DEVICES="$GPUS"
if [ -n "${FOLDS:-}" ]; then
  if [ -n "${RESUME:-}" ]; then
    echo "error: FOLDS=$FOLDS and RESUME: to resume a CV, run the same FOLDS command again (finished folds are kept)" >&2
    exit 2
  fi
  if [ "$NNODES" -gt 1 ] || [ -n "${ACCELERATE_CONFIG:-}" ]; then
    echo "error: FOLDS=$FOLDS runs on one machine without ACCELERATE_CONFIG (giseg cv starts each fold itself)" >&2
    exit 2
  fi
  CMD=("$PYTHON" -m giseg cv --output_dir "$OUTPUT_DIR" --folds "$FOLDS" --parallel "${PARALLEL:-1}" --gpus "${GPUS:-}")
  [ "$FINAL_MODEL" = 1 ] && CMD+=(--final_model)
  CMD+=(-- "${ARGS[@]:1:4}" "${ARGS[@]:7}")  # trainer.py's arguments without its --output_dir
  SET+=("FOLDS=$FOLDS")
elif [ -n "${ACCELERATE_CONFIG:-}" ]; then
  CMD=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" "${ARGS[@]}")
elif [ "$NNODES" -gt 1 ]; then
  if [ -n "${GPUS:-}" ]; then
    PER_NODE=$(awk -F, '{print NF}' <<<"$GPUS")
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
  else
    PER_NODE=1
  fi
  CMD=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_machines "$NNODES" --machine_rank "$NODE_RANK"
       --num_processes $((PER_NODE * NNODES)) --main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}"
       --mixed_precision "${MIXED_PRECISION:-no}" --dynamo_backend no "${ARGS[@]}")
elif [ -n "${GPUS:-}" ]; then
  NPROC=$(awk -F, '{print NF}' <<<"$GPUS")
  if [ "$NPROC" -gt 1 ]; then
    CMD=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$NPROC" --num_machines 1
         --mixed_precision "${MIXED_PRECISION:-no}" --dynamo_backend no "${ARGS[@]}")
  else
    CMD=("$PYTHON" "${ARGS[@]}")
  fi
else
  CMD=("$PYTHON" "${ARGS[@]}")
fi

# everything that can be checked in a few seconds, in the foreground: a mistake is one line here, not in a log
CHECK=("${ARGS[@]}")
[ -n "${FOLDS:-}" ] && CHECK+=(--output_dir "$OUTPUT_DIR/fold_0")  # (giseg cv passes each fold's folder)
"$PYTHON" "${CHECK[@]}" --check_only || exit $?

mkdir -p "$(dirname "$LOG_FILE")"
# the run holds a lock on its log file (fd 9, inherited by the background run): a second launch onto a live log
# is refused instead of interleaving two runs in one file
exec 9>>"$LOG_FILE"
if command -v flock >/dev/null && ! flock -n 9; then
  echo "error: LOG_FILE $LOG_FILE is being written by a live run; wait for it, or pick another LOG_FILE" >&2
  exit 2
fi

run() {
  echo "$(date '+%Y-%m-%d %H:%M:%S') run settings: ${SET[*]:-none set}; $SETTINGS"
  echo "$(date '+%Y-%m-%d %H:%M:%S') run start: ${CUDA_VISIBLE_DEVICES:+CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES }${CMD[*]}"
  local status=0 child
  "${CMD[@]}" &
  child=$!
  # `kill <this pid>` reaches the trainer: it finishes its step, saves a resumable state and exits
  trap 'kill -TERM "$child" 2>/dev/null' TERM
  trap 'kill -INT "$child" 2>/dev/null' INT
  while true; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break  # (a signal interrupts wait; the trainer may still be saving)
  done
  trap - TERM INT
  echo "$(date '+%Y-%m-%d %H:%M:%S') run end: exit status $status"
  return "$status"
}

if [ "$FOREGROUND" = 1 ]; then
  echo "log: $LOG_FILE   output: $OUTPUT_DIR"
  set +e
  run 2>&1 | tee -a "$LOG_FILE"
  exit "${PIPESTATUS[0]}"
fi
nohup bash -c "$(declare -p CMD SET SETTINGS); $(declare -f run); run" >>"$LOG_FILE" 2>&1 </dev/null &
PID=$!
echo "$PID" > "${LOG_FILE%.log}.pid"
echo "started (pid $PID): output in $OUTPUT_DIR"
echo "log:    $LOG_FILE${RESUME:+ (appended to)}"
echo "follow: tail -f $LOG_FILE"
echo "stop:   kill $PID   (saves a resumable state; then: RESUME=$OUTPUT_DIR bash run_train.sh)"
