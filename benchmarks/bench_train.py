"""Train-step throughput of jaxgen against PyTorch (diffusers) on the same models.

    python benchmarks/bench_train.py                        # both pairs, batch 16
    python benchmarks/bench_train.py --cpu-devices 2        # one JAX CPU device per core
    python benchmarks/bench_train.py --only dit-s2 --repeats 7 --steps 4
    python benchmarks/bench_train.py --only default         # the README's recipe, jaxgen only

Pairs (same architecture, parameter counts printed and checked equal):

- ``unet-ddpm-cifar10``: jaxgen's DDPM CIFAR-10 U-Net (35.7M) against
  diffusers ``UNet2DModel`` with the ``google/ddpm-cifar10-32`` configuration
  (dropout 0.1 as in DDPM), 32x32x3;
- ``dit-s2``: jaxgen ``DiT-S/2`` against diffusers ``DiTTransformer2DModel``
  configured as DiT-S/2 (12 layers, 6 heads of 64, patch 2, adaLN-Zero, 1000
  classes with label dropout 0.1), 32x32x4 latents. diffusers repeats the
  timestep and class embedders in each block (computing them 12 times, a
  negligible cost); they are counted once.

One full train step on both sides: draw ``t`` and the noise, the
eps-prediction loss of a cosine VP process, forward, backward,
clip the gradients' global norm to 1, AdamW (lr 1e-4, weight decay 0.01),
EMA (decay 0.9999) of the weights. jaxgen's step is built from
``jaxgen.diffusion.loss`` and optax, jitted with the state donated and the
batch split over every JAX device; PyTorch's uses its fastest CPU paths
(fused AdamW, ``torch._foreach_lerp_`` for the EMA, ``clip_grad_norm_(foreach=True)``).
Each side times ``--steps`` consecutive steps after a warm-up (compilation)
step, the two sides alternate ``--repeats`` times, and the medians give images/s
and the ratio jaxgen / PyTorch. The load average is printed with every line,
since the figures are only meaningful on an idle machine.

PyTorch and diffusers are needed for the reference (``pip install torch
diffusers``; jaxgen itself never imports them); without them the script says
so and exits. ``--no-torch`` times jaxgen alone.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen import diffusion
from jaxgen.models import count_params, create_model
from jaxgen.parallel import batch_sharding, make_mesh, replicated

LR, WEIGHT_DECAY, CLIP, EMA_DECAY = 1e-4, 0.01, 1.0, 0.9999

# name -> (jaxgen model name, its overrides, image shape HWC, classes)
PAIRS: dict[str, tuple[str, dict, tuple[int, int, int], int]] = {
    "unet-ddpm-cifar10": ("unet-ddpm-cifar10", {}, (32, 32, 3), 0),
    "dit-s2": ("DiT-S/2", dict(num_classes=1000, learn_sigma=False), (32, 32, 4), 1000),
}


def load() -> str:
    """``load a.aa b.bb c.cc`` (1, 5, 15 minutes) to print beside every figure."""
    return "load " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def time_runs(step: Callable[[], None], sync: Callable[[], None], steps: int) -> float:
    """Seconds per step of ``steps`` consecutive calls of ``step``."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


# ---------------------------------------------------------------- jaxgen


def make_train_step(module: nn.Module, constants: dict | None = None) -> Callable:
    """``train_step(state, x0, cond) -> (state, loss)``, ``state = (params, ema, opt_state, key)``.

    The eps-prediction loss of a cosine VP process (``jaxgen.diffusion.loss``),
    its gradient, global-norm clipping, AdamW and the EMA, as described above.
    ``constants``: the module's variable collections other than ``params`` (EDM2's
    ``buffers``), passed to every call unchanged.
    """
    process = diffusion.VP(schedule="cosine", num_steps=None)
    tx = make_optimizer()

    def train_step(state, x0, cond):
        params, ema, opt_state, key = state
        key, k_loss, k_model = jax.random.split(key, 3)

        def model_fn(p, x_t, t, c):
            # 1000 t: DDPM's and DiT's embeddings expect the step index.
            out = module.apply({"params": p, **(constants or {})}, x_t, 1000 * t, c, train=True,
                               rngs={"dropout": k_model})
            return out[..., : x_t.shape[-1]]  # the prediction, without a learned variance

        loss_fn = functools.partial(diffusion.loss, model_fn, process=process, prediction="eps")
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x0, cond, k_loss)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = optax.incremental_update(params, ema, 1 - EMA_DECAY)
        return (params, ema, opt_state, key), loss

    return train_step


