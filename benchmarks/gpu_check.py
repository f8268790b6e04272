"""The GPU check: everything issue 9 fixed that needs a GPU but not vLLM, on one GPU, offline, in <= 10 min.

Each check is a real `python train.py` run (the same CLI users type) on a model built in code, so
nothing is downloaded:

  recipe  the default recipe on the tiny Qwen2.5-VL: bf16 SFT -> GRPO (transformers generation) ->
          evaluate, on the GPU; the evaluate stage's model sits on cuda:0 (generation.load_here)
  lora    LoRA, merged into ckpt/<stage>/merged, evaluated from there
  zero2   DeepSpeed ZeRO-2, then ZeRO-3, under torchrun (one process: the machine has one GPU), GRPO
  zero3   with generation from the gathered ZeRO-3 weights, evaluation on rank 0
  qlora   4-bit QLoRA, when bitsandbytes is installed
  bench   a Qwen2.5-VL-3B-shaped model (its published config, benchmarks/qwen2_5_vl_3b_config.json, with
          random weights): 20 GRPO steps, then its evaluate stage; seconds per step, completion tokens
          per second, peak GPU memory; then the same steps as a plain TRL script
          (benchmarks/plain_trl_grpo.py) for the overhead ratio
  memory  in every run, after every stage, allocated GPU memory is back near zero (the
          `GPU memory after release` lines hardware.stage_scope logs); the bench's GRPO -> evaluate
          step is where a leak would show (a 3.75 B-parameter trainer)

How to run:

    make gpu-wheels           # here, with network: what the GPU machine lacks -> .whl/ (~9 MB, git-ignored)
    make gpu-check            # there: installs .whl/ into .whl/site when needed, then runs every check
    python benchmarks/gpu_check.py --cpu         # tiny sizes on the CPU: tests/test_gpu_check.py (~1 min)
    python benchmarks/gpu_check.py --only bench  # some checks

--cpu leaves out lora, zero2 and zero3 (run on CPU by tests/test_adapters.py and tests/test_multiprocess.py;
--only brings them back) and qlora and the memory check (CUDA only), and runs fewer bench steps.
Results: one table on stdout, outputs/gpu_check/report.{json,md}; exit code 1 when a check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = WHEELS / "site"
CONFIG_3B = Path(__file__).with_name("qwen2_5_vl_3b_config.json")

# What the GPU machine lacks (it has torch, transformers, accelerate, pyarrow, tensorboard, ...): pure-Python
# wheels (pydantic-core is the one cp312 binary), and two source distributions built there offline.
WHEEL_PINS = [
    "trl==1.16.0", "peft==0.21.2", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
    "hydra-core==1.3.8", "omegaconf==2.3.0", "hydra-submitit-launcher==1.2.0", "submitit==1.5.3",
    "math-verify==0.9.0", "latex2sympy2_extended==1.11.0",
    "hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "typing-extensions==4.16.0",
]  # fmt: skip
SDIST_PINS = ["antlr4-python3-runtime==4.9.3", "deepspeed==0.19.8"]  # DS_BUILD_OPS=0: ops JIT-compile on use
REQUIRED = ["trl", "peft", "datasets", "hydra", "omegaconf", "submitit", "math_verify"]
PLATFORM = ["--python-version", "3.12", "--implementation", "cp"] + [
    f"--platform={p}"
    for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
]
MEMORY_RE = re.compile(
    r"\[(\S+)\] GPU memory after release: (\d+) MiB allocated, (\d+) MiB reserved \(stage peak (\d+) MiB\)"
)
LEFT_OVER_MIB = 256  # after a stage: CUDA library workspaces, not a model (the bench's trainer holds ~30 GiB)


class Skip(Exception):
    """A check that cannot run here; the message says why."""


# ------------------------------------------------------------------------------ packages
def fetch_wheels() -> None:
    """`make gpu-wheels`: download what the GPU machine lacks into .whl/ (run where pip has network)."""
    WHEELS.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS)]
    subprocess.run([*pip, "--only-binary=:all:", *PLATFORM, *WHEEL_PINS], check=True)
    subprocess.run([*pip, "--no-binary=:all:", *SDIST_PINS], check=True)
    files = sorted(p for p in WHEELS.iterdir() if p.is_file())
    print(f"{len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB in {WHEELS}")


def ensure_packages() -> None:
    """Where required packages are missing and .whl/ holds them: install them into .whl/site (offline,
    the sdists built against the machine's own torch) and restart this script with them on PYTHONPATH."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if not missing:
        return
    if os.environ.get("RCOT_GPU_CHECK_SITE") or not any(WHEELS.glob("*.whl")):
        sys.exit(f"missing packages {missing}: pip install -e . here, or `make gpu-wheels` and carry .whl/ along")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation"]
    pip += ["--no-compile", "--upgrade", "--target", str(SITE)]
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    subprocess.run([*pip, *map(str, sorted(WHEELS.glob("*.whl")))], check=True, env=env)
    for sdist in sorted(WHEELS.glob("*.tar.gz")):  # deepspeed may fail to build: the ZeRO checks then say so
        done = subprocess.run([*pip, str(sdist)], env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"could not build {sdist.name} here:\n{done.stderr[-1500:]}", flush=True)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    env["RCOT_GPU_CHECK_SITE"] = "1"
    os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)


