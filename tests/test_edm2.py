"""EDM2 network: official parameter counts, parity with NVlabs/edm2 on random weights.

The fixture ``fixtures/edm2_reference.npz`` comes from
``fixtures/make_edm2_reference.py``, which runs the official
``training/networks_edm2.py``; its state dicts are refilled here from the
same seed and read through the torch-file reader as a user's
``torch.save(net.state_dict())`` would be.
"""

import collections
import io
import json
import pickle
import struct
from functools import cache
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch_files

from jaxgen.diffusion.edm2_loss import edm2_loss
from jaxgen.errors import InputError
from jaxgen.models import EDM2, count_params, create_model, force_normalize, load_weights
from jaxgen.models.checkpoints import convert_state_dict, export_weights
from jaxgen.models.edm2 import EDM2_PRESETS, mp_cat, mp_silu, mp_sum, normalize
from jaxgen.train.phema import power_ema_init, power_ema_update
from jaxgen.train.schedules import inverse_sqrt_schedule

REF = np.load(Path(__file__).parent / "fixtures" / "edm2_reference.npz")
META = json.loads(str(REF["meta"]))
SEED = 20261130  # make_edm2_reference.SEED

OFFICIAL_COUNTS = {  # the figures (ImageNet-512 latents, 1000 classes)
    "xs": 124_713_253, "s": 280_212_837, "m": 497_807_781,
    "l": 777_498_085, "xl": 1_119_283_749, "xxl": 1_523_164_773,
}


