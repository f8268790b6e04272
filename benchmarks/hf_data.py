"""Benchmark of data=hf at scale: seconds from `python train.py ...` to the first optimizer step, and the
peak RSS, on hub-style parquet with 256x256 PNG images stored as bytes, from 10k to 100k rows; the same
data through the JSONL loader of an older checkout (today's path) for contrast; and the 8000x8000-image
JSONL case (peak RSS only).

    python benchmarks/hf_data.py make DIR                     # the datasets (~2 min, ~0.5 GB)
    python benchmarks/hf_data.py run DIR --repeats 2          # data=hf, cold and warm cache, 10k..100k rows
    python benchmarks/hf_data.py run DIR --old CHECKOUT --sizes 10000   # today's path (a checkout of main)
    python benchmarks/hf_data.py big DIR [--old CHECKOUT] [--big-rows 32]   # 8000x8000 PNGs through data=jsonl

Each run is `train.py recipe=single algo=sft` (one SFT step, batch 16) under `nice -n 10`; it is stopped
once TRL logs step 1. "cold" runs start with an empty `datasets` cache (HF_DATASETS_CACHE); "warm" runs
reuse it (the fingerprint cache: a second run of the same command). Peak RSS is the process's VmHWM
(/proc/<pid>/status), which counts the memory-mapped dataset pages it touched. A watchdog stops a run
whose RSS passes --limit-gb (the machine is shared). Figures go to benchmarks/README.md by hand, with the
load average printed beside each run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD = 5000  # rows per parquet shard (hub exports use a few hundred MB per shard; these are ~20 MB)
SIZES = (10_000, 25_000, 50_000, 100_000)
TEST_ROWS = 500


# ------------------------------------------------------------------------------------- data
def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


UNIQUE = 2000  # distinct images; rows cycle over them (loading and decoding cost the same either way)


def _pool(seed: int = 0) -> list[dict]:
    """UNIQUE shapes rows at 256 px, each image with a gradient texture, as PNG bytes (~4 KB each; a flat
    synthetic image compresses to ~1 KB, the texture makes the bytes less trivial)."""
    import numpy as np
    from PIL import Image as PILImage

    from reinforce_cot import data

    y, x = np.mgrid[0:256, 0:256]
    textures = [(((x * (k + 1) + y * 3) % 64 - 32) // 4)[..., None] for k in range(7)]
    rows = data.shapes_rows(UNIQUE, seed=seed, image_size=256)
    for i, r in enumerate(rows):
        a = np.asarray(r["image"]).astype(np.int16) + textures[i % 7]
        r["png"] = _png(PILImage.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
        del r["image"]
    return rows


def _shard(path: Path, pool: list[dict], start: int, n: int) -> None:
    """One hub-style parquet shard: problem, solution (a chain ending in \\boxed{answer}), image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image, Value

    rows = [pool[(start + i) % len(pool)] for i in range(n)]
    features = Features({"problem": Value("string"), "solution": Value("string"), "image": Image()})
    table = pa.table(
        {
            "problem": [r["question"] for r in rows],
            "solution": [f"{r['reasoning']} \\boxed{{{r['answer']}}}" for r in rows],
            "image": [{"bytes": r["png"], "path": None} for r in rows],
        },
        schema=features.arrow_schema,
    )
    pq.write_table(table, path)


