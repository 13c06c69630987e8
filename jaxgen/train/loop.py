"""The one training loop: data -> train step -> logs, evaluations, checkpoints."""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from flax.traverse_util import flatten_dict
from tqdm import tqdm

from jaxgen.data import TrainIterator, open_source
from jaxgen.errors import InputError
from jaxgen.files import open_atomic
from jaxgen.models import count_params
from jaxgen.parallel import initialize_distributed, make_mesh
from jaxgen.train import latent, repa
from jaxgen.train.checkpoint import Checkpointer
from jaxgen.train.consistency import (
    fake_updates,
    generator_steps,
    needs_teacher,
    teacher_steps,
    with_teacher,
)
from jaxgen.train.monitoring import (
    fid_of_samples,
    image_grid,
    reference_stats,
    sample_images,
    save_png,
)
from jaxgen.train.phema import (
    PowerEMAState,
    load_snapshot,
    save_snapshot,
    snapshot_folder,
    snapshot_name,
)
from jaxgen.train.state import (
    LossFn,
    RunParts,
    TrainState,
    abstract_state,
    default_weights_name,
    init_state,
    make_model,
    make_run_parts,
    make_train_step,
    phema_sigma_rels,
    state_weights,
)
from jaxgen.train.workdir import WorkdirLock, check_config
from jaxgen.train.writers import MetricWriter


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a checkpoint was saved.

    Attributes:
      signum: the signal; a command exits with ``128 + signum`` (143, 130), so that
        ``train && sample`` does not go on with a half-trained model.
      step: the step of the checkpoint saved.
    """

    def __init__(self, signum: int, step: int, where: str) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped at step {step}, checkpoint saved in {where}; run the "
                         "same command again to continue.")
        self.signum, self.step = signum, step


def open_data(config: ml_collections.ConfigDict, download: bool = True):
    """The training source, resized to ``data.resolution`` when set (the one place images
    are resized), and the image shape the model sees (after padding to ``data.pad_to``)."""
    source = open_source(config.data.source, resolution=config.data.resolution,
                         tfds_download=download)
    return source, model_shape(config, source.image_shape)


def model_shape(config: ml_collections.ConfigDict, stored: tuple | None) -> tuple[int, int, int]:
    """``(H, W, C)`` of the model's input given the source's image shape (``None``: varies);
    in a latent run, the latent's shape."""
    if latent.enabled(config):
        return tuple(stored) if stored is not None else latent.latent_shape(config)
    side = config.data.pad_to or config.data.resolution
    if stored is None:
        if config.data.resolution is None:
            raise InputError(
                f"{config.data.source}: images differ in size; set data.resolution "
                "(--config.data.resolution=N) to center-crop and resize them to NxN."
            )
        stored = (config.data.resolution, config.data.resolution, 3)
    return (side or stored[0], side or stored[1], stored[2])


def _check_labels(parts: RunParts, source) -> None:
    """A class-conditional model needs labels in ``[0, num_classes)``."""
    if not parts.num_classes:
        return
    if not source.has_labels:
        raise InputError(
            f"{source.name} has no labels but the model is conditioned on "
            f"{parts.num_classes} classes; set model.kwargs.num_classes=0 for an unconditional "
            "model, or give a labelled source."
        )
    labels = source.labels
    if labels is not None and len(labels) and int(np.max(labels)) >= parts.num_classes:
        raise InputError(
            f"{source.name} has labels up to {int(np.max(labels))} but the model has "
            f"num_classes={parts.num_classes}; set model.kwargs.num_classes="
            f"{int(np.max(labels)) + 1} or more."
        )