# ------------------------------------------------------------------------------ runs
class Context:
    def __init__(self, out: Path, gpu: bool, steps: int):
        self.out, self.gpu, self.steps = out, gpu, steps
        self.hw = ["hardware=cpu"]
        if gpu:  # the preset's A100 budget would refuse the 3B bench (memory.py): validate against this GPU's memory
            import torch

            gib = torch.cuda.get_device_properties(0).total_memory // 2**30
            self.hw = ["hardware=1xa100", "hardware.vllm.use_vllm=false", f"hardware.gpu_memory_gib={gib}"]
        self.memory: dict[str, list] = {}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        if not gpu:
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def run(self, name: str, cmd: list[str], timeout: int = 600) -> str:
        log = self.out / f"{name}.log"
        with log.open("w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=self.env, timeout=timeout)
        text = log.read_text()
        if proc.returncode:
            raise AssertionError(f"exit code {proc.returncode} ({log}):\n" + "\n".join(text.splitlines()[-25:]))
        return text

    def train(self, name: str, *overrides: str, torchrun: bool = False) -> Path:
        """`python train.py <overrides>` (under torchrun with one process if asked) into out/<name>/."""
        run = self.out / name
        shutil.rmtree(run, ignore_errors=True)
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun else []
        cmd = [sys.executable, *launch, str(ROOT / "train.py"), f"hydra.run.dir={run}", "logger=none", *overrides]
        self.run(name, cmd)
        if self.gpu:  # every stage gave its memory back
            lines = [
                (sid, int(a), int(r), int(p)) for sid, a, r, p in MEMORY_RE.findall((run / "output.log").read_text())
            ]
            assert lines, f"{name}: no 'GPU memory after release' line in output.log"
            self.memory[name] = lines
            leaks = [line for line in lines if line[1] > LEFT_OVER_MIB]
            assert not leaks, (
                f"{name}: memory still allocated after a stage (stage, MiB allocated, reserved, peak): {leaks}"
            )
        return run


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _device(ctx: Context) -> str:
    return "cuda:0" if ctx.gpu else "cpu"


# ------------------------------------------------------------------------------ checks
def check_recipe(ctx: Context) -> dict:
    from omegaconf import OmegaConf

    run = ctx.train("recipe", "debug=smoke", *ctx.hw)  # the default recipe: SFT -> GRPO -> evaluate
    rows = _json(run / "result" / "summary.json")["rows"]
    assert [r["stage"] for r in rows] == ["01_sft", "02_rl"], rows
    rl = _json(run / "result" / "02_rl.json")
    lengths = [h["completions/mean_length"] for h in rl["log_history"] if "completions/mean_length" in h]
    assert rl["global_step"] == 4 and lengths and min(lengths) > 0, "GRPO generated nothing"
    log = (run / "output.log").read_text()
    on = re.findall(r"generating with (\S+) on (\S+)", log)
    assert len(on) == 2 and all(dev == _device(ctx) for _, dev in on), f"evaluation ran on {on}"
    bf16 = bool(OmegaConf.load(run / "backup" / "stages" / "01_sft.yaml").algo.args.bf16)
    assert bf16 == ctx.gpu, "bf16 is the GPU presets' precision"
    return {"greedy_acc": [r["greedy_acc"] for r in rows], "generation_on": on[0][1], "bf16": bf16}


def check_lora(ctx: Context) -> dict:
    run = ctx.train("lora", "recipe=single", "algo=sft", "reward=none", "peft=lora", "debug=smoke", *ctx.hw)
    merged = run / "ckpt" / "01_sft" / "merged"
    assert (merged / "model.safetensors").is_file(), "no merged model"
    assert f"generating with {merged} on {_device(ctx)}" in (run / "output.log").read_text(), (
        "not evaluated from merged/"
    )
    return {"merged": str(merged.relative_to(ctx.out))}


def _zero(ctx: Context, stage: int) -> dict:
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed is not installed (its sdist did not build here?)")
    run = ctx.train(
        f"zero{stage}", "recipe=single", "algo=grpo", "debug=smoke", *ctx.hw,
        f"deepspeed=zero{stage}", torchrun=True,
    )  # fmt: skip
    res = _json(run / "result" / "01_grpo.json")
    assert res["distributed_type"] == "DEEPSPEED" and res["global_step"] == 4, res["distributed_type"]
    assert (run / "result" / "summary.json").is_file(), "no evaluation after the ZeRO stage"
    if stage == 3:  # the args exist before the model: from_pretrained loads each rank's shard (zero.Init)
        assert "model loaded partitioned (ZeRO-3 zero.Init)" in (run / "output.log").read_text(), "loaded whole"
    return {"steps": res["global_step"], "train_s": res["wall_seconds"]}


def check_zero2(ctx: Context) -> dict:
    return _zero(ctx, 2)


def check_zero3(ctx: Context) -> dict:
    return _zero(ctx, 3)


def check_qlora(ctx: Context) -> dict:
    if not ctx.gpu:
        raise Skip("bitsandbytes' 4-bit kernels need CUDA")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed (its CUDA wheel is ~60 MB: too big to carry to the GPU machine)")
    run = ctx.train("qlora", "recipe=single", "algo=sft", "reward=none", "peft=qlora", "debug=smoke", *ctx.hw)
    assert (run / "ckpt" / "01_sft" / "merged" / "model.safetensors").is_file(), "no merged model"
    return {"merged": True}


def build_3b_shaped(ctx: Context) -> Path:
    """Qwen2.5-VL-3B's published config with random weights (bf16, built on the GPU), the tiny tokenizer
    and processor (patch 14) beside it; on the CPU the same code with a few small sizes."""
    import torch
    from omegaconf import OmegaConf
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from reinforce_cot import tiny
    from reinforce_cot.processing import ImageOnlyQwen2_5_VLProcessor, tiny_image_processor

    folder = ctx.out / ("qwen2_5_vl_3b_random" if ctx.gpu else "qwen2_5_vl_3b_shaped_tiny")
    if (folder / "config.json").is_file():
        return folder
    spec = json.loads(CONFIG_3B.read_text())
    spec.pop("_source")
    tok = tiny.build_tokenizer(640)
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    spec |= {  # the tiny tokenizer's ids for Qwen's control tokens (its vocabulary is a subset of 151936 rows)
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|image_pad|>"], "bos_token_id": None, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }  # fmt: skip
    if not ctx.gpu:  # the same architecture at CPU sizes
        spec |= dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tok)
        )
        spec["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}  # sums to head_dim 16 / 2
        spec["vision_config"] |= dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, fullatt_block_indexes=[1]
        )
    config = Qwen2_5_VLConfig(**spec)
    dtype = torch.bfloat16 if ctx.gpu else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if ctx.gpu else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    max_pixels = OmegaConf.load(ROOT / "conf" / "model" / "qwen2_5_vl_3b.yaml").image_max_pixels
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=tiny_image_processor(14, max_pixels), tokenizer=tok, chat_template=tiny.CHAT_TEMPLATE
    )
    processor.save_pretrained(tmp)
    del model
    if ctx.gpu:
        torch.cuda.empty_cache()
    tmp.rename(folder)
    return folder