def _tensors(key: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    meta = META[key]
    return {
        n: np.asarray(rng.standard_normal(tuple(s)).astype(np.float32))
        for n, s in zip(meta["names"], meta["shapes"], strict=True)
    }


def _model(key: str) -> EDM2:
    c = META[key]["config"]
    return EDM2(
        img_resolution=c["img_resolution"], img_channels=c["img_channels"],
        num_classes=c["label_dim"], model_channels=c["model_channels"],
        channel_mult=tuple(c["channel_mult"]), num_blocks=c["num_blocks"],
        attn_resolutions=tuple(c["attn_resolutions"]), channels_per_head=c["channels_per_head"],
        logvar_channels=c["logvar_channels"],
    )


@cache
def _apply(model: EDM2):
    return jax.jit(model.apply, static_argnames="return_logvar")


@pytest.mark.parametrize(
    "name",
    [n if n in ("xs", "img64-xs") else pytest.param(n, marks=pytest.mark.slow)
     for n in EDM2_PRESETS],
)
def test_preset_parameter_counts_are_official(name):
    # ImageNet-64 counts: the official Precond built on torch's meta device by the fixture script.
    official = {**json.loads(str(REF["preset_counts"])), **OFFICIAL_COUNTS}
    assert json.loads(str(REF["preset_counts"]))["xxl"] == OFFICIAL_COUNTS["xxl"]
    model = create_model(f"edm2-{name}")
    x = jax.ShapeDtypeStruct((1, 64, 64, model.img_channels), jnp.float32)
    sigma = jax.ShapeDtypeStruct((1,), jnp.float32)
    label = {"label": jax.ShapeDtypeStruct((1,), jnp.int32)}
    variables = jax.eval_shape(model.init, jax.random.key(0), x, sigma, label)
    assert count_params(variables["params"]) == official[name]


@pytest.mark.parametrize("key", ["cond8", "uncond16"])
def test_matches_official_precond(key, tmp_path):
    path = tmp_path / "precond.pt"
    path.write_bytes(torch_files.zip_file(_tensors(key)))  # as torch.save(net.state_dict())
    model = _model(key)
    variables = load_weights(path, model)
    labels = f"{key}_labels"
    cond = {"label": jnp.asarray(REF[labels])} if labels in REF else None
    x, sigma = jnp.asarray(REF[f"{key}_x"]), jnp.asarray(REF[f"{key}_sigma"])
    denoised, logvar = _apply(model)(variables, x, sigma, cond, return_logvar=True)
    want = REF[f"{key}_denoised"]
    # float32 through ~20 layers: errors of a few ulp per op, relative to each image's scale.
    scale = np.abs(want).max(axis=(1, 2, 3), keepdims=True)
    assert np.abs(np.asarray(denoised) - want).max(axis=(1, 2, 3)).max() / scale.min() < 1e-5
    np.testing.assert_allclose(np.asarray(logvar).reshape(-1), REF[f"{key}_logvar"],
                               rtol=1e-5, atol=1e-5)
    if key == "cond8":  # the default output: the denoised image alone (one more compile)
        alone = _apply(model)(variables, x, sigma, cond)
        np.testing.assert_array_equal(np.asarray(alone), np.asarray(denoised))


def test_force_normalize_matches_official_training_forward():
    tensors = _tensors("cond8")
    params = force_normalize(convert_state_dict(tensors, _model("cond8"))["params"])
    conv = params["unet"]["enc_8x8_block0"]["conv_res0"]["weight"]
    want = REF["forced/unet.enc.8x8_block0.conv_res0.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_allclose(np.asarray(conv), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["unet"]["emb_noise"]["weight"]),
                               REF["forced/unet.emb_noise.weight"].T, rtol=1e-6, atol=1e-6)
    # Gains are not weights: left alone.
    gain = tensors["unet.enc.8x8_block0.emb_gain"]
    assert float(params["unet"]["enc_8x8_block0"]["emb_gain"]) == float(gain)
    # Unit mean-square per output channel (up to eps = 1e-4 in the denominator).
    rms = np.sqrt(np.mean(np.square(np.asarray(conv)), axis=(0, 1, 2)))
    np.testing.assert_allclose(rms, 1.0, atol=1e-3)
    # Boxed parameters (what init returns, with logical axes) are normalised alike.
    raw = tensors["unet.emb_noise.weight"].T
    boxed = force_normalize({"emb_noise": {"weight": nn.LogicallyPartitioned(raw, ("a", "b"))}})
    np.testing.assert_array_equal(np.asarray(nn.unbox(boxed)["emb_noise"]["weight"]),
                                  np.asarray(params["unet"]["emb_noise"]["weight"]))


def test_magnitude_preserving_ops_keep_unit_variance():
    a, b = jax.random.normal(jax.random.key(0), (2, 200_000, 4))
    # Independent unit-variance inputs → unit second moment (Eq. 88, 103); the
    # sampling error of a mean of 8e5 squares of Gaussians is ~ sqrt(2 / 8e5) = 1.6e-3.
    for t in (0.3, 0.5, 0.8):
        assert abs(float(jnp.mean(mp_sum(a, b, t) ** 2)) - 1) < 1e-2
        assert abs(float(jnp.mean(mp_cat(a, b[:, :2], t) ** 2)) - 1) < 1e-2
    # E[silu(x)^2] = 0.596^2 for x ~ N(0, 1) (Eq. 81, to the paper's 3 digits).
    assert abs(float(jnp.mean(mp_silu(a) ** 2)) - 1) < 5e-3
    # normalize: x / (eps + rms(x)), so rms of the output is rms / (1e-4 + rms), in closed form.
    x = np.asarray(a.reshape(-1, 64))
    rms = np.sqrt(np.mean(np.square(x.astype(np.float64)), -1))
    out = np.sqrt(np.mean(np.square(np.asarray(normalize(x, axis=-1), np.float64)), -1))
    np.testing.assert_allclose(out, rms / (1e-4 + rms), rtol=1e-6)


def test_bad_inputs_are_named():
    model = _model("cond8")
    variables = convert_state_dict(_tensors("cond8"), model)
    with pytest.raises(InputError, match="8x8x3"):
        model.apply(variables, jnp.zeros((1, 16, 16, 3)), jnp.ones(1), None)
    with pytest.raises(InputError, match="unknown model 'edm2-huge'"):
        create_model("edm2-huge")
    tensors = _tensors("cond8")
    tensors.pop("unet.out_gain")
    with pytest.raises(InputError, match="unet.out_gain"):
        convert_state_dict(tensors, model, "x.pt")
    with pytest.raises(InputError, match=r"wrong shape: logvar_fourier.freqs .* model has \(4,\)"):
        convert_state_dict(_tensors("cond8"), _model("cond8").clone(logvar_channels=4))


def test_export_weights_gives_back_the_official_state_dict():
    tensors = _tensors("cond8")
    model = _model("cond8")
    exported = export_weights(convert_state_dict(tensors, model), model)
    assert exported.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_edm2_loss_is_one_per_element_for_the_ideal_gaussian_denoiser():
    """Data ``N(0, sd^2)``: ``D = sd^2 / (sd^2 + sigma^2) x`` has error variance ``1 / lambda``.

    So ``lambda (D - y)^2`` is ``chi^2_1`` per element at every sigma, and with
    ``u = 0`` the per-element loss has mean 1; the mean of 64 x 512 of them has
    standard error sqrt(2 / 32768) = 0.008.
    """
    sd = 0.5
    x0 = sd * jax.random.normal(jax.random.key(1), (512, 8, 8, 1))

    def ideal(params, x_t, sigma, cond):
        s = sigma.reshape(-1, 1, 1, 1)
        return sd**2 / (sd**2 + s**2) * x_t, jnp.zeros((x_t.shape[0], 1, 1, 1)) + params

    loss, metrics = edm2_loss(ideal, 0.0, x0, None, jax.random.key(2))
    assert loss.shape == (512,)
    assert abs(float(metrics["loss"]) / 64 - 1) < 0.04
    assert abs(float(metrics["weighted_mse"]) - 1) < 0.04
    # With a constant u the per-element loss is e^-u * 1 + u: minimal (= 1) at u = 0.
    loss_u, _ = edm2_loss(ideal, 0.5, x0, None, jax.random.key(2))
    np.testing.assert_allclose(loss_u, np.exp(-0.5) * np.asarray(loss) + 0.5 * 64, rtol=1e-5)
    grad = jax.grad(lambda u: edm2_loss(ideal, u, x0, None, jax.random.key(2))[0].mean())
    assert abs(float(grad(0.0))) < 0.04 * 64


def test_edm2_loss_draws_lognormal_sigma():
    # y = 0 and D = 0: the loss is only the logvar, which this model sets to ln sigma.
    def log_sigma(params, x_t, sigma, cond):
        return jnp.zeros_like(x_t), jnp.log(sigma).reshape(-1, 1, 1, 1)

    x0 = jnp.zeros((8192, 1, 1, 1))
    ln_sigma, _ = edm2_loss(log_sigma, None, x0, None, jax.random.key(3), p_mean=-0.8, p_std=1.6)
    # Standard errors 1.6 / sqrt(8192) = 0.018 (mean) and 1.6 / sqrt(2 * 8192) = 0.013 (std).
    assert abs(float(jnp.mean(ln_sigma)) + 0.8) < 0.09
    assert abs(float(jnp.std(ln_sigma)) - 1.6) < 0.07


def test_inverse_sqrt_schedule_matches_official_formula():
    ref_lr, ref_batches, batch, rampup_mimg = 0.012, 70_000, 2048, 10

    def official(cur_nimg):  # NVlabs/edm2 training_loop.learning_rate_schedule
        lr = ref_lr / np.sqrt(max(cur_nimg / (ref_batches * batch), 1))
        return lr * min(cur_nimg / (rampup_mimg * 1e6), 1)

    schedule = inverse_sqrt_schedule(ref_lr, ref_batches, rampup_mimg * 1e6 / batch)
    for step in (0, 1, 1000, 4882, 4883, 69_999, 70_000, 280_000, 1_000_000):
        np.testing.assert_allclose(float(schedule(step)), official(step * batch), rtol=1e-6)
    with pytest.raises(InputError, match="must be >= 0"):
        inverse_sqrt_schedule(0.01, -1)


class _Reduce:
    """``func(*args)``, then ``BUILD(state)`` and ``SETITEMS(items)``, as pickle writes objects."""

    def __init__(self, func, args=(), state=None, items=None):
        self.func, self.args, self.state, self.items = func, args, state, items

    def __reduce__(self):
        return (self.func, self.args, self.state, None,
                iter(self.items.items()) if self.items is not None else None)


def _storage_record(array: np.ndarray) -> bytes:
    """What ``torch.storage._load_from_bytes`` receives: a legacy ``torch.save`` of one storage."""
    storage = torch_files._Storage("0", array)
    f = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, f, protocol=2)
    f.write(torch_files.dumps(storage, legacy=True))
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", array.size) + array.tobytes())
    return f.getvalue()