def make_optimizer() -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW."""
    return optax.chain(optax.clip_by_global_norm(CLIP),
                       optax.adamw(LR, weight_decay=WEIGHT_DECAY))


def jax_trainer(module: nn.Module, shape, batch: int, num_classes: int):
    """``(run one step, wait for it, parameter count)`` of jaxgen's train step."""
    mesh = make_mesh()
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (batch, *shape)).astype(np.float32)
    cond = {"label": rng.integers(0, num_classes, batch).astype(np.int32)} if num_classes else None
    x0, cond = jax.device_put((x0, cond), batch_sharding(mesh))
    init_cond = None if cond is None else {"label": cond["label"][:1]}
    variables = jax.jit(module.init)(jax.random.key(0), x0[:1], jnp.zeros((1,)), init_cond)
    params = nn.unbox(variables)["params"]
    ema = jax.tree.map(jnp.copy, params)  # donated: must not share buffers with params
    state = (params, ema, make_optimizer().init(params), jax.random.key(1))
    state = jax.device_put(state, replicated(mesh))
    jitted = jax.jit(make_train_step(module), donate_argnums=0)
    box = {"state": state, "loss": None}

    def step():
        box["state"], box["loss"] = jitted(box["state"], x0, cond)

    return step, lambda: jax.block_until_ready(box["loss"]), count_params(params)


# ---------------------------------------------------------------- PyTorch


def torch_trainer(pair: str, shape, batch: int, num_classes: int):
    """``(run one step, wait for it, parameter count)`` of the diffusers reference."""
    import torch
    from diffusers import DiTTransformer2DModel, UNet2DModel

    torch.manual_seed(0)
    height, width, channels = shape
    if pair == "unet-ddpm-cifar10":
        # google/ddpm-cifar10-32's config.json; dropout 0.1 as in DDPM's CIFAR-10 run.
        model = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
            norm_num_groups=32, dropout=0.1,
        )
        forward = lambda x_t, t, y: model(x_t, t).sample
    else:
        model = DiTTransformer2DModel(
            num_attention_heads=6, attention_head_dim=64, in_channels=channels,
            out_channels=channels, num_layers=12, sample_size=height, patch_size=2,
            num_embeds_ada_norm=num_classes,
        )
        forward = lambda x_t, t, y: model(x_t, t, class_labels=y).sample
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, channels, height, width, generator=gen) * 2 - 1
    y = torch.randint(0, max(num_classes, 1), (batch,), generator=gen)

    def step():
        t = torch.rand(batch)
        eps = torch.randn_like(x0)
        alpha = torch.cos(0.5 * math.pi * t)[:, None, None, None]
        sigma = torch.sin(0.5 * math.pi * t)[:, None, None, None]
        loss = torch.mean((forward(alpha * x0 + sigma * eps, 1000 * t, y) - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - EMA_DECAY)

    # diffusers' DiT keeps a copy of the timestep and class embedders in every block
    # (the same function as DiT's one shared pair): count them once.
    count = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not (
        ".norm1.emb." in n and not n.startswith("transformer_blocks.0.")))
    return step, lambda: None, count


# ---------------------------------------------------------------- the default recipe