def check_bench(ctx: Context) -> dict:
    t0 = time.time()
    folder = build_3b_shaped(ctx)
    build_s = time.time() - t0
    batch, per_round = 16, 2  # completions per optimizer step; steps per generation round (32 = 4 prompts x 8)
    model = ["model=qwen2_5_vl_3b", "data.train.image_size=448", "data.max_completion_length=128"]  # 256 image tokens
    if not ctx.gpu:
        model = ["model=tiny_vlm", "model.image_factor=28"]  # patch 14 x merge 2, as the 3B
    run = ctx.train(
        "bench", "recipe=single", "algo=grpo", *model, f"model.path={folder}", *ctx.hw,
        f"data.train.n={batch * ctx.steps}", "data.test.n=16", f"algo.args.max_steps={ctx.steps}",
        f"algo.args.per_device_train_batch_size={batch}", "algo.args.gradient_accumulation_steps=1",
        f"algo.args.steps_per_generation={per_round}", "algo.args.logging_steps=1", "algo.args.save_strategy=no",
        "eval.max_prompts=8", "eval.k=0", "eval.answer_only_template=null", "eval.consistency=false",
    )  # fmt: skip
    res = _json(run / "result" / "01_grpo.json")
    runtime, steps = res["train_metrics"]["train_runtime"], res["global_step"]
    lengths = [h["completions/mean_length"] for h in res["log_history"] if "completions/mean_length" in h]
    tokens = batch * steps * sum(lengths) / len(lengths)  # every step trains on `batch` completions
    out: dict = {
        "model_params_m": round(_params(folder) / 1e6, 1),
        "build_s": round(build_s, 1),
        "grpo_steps": steps,
        "s_per_step": round(runtime / steps, 3),
        "completion_tokens_per_s": round(tokens / runtime, 1),
        "mean_completion_tokens": round(sum(lengths) / len(lengths), 1),
    }
    if ctx.gpu:
        peaks = {sid: peak for sid, _, _, peak in ctx.memory["bench"]}
        out["peak_gpu_gib"] = {sid: round(p / 1024, 2) for sid, p in peaks.items()}
    plain = ctx.out / "plain_trl.json"
    ctx.run(
        "plain_trl", [sys.executable, str(ROOT / "benchmarks" / "plain_trl_grpo.py"), str(run), str(plain), "01_grpo"]
    )
    p = _json(plain)
    assert p["global_step"] == steps, p
    out["plain_trl_s_per_step"] = round(p["train_runtime"] / steps, 3)
    out["overhead_ratio"] = round(runtime / p["train_runtime"], 3)
    if "peak_gpu_mib" in p:
        out["plain_trl_peak_gpu_gib"] = round(p["peak_gpu_mib"] / 1024, 2)
    return out


