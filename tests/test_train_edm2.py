"""EDM2 in the trainer: buffers in the state, forced weight normalisation, the EDM2 loss and
schedule, power-function EMAs with snapshots, resume, load_run, post-hoc reconstruction."""

from __future__ import annotations

import importlib
import json
import shutil
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from train_fixtures import assert_same, leaves, set_fields, tiny_config, tiny_images

from jaxgen import phema as phema_cli
from jaxgen import sampling
from jaxgen.configs import fashion_mnist_edm2, imagenet512_edm2_xs
from jaxgen.errors import InputError
from jaxgen.models import EDM2
from jaxgen.parallel import make_mesh
from jaxgen.train import (
    Checkpointer,
    abstract_state,
    describe,
    init_state,
    load_run,
    loop,
    make_run_parts,
    make_schedule,
    make_train_step,
    sample_images,
    train_and_evaluate,
)
from jaxgen.train.phema import (
    PowerEMAState,
    list_snapshots,
    load_snapshot,
    reconstruct,
    snapshot_folder,
)

# Compilations are reused between the runs of the module (identical configs, identical HLO).
pytestmark = pytest.mark.usefixtures("module_compile_cache")


def tiny_edm2_config(source: str, **overrides) -> ml_collections.ConfigDict:
    """The EDM2 recipe shrunk to a one-level, 8-channel network on 8x8 images, no evaluation."""
    c = fashion_mnist_edm2.get_config()
    c.data.source = source
    c.data.batch_size = 8
    c.model.kwargs = ml_collections.ConfigDict(dict(
        img_resolution=8, img_channels=1, num_classes=4, model_channels=8, channel_mult=(1,),
        num_blocks=1, attn_resolutions=(), channels_per_head=8, logvar_channels=8, dropout=0.1,
    ))
    c.optim.warmup_steps = 1
    c.optim.ref_steps = 2
    c.train.num_steps = 4
    c.train.log_every = 1
    c.train.phema_snapshot_every = 2
    c.checkpoint.every_steps = 2
    c.eval.every_steps = 0
    c.eval.at_minutes = ()
    c.eval.fid_samples = 0
    return set_fields(c, overrides)


def batch() -> dict:
    images, labels = tiny_images(8)
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32)}