def default_recipe_trainer(batch: int | None):
    """jaxgen.train's own step for ``jaxgen/configs/fashion_mnist.py`` (the README's main job)."""
    from jaxgen.configs import fashion_mnist
    from jaxgen.train import init_state, make_run_parts, make_train_step

    config = fashion_mnist.get_config()
    batch = batch or config.data.batch_size
    parts = make_run_parts(config, make_mesh(), (28, 28, 1), 10_000)
    box = {"state": init_state(parts, seed=0), "m": None}
    step_fn = make_train_step(parts)
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)),
            "label": jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)}

    def step():
        box["state"], box["m"] = step_fn(box["state"], data)

    return step, lambda: jax.block_until_ready(box["m"]), batch


# ---------------------------------------------------------------- main


def bench_pair(pair: str, batch: int, steps: int, repeats: int, use_torch: bool,
               dtype: str) -> None:
    """Time jaxgen (and PyTorch) on one pair, alternating, and print the medians."""
    name, overrides, shape, num_classes = PAIRS[pair]
    module = create_model(name, dtype=jnp.dtype(dtype), **overrides)
    sides = {"jaxgen": jax_trainer(module, shape, batch, num_classes)}
    if use_torch:
        sides["torch"] = torch_trainer(pair, shape, batch, num_classes)
        counts = {k: v[2] for k, v in sides.items()}
        if len(set(counts.values())) != 1:
            raise SystemExit(f"{pair}: the two models differ in size: {counts}")
    compile_s = {}
    for side, (step, sync, _) in sides.items():
        start = time.perf_counter()
        step()
        sync()
        compile_s[side] = time.perf_counter() - start
    runs: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, (step, sync, _) in sides.items():
            runs[side].append(time_runs(step, sync, steps))
    rate = {side: batch / statistics.median(r) for side, r in runs.items()}
    for side, r in runs.items():
        print(f"{pair:18s} {side:6s} batch {batch} {shape}: {rate[side]:6.2f} img/s "
              f"(median of {repeats} x {steps} steps; runs {batch / max(r):.2f}-"
              f"{batch / min(r):.2f}), {sides[side][2]:,} params, first step "
              f"{compile_s[side]:.1f} s; {load()}", flush=True)
    if use_torch:
        print(f"{pair:18s} ratio jaxgen / torch: {rate['jaxgen'] / rate['torch']:.2f}", flush=True)


def main() -> None:
    """Parse the flags, then time each pair (and the default recipe if asked)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=(*PAIRS, "default"), action="append",
                   help="run only these (repeatable); default: every pair")
    p.add_argument("--batch-size", type=int,
                   help="images per step (default: 16; the recipe's own for 'default')")
    p.add_argument("--steps", type=int, default=3, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side; medians")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="jaxgen's compute dtype (PyTorch stays float32)")
    p.add_argument("--cpu-devices", type=int,
                   help="JAX CPU devices (e.g. 2: one per core); default: JAX's (1)")
    p.add_argument("--no-torch", action="store_true", help="time jaxgen alone")
    args = p.parse_args()
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    use_torch = not args.no_torch and args.dtype == "float32"
    if use_torch:
        try:
            import diffusers  # noqa: F401
            import torch
        except ImportError as e:
            raise SystemExit(f"the PyTorch reference needs torch and diffusers ({e}); "
                             "`pip install torch diffusers`, or pass --no-torch.") from None
        torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    else:
        torch_info = "no torch"
    print(f"jax {jax.__version__}: {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"{args.dtype}; {torch_info}; {os.cpu_count()} CPUs; {load()}", flush=True)
    for pair in args.only or PAIRS:
        if pair == "default":
            step, sync, batch = default_recipe_trainer(args.batch_size)
            step()
            sync()
            runs = [time_runs(step, sync, args.steps) for _ in range(args.repeats)]
            print(f"default recipe (fashion_mnist.py) batch {batch}: "
                  f"{batch / statistics.median(runs):.1f} img/s, "
                  f"{1 / statistics.median(runs):.2f} steps/s; {load()}", flush=True)
            continue
        bench_pair(pair, args.batch_size or 16, args.steps, args.repeats, use_torch, args.dtype)


if __name__ == "__main__":
    main()