def make(out: Path, rows: int, jsonl_rows: int) -> None:
    """out/full/data/*.parquet (hub layout, train shards + a test shard), out/s<N>/ folders of hard links to
    the first N rows' shards, and out/jsonl/ (train_<N>.jsonl + images/, test.jsonl) for today's path."""
    import pyarrow.parquet as pq

    full = out / "full" / "data"
    full.mkdir(parents=True, exist_ok=True)
    n_shards = rows // SHARD
    t0 = time.time()
    pool = _pool()
    jobs = [full / f"train-{k:05d}-of-{n_shards:05d}.parquet" for k in range(n_shards)]
    for k, path in enumerate(jobs):
        if not path.exists():
            _shard(path, pool, k * SHARD, SHARD)
    jobs.append(full / "test-00000-of-00001.parquet")
    _shard(jobs[-1], _pool(seed=1)[:TEST_ROWS], 0, TEST_ROWS)
    for size in SIZES:
        if size > rows:
            continue
        folder = out / f"s{size}" / "data"
        folder.mkdir(parents=True, exist_ok=True)
        for path in jobs[: size // SHARD] + jobs[-1:]:
            if not (folder / path.name).exists():
                os.link(path, folder / path.name)
    # today's path: JSONL + one PNG file per row (the same bytes)
    jdir = out / "jsonl"
    (jdir / "images").mkdir(parents=True, exist_ok=True)

    def dump(shards, name, limit):
        with (jdir / name).open("w") as f:
            written = 0
            for path in shards:
                table = pq.read_table(path)
                for q, sol, img in zip(*(table[c].to_pylist() for c in ("problem", "solution", "image"))):
                    if written >= limit:
                        return
                    img_name = f"{path.stem}-{written}.png"
                    if not (jdir / "images" / img_name).exists():
                        (jdir / "images" / img_name).write_bytes(img["bytes"])
                    answer = sol.rsplit("\\boxed{", 1)[1].rstrip("}")
                    f.write(json.dumps({"image": img_name, "question": q, "answer": answer, "reasoning": sol}) + "\n")
                    written += 1

    for size in (s for s in SIZES if s <= jsonl_rows):
        dump(jobs[:-1], f"train_{size}.jsonl", size)
    dump(jobs[-1:], "test.jsonl", TEST_ROWS)
    du = sum(p.stat().st_size for p in full.glob("*.parquet")) / 1e9
    print(f"wrote {out}: {rows} train rows in {n_shards} shards, {du:.2f} GB of parquet, in {time.time() - t0:.0f} s")


# -------------------------------------------------------------------------------- measuring
def _status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict, limit_gb: float, log: Path) -> dict:
    """Run `cmd` until TRL logs its first step; seconds to that line, peak RSS, load averages."""
    load0 = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.Popen(
        ["nice", "-n", "10", *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = {"rss": 0, "killed": False}

    def watch():
        while proc.poll() is None:
            peak["rss"] = max(peak["rss"], _status(proc.pid, "VmHWM"))
            if _status(proc.pid, "VmRSS") > limit_gb * 1e9:
                peak["killed"] = True
                proc.kill()
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    first_step = None
    with log.open("w") as f:
        for line in proc.stdout:
            f.write(line)
            if first_step is None and "'loss'" in line:
                first_step = time.time() - t0
                peak["rss"] = max(peak["rss"], _status(proc.pid, "VmHWM"))
                proc.terminate()
    proc.wait()
    return {
        "first_step_s": round(first_step, 1) if first_step else None,
        "peak_rss_gb": round(peak["rss"] / 1e9, 2),
        "killed_at_limit": peak["killed"],
        "load_before": round(load0, 1),
        "load_after": round(os.getloadavg()[0], 1),
        "rc": proc.returncode,
    }


def _base(out_root: Path) -> list[str]:
    return ["recipe=single", "algo=sft", "reward=none", "algo.args.max_steps=1", "algo.args.logging_steps=1",
            "algo.args.per_device_train_batch_size=16", f"output_root={out_root}"]  # fmt: skip


def new_cmd(folder: Path, out_root: Path) -> list[str]:
    fields = ["data.fields.question=problem", "data.fields.answer=solution", "data.fields.reasoning=solution"]
    return [sys.executable, "train.py", *_base(out_root), "data=hf", f"data.path={folder}", *fields]


def old_cmd(old: Path, jsonl: Path, size: int, out_root: Path) -> list[str]:
    return [sys.executable, str(old / "train.py"), *_base(out_root), "data=jsonl",
            f"data.train.path={jsonl / f'train_{size}.jsonl'}", f"data.test.path={jsonl / 'test.jsonl'}",
            f"data.image_folder={jsonl / 'images'}"]  # fmt: skip


def run(out: Path, sizes: list[int], repeats: int, old: Path | None, limit_gb: float) -> list[dict]:
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="hf_bench_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if old is not None:
        env["PYTHONPATH"] = str(old / "src")  # the old checkout's package, not this one
    for rep in range(repeats):
        for size in sizes:
            cache = scratch / f"cache_{rep}_{size}"
            for phase in ("cold", "warm") if old is None else ("jsonl",):
                shutil.rmtree(scratch / "outputs", ignore_errors=True)
                cmd = (
                    new_cmd(out / f"s{size}", scratch / "outputs")
                    if old is None
                    else old_cmd(old, out / "jsonl", size, scratch / "outputs")
                )
                r = measure(cmd, {**env, "HF_DATASETS_CACHE": str(cache)}, limit_gb, scratch / f"{phase}_{size}.log")
                r |= {"path": "data=hf" if old is None else f"data=jsonl @ {old.name}", "rows": size, "phase": phase,
                      "repeat": rep}  # fmt: skip
                print(json.dumps(r), flush=True)
                results.append(r)
            shutil.rmtree(cache, ignore_errors=True)
    _table(results)
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def _table(results: list[dict]) -> None:
    print("\n| path | rows | phase | first step s (median) | peak RSS GB (max) | load avg | runs |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(r["path"], r["rows"], r["phase"]) for r in results}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        rs = [r for r in results if (r["path"], r["rows"], r["phase"]) == key]
        steps = [r["first_step_s"] for r in rs if r["first_step_s"] is not None]
        step = (
            f"{statistics.median(steps):.1f}"
            if steps
            else "none (" + ("over limit" if rs[0]["killed_at_limit"] else "failed") + ")"
        )
        loads = ", ".join(f"{r['load_before']}-{r['load_after']}" for r in rs)
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {step} | {max(r['peak_rss_gb'] for r in rs):.2f} | {loads} | {len(rs)} |"
        )


# ------------------------------------------------------------------------- 8000 x 8000 JSONL
def big(out: Path, old: Path | None, limit_gb: float, rows: int = 32, files: int = 8) -> list[dict]:
    """`rows` JSONL rows over `files` distinct 8000x8000 PNGs; one SFT step through data=jsonl."""
    from PIL import Image, ImageDraw

    folder = out / "big"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(files):
        path = folder / "images" / f"{k}.png"
        if not path.exists():
            img = Image.new("RGB", (8000, 8000), (255, 255, 255))
            ImageDraw.Draw(img).rectangle((500 * k, 500, 500 * k + 2000, 2500), fill=(220, 30, 30))
            img.save(path, compress_level=1)
    lines = [json.dumps({"image": f"{i % files}.png", "question": "How many red squares are there?", "answer": "1",
                         "reasoning": "I count 1."}) for i in range(rows)]  # fmt: skip
    (folder / f"d{rows}.jsonl").write_text("\n".join(lines) + "\n")
    scratch = Path(tempfile.mkdtemp(prefix="hf_bench_big_"))
    results = []
    for label, checkout in [("this checkout", ROOT), *([("old", old)] if old else [])]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(scratch / "c")}
        if checkout != ROOT:
            env["PYTHONPATH"] = str(checkout / "src")
        cmd = [sys.executable, str(checkout / "train.py"), *_base(scratch / "outputs"), "data=jsonl",
               f"data.train.path={folder / f'd{rows}.jsonl'}", f"data.test.path={folder / f'd{rows}.jsonl'}",
               f"data.image_folder={folder / 'images'}", "eval.max_prompts=4"]  # fmt: skip
        r = measure(cmd, env, limit_gb, scratch / f"{label.replace(' ', '_')}.log") | {"path": label, "rows": rows}
        print(json.dumps(r), flush=True)
        results.append(r)
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["make", "run", "big"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--jsonl-rows", type=int, default=25_000, help="rows written as JSONL + PNG files (old path)")
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--old", type=Path, help="a checkout of an older commit: measure its data=jsonl path")
    ap.add_argument("--limit-gb", type=float, default=8.0, help="stop a run whose RSS passes this (shared machine)")
    ap.add_argument("--big-rows", type=int, default=32, help="big: JSONL rows over the 8 large images")
    a = ap.parse_args()
    if a.what == "make":
        make(a.dir, a.rows, a.jsonl_rows)
    elif a.what == "run":
        run(a.dir, a.sizes, a.repeats, a.old, a.limit_gb)
    else:
        big(a.dir, a.old, a.limit_gb, rows=a.big_rows)


if __name__ == "__main__":
    main()
