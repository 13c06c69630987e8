"""The offline default: a small class-conditional U-Net, flow matching, Fashion-MNIST at 28x28.

Runs on a laptop CPU without downloads (Debian's Fashion-MNIST copy, or
TFDS). Rectified-flow / flow-matching training (Liu et al. 2023; Lipman et
al. 2023) with velocity prediction and logit-normal time sampling (Esser et
al. 2024, Eq. 19) learns fastest per CPU-second among the recipes here; the
U-Net is the DDPM/ADM design (Ho et al. 2020; Dhariwal & Nichol 2021) shrunk
to 0.72M parameters (136 MFLOP per forward pass), native 28x28 (28 -> 14 -> 7, attention at 7x7).

    python -m jaxgen.train --config configs/fashion_mnist.py --workdir runs/fm \
        --config.train.minutes=10

Expected on a 2-core CPU: garments recognisable in the 8x8 grid
(``runs/fm/samples/``) after ~10 minutes of training; FID figures in
BENCHMARKS.md. Every other recipe imports this one and overrides fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The default configuration; every field is documented inline."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "fashion_mnist:train"  # any jaxgen.data.open_source spec
    c.data.batch_size = 32  # global, over all devices and processes
    c.data.resolution = ml_collections.FieldReference(None, field_type=int)  # resize to
    c.data.pad_to = ml_collections.FieldReference(None, field_type=int)  # zero-pad to
    c.data.flip = False  # random horizontal flips

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet-small"  # a jaxgen.models.MODEL_NAMES entry
    c.model.kwargs = ml_collections.ConfigDict(dict(
        ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(2,), head_channels=32,
        num_groups=8, dropout=0.0, num_classes=10, class_dropout=0.1,
    ))

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.process = "flow"  # vp | edm | flow
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(path="linear"))
    c.diffusion.prediction = "velocity"  # eps | x0 | v | velocity | score
    c.diffusion.precond = "none"  # none | edm (Karras et al. 2022 preconditioning; predicts x0)
    c.diffusion.sigma_data = 0.5  # data scale: the EDM process, precond="edm" and weighting="edm"
    c.diffusion.time_scale = 1.0  # the network sees time_scale * t (precond="none")
    c.diffusion.time_sampler = "logit_normal"  # uniform | lognormal | logit_normal | discrete
    c.diffusion.time_sampler_kwargs = ml_collections.ConfigDict()
    c.diffusion.weighting = "uniform"  # uniform | min_snr | edm | p2
    c.diffusion.weighting_kwargs = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "constant"  # constant | cosine
    c.optim.final_lr_fraction = 0.0  # cosine: lr at the end / lr
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0  # global-norm clipping; 0 disables
    c.optim.grad_accum = 1  # micro-batches per optimizer update

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1_000_000
    c.train.minutes = 0.0  # stop after this many minutes of training (0: no limit)
    c.train.ema_decays = (0.999,)  # the first one is sampled from
    c.train.ema_warmup = True  # decay min(d, (1+n)/(10+n)): fast start in short runs
    c.train.compute_dtype = "float32"  # float32 | bfloat16
    c.train.fsdp = 1  # size of the mesh's fsdp axis (parameter sharding)
    c.train.log_every = 50

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 5000  # 0: only at eval.at_minutes
    c.eval.at_minutes = (10.0, 30.0, 60.0)  # minutes of training
    c.eval.solver = "euler"
    c.eval.steps = 20
    c.eval.cfg_scale = 1.0
    c.eval.batch_size = 128
    c.eval.seed = 0
    c.eval.fid_samples = 1000  # 0 disables FID
    c.eval.fid_reference = "fashion_mnist:test"
    c.eval.fid_reference_num = ml_collections.FieldReference(None, field_type=int)  # None: all
    c.eval.fid_batch_size = 100

    c.parallel = ml_collections.ConfigDict()  # multi-host; None: from JAXGEN_* env or cluster
    c.parallel.coordinator = ml_collections.FieldReference(None, field_type=str)
    c.parallel.num_processes = ml_collections.FieldReference(None, field_type=int)
    c.parallel.process_id = ml_collections.FieldReference(None, field_type=int)
    return c
