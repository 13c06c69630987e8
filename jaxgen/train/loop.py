"""The one training loop: data -> train step -> logs, evaluations, checkpoints."""

from __future__ import annotations

import json
import math
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from jaxgen.data import TrainIterator, open_source
from jaxgen.errors import InputError
from jaxgen.files import open_atomic
from jaxgen.models import count_params
from jaxgen.parallel import initialize_distributed, make_mesh
from jaxgen.train.checkpoint import Checkpointer
from jaxgen.train.evaluation import (
    fid_of_samples,
    generate,
    image_grid,
    make_sampler,
    reference_stats,
    save_png,
)
from jaxgen.train.state import (
    Setup,
    TrainState,
    abstract_state,
    ema_name,
    init_state,
    make_setup,
    make_train_step,
)
from jaxgen.train.writers import MetricWriter


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped."""


def open_data(config: ml_collections.ConfigDict, download: bool = True):
    """The training source and the image shape the model sees (after resize and padding)."""
    source = open_source(config.data.source, tfds_download=download)
    return source, model_shape(config, source.image_shape)


def model_shape(config: ml_collections.ConfigDict, stored: tuple | None) -> tuple[int, int, int]:
    """``(H, W, C)`` of the model's input given the stored image shape (``None``: varies)."""
    side = config.data.pad_to or config.data.resolution
    if stored is None:
        if config.data.resolution is None:
            raise InputError(
                f"{config.data.source}: images differ in size; set data.resolution to train."
            )
        stored = (config.data.resolution, config.data.resolution, 3)
    return (side or stored[0], side or stored[1], stored[2])


