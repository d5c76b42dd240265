"""One device call: GPU correctness tests, a GEMV config sweep, and the full benchmark.

Usage (on the H200, from the repo root):  python3 bench/gpu_bench.py [--skip-tests] [--skip-tune]
        [--models llama-2-7b,llama-3-8b,qwen-2.5-7b,phi-4] [--hf-other 32]
Writes $OUT/bench.json, $OUT/tune.json and prints the tables last.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)

ap = argparse.ArgumentParser()
ap.add_argument("--skip-tests", action="store_true")
ap.add_argument("--skip-tune", action="store_true")
ap.add_argument("--models", default="llama-2-7b,llama-3-8b,qwen-2.5-7b,phi-4")
ap.add_argument("--hf-other", type=int, default=32, help="HF generate tokens for models after the first")
ap.add_argument("--tests", default="tests/test_kernels.py tests/test_engine.py")
ap.add_argument("--force-sparse", default="",
                help="one sparse GemvConfig for every shape, e.g. 256,64,264,4")
ap.add_argument("--shape-config", action="append", default=[],
                help="a sparse GemvConfig for one exact shape, K,N:fields (repeatable; block_n, block_k, "
                     "programs, num_warps, pipeline, precompact, min_ctas), e.g. 4096,4096:128,64,528,4,1,1,3")
ap.add_argument("--dense-tune", action="store_true", help="sweep the dense kernel's configs too")
ap.add_argument("--precompact", type=float, default=0.5,
                help="kernel table: time the pre-compaction variant at this sparsity (negative: no)")
args = ap.parse_args()
T0 = time.time()


def stamp(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


stamp(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
import torch  # noqa: E402
import triton  # noqa: E402
stamp(f"torch {torch.__version__} triton {triton.__version__}")

if not args.skip_tests:
    stamp("pytest (GPU tests)")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rP", "-n", "6", "-p", "no:cacheprovider",
                        *args.tests.split()], capture_output=True, text=True)
    with open(f"{OUT}/pytest.log", "w") as f:
        f.write(r.stdout + r.stderr)
    tail = (r.stdout + r.stderr).strip().splitlines()
    print("\n".join([l for l in tail if "transformers bf16" in l or "FAILED" in l or "Error" in l][:30]), flush=True)
    print("\n".join(tail[-3:]), flush=True)
    stamp(f"pytest rc={r.returncode}")

from wina import bench  # noqa: E402
from wina.cli.bench_tables import print_bench  # noqa: E402
from wina.kernels import GemvConfig, config_for, set_config  # noqa: E402

# the Llama-2-7B GEMV shapes and their roles in the decode step
shapes = {(4096, 12288): "attn_in", (4096, 4096): "o", (4096, 22016): "mlp_in", (11008, 4096): "down",
          (4096, 32000): "head"}
# Without a sweep every shape takes the library's configs (exact shape, then decode-step role, then
# default; wina/kernels/config.py). A sweep sets exact entries for the Llama-2-7B shapes only: its
# winners are not mapped onto other models' shapes by kind (run 8: that cost Llama-3-8B 10 %).
if not args.skip_tune:
    # run 6: pre-compaction joins the sparse sweep
    sweeps = {True: [GemvConfig(bn, bk, p, w, pipeline=pipe) for bn in (128, 256) for bk in (32, 64)
                     for p in (264, 528) for w in (4, 8) for pipe in (0, 1)]
                    + [GemvConfig(bn, bk, p, 4, pipeline=pipe, precompact=1) for bn in (128, 256) for bk in (32, 64)
                       for p in (264, 528) for pipe in (0, 1)],
              # run 7: the split-K partials are summed in one load per 16-32 rows, so larger splits
              # (more programs) may pay now
              False: [GemvConfig(bn, bk, p, w) for bn in (128, 256) for bk in (32, 64) for p in (264, 528, 1056)
                      for w in (4, 8)]}
    for sp in ((True, False) if args.dense_tune else (True,)):
        stamp(f"{'sparse' if sp else 'dense'} GEMV config sweep (llama-2-7b shapes), {len(sweeps[sp])} configs")
        rows = bench.tune_gemv("cuda", torch.bfloat16, list(shapes), sweeps[sp], sparsity=0.5, modes=(sp,))
        with open(f"{OUT}/tune_{'sparse' if sp else 'dense'}.json", "w") as f:
            json.dump(rows, f)
        for (k, n) in shapes:
            cand = [r for r in rows if r["K"] == k and r["N"] == n and r["sparse"] == sp and "time_us" in r]
            cand.sort(key=lambda r: r["time_us"])
            if not cand:
                continue
            b = cand[0]
            lib = list(config_for(k, n, sp, shapes[(k, n)]).__dict__.values())
            old = next((r for r in cand if r["config"] == lib), None)
            set_config(k, n, GemvConfig(*b["config"]), sparse=sp)
            print(f"  {k}x{n} {'sparse50' if sp else 'dense'} best {b['config']} {b['time_us']:.1f}us "
                  f"{b['tb_per_s']:.2f}TB/s | library default {lib} {old and round(old['time_us'], 1)}"
                  f" | worst {cand[-1]['time_us']:.1f}us", flush=True)
        errs = [r for r in rows if "error" in r]
        if errs:
            print("tune errors:", errs[:3])
    stamp("sweep done")


if args.force_sparse:
    from wina.kernels.config import ROLES, clear_shape_configs, set_role_config
    forced = GemvConfig(*[int(v) for v in args.force_sparse.split(",")])
    clear_shape_configs(sparse=True)              # every sparse launch takes its role's config,
    for role in ROLES:                            # and every role this one
        set_role_config(role, forced, sparse=True)
    stamp(f"sparse config forced: {forced}")

for spec in args.shape_config:
    shape, fields = spec.split(":")
    kk_, nn_ = (int(v) for v in shape.split(","))
    cfg_ = GemvConfig(*[int(v) for v in fields.split(",")])
    set_config(kk_, nn_, cfg_, sparse=True)
    stamp(f"sparse config for {kk_}x{nn_}: {cfg_}")

models = args.models.split(",")
res_all = None
for i, mname in enumerate(models):
    stamp(f"bench {mname}")
    r = bench.run_bench([mname], hf_new_tokens=None if i == 0 else args.hf_other,
                        kernels=(i == 0), json_path=f"{OUT}/bench_{mname}.json",
                        precompact_at=args.precompact if args.precompact >= 0 else None,
                        # one copy bandwidth for every model: the first, taken before any load
                        copy_bw=None if res_all is None else res_all["copy_bw_tb_s"] * 1e12,
                        on_event=lambda ev: print(f"    {ev.message}", flush=True))
    if res_all is None:
        res_all = r
    else:
        res_all["models"] += r["models"]
    res_all["targets"] = bench.evaluate_targets(res_all)
    with open(f"{OUT}/bench.json", "w") as f:
        json.dump(res_all, f, indent=1)
    for m in r["models"]:
        if "error" in m:
            print(m.get("traceback", m["error"]), flush=True)
    torch.cuda.empty_cache()
stamp("done")
print_bench(res_all)
