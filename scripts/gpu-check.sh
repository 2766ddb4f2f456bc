#!/usr/bin/env bash
# GPU check: the GPU recipe at small scale on one GPU, then the vLLM serving backend, with the figures printed.
#   TORCH_SPEC=torch bash scripts/bootstrap.sh && bash scripts/gpu-check.sh   # on a machine with an NVIDIA GPU
# Steps (each prints its figures; record them with this command in docs/benchmarks.md):
#   1. the GPU recipe (jobs/configs/qwen3-0.6b-zero3.yaml) on 1 GPU, ~20 steps: ZeRO-3, packing, bf16, NCCL,
#      export, the before/after report; MODEL=... picks the model (default: the embedded SmolLM2, no download);
#   2. the exported model served by the vLLM backend (pip install 'sft-ray[vllm]'), asked through the openai client.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT="${OUT:-runs/gpu-check}"
MODEL="${MODEL:-embedded}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA: install a CUDA torch (TORCH_SPEC=torch bash scripts/bootstrap.sh)'; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== 1. train: GPU recipe, 1 GPU, ZeRO-3, packing =="
t0=$(date +%s)
.venv/bin/sft-ray train jobs/configs/qwen3-0.6b-zero3.yaml "model.name=$MODEL" train.name=gpu-check \
  "output_dir=$OUT/train" train.resume=false train.num_workers=1 train.cpus_per_worker=4 train.max_steps=20 \
  train.save_steps=10 train.eval_steps=10 data.train=generated data.eval=generated data.generated_train_rows=1280 \
  data.generated_eval_rows=64 eval.max_examples=64 | tee "$OUT.train.log"
echo "train wall: $(( $(date +%s) - t0 ))s"
$PY - "$OUT/train" <<'PY'
import json, sys
run = sys.argv[1]
s = json.load(open(f"{run}/train_summary.json"))
m = s["metrics"]
print(json.dumps({"steps": m["step"], "avg_tokens_per_s": m["avg_tokens_per_s"], "final_loss": m.get("loss"),
                  "eval_loss": m.get("eval_loss"), "peak_cuda_mib_per_worker": m.get("peak_cuda_mib_per_worker"),
                  "train_seconds": s["train_seconds"],
                  "exact_match": s.get("eval", {}).get("exact_match", {}).get("after")}))
PY

echo "== 2. serve: vLLM backend, openai client =="
if ! $PY -c "import vllm" 2>/dev/null; then
  .venv/bin/pip install -q "vllm>=0.10" || { echo "vLLM could not be installed here: step 2 not run"; exit 1; }
fi
export SFT_RAY_GPU_CHECK_KEY="sk-gpu-check-$RANDOM$RANDOM"
.venv/bin/sft-ray serve "$OUT/train/model" serve.backend=vllm serve.gpus_per_replica=1 --port 8123 \
  --api-key-env SFT_RAY_GPU_CHECK_KEY serve.max_tokens_limit=64 serve.max_body_bytes=20000 > "$OUT.serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true; .venv/bin/ray stop --force >/dev/null 2>&1 || true' EXIT
$PY - <<'PY'
import json, os, time
import httpx
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8123/v1", api_key=os.environ["SFT_RAY_GPU_CHECK_KEY"])
for _ in range(600):
    try:
        models = client.models.list().data
        break
    except Exception:
        time.sleep(2)
else:
    raise SystemExit("the vLLM endpoint did not come up in 20 minutes (see the serve log)")
name = models[0].id
# the guard in front of ray.serve.llm's ingress: key, max_tokens limit, chunked body limit
url = "http://127.0.0.1:8123/v1/chat/completions"
body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
assert httpx.post(url, json=body).status_code == 401, "vLLM app answered without the key"
auth = {"Authorization": f"Bearer {os.environ['SFT_RAY_GPU_CHECK_KEY']}"}
r = httpx.post(url, json={**body, "max_tokens": 1000}, headers=auth)
assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large", r.text
r = httpx.post(url, content=(b"x" * 1000 for _ in range(30)), headers={**auth, "Content-Type": "application/json"})
assert r.status_code == 413, r.text
t0 = time.time()
r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Calculate 1+1-1"}], max_tokens=32)
first = time.time() - t0
t0 = time.time()
stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say hello."}],
                                        max_tokens=32, stream=True)
ttft = None
for chunk in stream:
    if ttft is None and chunk.choices and chunk.choices[0].delta.content:
        ttft = time.time() - t0
print(json.dumps({"model": name, "answer": r.choices[0].message.content, "latency_s": round(first, 3),
                  "stream_ttft_s": round(ttft or -1, 3)}))
PY
