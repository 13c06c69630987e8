"""Statistics files name the network and protocol of their features; one feature pass serves
the Inception and the encoder metrics together."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from encoder_fixture import random_tensors

from jaxgen import cli, fid_stats
from jaxgen import evaluate as evaluate_cli
from jaxgen.data import ArraySource
from jaxgen.encoders import clip, dinov2
from jaxgen.encoders.weights import clip_from_tensors, dinov2_from_tensors
from jaxgen.errors import InputError
from jaxgen.metrics import GaussianStats, frechet_distance, save_stats
from jaxgen.metrics.stats import (
    DINOV2_CLS,
    INCEPTION_CLEAN,
    INCEPTION_POOL3,
    INCEPTION_SPATIAL,
    read_npz,
)

REF = np.load(Path(__file__).parent / "fixtures" / "encoder_reference.npz")


def _stats(seed, d=5, network=None):
    return GaussianStats.from_features(np.random.default_rng(seed).normal(size=(20, d)), network)


def _run(main, argv):
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    return e.value.code


def test_protocol_round_trips_and_defaults_to_pool3(tmp_path):
    save_stats(tmp_path / "d.npz", _stats(0, network=DINOV2_CLS), _stats(1, 3, INCEPTION_SPATIAL))
    assert str(read_npz(tmp_path / "d.npz")["network"]) == DINOV2_CLS
    assert GaussianStats.load(tmp_path / "d.npz").network == DINOV2_CLS
    assert GaussianStats.load(tmp_path / "d.npz", spatial=True).network == INCEPTION_SPATIAL
    # pytorch-fid's file and an ADM reference batch carry no key: TF-FID Inception features
    s = _stats(2)
    np.savez(tmp_path / "pf.npz", mu=s.mu, sigma=s.sigma)
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=s.mu,
             sigma=s.sigma, mu_s=s.mu, sigma_s=s.sigma)
    assert GaussianStats.load(tmp_path / "pf.npz").network == INCEPTION_POOL3
    assert GaussianStats.load(tmp_path / "adm.npz").network == INCEPTION_POOL3
    assert GaussianStats.load(tmp_path / "adm.npz", spatial=True).network == INCEPTION_SPATIAL
    # statistics without a protocol write no key (the file is pytorch-fid's layout)
    save_stats(tmp_path / "plain.npz", _stats(3))
    assert "network" not in read_npz(tmp_path / "plain.npz")


def test_different_protocols_are_refused():
    a, b = _stats(0, network=DINOV2_CLS), _stats(1, network=INCEPTION_CLEAN)
    with pytest.raises(InputError, match=f"holds {DINOV2_CLS} .* holds {INCEPTION_CLEAN}"):
        frechet_distance(a, b)
    # the same protocol, or an unknown one, is compared; the value is the plain distance
    same = frechet_distance(a, _stats(1, network=DINOV2_CLS))
    assert same == frechet_distance(_stats(0), _stats(1)) > 0
    assert frechet_distance(a, _stats(1)) == same


def test_cli_names_both_files_and_both_protocols(tmp_path, fid_helper_wheel, capsys):
    save_stats(tmp_path / "dino.npz", _stats(0, network=DINOV2_CLS))
    s = _stats(1)
    np.savez(tmp_path / "pf.npz", mu=s.mu, sigma=s.sigma)  # pytorch-fid: pool3
    code = _run(evaluate_cli.main, [str(tmp_path / "pf.npz"), str(tmp_path / "dino.npz"),
                                    "--weights", str(fid_helper_wheel)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    for word in ("pf.npz", "dino.npz", INCEPTION_POOL3, DINOV2_CLS):
        assert word in err
    # a DINOv2 file against images: refused before any image is read
    images = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "img.npz", arr_0=images)
    code = _run(evaluate_cli.main, [str(tmp_path / "dino.npz"), str(tmp_path / "img.npz"),
                                    "--weights", str(fid_helper_wheel)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and DINOV2_CLS in err and INCEPTION_POOL3 in err and "img.npz" in err


def test_fid_stats_writes_the_protocols(tmp_path, fid_helper_wheel):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "img.npz", arr_0=images)
    assert _run(fid_stats.main, [str(tmp_path / "img.npz"), str(tmp_path / "s.npz"),
                                 "--weights", str(fid_helper_wheel), "--no-progress"]) == 0
    f = read_npz(tmp_path / "s.npz")
    assert (str(f["network"]), str(f["network_s"])) == (INCEPTION_POOL3, INCEPTION_SPATIAL)


class CountingSource(ArraySource):
    """Counts the images read."""

    reads = 0

    def read_with_labels(self, idx):
        CountingSource.reads += len(idx)
        return super().read_with_labels(idx)


@pytest.mark.slow
def test_one_pass_serves_inception_and_encoder_metrics(inception):
    """fid, sfid, kid, pr, fd_dinov2 and cmmd together: each image is read once, and every
    value equals the separate passes' (the same features, in the same batches: exactly)."""
    from jaxgen.metrics.encoder_eval import evaluate_encoders
    from jaxgen.metrics.evaluate import evaluate

    dino = dinov2.DINOv2(64, 2, 4, pos_offset=0.1)
    dino, dp = dinov2_from_tensors(random_tensors(json.loads(str(REF["hub/shapes"])), 6), "h",
                                   dino)
    tower = clip.CLIPVision(64, 2, 4, 32, 224, 32, mlp_hidden=256)
    tower, cp = clip_from_tensors(random_tensors(json.loads(str(REF["clip_b32/shapes"])), 4),
                                  "c", tower)
    rng = np.random.default_rng(3)
    real = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-60, 60, real.shape), 0, 255).astype(np.uint8)
    kw = dict(batch_size=8, kid_subsets=2, kid_subset_size=4, progress=False)
    nets = dict(dinov2=(dino, {"params": dp}, "dinov2:test"), clip=(tower, {"params": cp}))
    CountingSource.reads = 0
    together = evaluate_encoders(CountingSource(real, "real"), CountingSource(fake, "fake"),
                                 ["fid", "sfid", "kid", "pr", "fd_dinov2", "cmmd"],
                                 inception=inception, **nets, **kw)
    assert CountingSource.reads == len(real) + len(fake)
    alone = evaluate(real, fake, ["fid", "sfid", "kid", "pr"], inception=inception, **kw)
    alone.update(evaluate_encoders(real, fake, ["fd_dinov2", "cmmd"], **nets, **kw))
    assert together == alone
    assert together["fid"] > 0 and together["fd_dinov2"] > 0 and together["cmmd"] > 0
    jax.clear_caches()
