"""CIFAR-10 flow matching: linear (OT) path, velocity target (Lipman et al. 2023).

"Flow Matching for Generative Modeling" (Lipman, Chen, Ben-Hamu, Nickel &
Le, 2023), Sec. 4.1: the optimal-transport path x_t = (1 - t) x0 + t eps
(sigma_min -> 0) and its velocity as the regression target, t ~ U[0, 1].
Training hyperparameters of TorchCFM's CIFAR-10 recipe (Tong et al. 2024,
``examples/images/cifar10``): the 128-channel U-Net, Adam lr 2e-4 with 5000
warmup steps, batch 128, gradient clipping at 1, EMA 0.9999, 400k steps,
random flips; Euler sampling with 100 steps (or an adaptive solver).

    python -m jaxgen.train --config jaxgen/configs/cifar10_flow.py --workdir runs/cifar10_flow
    python -m jaxgen.sample --workdir runs/cifar10_flow --num 50000 --solver euler \
        --steps 100 --out runs/cifar10_flow/samples.npz
"""

import ml_collections

from jaxgen.configs import _cifar10


def get_config() -> ml_collections.ConfigDict:
    """The shared CIFAR-10 fields with the flow-matching objective."""
    c = _cifar10.get_config()
    c.data.batch_size = 128
    c.model.kwargs = ml_collections.ConfigDict(dict(num_classes=0))
    c.diffusion.process = "flow"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(path="linear"))
    c.diffusion.prediction = "velocity"
    c.diffusion.time_sampler = "uniform"
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.train.num_steps = 400_000
    c.train.ema_decays = (0.9999,)
    c.eval.solver = "euler"
    c.eval.steps = 100
    return c