def weight_rms(params) -> dict[str, np.ndarray]:
    """Root-mean-square of every MPConv weight per output channel (over its fan-in)."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return {k: np.sqrt(np.mean(np.square(np.asarray(v)), axis=tuple(range(v.ndim - 1))))
            for k, v in flat.items() if k.endswith("weight")}


def assert_unit_norm(params) -> None:
    # force_normalize stores w / (1e-4 + rms(w)) (the official eps): rms 1 - 1e-4 / rms(w),
    # within 1e-3 of 1 for rms(w) > 0.1; without it one step at lr 0.5 moves rms by ~0.1.
    rms = weight_rms(params)
    assert rms
    for name, r in rms.items():
        np.testing.assert_allclose(r, 1.0, atol=1e-3, err_msg=name)


@pytest.fixture(scope="module")
def straight(data_file, tmp_path_factory):
    """An uninterrupted 4-step EDM2 run: its workdir and final state."""
    workdir = tmp_path_factory.mktemp("edm2") / "run"
    state = train_and_evaluate(tiny_edm2_config(data_file), str(workdir))
    return workdir, jax.tree.map(np.array, state)


def test_edm2_run_keeps_buffers_power_emas_and_snapshots(data_file, straight):
    workdir, state = straight
    config = tiny_edm2_config(data_file)
    fresh = init_state(make_run_parts(config, make_mesh(), (8, 8, 1), 4), config.seed)
    # The Fourier buffers: made at init, passed to the model, never optimised or averaged.
    assert set(state.constants) == {"buffers"}
    assert_same(state.constants, fresh.constants)
    assert "buffers" not in state.params and len(state.phema.emas[0]) == len(state.params)
    assert len(jax.tree.leaves(state.opt_state.inner_opt_state[1][0].mu)) == len(
        jax.tree.leaves(state.params))
    assert_unit_norm(state.params)
    assert int(state.phema.count) == 4
    assert not np.allclose(leaves(state.phema.emas[0])[0], leaves(state.phema.emas[1])[0])
    snaps = list_snapshots(snapshot_folder(workdir))
    assert [(s.t, s.sigma_rel) for s in snaps] == [(2, 0.05), (2, 0.1), (4, 0.05), (4, 0.1)]
    for snap, ema in zip(snaps[2:], state.phema.emas, strict=True):
        assert_same(load_snapshot(snap.path), ema)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"weighted_mse", "logvar", "lr"} <= set(logged[-1])  # the EDM2 loss's own metrics
    # lr(t) = 0.01 / sqrt(max(t / 2, 1)) * min(t / 1, 1), logged after the step (t = 4)
    np.testing.assert_allclose(logged[-1]["lr"], 0.01 / np.sqrt(2), rtol=1e-6)


def test_edm2_resume_after_stop_equals_uninterrupted(data_file, straight, tmp_path):
    _, want = straight
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_edm2_config(data_file, **{"train.num_steps": 2}), str(workdir))
    got = train_and_evaluate(tiny_edm2_config(data_file), str(workdir))
    assert_same(got, want)  # params, buffers, optimizer, power EMAs, bit for bit
    snaps = list_snapshots(snapshot_folder(workdir))
    assert [s.t for s in snaps] == [2, 2, 4, 4]
    for snap, ema in zip(snaps[2:], want.phema.emas, strict=True):
        assert_same(load_snapshot(snap.path), ema)


def test_weights_are_renormalised_after_each_real_update(data_file):
    # A huge rate: one Adam step moves every weight by ~0.5, rms ~1.12 if left alone.
    config = tiny_edm2_config(data_file, **{
        "optim.lr": 0.5, "optim.warmup_steps": 0, "optim.ref_steps": 0, "optim.grad_accum": 2})
    parts = make_run_parts(config, make_mesh(), (8, 8, 1), 2)
    state = init_state(parts, seed=0)
    assert_unit_norm(state.params)  # normalised once at initialisation
    start = jax.tree.map(np.array, state)
    step = make_train_step(parts)
    state, _ = step(state, batch())  # accumulating: nothing moves, nothing shrinks
    assert_same(state.params, start.params)
    assert int(state.phema.count) == 0
    state, _ = step(state, batch())  # the update
    moved = max(np.abs(a - b).max() for a, b in
                zip(leaves(state.params), leaves(start.params), strict=True))
    assert moved > 0.3
    assert_unit_norm(state.params)
    assert int(state.phema.count) == 1  # beta(1) = 0: each power EMA is the new weights
    for ema in state.phema.emas:
        jax.tree.map(lambda e, p: np.testing.assert_allclose(e, p, rtol=1e-6, atol=1e-7),
                     ema, state.params)


def test_load_run_samples_the_first_power_ema_with_the_buffers(data_file, straight):
    workdir, state = straight
    run = load_run(workdir)
    assert run.weights == "phema:0.05" and run.step == 4
    assert_same(run.params, state.phema.emas[0])
    assert_same(load_run(workdir, "phema:0.1").params, state.phema.emas[1])
    assert_same(load_run(workdir, "params").params, state.params)
    with pytest.raises(InputError, match=r"ema='0.999': the run keeps EMAs with decays \[\], "
                                         r"power EMAs \['phema:0.05', 'phema:0.1'\]"):
        load_run(workdir, "0.999")
    # The model sees the run's buffers: the same as calling the module with them.
    module = run.parts.module
    assert isinstance(module, EDM2)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    sigma, cond = jnp.array([0.5, 3.0]), {"label": jnp.array([0, 3])}
    want = module.apply({"params": state.phema.emas[0], **state.constants}, x, sigma, cond)
    got = run.parts.model_fn(run.params, x, sigma, cond)  # on the mesh: float32 rounding apart
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    key = jax.random.key_data(jax.random.key(0))
    images = np.concatenate(list(sample_images(
        run.parts, run.params, key, num=4, batch_size=4, solver="euler", steps=2)))
    # The same draw through the module with the buffers bound by hand (labels i % 4).
    by_hand = np.concatenate(list(sampling.generate(
        lambda p, x, t, c: module.apply({"params": p, **state.constants}, x, t, c),
        run.params, run.parts.process, key, (8, 8, 1), num=4, batch_size=4,
        cond=lambda idx: {"label": jnp.asarray(idx % 4, jnp.int32)},
        prediction=run.parts.prediction, solver="euler", steps=2)))
    assert images.dtype == np.uint8 and images.shape == by_hand.shape == (4, 8, 8, 1)
    # float32 rounding on the mesh may move a value across a uint8 rounding boundary
    assert np.abs(images.astype(int) - by_hand).max() <= 1
    assert np.mean(images != by_hand) < 0.05


def test_phema_cli_reconstructs_from_the_runs_snapshots(straight, tmp_path):
    workdir, state = straight
    out = tmp_path / "posthoc"
    assert phema_cli.main(["--workdir", str(workdir), "--sigma-rel", "0.05,0.07",
                           "--out", str(out)]) == 0
    direct = dict(reconstruct(list_snapshots(snapshot_folder(workdir)), [0.05, 0.07]))
    for sigma_rel in (0.05, 0.07):
        path = out / f"phema-0000000004-{sigma_rel:.3f}.npz"
        flat = flax.traverse_util.flatten_dict(load_snapshot(path), sep="/")
        assert flat.keys() == direct[sigma_rel].keys()
        for k, v in direct[sigma_rel].items():
            np.testing.assert_array_equal(flat[k], v)
    # A stored profile comes back as the EMA the run kept (Appendix C.3: exact up to rounding).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 load_snapshot(out / "phema-0000000004-0.050.npz"), state.phema.emas[0])
    # A reconstruction is weights like any other: load_run takes its path and samples it.
    path = out / "phema-0000000004-0.070.npz"
    run = load_run(workdir, str(path))
    assert run.weights == str(path)
    assert_same(run.params, load_snapshot(path))
    images = np.concatenate(list(sample_images(
        run.parts, run.params, jax.random.key_data(jax.random.key(0)), num=2, batch_size=2,
        solver="euler", steps=2)))
    assert images.shape == (2, 8, 8, 1)


def test_a_snapshot_is_never_overwritten_with_other_weights(tmp_path, capfd):
    config = ml_collections.ConfigDict({"train": {"phema_sigma_rels": (0.05,)}})
    folder = tmp_path / "phema"

    def save(count: int, value: float) -> None:
        emas = ({"layer": {"w": jnp.full((2, 3), value)}},)
        loop._save_snapshots(PowerEMAState(jnp.asarray(count), emas), config, folder)

    save(0, 1.0)  # nothing averaged yet: nothing saved
    assert not folder.exists()
    save(3, 1.0)
    path = folder / "phema-0000000003-0.050.npz"
    written = path.stat().st_mtime_ns
    save(3, 1.0)  # the same step again after a resume: left as it is
    assert path.stat().st_mtime_ns == written and "warning" not in capfd.readouterr().err
    save(3, 2.0)  # other weights for the same t: kept, reported
    assert "exists with other weights" in capfd.readouterr().err
    np.testing.assert_array_equal(load_snapshot(path)["layer"]["w"], np.ones((2, 3)))


@flax.struct.dataclass
class _TrainStateBeforeEDM2:
    """The train state's layout before the buffers and power EMAs were added."""

    step: jax.Array
    params: Any
    ema: dict[str, Any]
    opt_state: Any
    rng: jax.Array