def build(config: ml_collections.ConfigDict, source=None) -> tuple[Setup, object]:
    """The run's :class:`Setup` and training source (no parameters allocated).

    Args:
      config: the run's configuration.
      source: the training images; default ``open_source(config.data.source)``.
    """
    if source is None:
        source, image_shape = open_data(config)
    else:
        image_shape = model_shape(config, source.image_shape)
    mesh = make_mesh(fsdp=config.train.fsdp)
    total_updates = max(config.train.num_steps // config.optim.grad_accum, 1)
    return make_setup(config, mesh, image_shape, total_updates), source


def describe(config: ml_collections.ConfigDict, workdir: str) -> str:
    """What a run of ``config`` would do: model, size, data, mesh, schedule, outputs.

    Nothing is downloaded: a dataset that is not available locally is reported
    as such and the model input shape is taken from ``data.resolution``.
    """
    try:
        source, image_shape = open_data(config, download=False)
        data_line = f"data: {source.name}, {len(source):,} images, model input {image_shape}"
    except InputError as e:
        image_shape = model_shape(config, None)
        data_line = f"data: {config.data.source} (not available here: {e}), model input " \
                    f"{image_shape}"
    try:
        mesh = make_mesh(fsdp=config.train.fsdp)
        mesh_line = f"mesh: {dict(mesh.shape)}"
    except InputError as e:  # e.g. an fsdp axis for a pod, described on a laptop
        mesh = make_mesh()
        mesh_line = f"mesh: not here ({e})"
    total_updates = max(config.train.num_steps // config.optim.grad_accum, 1)
    setup = make_setup(config, mesh, image_shape, total_updates)
    from jaxgen.models import abstract_init

    params = abstract_init(setup.module, *setup.example_inputs())["params"]
    stop = f"{config.train.num_steps} steps"
    if config.train.minutes:
        stop += f" or {config.train.minutes} minutes of training, whichever comes first"
    lines = [
        f"model: {config.model.name} {dict(config.model.kwargs)}, "
        f"{count_params(params):,} parameters, compute {config.train.compute_dtype}",
        f"process: {setup.process!r}, prediction {setup.prediction}, "
        f"precond {config.diffusion.precond}",
        data_line,
        f"{mesh_line} over {jax.device_count()} device(s), "
        f"{jax.process_count()} process(es)",
        f"train: batch {config.data.batch_size}, {stop}, grad_accum {config.optim.grad_accum}, "
        f"lr {config.optim.lr} ({config.optim.schedule}, warmup {config.optim.warmup_steps}), "
        f"EMA {list(config.train.ema_decays)}",
        f"checkpoints: every {config.checkpoint.every_steps} steps, keep "
        f"{config.checkpoint.keep}, in {epath.Path(workdir) / 'checkpoints'}",
        f"eval: every {config.eval.every_steps} steps, at minutes {list(config.eval.at_minutes)}; "
        f"grid of 64 + FID of {config.eval.fid_samples} EMA samples vs "
        f"{config.eval.fid_reference} ({config.eval.solver}, {config.eval.steps} steps)",
    ]
    return "\n".join(lines)


class _Signals:
    """Records SIGTERM (preemption) so the loop can checkpoint and stop between steps."""

    def __init__(self) -> None:
        self.stop = False
        self._previous = None

    def __enter__(self) -> _Signals:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _agree(flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over all processes (so every process takes the same branch)."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    return list(np.asarray(multihost_utils.process_allgather(np.asarray(flags))).any(axis=0))


class _Evaluator:
    """Sample grid + FID of EMA samples; the reference statistics are computed on first use."""

    def __init__(self, setup: Setup, workdir: epath.Path) -> None:
        cfg = setup.config.eval
        self.setup, self.workdir, self.cfg = setup, workdir, cfg
        self.batch_size = cfg.batch_size
        self.sampler = make_sampler(setup, cfg.batch_size, solver=cfg.solver, steps=cfg.steps,
                                    cfg_scale=cfg.cfg_scale)
        self.key = jax.random.key_data(jax.random.key(cfg.seed))
        self._extractor = None
        self._reference = None

    def _fid_parts(self):
        if self._extractor is None:
            from jaxgen.metrics.features import FeatureExtractor
            from jaxgen.metrics.weights import load_inception

            self._extractor = FeatureExtractor(*load_inception(),
                                               batch_size=self.cfg.fid_batch_size)
            data = self.setup.config.data
            self._reference = reference_stats(
                self.cfg.fid_reference, self.workdir, self._extractor,
                num=self.cfg.fid_reference_num, resolution=data.resolution, pad_to=data.pad_to,
            )
        return self._extractor, self._reference

    def prepare(self) -> None:
        """Compute (or load) the reference statistics before the training clock starts."""
        if self.cfg.fid_samples and (self.cfg.every_steps or self.cfg.at_minutes):
            self._fid_parts()

    def __call__(self, state: TrainState, step: int) -> dict[str, float]:
        params = state.ema[ema_name(self.setup.config.train.ema_decays[0])]
        n_grid = 64
        num = max(n_grid, self.cfg.fid_samples)
        start = time.perf_counter()
        batches = list(generate(self.sampler, params, self.key, num, self.batch_size,
                                self.setup.num_classes))
        images = np.concatenate([b[0] for b in batches])
        out = {"sample_seconds": time.perf_counter() - start}
        if jax.process_index() == 0:
            save_png(image_grid(images[:n_grid]), self.workdir / "samples" / f"{step:08d}.png")
        if self.cfg.fid_samples:
            start = time.perf_counter()
            extractor, reference = self._fid_parts()
            out[f"fid{self.cfg.fid_samples}"] = fid_of_samples(
                images[: self.cfg.fid_samples], reference, extractor
            )
            out["fid_seconds"] = time.perf_counter() - start
        return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Writes ``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``tb/`` (TensorBoard)
    and ``samples/<step>.png``; ``workdir`` may be a bucket (``gs://BUCKET/...``), which
    every process of a multi-host run must see. Stops after ``train.num_steps`` steps, after
    ``train.minutes`` minutes of training (evaluation and checkpoint time not
    counted), or on SIGTERM, saving a checkpoint each time.

    Raises:
      TrainingDiverged: when the loss or gradient norm is not finite; the
        last checkpoint (written before the bad step) is kept.
    """
    initialize_distributed(config.parallel.coordinator, config.parallel.num_processes,
                           config.parallel.process_id)
    workdir_path = epath.Path(workdir)
    main = jax.process_index() == 0
    if main:
        with open_atomic(workdir_path / "config.json") as f:
            f.write((config.to_json_best_effort(indent=2) + "\n").encode())
    setup, source = build(config)
    ckpt = Checkpointer(workdir_path / "checkpoints", keep=config.checkpoint.keep)
    restored = ckpt.restore_latest(abstract_state(setup))
    if restored is None:
        state, extra = init_state(setup, config.seed), {"data": None, "train_seconds": 0.0}
    else:
        state, extra, step = restored
        print(f"resuming from {ckpt.directory / str(step)}", file=sys.stderr)
    data = TrainIterator(
        source, config.data.batch_size, seed=config.seed, flip=config.data.flip,
        resolution=config.data.resolution, pad_to=config.data.pad_to,
        with_labels=bool(setup.num_classes), mesh=setup.mesh, state=extra["data"],
    )
    train_step = make_train_step(setup)
    writer = MetricWriter(workdir_path, enabled=main)
    evaluator = _Evaluator(setup, workdir_path)
    evaluator.prepare()
    if main and restored is None:
        n = count_params(state.params)
        writer.write(0, {"params": n})
        print(f"{config.model.name}: {n:,} parameters", file=sys.stderr)

    step = int(state.step)
    train_seconds = float(extra["train_seconds"])
    pending_minutes = [m for m in config.eval.at_minutes if m * 60 > train_seconds]
    bar = tqdm(initial=step, total=config.train.num_steps, disable=not main, file=sys.stderr,
               unit="step", dynamic_ncols=True)
    last_log, window = time.perf_counter(), 0

    def save():
        ckpt.save(step, state, {"data": data.get_state(), "train_seconds": train_seconds})

    with _Signals() as signals:
        while step < config.train.num_steps:
            tick = time.perf_counter()
            state, metrics = train_step(state, next(data))
            checks = {k: float(metrics[k]) for k in ("loss", "grad_norm", "update_norm")}
            loss, grad_norm = checks["loss"], checks["grad_norm"]
            train_seconds += time.perf_counter() - tick
            if not all(map(math.isfinite, checks.values())):
                # The state after this step is never saved: the last checkpoint stays good.
                kept = ckpt.steps()
                where = f"step {kept[-1]} in {ckpt.directory}" if kept else "none"
                writer.write(step + 1, checks)
                writer.close()
                ckpt.close()
                data.close()
                bar.close()
                found = ", ".join(f"{k}={v}" for k, v in checks.items())
                raise TrainingDiverged(
                    f"{found} at step {step + 1}: training diverged and stopped. Last good "
                    f"checkpoint: {where}. Lower optim.lr, set optim.grad_clip, or check the data."
                )
            step += 1
            window += 1
            bar.update(1)
            due_minutes = bool(pending_minutes) and train_seconds >= pending_minutes[0] * 60
            out_of_time = bool(config.train.minutes) and train_seconds >= config.train.minutes * 60
            preempted, due_minutes, out_of_time = _agree([signals.stop, due_minutes, out_of_time])
            if step % config.train.log_every == 0 or step == config.train.num_steps:
                now = time.perf_counter()
                rate = window / (now - last_log)
                last_log, window = now, 0
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                writer.write(step, {"loss": loss, "grad_norm": grad_norm,
                                    "lr": float(metrics["lr"]), "steps_per_s": rate,
                                    "train_minutes": train_seconds / 60})
            if step % config.checkpoint.every_steps == 0:
                save()
            evaluate_now = (config.eval.every_steps and step % config.eval.every_steps == 0)
            if evaluate_now or due_minutes:
                if due_minutes:  # decided together, so every process drops the same mark
                    pending_minutes.pop(0)
                results = evaluator(state, step)
                results["train_minutes"] = train_seconds / 60
                writer.write(step, results)
                bar.write(f"step {step}: " + json.dumps({k: round(v, 3)
                                                          for k, v in results.items()}))
                last_log, window = time.perf_counter(), 0
            if preempted or out_of_time:
                why = "SIGTERM" if preempted else f"{config.train.minutes} minutes reached"
                bar.write(f"{why}: checkpoint at step {step}")
                break
    save()
    bar.close()
    writer.close()
    ckpt.close()
    data.close()
    return state