def _check_cadence(config: ml_collections.ConfigDict) -> None:
    """Counts and periods that must be positive (0 would divide by zero or never save)."""
    for key, value, least in (
        ("data.batch_size", config.data.batch_size, 1),
        ("train.num_steps", config.train.num_steps, 1),
        ("train.log_every", config.train.log_every, 1),
        ("checkpoint.every_steps", config.checkpoint.every_steps, 1),
        ("checkpoint.keep", config.checkpoint.keep, 1),
        ("eval.every_steps", config.eval.every_steps, 0),
        ("train.minutes", config.train.minutes, 0),
        ("train.phema_snapshot_every", _snapshot_every(config), 0),
    ):
        if not value >= least:  # also refuses NaN
            raise InputError(f"{key}={value} must be >= {least}; --config.{key}=N sets it.")
    every, accum = _snapshot_every(config), config.optim.grad_accum
    if every and not phema_sigma_rels(config):
        raise InputError(f"train.phema_snapshot_every={every} saves power EMAs, but "
                         "train.phema_sigma_rels is empty; set it, e.g. (0.05, 0.1).")
    if every % accum:
        raise InputError(f"train.phema_snapshot_every={every} must be a multiple of "
                         f"optim.grad_accum={accum} (snapshots are taken after an update).")


def _snapshot_every(config: ml_collections.ConfigDict) -> int:
    """``train.phema_snapshot_every`` (absent from configs saved before it existed: 0)."""
    return config.train.get("phema_snapshot_every", 0)


def _save_snapshots(phema: PowerEMAState, config: ml_collections.ConfigDict,
                    folder: epath.Path) -> None:
    """Save each power EMA of ``phema`` as ``FOLDER/phema-<t>-<sigma_rel>.npz``.

    ``t`` is the number of optimizer updates the EMAs have averaged (none yet:
    nothing is saved). Every process calls this (a sharded EMA is gathered);
    process 0 writes, atomically. A snapshot already there with the same arrays
    (a step computed again after a resume) is left as it is; one with other
    arrays is never overwritten: it is kept and reported in one line.
    """
    t = int(phema.count)
    if t == 0:
        return
    emas = phema.emas
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        emas = multihost_utils.process_allgather(emas, tiled=True)
    if jax.process_index() != 0:
        return
    for sigma_rel, ema in zip(phema_sigma_rels(config), emas, strict=True):
        path = folder / snapshot_name(t, sigma_rel)
        if not path.exists():
            save_snapshot(folder, ema, t, sigma_rel)
            continue
        saved, new = flatten_dict(load_snapshot(path)), flatten_dict(jax.device_get(ema))
        if saved.keys() != new.keys() or any(not np.array_equal(saved[k], new[k]) for k in new):
            print(f"warning: {path} exists with other weights (not saved by this run's "
                  "trajectory); kept, not overwritten.", file=sys.stderr)