NEW_FIELDS = [("diffusion", "loss"), ("optim", "ref_steps"), ("train", "phema_sigma_rels"),
              ("train", "phema_snapshot_every")]


class _Conv(nn.Module):
    """A two-convolution model: compiles in a moment, has only ``params``."""

    @nn.compact
    def __call__(self, x, t, cond=None, train: bool = False):
        h = nn.Conv(4, (3, 3))(x) + t[:, None, None, None]
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


def test_checkpoint_without_the_new_fields_resumes(data_file, tmp_path):
    config = tiny_config(data_file)  # no buffers, no power EMAs
    want = train_and_evaluate(config, str(tmp_path / "straight"), module=_Conv())
    workdir = tmp_path / "old"
    train_and_evaluate(tiny_config(data_file, **{"train.num_steps": 2}), str(workdir),
                       module=_Conv())
    parts, _ = loop.build(config, module=_Conv())
    ckpt = Checkpointer(workdir / "checkpoints")
    state, extra, step = ckpt.restore_latest(abstract_state(parts))
    ckpt.close()
    assert step == 2 and state.constants is None and state.phema is None
    old = _TrainStateBeforeEDM2(state.step, state.params, state.ema, state.opt_state, state.rng)
    shutil.rmtree(workdir / "checkpoints")
    ckpt = Checkpointer(workdir / "checkpoints")
    ckpt.save(2, old, extra)
    ckpt.close()
    # The run's config.json from before the new fields: at their defaults they are no
    # change; set to anything else they are.
    saved = json.loads((workdir / "config.json").read_text())
    for section, field in NEW_FIELDS:
        del saved[section][field]
    (workdir / "config.json").write_text(json.dumps(saved))
    changed = tiny_config(data_file, **{"train.phema_sigma_rels": (0.05,)})
    with pytest.raises(InputError, match=r"train.phema_sigma_rels: '\(absent\)' -> \[0.05\]"):
        train_and_evaluate(changed, str(workdir), module=_Conv())
    got = train_and_evaluate(config, str(workdir), module=_Conv())
    assert_same(got, want)  # resumed at step 2, as if never stopped