def _network_pickle(tensors: dict[str, np.ndarray], module_src: str) -> bytes:
    """An official-style snapshot: ``EasyDict(ema=<persistent Precond>)``, built without torch."""
    G = torch_files.Global
    tree: dict = {}
    for name, array in tensors.items():
        *path, leaf = name.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        strides = tuple(s // array.itemsize for s in array.strides)
        load = torch_files.Call(G("torch.storage", "_load_from_bytes"), (_storage_record(array),))
        tensor = torch_files.Call(G("torch._utils", "_rebuild_tensor_v2"),
                                  (load, 0, array.shape, strides, False, collections.OrderedDict()))
        node[leaf] = torch_files.Call(G("torch._utils", "_rebuild_parameter"),
                                      (tensor, False, collections.OrderedDict()))

    def module(name: str, node: dict):
        tensors_ = {k: v for k, v in node.items() if not isinstance(v, dict)}
        state = {
            "training": False,
            "_parameters": {k: v for k, v in tensors_.items() if k not in ("freqs", "phases")},
            "_buffers": {k: v for k, v in tensors_.items() if k in ("freqs", "phases")},
            "_modules": {k: module(k, v) for k, v in node.items() if isinstance(v, dict)},
        }
        if name in ("enc", "dec"):
            return _Reduce(G("torch.nn.modules.container", "ModuleDict"), state=state)
        meta = dict(type="class", version=6, module_src=module_src, class_name=name, state=state)
        return torch_files.Call(G("torch_utils.persistence", "_reconstruct_persistent_obj"),
                                (meta,))

    root = _Reduce(G("dnnlib.util", "EasyDict"), items={"ema": module("Precond", tree)})
    f = io.BytesIO()
    pickler = torch_files._Pickler(f, legacy=False)
    pickler.proto = 4  # as pickle.dump writes by default: bytes as BINBYTES, no _codecs global
    pickler.dump(root)
    return f.getvalue()


def test_official_network_pickle_is_read_without_running_its_code(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "edm2-tiny.pkl"
    path.write_bytes(_network_pickle(_tensors("cond8"), f"open({str(marker)!r}, 'w').close()"))
    model = _model("cond8")
    got = load_weights(path, model)
    assert not marker.exists()  # the embedded module source was never compiled or run
    want = convert_state_dict(_tensors("cond8"), model)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    evil = torch_files.dumps(torch_files.Call(torch_files.Global("os", "system"), ("true",)))
    (tmp_path / "evil.pkl").write_bytes(evil)
    with pytest.raises(InputError, match="refusing to load global 'os.system'"):
        load_weights(tmp_path / "evil.pkl", model)


@pytest.mark.slow
def test_one_edm2_training_step_composes():
    """init, force_normalize, EDM2 loss, Adam at the inverse-sqrt rate, force_normalize, EMA."""
    model = EDM2(img_resolution=4, img_channels=3, num_classes=10, model_channels=8,
                 channel_mult=(1,), num_blocks=1, attn_resolutions=(4,), channels_per_head=4,
                 logvar_channels=4, dropout=0.1)
    x0 = 0.5 * jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
    labels = jnp.array([1, 2, 3, 10])
    # Random N(0, 1) values for every variable, gains included (init's XLA compile is slower).
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(1), x0, jnp.ones(4),
                                     {"label": labels}))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)
    params, buffers = force_normalize(variables["params"]), variables["buffers"]
    optimizer = optax.adam(inverse_sqrt_schedule(0.01, 10, rampup_steps=0), b1=0.9, b2=0.99)

    @jax.jit
    def step(params, opt_state, ema, key):
        def loss_fn(p):
            def model_fn(p, x, sigma, cond):
                return model.apply({"params": p, "buffers": buffers}, x, sigma, cond, train=True,
                                   return_logvar=True, rngs={"dropout": key})
            loss, metrics = edm2_loss(model_fn, p, x0, {"label": labels}, key)
            return loss.mean(), metrics

        grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = force_normalize(optax.apply_updates(params, updates))
        return params, opt_state, power_ema_update(ema, params), metrics

    ema = power_ema_init(params)
    new, _, ema, metrics = step(params, optimizer.init(params), ema, jax.random.key(2))
    assert np.isfinite(float(metrics["loss"]))
    w = np.asarray(new["unet"]["enc_4x4_block0"]["conv_res0"]["weight"])
    np.testing.assert_allclose(np.sqrt(np.mean(w**2, axis=(0, 1, 2))), 1.0, atol=1e-3)
    assert not np.allclose(w, params["unet"]["enc_4x4_block0"]["conv_res0"]["weight"])
    # After the first update every power EMA is the parameters (beta(1) = 0), to rounding.
    jax.tree.map(lambda e, p: np.testing.assert_allclose(e, p, rtol=1e-6, atol=1e-7),
                 ema.emas[0], new)
