"""Sampler accuracy vs NFE on a Gaussian mixture, and the driver's overhead.

Usage::

    python benchmarks/bench_sampling.py [--out sampling_error_vs_nfe.png] [--repeats 5]

Part 1 solves the probability-flow ODE (EDM process, Karras grid, x0 model =
the exact posterior mean of a 2-D Gaussian mixture) with every solver at a
range of steps and prints, per solver and NFE:

- ``ode``: RMS distance of the samples to the exact ODE solution from the same
  noise (RK4 with 1024 steps in float64); not defined for the SDE solvers;
- ``moments``: ``|mean - mu| + ||cov - Sigma||_F`` over 20,000 samples (the
  sampling error of this estimate is ~0.01, the floor of the column).

It writes a log-log plot of both (Pillow only). Part 2 times ``sample`` for a
small convolutional model on this machine and divides by ``NFE x`` the time of
one jitted model call: the driver's overhead (target <= 1.05); it also
divides by the time of the same NFE calls chained in a bare jitted loop
(what is left is the solver arithmetic and the driver's plumbing).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from jaxgen import diffusion as D
from jaxgen import sampling as S

MIXTURE = D.GaussianMixture(
    np.array([[1.0, 0.0], [-1.0, 0.5], [0.2, -1.0]]),
    np.array([[[0.1, 0.03], [0.03, 0.08]], 0.2 * np.eye(2), [[0.05, 0.0], [0.0, 0.15]]]),
    np.array([0.3, 0.5, 0.2]),
)
TARGET_NFE = (5, 10, 20, 50, 100)
SDE = ("ddpm", "euler_maruyama")


def _steps_for(solver: str, nfe: int) -> int:
    spec = S.SOLVERS[solver]
    return max(1, round((nfe + spec.free_final) / spec.evals_per_step))


def accuracy(n_ode: int = 256, n_moments: int = 20000):
    process = D.EDM()
    model = MIXTURE.denoiser(process)
    with jax.enable_x64(True):
        x_T = 80.0 * jax.random.normal(jax.random.key(1), (n_ode, 2), jnp.float64)
        ref, _ = S.sample(
            MIXTURE.denoiser(process),  # its own instance: traced in float64 only
            None,
            process,
            jax.random.key(0),
            x_T.shape,
            prediction="x0",
            solver="rk4",
            steps=1024,
            x_T=x_T,
        )
    x_T32, ref = jnp.asarray(x_T, jnp.float32), np.asarray(ref)
    rows = {}
    for solver in (name for name, spec in S.SOLVERS.items() if not spec.learned_variance):
        rows[solver] = []  # the mixture's exact denoiser has no learned variance
        for target in TARGET_NFE:
            steps = _steps_for(solver, target)
            kw = dict(prediction="x0", solver=solver, steps=steps)
            x, info = S.sample(model, None, process, jax.random.key(0), (n_ode, 2), x_T=x_T32,
                               **kw)
            ode = np.nan if solver in SDE else float(np.sqrt(np.mean((np.asarray(x) - ref) ** 2)))
            y, _ = S.sample(model, None, process, jax.random.key(2), (n_moments, 2), **kw)
            y = np.asarray(y, np.float64)
            mom = np.abs(y.mean(0) - MIXTURE.mean()).sum() + np.linalg.norm(
                np.cov(y.T) - MIXTURE.cov()
            )
            rows[solver].append((info["nfe"], ode, float(mom)))
    return rows


def print_table(rows, column: int, title: str) -> None:
    print(f"\n{title}\n")
    print("| solver | " + " | ".join(f"NFE~{n}" for n in TARGET_NFE) + " |")
    print("|---|" + "---|" * len(TARGET_NFE))
    for solver, cells in rows.items():
        vals = ["n/a" if np.isnan(c[column]) else f"{c[column]:.2e} ({c[0]})" for c in cells]
        print(f"| {solver} | " + " | ".join(vals) + " |")


COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
]


def plot(rows, path: str) -> None:
    """Two log-log panels (ODE error, moment error vs NFE), drawn with Pillow."""
    w, h, pad = 560, 420, 60
    img = Image.new("RGB", (2 * w + 180, h), "white")
    draw = ImageDraw.Draw(img)
    for panel, (column, title) in enumerate([(1, "ODE error vs NFE"), (2, "moment error vs NFE")]):
        ox = panel * w
        vals = [c[column] for cells in rows.values() for c in cells if np.isfinite(c[column])]
        lo, hi = np.log10(max(min(vals), 1e-8)), np.log10(max(vals))
        fx = lambda n, ox=ox: ox + pad + np.log10(n / 2) / np.log10(150) * (w - 2 * pad)
        fy = lambda v, lo=lo, hi=hi: h - pad - (np.log10(v) - lo) / (hi - lo) * (h - 2 * pad)
        draw.rectangle([ox + pad, pad, ox + w - pad, h - pad], outline="black")
        draw.text((ox + pad, 20), title + " (log-log)", fill="black")
        for n in (2, 5, 10, 20, 50, 100, 200):
            draw.line([fx(n), h - pad, fx(n), h - pad + 5], fill="black")
            draw.text((fx(n) - 8, h - pad + 8), str(n), fill="black")
        for e in range(int(np.floor(lo)), int(np.ceil(hi)) + 1):
            if lo <= e <= hi:
                draw.line([ox + pad, fy(10.0**e), ox + w - pad, fy(10.0**e)], fill=(220, 220, 220))
                draw.text((ox + 10, fy(10.0**e) - 6), f"1e{e}", fill="black")
        for color, cells in zip(COLORS, rows.values(), strict=False):
            pts = [
                (fx(c[0]), fy(c[column])) for c in cells if np.isfinite(c[column]) and c[column] > 0
            ]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    for i, (color, solver) in enumerate(zip(COLORS, rows, strict=False)):
        draw.line([2 * w + 10, 40 + 18 * i, 2 * w + 30, 40 + 18 * i], fill=color, width=3)
        draw.text((2 * w + 36, 33 + 18 * i), solver, fill="black")
    notes = ("on EDM, ddim = euler;", "unipc bh1 ~ bh2 (B(h)", "cancels at order 3)")
    for j, note in enumerate(notes):
        draw.text((2 * w + 10, 60 + 18 * len(rows) + 14 * j), note, fill="black")
    img.save(path)


def conv_model(key, channels: int = 32):
    """A small 3-layer convolutional x0 model, time-conditioned by a bias: (model_fn, params)."""
    k1, k2, k3 = jax.random.split(key, 3)
    init = lambda k, shape: jax.random.normal(k, shape) / np.sqrt(np.prod(shape[:-1]))
    params = (
        init(k1, (3, 3, 3, channels)),
        init(k2, (3, 3, channels, channels)),
        init(k3, (3, 3, channels, 3)),
    )
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

    def model_fn(params, x, t, cond):
        w1, w2, w3 = params
        emb = jnp.log(t)[:, None, None, None] / 4
        h = jax.nn.silu(conv(x, w1) + emb)
        h = jax.nn.silu(conv(h, w2) + emb)
        return conv(h, w3)

    return model_fn, params


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def overhead(repeats: int, shape=(16, 32, 32, 3)):
    """Time ``sample`` against NFE standalone model calls and against a bare loop of them.

    The three timings are interleaved within each repeat, so a change of load
    on a shared machine hits all three alike; medians over repeats.
    """
    process = D.EDM()
    model, params = conv_model(jax.random.key(0), channels=64)
    x = jax.random.normal(jax.random.key(1), shape)
    t = jnp.full((shape[0],), 1.0)
    one_call = jax.jit(lambda p, x, t: model(p, x, t, None))
    results = []
    for solver, steps in (("euler", 20), ("dpmpp_2m", 20), ("heun", 10), ("unipc_bh2", 20)):
        run = lambda solver=solver, steps=steps: S.sample(
            model, params, process, jax.random.key(0), shape, prediction="x0", solver=solver,
            steps=steps,
        )[0]
        nfe = S.sample(
            model, params, process, jax.random.key(0), shape, prediction="x0", solver=solver,
            steps=steps,
        )[1]["nfe"]
        # The floor: the same NFE model calls chained in one jitted loop, nothing else.
        loop = jax.jit(lambda p, x, n=nfe: jax.lax.fori_loop(
            0, n, lambda i, x: model(p, x, t, None), x))
        jax.block_until_ready((run(), loop(params, x), one_call(params, x, t)))
        times = np.array(
            [
                (
                    _timed(run),
                    _timed(lambda loop=loop: loop(params, x)),
                    np.median([_timed(lambda: one_call(params, x, t)) for _ in range(5)]),
                )
                for _ in range(repeats)
            ]
        )
        t_sample, t_loop, t_model = np.median(times, axis=0)
        results.append((solver, nfe, t_sample, t_model, t_loop))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sampling_error_vs_nfe.png")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=("all", "accuracy", "overhead"), default="all")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}")
    if args.part in ("all", "accuracy"):
        rows = accuracy()
        print_table(rows, 1, "ODE error (RMS to exact ODE solution), cell = error (NFE)")
        print_table(rows, 2, "Moment error |mean - mu|_1 + ||cov - Sigma||_F, 20k samples")
        plot(rows, args.out)
        print(f"\nplot written to {args.out}")
    if args.part in ("all", "overhead"):
        print(
            "\n| solver | NFE | sample (ms) | one call (ms) | sample / (NFE x call) "
            "| NFE calls in a bare jitted loop (ms) | sample / loop |"
        )
        print("|---|---|---|---|---|---|---|")
        for solver, nfe, t_s, t_m, t_l in overhead(args.repeats):
            print(
                f"| {solver} | {nfe} | {1e3 * t_s:.1f} | {1e3 * t_m:.2f} "
                f"| {t_s / (nfe * t_m):.3f} | {1e3 * t_l:.1f} | {t_s / t_l:.3f} |"
            )


if __name__ == "__main__":
    main()
