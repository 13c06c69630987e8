"""The notebooks run top to bottom in SMALL mode, and are committed without outputs."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# The kernel inherits this process's environment, where conftest asks for 8 simulated
# devices. Two keep a real `data` mesh (batches split as on a TPU's 8 cores) without
# cutting the notebooks' small batches into 8 slivers on a 2-core machine.
DEVICES = "--xla_force_host_platform_device_count=2"


def test_committed_notebooks_are_stripped():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.name for p in paths} >= {"quickstart.ipynb", "samplers_and_metrics.ipynb",
                                      "few_step.ipynb", "latent.ipynb"}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            assert "execution" not in cell.metadata, f"{path.name} cell {i}: timing metadata"
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{path.name} cell {i} holds outputs: clear them before committing "
                    "(Jupyter: Edit > Clear All Outputs)."
                )


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    """A compilation cache of this module's own: cold at first, as on a fresh machine, and
    shared by the two notebooks (the same train step and Inception)."""
    return tmp_path_factory.mktemp("xla")


def execute(name: str, tmp_path: Path, monkeypatch, xla_cache: Path):
    """Run notebook ``name`` in SMALL mode in ``tmp_path``; return it and its stdout."""
    monkeypatch.setenv("JAXGEN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(xla_cache))
    monkeypatch.setenv("JAXGEN_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    monkeypatch.setenv("XLA_FLAGS", f"{flags} {DEVICES}".strip())
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    return nb, stdout


def count_images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_quickstart(tmp_path, monkeypatch, xla_cache):
    nb, out = execute("quickstart.ipynb", tmp_path, monkeypatch, xla_cache)
    assert "backend: cpu" in out and "mesh: {'data': 2, 'fsdp': 1}" in out
    grids = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert [p.stem for p in grids] == ["00000060", "00000120", "00000180"]
    assert count_images(nb) == 3 + 2  # a grid per chunk, the loss curve, the two solvers
    assert re.search(r"euler: 10 steps, NFE 10, 50 samples", out)
    assert re.search(r"heun: 5 steps, NFE 9, 50 samples", out)
    fids = {k: float(v) for k, v in
            re.findall(r"FID (\w+): ([\d.]+) \(50 samples vs 100 images", out)}
    assert fids.keys() == {"euler", "heun"}
    (floor,) = map(float, re.findall(r"FID of 50 training images \(the floor at this size\): "
                                     r"([\d.]+)", out))
    # Real images are the best 50 samples there are: no model beats them at this size, and
    # 180 steps of training leave the samples far from them.
    assert 0 < floor < min(fids.values())


@pytest.mark.slow
def test_samplers_and_metrics(tmp_path, monkeypatch, xla_cache):
    nb, out = execute("samplers_and_metrics.ipynb", tmp_path, monkeypatch, xla_cache)
    assert "no checkpoint, training a tiny model" in out  # nothing given: trains its own
    assert re.search(
        r"run, step 100 \(0\.\d+ weights\): unet-small, Flow\(path='linear'\), predicts velocity",
        out,
    )
    solvers = re.findall(r"(\w+) +\d+ steps +NFE +(\d+) +FID +([\d.]+)", out)
    assert {(s, int(n)) for s, n, _ in solvers} == {
        (s, n) for s in ("euler", "heun", "dpmpp_2m") for n in (5, 9)
    }
    guided = re.findall(r"(all steps|\(0\.28, 5\.42\]) +scale +([\d.]+) +FID +([\d.]+)", out)
    assert len(guided) == 5  # 3 scales x 2 intervals, scale 1 once
    fids = [float(f) for *_, f in solvers + guided]
    assert all(math.isfinite(f) and f > 0 for f in fids)
    # Scale 1 is no guidance: the same samples as the solver sweep's Euler at 9 steps (one
    # batched call per step instead of a plain one: float32 rounding at most).
    (euler9,) = [float(f) for s, n, f in solvers if s == "euler" and int(n) == 9]
    (unguided,) = [float(f) for name, scale, f in guided if float(scale) == 1.0]
    assert abs(unguided - euler9) <= 0.01
    rows = re.findall(r"precision ([\d.]+) +recall ([\d.]+) +density ([\d.]+) +coverage "
                      r"([\d.]+)", out)
    assert len(rows) == 5
    for p, r, _, c in rows:
        assert all(0 <= float(v) <= 1 for v in (p, r, c))
    assert count_images(nb) == 4  # FID vs NFE, FID vs scale, guided grids, P/R + D/C


@pytest.mark.slow
def test_few_step(tmp_path, monkeypatch, xla_cache):
    nb, out = execute("few_step.ipynb", tmp_path, monkeypatch, xla_cache)
    assert "no checkpoint, training a tiny teacher first" in out  # nothing given: trains one
    assert re.search(r"teacher \S+, step 100 \(0\.\d+ weights\): unet-small, Flow", out)
    assert re.search(r"student \S+-cd: 60 updates", out)
    fids = {name: (float(value), int(evals)) for name, value, evals in re.findall(
        r"FID (\w+ \w+ \d+): ([\d.]+) \((\d+) network evaluations, 32 samples vs 64 images",
        out)}
    assert {name: evals for name, (_, evals) in fids.items()} == {
        "teacher Euler 1": 1, "teacher Euler 2": 2, "teacher Euler 4": 4, "teacher Euler 20": 20,
        "student CD 1": 1, "student CD 2": 2, "student CD 4": 4}
    assert all(math.isfinite(f) and f > 0 for f, _ in fids.values())
    assert count_images(nb) == 2  # the teacher's grids, the student's grids


@pytest.mark.slow
def test_latent(tmp_path, monkeypatch, xla_cache):
    nb, out = execute("latent.ipynb", tmp_path, monkeypatch, xla_cache)
    work = tmp_path / "run"
    assert "trained 30 steps in" in out  # the autoencoder, trained here
    ((psnr, std, scale),) = re.findall(
        r"vae\.safetensors: reconstruction PSNR ([\d.]+) dB, latent std ([\d.]+), scale "
        r"([\d.]+) \(64 test images\)", out)
    assert float(psnr) > 0 and float(scale) == pytest.approx(1 / float(std), rel=2e-3)
    meta = json.loads((work / "latents" / "meta.json").read_text())
    assert (meta["count"], meta["latent_shape"], meta["scale"]) == (512, [7, 7, 4], float(scale))
    assert "latents: 512 images with their mirrors, latents (7, 7, 4)" in out
    assert re.search(r"DiT \S+: step 40 \(0\.999 weights\)", out)
    assert (work / "dit.safetensors").is_file()  # exported, then loaded back for sampling
    assert re.search(r"dit\.safetensors: DiT-S/2 \(patch 1\), [\d,]+ parameters, "
                     r"Flow\(path='linear'\), predicts velocity, samples \(7, 7, 4\)", out)
    # Guided: the conditional and unconditional passes in each evaluation.
    assert ("latents (7, 7, 4) -> images (28, 28, 1) uint8: 32 samples, 20 evaluations of 2 "
            "passes each") in out
    # Sampled and decoded by hand from the two files = sample_images on the run's own VAE.
    (levels,) = re.findall(r"sample_images: the same 32 samples up to (\d+) uint8 levels", out)
    assert int(levels) <= 1
    assert "grid (92, 302, 1) of samples (32, 28, 28, 1) uint8" in out  # 3 rows of 10
    assert count_images(nb) == 1  # one figure: samples, training images, reconstructions
    (fid,) = map(float, re.findall(
        r"FID: ([\d.]+) \(CFG scale 1\.5, 20 Euler steps, 32 samples vs 64 images", out))
    (floor,) = map(float, re.findall(r"FID of 32 reconstructed training images \(the "
                                     r"autoencoder's floor\): ([\d.]+)", out))
    assert all(math.isfinite(f) and f > 0 for f in (fid, floor))