def build(
    config: ml_collections.ConfigDict,
    source=None,
    *,
    module: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    frozen: Any = None,
) -> tuple[RunParts, object]:
    """The run's :class:`RunParts` and training source (no parameters allocated).

    Args:
      config: the run's configuration.
      source: the training images; default :func:`open_data`.
      module, loss_fn, frozen: a user's model, loss and the loss's frozen weights
        (see :func:`make_run_parts`).
    """
    _check_cadence(config)
    if source is None:
        source, image_shape = open_data(config)
    else:
        image_shape = model_shape(config, source.image_shape)
    latent.check_dataset(config, source)
    mesh = make_mesh(fsdp=config.train.fsdp)
    total_updates = max(config.train.num_steps // config.optim.grad_accum, 1)
    parts = make_run_parts(config, mesh, image_shape, total_updates, module=module,
                           loss_fn=loss_fn, frozen=frozen)
    if repa.enabled(config):  # the encoder's weights as the step's frozen argument
        parts = repa.with_repa(parts)
    _check_labels(parts, source)
    return parts, source


def describe(config: ml_collections.ConfigDict, workdir: str) -> str:
    """What a run of ``config`` would do: model, size, data, mesh, schedule, outputs.

    Nothing is downloaded: a dataset that is not available locally is reported
    as such and the model input shape is taken from ``data.resolution`` (its
    channels from a model built for one input shape, such as EDM2's presets).
    """
    try:
        source, image_shape = open_data(config, download=False)
        data_line = f"data: {source.name}, {len(source):,} images, model input {image_shape}"
    except InputError as e:
        image_shape = model_shape(config, None)
        # A model built for one input (EDM2) says its channels (e.g. 4 for latents).
        channels = getattr(make_model(config), "img_channels", image_shape[2])
        image_shape = (*image_shape[:2], channels)
        data_line = f"data: {config.data.source} (not available here: {e}), model input " \
                    f"{image_shape}"
    try:
        mesh = make_mesh(fsdp=config.train.fsdp)
        mesh_line = f"mesh: {dict(mesh.shape)}"
    except InputError as e:  # e.g. an fsdp axis for a pod, described on a laptop
        mesh = make_mesh()
        mesh_line = f"mesh: not here ({e})"
    total_updates = max(config.train.num_steps // config.optim.grad_accum, 1)
    parts = make_run_parts(config, mesh, image_shape, total_updates)
    from jaxgen.models import abstract_init

    params = abstract_init(parts.module, *parts.example_inputs())["params"]
    stop = f"{config.train.num_steps} steps"
    schedule = config.optim.schedule
    if schedule == "inverse_sqrt":
        schedule += f" after {config.optim.ref_steps} updates"
    if config.train.minutes:
        stop += f" or {config.train.minutes} minutes of training, whichever comes first"
    lines = [
        f"model: {config.model.name} {dict(config.model.kwargs)}, {parts.num_classes} classes, "
        f"{count_params(params):,} parameters, compute {config.train.compute_dtype}",
        f"process: {parts.process!r}, prediction {parts.prediction}, "
        f"precond {config.diffusion.precond}",
        data_line,
        f"{mesh_line} over {jax.device_count()} device(s), "
        f"{jax.process_count()} process(es)",
        f"train: batch {config.data.batch_size}, {stop}, grad_accum {config.optim.grad_accum}, "
        f"loss {config.diffusion.loss}, lr {config.optim.lr} ({schedule}, warmup "
        f"{config.optim.warmup_steps}), EMA {list(config.train.ema_decays)}, power EMA "
        f"sigma_rel {list(phema_sigma_rels(config))}",
        f"checkpoints: every {config.checkpoint.every_steps} steps, keep "
        f"{config.checkpoint.keep}, in {epath.Path(workdir) / 'checkpoints'}",
        f"eval: every {config.eval.every_steps} steps, at minutes {list(config.eval.at_minutes)}; "
        f"grid of 64 + FID of {config.eval.fid_samples} samples of weights "
        f"{default_weights_name(config)} vs "
        f"{config.eval.fid_reference} ("
        f"{_eval_sampler(parts)}, "
        f"{config.eval.steps} steps)",
    ]
    if needs_teacher(config):
        d = config.distill
        how = {"cd": f"one {d.solver} step of its ODE per target",
               "scm": "its PF-ODE velocity for the tangent",
               "pd": f"{teacher_steps(config)} DDIM steps -> {teacher_steps(config) // 2}, "
                     "the student starting from its weights",
               "reflow": f"{teacher_steps(config)} {d.solver} steps of its ODE from fresh noise "
                         "per pair, the student starting from its weights",
               "dmd2": f"its score as DMD2's real score, {fake_updates(config)} fake-score "
                       "updates per generator update, both starting from its weights, a "
                       f"{generator_steps(config)}-step generator",
               }[config.diffusion.loss]
        lines.append(f"distill: teacher {d.teacher} (weights "
                     f"{d.teacher_weights or 'its default'}), {how}")
    if repa.enabled(config):
        r = config.train.repa
        lines.append(f"repa: tokens after block {r.depth} -> projector {r.projector_dim} -> "
                     f"{r.encoder} features (weights {r.weights or 'default'}), "
                     f"lambda {r['lambda']}")
    if _snapshot_every(config):
        lines.append(f"power-EMA snapshots: every {_snapshot_every(config)} steps, in "
                     f"{snapshot_folder(workdir)}")
    return "\n".join(lines)


def _eval_sampler(parts: RunParts) -> str:
    """The sampler the run's evaluations use (see :func:`sample_images`)."""
    if parts.is_consistency:
        return "consistency sampler"
    if parts.is_dmd2_generator:
        return "DMD2 generator"
    return "ddim" if parts.config.diffusion.get("loss") == "pd" else parts.config.eval.solver


class _Signals:
    """Records SIGTERM (preemption) and SIGINT (Ctrl-C), so that the loop checkpoints and
    stops between steps instead of dying mid-step or swallowing the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    @property
    def stop(self) -> bool:
        return self.received is not None

    def __enter__(self) -> _Signals:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, no preemption support
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _any_process(flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over all processes (so every process takes the same branch)."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    return list(np.asarray(multihost_utils.process_allgather(np.asarray(flags))).any(axis=0))


class _Evaluator:
    """Sample grid + FID of EMA samples; the reference statistics are computed on first use."""

    def __init__(self, parts: RunParts, workdir: epath.Path) -> None:
        self.parts, self.workdir, self.cfg = parts, workdir, parts.config.eval
        self.key = jax.random.key_data(jax.random.key(self.cfg.seed))
        self._extractor = None
        self._reference = None

    def _fid_parts(self):
        if self._extractor is None:
            from jaxgen.metrics.features import FeatureExtractor
            from jaxgen.metrics.weights import load_inception

            self._extractor = FeatureExtractor(*load_inception(),
                                               batch_size=self.cfg.fid_batch_size)
            data = self.parts.config.data
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
        config = self.parts.config
        params = state_weights(state, config, default_weights_name(config))
        n_grid = 64
        start = time.perf_counter()
        images = np.concatenate(list(sample_images(
            self.parts, params, self.key, num=max(n_grid, self.cfg.fid_samples),
            batch_size=self.cfg.batch_size, solver=self.cfg.solver, steps=self.cfg.steps,
            cfg_scale=self.cfg.cfg_scale,
        )))
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


@jax.jit
def _accumulate(totals: dict, metrics: dict) -> dict:
    """Running sums of the step metrics, on the device (no host round trip per step)."""
    return {k: totals[k] + metrics[k] for k in totals}


class _Progress:
    """The progress bar, counted against the limit that stops the run.

    With ``train.minutes`` set the bar runs over the training minutes (and
    shows the step); otherwise over ``train.num_steps``. A time-limited run
    never shows a million-step bar with a days-long ETA.
    """

    def __init__(self, config: ml_collections.ConfigDict, step: int, seconds: float,
                 enabled: bool) -> None:
        self.minutes = float(config.train.minutes or 0.0)
        self.num_steps = config.train.num_steps
        if self.minutes:
            self.bar = tqdm(initial=round(seconds), total=round(self.minutes * 60),
                            disable=not enabled, file=sys.stderr, unit="s", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s of training "
                                       "[{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(initial=step, total=self.num_steps, disable=not enabled,
                            file=sys.stderr, unit="step", dynamic_ncols=True)

    def update(self, step: int, seconds: float) -> None:
        if self.minutes:
            self.bar.update(min(round(seconds), self.bar.total) - self.bar.n)
        else:
            self.bar.update(step - self.bar.n)

    def show(self, step: int, **values: str) -> None:
        if self.minutes:
            values = {"step": f"{step}/{self.num_steps}", **values}
        self.bar.set_postfix(values, refresh=False)

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    module: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    frozen: Any = None,
    allow_config_change: bool = False,
) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

    Writes ``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``tb/`` (TensorBoard)
    and ``samples/<step>.png``; ``workdir`` may be a bucket (``gs://BUCKET/...``), which
    every process of a multi-host run must see. Stops after ``train.num_steps`` steps, after
    ``train.minutes`` minutes of training (evaluation and checkpoint time not
    counted), or on SIGTERM/SIGINT, saving a checkpoint each time.

    The workdir is locked while the run trains (a second run there is refused),
    and a rerun must have the saved ``config.json``'s configuration up to the
    fields that only say how long or how often (see :mod:`jaxgen.train.workdir`).

    The step runs ahead of the host: its metrics stay on the device and are
    read only every ``train.log_every`` steps and at checkpoints.

    Args:
      config: the run's configuration (``jaxgen/configs/*.py``).
      workdir: the run's folder.
      module: train this Flax module instead of ``config.model`` (called as
        ``module.apply(variables, x_t, t, cond, train=..., rngs=...)``; give the
        same module again to resume or to :func:`jaxgen.train.load_run`).
      loss_fn: train with this loss instead of :func:`jaxgen.diffusion.loss`
        (a :data:`jaxgen.train.state.LossFn`).
      frozen: weights ``loss_fn`` reads but does not train (a teacher's
        parameters, an encoder's), given to it as ``frozen=`` (traced, replicated;
        not checkpointed: give them again to resume).
      allow_config_change: continue a run whose saved configuration differs
        (the new one is saved); otherwise that is refused.

    Raises:
      InputError: bad configuration, a configuration that differs from the
        run's, a workdir in use by another run; nothing is written.
      TrainingDiverged: when the loss or gradient norm is not finite; the
        last checkpoint (written before the bad step) is kept.
      TrainingInterrupted: after SIGTERM or SIGINT, once the checkpoint is saved.
    """
    initialize_distributed(config.parallel.coordinator, config.parallel.num_processes,
                           config.parallel.process_id)
    workdir_path = epath.Path(workdir)
    main = jax.process_index() == 0
    config_json = config.to_json_best_effort(indent=2) + "\n"
    # Everything is checked before anything is written: a refused start leaves no trace.
    rewrite_config = check_config(workdir_path, config_json, allow_config_change)
    parts, source = build(config, module=module, loss_fn=loss_fn, frozen=frozen)
    if loss_fn is None and needs_teacher(config):
        parts = with_teacher(parts)  # distill.teacher's weights, checked against the student
    lock = WorkdirLock(workdir_path)
    created = main and not workdir_path.exists()
    if main:
        workdir_path.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    started = []  # set once the start-up has succeeded and the run begins to write
    try:
        return _train(config, workdir_path, parts, source, lock, rewrite_config and main,
                      config_json, started)
    except BaseException:
        if created and not started:  # a failed start leaves no trace of the folder it made
            lock.release()
            workdir_path.rmtree(missing_ok=True)
        raise
    finally:
        lock.release()


def _train(config, workdir_path, parts, source, lock, write_config: bool, config_json: str,
           started: list):
    main = jax.process_index() == 0
    ckpt = Checkpointer(workdir_path / "checkpoints", keep=config.checkpoint.keep)
    restored = ckpt.restore_latest(abstract_state(parts))
    if restored is None:
        state, extra = init_state(parts, config.seed), {"data": None, "train_seconds": 0.0}
    else:
        state, extra, step = restored
        print(f"resuming from {ckpt.directory / str(step)}", file=sys.stderr)
    parts = parts.with_constants(state.constants)  # for sampling (the step takes the state's)
    data = TrainIterator(
        source, config.data.batch_size, seed=config.seed, flip=config.data.flip,
        pad_to=config.data.pad_to, with_labels=bool(parts.num_classes), mesh=parts.mesh,
        with_images=latent.wants_images(config), state=extra["data"],
    )
    train_step = make_train_step(parts)
    evaluator = _Evaluator(parts, workdir_path)
    evaluator.prepare()
    # The start-up can no longer fail: from here on the run writes (config first).
    if write_config:
        with open_atomic(workdir_path / "config.json") as f:
            f.write(config_json.encode())
    started.append(True)
    # Records past the checkpoint (logged before a crash) are dropped: no step twice.
    writer = MetricWriter(workdir_path, enabled=main, after=int(state.step))
    if main and restored is None:
        n = count_params(state.params)
        writer.write(0, {"params": n})
        print(f"{config.model.name}: {n:,} parameters", file=sys.stderr)

    step = int(state.step)
    train_seconds = float(extra["train_seconds"])
    pending_minutes = [m for m in config.eval.at_minutes if m * 60 > train_seconds]
    progress = _Progress(config, step, train_seconds, enabled=main)
    # Processes agree on signals and time limits at log steps only (a collective per step
    # would stall every step on the slowest host); one process decides every step.
    agree_every = 1 if jax.process_count() == 1 else config.train.log_every
    totals, window, window_start = None, 0, time.perf_counter()

    def read_window() -> dict[str, float]:
        """Wait for the steps so far; their mean metrics (raise if one was not finite)."""
        nonlocal totals, window, window_start
        means = {k: float(v) / window for k, v in jax.device_get(totals).items()}
        means["steps_per_s"] = window / (time.perf_counter() - window_start)
        bad = window - round(means["finite"] * window)
        if bad:
            kept = ckpt.steps()
            where = f"step {kept[-1]} in {ckpt.directory}" if kept else "none"
            writer.write(step, means)
            shutdown()
            found = ", ".join(f"{k}={means[k]:.4g}" for k in ("loss", "grad_norm"))
            raise TrainingDiverged(
                f"{bad} of steps {step - window + 1}..{step} had a non-finite loss or gradient "
                f"(means {found}): training diverged and stopped; those steps were not applied. "
                f"Last good checkpoint: {where}. Lower optim.lr, set optim.grad_clip, or check "
                "the data."
            )
        totals, window, window_start = None, 0, time.perf_counter()
        return means

    def save():
        ckpt.save(step, state, {"data": data.get_state(), "train_seconds": train_seconds})

    def shutdown():
        progress.close()
        writer.close()
        ckpt.close()
        data.close()

    snapshot_every = _snapshot_every(config)
    preempted = False
    with _Signals() as signals:
        tick = time.perf_counter()
        while step < config.train.num_steps:
            state, metrics = train_step(state, next(data))
            totals = metrics if totals is None else _accumulate(totals, metrics)
            step += 1
            window += 1
            now = time.perf_counter()
            train_seconds += now - tick  # wall time: the device queue is at most a few steps
            tick = now
            progress.update(step, train_seconds)
            preempted, due_minutes, out_of_time = signals.stop, False, False
            if step % agree_every == 0 or step == config.train.num_steps:
                due_minutes = bool(pending_minutes) and train_seconds >= pending_minutes[0] * 60
                out_of_time = bool(config.train.minutes) and (
                    train_seconds >= config.train.minutes * 60)
                preempted, due_minutes, out_of_time = _any_process(
                    [signals.stop, due_minutes, out_of_time])
            checkpoint_now = step % config.checkpoint.every_steps == 0
            snapshot_now = bool(snapshot_every) and step % snapshot_every == 0
            evaluate_now = (config.eval.every_steps and step % config.eval.every_steps == 0)
            stopping = preempted or out_of_time or step == config.train.num_steps
            if (step % config.train.log_every == 0 or checkpoint_now or snapshot_now
                    or evaluate_now or due_minutes or stopping):
                means = read_window()  # waits for the device; raises on divergence
                if step % config.train.log_every == 0 or stopping:
                    progress.show(step, loss=f"{means['loss']:.4f}")
                    writer.write(step, {**{k: v for k, v in means.items() if k != "finite"},
                                        "train_minutes": train_seconds / 60})
            if snapshot_now:
                # Before the checkpoint of the same step: a resume never skips a snapshot.
                _save_snapshots(state.phema, config, snapshot_folder(workdir_path))
            if checkpoint_now:
                save()
            if evaluate_now or due_minutes:
                if due_minutes:  # decided together, so every process drops the same mark
                    pending_minutes.pop(0)
                results = evaluator(state, step)
                results["train_minutes"] = train_seconds / 60
                writer.write(step, results)
                progress.write(f"step {step}: " + json.dumps({k: round(v, 3)
                                                               for k, v in results.items()}))
                window_start = time.perf_counter()
            if preempted or out_of_time:
                why = "signal" if preempted else f"{config.train.minutes} minutes reached"
                progress.write(f"{why}: checkpoint at step {step}")
                break
            lock.refresh()
            tick = time.perf_counter()  # evaluation and checkpoint time is not training time
    if totals is not None:
        read_window()
    save()
    shutdown()
    if preempted:
        raise TrainingInterrupted(signals.received or signal.SIGTERM, step,
                                  str(ckpt.directory / str(step)))
    return state