@pytest.mark.parametrize("overrides, message", [
    ({"diffusion.precond": "edm"}, "diffusion.loss='edm2' .* got precond='edm'"),
    ({"diffusion.time_sampler": "uniform"}, "got time_sampler='uniform'"),
    ({"diffusion.loss": "l2"}, "diffusion.loss='l2': use one of denoising, edm2"),
    ({"diffusion.time_sampler_kwargs": {"p_mean": 0.0, "x": 1.0}}, r"\['x'\] unknown"),
    ({"model.kwargs.sigma_data": 1.0}, "model.kwargs.sigma_data: set diffusion.sigma_data"),
    ({"train.phema_sigma_rels": (0.0505,)}, "at most 3 decimals"),
    ({"train.phema_sigma_rels": (0.5,)}, r"must lie in \(0, 0.2887\)"),
    ({"train.phema_sigma_rels": ()}, "phema_sigma_rels is empty"),
    ({"optim.grad_accum": 4}, "phema_snapshot_every=2 must be a multiple of optim.grad_accum=4"),
    ({"train.phema_snapshot_every": -1}, "phema_snapshot_every=-1 must be >= 0"),
])
def test_edm2_configuration_mistakes_are_one_line_errors(data_file, overrides, message):
    with pytest.raises(InputError, match=message):
        loop.build(tiny_edm2_config(data_file, **overrides))


def test_edm2_loss_needs_a_model_with_an_uncertainty_output(data_file):
    config = tiny_edm2_config(data_file)
    config.model = tiny_config(data_file).model  # a U-Net: no return_logvar
    with pytest.raises(InputError, match="UNet has no return_logvar output"):
        loop.build(config)


def test_inverse_sqrt_schedule_is_the_official_one():
    cfg = imagenet512_edm2_xs.get_config().optim
    schedule = make_schedule(cfg, total_updates=1)

    def official(cur_nimg, batch_size=2048, ref_lr=0.0120, ref_batches=70e3, rampup_mimg=10):
        # NVlabs/edm2 training/training_loop.py learning_rate_schedule
        lr = ref_lr / np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
        return lr * min(cur_nimg / (rampup_mimg * 1e6), 1)

    for t in (0, 1000, 4883, 70_000, 140_000, 1_048_575):
        # rtol: the ramp-up is 4883 updates here, 4882.8 there
        np.testing.assert_allclose(float(schedule(t)), official(t * 2048), rtol=1e-4, atol=0)


# NVlabs/edm2 train_edm2.py config_presets (duration in Mi images, lr, decay, P_mean, P_std)
# with the official networks' parameter counts (1000 classes).
OFFICIAL_PRESETS = {
    "imagenet512_edm2_xs": (2048, 0.0120, 70_000, -0.4, 1.0, "124,713,253"),
    "imagenet512_edm2_s": (2048, 0.0100, 70_000, -0.4, 1.0, "280,212,837"),
    "imagenet512_edm2_m": (2048, 0.0090, 70_000, -0.4, 1.0, "497,807,781"),
    "imagenet512_edm2_l": (1792, 0.0080, 70_000, -0.4, 1.0, "777,498,085"),
    "imagenet512_edm2_xl": (1280, 0.0070, 70_000, -0.4, 1.0, "1,119,283,749"),
    "imagenet512_edm2_xxl": (896, 0.0065, 70_000, -0.4, 1.0, "1,523,164,773"),
    "imagenet64_edm2_s": (1024, 0.0100, 35_000, -0.8, 1.6, None),
}


