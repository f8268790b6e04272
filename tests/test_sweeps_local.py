"""The Slurm sweep's twin on this machine (hydra/launcher=local, submitit's local executor), and
notebooks/compare_runs.ipynb executed against it. No Slurm or root needed.

    python -m pytest tests/test_sweeps_local.py
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import ROOT, run_sweep

# Both tests read the one module-scoped sweep: on one xdist worker, or each worker would run it (~30 s).
pytestmark = pytest.mark.xdist_group("local_sweep")

TINY = ("recipe=single", "algo=sft", "debug=smoke")
STEPS = 4  # debug=smoke's max_steps


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local_sweep")
    sweep = run_sweep(tmp, *TINY, "seed=0,1,2", "hydra/launcher=local")
    assert sweep.returncode == 0, sweep
    return sweep


@pytest.mark.slow  # the local_sweep fixture: 3 jobs through submitit's local executor, ~30 s
def test_local_launcher_runs_each_job_in_its_own_run_dir(local_sweep):
    sweep = local_sweep
    assert [p.name for p in sweep.jobs()] == ["0", "1", "2"]
    ids = set()
    for num, run_dir in enumerate(sweep.jobs()):
        assert f"seed: {num}\n" in (run_dir / "backup" / "config.yaml").read_text()
        [start] = (run_dir / "backup" / "jobs.txt").read_text().splitlines()
        assert "executor=local" in start and "restart=0" in start and "tasks=1" in start
        ids.add(start.split(" job=")[1].split()[0])
        train = sweep.result(num, "01_sft.json")
        assert train["global_step"] == STEPS
        assert sorted({h["step"] for h in train["log_history"] if "loss" in h}) == list(range(1, STEPS + 1))
        assert sweep.result(num, "summary.json")["rows"][0]["stage"] == "01_sft"
        assert list((run_dir / "tensorboard" / "01_sft").glob("events.out.tfevents.*"))
        assert (sweep.dir / ".submitit").is_dir()
    assert len(ids) == 3  # one submitit job per sweep job
    table = (sweep.dir / "sweep.md").read_text().splitlines()  # the end-of-sweep table: no Slurm columns here
    assert table[0].split("|")[1:4] == [" job ", " overrides ", " result "] and len(table) == 5, table
    assert all(line.split("|")[3].strip() == "ok" for line in table[2:]), table


@pytest.mark.slow  # the local_sweep fixture, then the notebook in a kernel: ~5 s
def test_compare_notebook_draws_the_sweep(local_sweep, tmp_path, monkeypatch):
    import nbclient  # the dev extra
    import nbformat

    notebook = ROOT / "notebooks" / "compare_runs.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs must be stripped in git"
    plots = tmp_path / "plots"
    # The kernel inherits the environment: the parameters cell reads SWEEP_DIR and PLOTS_DIR.
    monkeypatch.setenv("SWEEP_DIR", str(local_sweep.dir))
    monkeypatch.setenv("PLOTS_DIR", str(plots))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    assert f"3 runs in {local_sweep.dir}" in text
    for num in range(3):
        assert f"  {num}: seed={num}  [ok]" in text
    assert "curves: ['train_loss.png']" in text  # SFT logs no reward or completion length
    assert (plots / "train_loss.png").stat().st_size > 10_000 and (plots / "final_metrics.png").stat().st_size > 10_000
    csv = (plots / "runs.csv").read_text().splitlines()
    assert csv[0].startswith("run,seed,status,stage,greedy_acc") and len(csv) == 4
    expected = [
        json.loads((d / "result" / "summary.json").read_text())["rows"][0]["greedy_acc"] for d in local_sweep.jobs()
    ]
    assert [float(line.split(",")[4]) for line in csv[1:]] == pytest.approx(expected)
    settings = (plots / "settings.md").read_text()  # the mean over the 3 seeds of the one setting
    header, _, row = settings.splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    assert (cells["status"], cells["stage"], cells["n"]) == ("ok", "01_sft", "3") and "seed" not in cells
    assert float(cells["greedy_acc"]) == pytest.approx(sum(expected) / 3, abs=1e-3)