def _params(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


CHECKS = {
    "recipe": check_recipe, "lora": check_lora, "zero2": check_zero2, "zero3": check_zero3,
    "qlora": check_qlora, "bench": check_bench,
}  # fmt: skip
CPU_ELSEWHERE = {  # left out of --cpu: covered on CPU by the test suite
    "lora": "tests/test_adapters.py", "zero2": "tests/test_multiprocess.py", "zero3": "tests/test_multiprocess.py"
}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the test suite's run)")
    ap.add_argument("--only", help=f"comma-separated checks of {list(CHECKS)}")
    ap.add_argument("--steps", type=int, help="bench GRPO steps (default: 20 on a GPU, 6 with --cpu)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    ap.add_argument("--fetch-wheels", action="store_true", help="download .whl/ for the GPU machine, then exit")
    a = ap.parse_args()
    if a.fetch_wheels:
        fetch_wheels()
        return 0
    ensure_packages()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    gpu = torch.cuda.is_available() and not a.cpu
    if not gpu and not a.cpu:
        print("no CUDA GPU visible: running the CPU version (--cpu)", flush=True)
    names = a.only.split(",") if a.only else [n for n in CHECKS if gpu or n not in CPU_ELSEWHERE]
    unknown = set(names) - set(CHECKS)
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}; pick from {list(CHECKS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(a.out.resolve(), gpu, a.steps or (20 if gpu else 6))
    where = torch.cuda.get_device_name(0) if gpu else "CPU"
    print(f"gpu_check on {where}: torch {torch.__version__}, checks {names}", flush=True)
    report: dict = {"device": where, "torch": torch.__version__, "checks": {}}
    t_all = time.time()
    for name in CHECKS:
        if name not in names:
            why = f"covered on CPU by {CPU_ELSEWHERE[name]}" if name in CPU_ELSEWHERE else "not selected"
            report["checks"][name] = {"status": "skipped", "why": why}
            continue
        t0 = time.time()
        try:
            figures, status = CHECKS[name](ctx), "ok"
        except Skip as e:
            figures, status = {"why": str(e)}, "skipped"
        except Exception as e:  # noqa: BLE001  (every check runs; the report says which failed and why)
            figures, status = {"error": f"{type(e).__name__}: {e}"}, "FAILED"
        report["checks"][name] = {"status": status, "seconds": round(time.time() - t0, 1), **figures}
        print(f"[{status}] {name} ({time.time() - t0:.0f} s): {json.dumps(figures)[:2000]}", flush=True)
    if gpu:
        report["checks"]["memory"] = {"status": "ok", "after_each_stage_mib": ctx.memory}  # asserted per run
    report["total_s"] = round(time.time() - t_all, 1)
    (a.out / "report.json").write_text(json.dumps(report, indent=2))
    table = ["| check | status | seconds | figures |", "|---|---|---|---|"]
    for name, r in report["checks"].items():
        rest = {k: v for k, v in r.items() if k not in ("status", "seconds")}
        table.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {json.dumps(rest)} |")
    (a.out / "report.md").write_text("\n".join(table) + "\n")
    print("\n".join(table) + f"\n\ntotal {report['total_s']} s; {a.out / 'report.json'}", flush=True)
    return int(any(r["status"] == "FAILED" for r in report["checks"].values()))


if __name__ == "__main__":
    sys.exit(main())