@pytest.mark.parametrize("name", OFFICIAL_PRESETS)
def test_edm2_recipes_are_the_official_presets(name):
    mimg, lr, decay, p_mean, p_std, count = OFFICIAL_PRESETS[name]
    config = importlib.import_module(f"jaxgen.configs.{name}").get_config()
    assert config.train.num_steps * config.data.batch_size == mimg * 2**20
    assert config.data.batch_size == 2048 and config.optim.weight_decay == 0
    assert (config.optim.lr, config.optim.ref_steps) == (lr, decay)
    assert dict(config.diffusion.time_sampler_kwargs) == {"p_mean": p_mean, "p_std": p_std}
    assert config.train.phema_sigma_rels == (0.05, 0.1)
    text = describe(config, "/nonexistent")
    channels = 3 if name.startswith("imagenet64") else 4
    assert f"model input (64, 64, {channels})" in text
    if channels == 4:  # training/encoders.py StabilityVAEEncoder: sd-vae-ft-mse on x / 255,
        # raw_mean / raw_std to final_std 0.5 per channel (scale computed in float32 there)
        assert (config.latent.vae, config.latent.unit_range) == ("sd-vae-ft-mse", True)
        np.testing.assert_array_equal(np.float32(config.latent.scale),
                                      np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]))
        assert tuple(config.latent.shift) == (5.81, 3.25, 0.12, -2.15)
        assert config.data.resolution == 512 and config.eval.every_steps > 0  # decoded FID
    if count is not None:
        assert f"{count} parameters" in text


def test_remat_keeps_the_parameters_and_the_gradients(data_file):
    from jaxgen.train.state import make_model

    config = tiny_edm2_config(data_file)
    config.model.kwargs.attn_resolutions = (8,)  # encoder and decoder blocks, attention too
    plain = make_model(config)
    config.model.kwargs.remat = True  # --config.model.kwargs.remat=True
    remat = make_model(config)
    assert remat.remat and not plain.remat
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    sigma, cond = jnp.array([0.05, 0.5, 2.0, 20.0]), {"label": jnp.array([0, 1, 3, 4])}
    shapes = [nn.unbox(jax.eval_shape(m.init, jax.random.key(1), x, sigma, cond))
              for m in (plain, remat)]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])  # same names
    assert jax.tree.map(lambda a: a.shape, shapes[0]) == jax.tree.map(lambda a: a.shape, shapes[1])
    # Random N(0, 1) values for every variable: the zero-initialised gains would stop the
    # gradient of most weights.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                             shapes[0])

    def grads(module):
        def loss(params):  # EDM2's Eq. 21 shape: weighted error and the uncertainty
            d, logvar = module.apply({**variables, "params": params}, x, sigma, cond, train=True,
                                     return_logvar=True, rngs={"dropout": jax.random.key(2)})
            return jnp.mean(jnp.exp(-logvar) * (d - x) ** 2 + logvar)

        return jax.jit(jax.grad(loss))(variables["params"])

    want, got = grads(plain), grads(remat)
    # remat recomputes the same float32 forward pass inside the backward one; XLA compiles
    # the two programs separately and may fuse or order sums differently, so values agree
    # to float32 rounding accumulated over the network, not bit for bit: within 32 ulps
    # (2^-24 each) of a tensor's largest gradient (3e-7 of it measured: 5 ulps).
    want, got = flax.traverse_util.flatten_dict(want), flax.traverse_util.flatten_dict(got)
    assert want.keys() == got.keys()
    for path, g in want.items():
        scale = float(jnp.abs(g).max())
        assert scale > 0, path  # every weight gets a gradient (dropout keys match)
        np.testing.assert_allclose(got[path], g, rtol=1e-5, atol=4e-6 * scale,
                                   err_msg="/".join(path))


def test_recipes_describe_the_paper_network(data_file):
    text = describe(imagenet512_edm2_xs.get_config(), "/nonexistent")
    assert "124,713,253 parameters" in text  # the official edm2-img512-xs
    assert "model input (64, 64, 4)" in text and "loss edm2" in text
    assert "inverse_sqrt after 70000 updates, warmup 4883" in text
    text = describe(fashion_mnist_edm2.get_config(), "/nonexistent")
    assert "767,680 parameters" in text and "power EMA sigma_rel [0.05, 0.1]" in text
