"""Nothing a user saved is lost, and every I/O or input mistake ends in one line (issue 13).

Outputs never overwrite inputs or each other; a place that cannot be written is refused
before the work and a write that fails after it comes after the result is printed;
written files keep sane modes; ``gs://`` goes through one path layer; statistics that are
not a covariance are refused; command-line mistakes end in one line with exit code 2.
``gs://`` is a fake ``etils.epath`` backend over a local folder (no network).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import posixpath
import re
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from PIL import Image

from jaxgen import cli, fid_stats, files, sample
from jaxgen import evaluate as evaluate_cli
from jaxgen.data import open_source
from jaxgen.errors import InputError
from jaxgen.metrics import GaussianStats
from jaxgen.metrics import weights as metrics_weights
from jaxgen.metrics.fid import frechet_distance

REPO = Path(__file__).resolve().parents[1]
metrics_evaluate = importlib.import_module("jaxgen.metrics.evaluate")  # the package shadows it


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stripped stderr of an entry point run as ``python -m``."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err.strip()


def assert_one_line(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


@pytest.fixture
def no_work(monkeypatch):
    """Any work (opening images, loading weights, evaluating) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started its work before refusing its arguments")

    monkeypatch.setattr(fid_stats, "open_source", refuse)
    monkeypatch.setattr(evaluate_cli, "evaluate", refuse)
    monkeypatch.setattr(metrics_weights, "load_inception", refuse)


@pytest.fixture
def fake_inception(monkeypatch):
    """Weights that only say who they are: enough for an evaluation of two statistics files."""
    module = types.SimpleNamespace(source="fake-weights", with_logits=False)
    monkeypatch.setattr(metrics_weights, "load_inception", lambda *a, **k: (module, None))


@pytest.fixture
def stats_pair(tmp_path):
    """Two statistics files whose FID is 3 (means differ by 1 in each of 3 dimensions)."""
    np.savez(tmp_path / "a.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "b.npz", mu=np.ones(3), sigma=np.eye(3))
    return tmp_path / "a.npz", tmp_path / "b.npz"


def read_only(folder: Path, monkeypatch) -> None:
    """Make ``folder`` unwritable, also for root (whom file modes do not stop): creating a
    file in it fails with EACCES as the kernel would answer."""
    folder.chmod(0o555)
    real_open = os.open
    prefix = os.path.realpath(folder) + os.sep

    def guarded(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.realpath(path).startswith(prefix):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


# --- Outputs never overwrite inputs, and never share a path ---------------------------------


def test_fid_stats_refuses_to_write_over_its_source(tmp_path, no_work, capsys, monkeypatch):
    images = tmp_path / "x.npz"
    np.savez(images, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    before = images.read_bytes()
    (tmp_path / "link.npz").symlink_to(images)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    for out in (images, "./sub/../x.npz", tmp_path / "link.npz"):
        code, _, err = run_cli(fid_stats.main, [images, out], capsys)
        assert_one_line(code, err, "x.npz", "is the input SOURCE")
    assert images.read_bytes() == before
    code, _, err = run_cli(fid_stats.main, [tmp_path, images, "--weights", images], capsys)
    assert_one_line(code, err, "is the input --weights")
    assert images.read_bytes() == before


@pytest.mark.parametrize("side", ["real", "fake"])
def test_evaluate_refuses_json_over_an_input(stats_pair, no_work, capsys, side):
    a, b = stats_pair
    target = a if side == "real" else b
    before = target.read_bytes()
    code, _, err = run_cli(evaluate_cli.main, [a, b, "--json", target], capsys)
    assert_one_line(code, err, "--json", f"is the input {side.upper()}")
    assert target.read_bytes() == before


def test_sample_refuses_outputs_over_each_other_or_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    argv = ["--workdir", run, "--num", "2"]
    code, _, err = run_cli(sample.main, [*argv, "--out", tmp_path / "x.png"], capsys)
    assert_one_line(code, err, "x.png", "--out", ".npz")  # the grid would be x.png too
    code, _, err = run_cli(sample.main, [*argv, "--out", run / "config.json"], capsys)
    assert_one_line(code, err, "config.json")
    code, _, err = run_cli(sample.main, [*argv, "--out", run / "checkpoints" / "s.npz"], capsys)
    assert_one_line(code, err, "checkpoints")
    assert (run / "config.json").read_text() == "{}"
    assert sorted(os.listdir(run)) == ["config.json"]


def test_outputs_and_inputs_compare_as_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "real").symlink_to(tmp_path / "d")
    assert files.same_path("d/x.json", tmp_path / "real" / "x.json")
    assert files.same_path("./d/../d/x.json", "d/x.json")
    assert not files.same_path("d/x.json", "d/y.json")
    assert files.same_path("gs://b/run/./x.npz", "gs://b//run/x.npz")
    assert not files.same_path("gs://b/x.npz", "gs:/b/x.npz")  # the second is a local path
    with pytest.raises(InputError, match="--out o.npz: is also --grid"):
        files.check_outputs({"--out": "o.npz", "--grid": "./o.npz"})


# --- Nothing computed is lost: unwritable places are refused first, results printed first ---


def test_unwritable_outputs_are_refused_before_the_work(tmp_path, no_work, capsys, monkeypatch,
                                                        stats_pair):
    a, b = stats_pair
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    code, _, err = run_cli(fid_stats.main, [a, folder], capsys)
    assert_one_line(code, err, "folder.npz", "is a folder")
    code, _, err = run_cli(evaluate_cli.main, [a, b, "--json", folder], capsys)
    assert_one_line(code, err, "--json", "is a folder")
    code, _, err = run_cli(evaluate_cli.main, [a, b, "--json", a / "x.json"], capsys)
    assert_one_line(code, err, "a.npz", "not a folder")
    code, _, err = run_cli(sample.main, ["--workdir", tmp_path, "--out", folder], capsys)
    assert_one_line(code, err, "--out", "is a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked, monkeypatch)
    for main, argv in [(fid_stats.main, [a, locked / "new" / "s.npz"]),
                       (evaluate_cli.main, [a, b, "--json", locked / "r.json"]),
                       (sample.main, ["--workdir", tmp_path, "--out", locked / "s.npz"])]:
        code, _, err = run_cli(main, argv, capsys)
        assert_one_line(code, err, str(locked), "Permission denied")
    assert os.listdir(locked) == []


def test_a_full_disk_after_the_work_keeps_the_printed_result(stats_pair, fake_inception,
                                                             capsys, monkeypatch):
    a, b = stats_pair
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    out = a.parent / "r.json"
    code, stdout, err = run_cli(evaluate_cli.main, [a, b, "--json", out], capsys)
    assert json.loads(stdout)["fid"] == pytest.approx(3.0, abs=1e-12)
    assert_one_line(code, err, str(out), "No space left on device", "free", "printed above")
    assert sorted(os.listdir(a.parent)) == ["a.npz", "b.npz"]  # no temporary file left


def test_an_os_error_is_one_line_naming_the_path_and_free_space(tmp_path, capsys):
    def main(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "big.npz"))

    code, _, err = run_cli(main, [], capsys)
    assert_one_line(code, err, "big.npz", "No space left on device")
    assert re.search(r"\d+(\.\d+)? [KMGT]?B free", err), err


# --- Files keep sane modes -------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_files_get_the_umask_and_old_ones_keep_their_mode(tmp_path, umask):
    old_umask = os.umask(umask)
    try:
        with files.open_atomic(tmp_path / "new.json") as f:
            f.write(b"{}")
        assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o666 & ~umask
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o644)
        with files.open_atomic(kept) as f:
            f.write(b"new")
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o644 and kept.read_text() == "new"
    finally:
        os.umask(old_umask)


def test_writing_through_a_symlink_keeps_the_link(tmp_path):
    (tmp_path / "target.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    with files.open_atomic(tmp_path / "link.json") as f:
        f.write(b"new")
    assert (tmp_path / "link.json").is_symlink()
    assert (tmp_path / "target.json").read_text() == "new"


# --- gs:// goes through one path layer --------------------------------------------------------


class FakeBucket(epath_backend._OsPathBackend):
    """``gs://B/K`` kept as the local file ``ROOT/B/K``."""

    def __init__(self, root) -> None:
        self.root = os.fspath(root)

    def local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith("gs://"), f"{path} reached the gs:// backend"
        return posixpath.join(self.root, path.removeprefix("gs://"))


def _through_bucket(name):
    def method(self, path, *args, **kwargs):
        return getattr(epath_backend._OsPathBackend, name)(self, self.local(path), *args, **kwargs)

    return method


for _name in ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "stat"):
    setattr(FakeBucket, _name, _through_bucket(_name))
FakeBucket.replace = lambda self, path, dst: os.replace(self.local(path), self.local(dst))


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> FakeBucket:
    """``gs://`` served from ``tmp_path/bucket``; the current folder is an empty one."""
    fake = FakeBucket(tmp_path / "bucket")
    (tmp_path / "bucket" / "b").mkdir(parents=True)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield fake
    assert not os.listdir(cwd), f"written to the current folder: {os.listdir(cwd)}"


@pytest.fixture
def no_bucket_backend(tmp_path, monkeypatch):
    """gs:// as on a machine without gcsfs or TensorFlow; the current folder is an empty one."""
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", epath_backend.fsspec_backend)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises ImportError
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not os.listdir(cwd), f"written to the current folder: {os.listdir(cwd)}"


def test_gs_outputs_without_gcsfs_are_one_line_before_the_work(stats_pair, no_bucket_backend,
                                                               no_work, capsys):
    a, b = stats_pair
    for main, argv in [(evaluate_cli.main, [a, b, "--json", "gs://bkt/r.json"]),
                       (fid_stats.main, [a, "gs://bkt/s.npz"]),
                       (sample.main, ["--workdir", a.parent, "--out", "gs://bkt/s.npz"]),
                       (evaluate_cli.main, ["gs://bkt/a.npz", b])]:
        code, _, err = run_cli(main, argv, capsys)
        assert_one_line(code, err, "gs://bkt/", "pip install 'jaxgen[gcs]'")


def test_gs_statistics_are_inputs_and_gs_json_an_output(stats_pair, bucket, fake_inception,
                                                        capsys):
    a, b = stats_pair
    os.replace(a, bucket.local("gs://b/a.npz"))
    code, stdout, err = run_cli(evaluate_cli.main, ["gs://b/a.npz", b, "--json", "gs://b/r.json"],
                                capsys)
    assert code == 0, err
    assert json.loads(stdout)["fid"] == pytest.approx(3.0, abs=1e-12)
    with open(bucket.local("gs://b/r.json")) as f:
        assert json.load(f) == json.loads(stdout)
    with pytest.raises(InputError, match="gs://b/a.npz: a statistics file"):
        open_source("gs://b/a.npz")
    code, _, err = run_cli(evaluate_cli.main, ["gs://b/a.npz", b, "--json", "gs://b/./a.npz"],
                           capsys)
    assert_one_line(code, err, "is the input REAL")


def test_gs_image_npz_is_a_source(bucket):
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    with open(bucket.local("gs://b/x.npz"), "wb") as f:
        np.savez(f, arr_0=images)
    source = open_source("gs://b/x.npz")
    np.testing.assert_array_equal(source.read(np.arange(2)), images)


# --- Statistics that are not a covariance are refused ----------------------------------------


@pytest.mark.parametrize(("sigma", "words"), [
    ([[1.0, 0.5], [0.0, 1.0]], "not symmetric"),
    ([[1.0, 2.0], [2.0, 1.0]], "not positive semi-definite (smallest eigenvalue -1"),
])
def test_stats_files_that_are_not_a_covariance_are_refused(tmp_path, sigma, words, capsys,
                                                           fake_inception, stats_pair):
    np.savez(tmp_path / "bad.npz", mu=np.zeros(2), sigma=np.asarray(sigma))
    with pytest.raises(InputError, match=re.escape(words)) as e:
        GaussianStats.load(tmp_path / "bad.npz")
    assert "bad.npz" in str(e.value)
    ok = GaussianStats(np.zeros(2), np.eye(2))
    bad = GaussianStats(np.zeros(2), np.asarray(sigma))
    for args in ((ok, bad), (bad, ok)):  # a FID that depended on argument order
        with pytest.raises(InputError, match=re.escape(words)):
            frechet_distance(*args)
    np.savez(tmp_path / "ok.npz", mu=np.zeros(2), sigma=np.eye(2))
    code, _, err = run_cli(evaluate_cli.main, [tmp_path / "ok.npz", tmp_path / "bad.npz"], capsys)
    assert_one_line(code, err, "bad.npz", words)


def test_round_off_of_real_covariances_is_accepted(tmp_path):
    rng = np.random.default_rng(0)
    # N = 5 samples in D = 40: rank 4, 36 eigenvalues that are 0 up to round-off, some
    # negative; a large mean makes np.cov's centring lose digits; stored in float32 too.
    x = rng.normal(size=(5, 40)) * np.geomspace(1e-3, 1e3, 40) + 1e4
    sigma = np.cov(x, rowvar=False)
    assert np.linalg.eigvalsh(sigma).min() < 0
    for dtype in (np.float64, np.float32):
        np.savez(tmp_path / "s.npz", mu=x.mean(0).astype(dtype), sigma=sigma.astype(dtype))
        s = GaussianStats.load(tmp_path / "s.npz")
        assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-6 * np.trace(sigma))
    GaussianStats.from_features(x).check()  # jaxgen's own accumulation passes its checks
    # The allowance is 1e-6 of sqrt(S_ii S_jj) entrywise, 1e-6 of tr(S) for eigenvalues.
    skew = np.zeros((40, 40))
    skew[0, 1] = np.sqrt(sigma[0, 0] * sigma[1, 1])
    GaussianStats(x.mean(0), sigma + 1e-7 * skew).check()
    with pytest.raises(InputError, match=r"sigma\[0,1\] = .* but sigma\[1,0\]"):
        GaussianStats(x.mean(0), sigma + 1e-5 * skew).check()
    # ones: rank 1, trace 40; minus d times the projector on its null space: eigenvalue -d.
    null = np.eye(40) - np.ones((40, 40)) / 40
    GaussianStats(np.zeros(40), np.ones((40, 40)) - 1e-7 * 40 * null).check()
    with pytest.raises(InputError, match="smallest eigenvalue -0.0004"):
        GaussianStats(np.zeros(40), np.ones((40, 40)) - 1e-5 * 40 * null).check()


# --- Bad values of flags end in one line ------------------------------------------------------


@pytest.mark.parametrize("flag", [["--cfg-scale", "nan"], ["--cfg-scale", "inf"],
                                  ["--batch-size", "0"], ["--batch-size", "-4"],
                                  ["--steps", "0"], ["--num", "-1"]])
def test_sample_refuses_bad_numbers(tmp_path, capsys, flag):
    code, _, err = run_cli(sample.main, ["--workdir", tmp_path, "--out", tmp_path / "s.npz",
                                         *flag], capsys)
    assert_one_line(code, err, f"{flag[0]} {flag[1]}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag", [["--batch-size", "0"], ["--batch-size", "-2"],
                                  ["--num-fake", "0"], ["--kid-subsets", "0"],
                                  ["--inf-points", "1"]])
def test_evaluate_refuses_bad_numbers(stats_pair, no_work, capsys, flag):
    code, _, err = run_cli(evaluate_cli.main, [*stats_pair, *flag], capsys)
    assert_one_line(code, err, f"{flag[0]} {flag[1]}")


def test_fid_stats_refuses_a_batch_of_zero(stats_pair, no_work, capsys, tmp_path):
    code, _, err = run_cli(fid_stats.main, [stats_pair[0], tmp_path / "s.npz", "--batch-size",
                                            "0"], capsys)
    assert_one_line(code, err, "--batch-size 0")


# --- Messages name only what the user can pass ------------------------------------------------


def test_folder_messages_name_no_missing_flags(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(InputError, match="resolution=N") as e:
        open_source(str(tmp_path))
    assert "--resolution" not in str(e.value)
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="skip_corrupt=True") as e:
        open_source(str(tmp_path))
    assert "--skip-corrupt" not in str(e.value)


def test_fid_inf_with_too_few_images_names_the_flag_before_the_work(tmp_path, capsys,
                                                                   fake_inception, monkeypatch):
    np.savez(tmp_path / "real.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "fake.npz", arr_0=np.zeros((6, 8, 8, 3), np.uint8))
    monkeypatch.setattr(metrics_evaluate, "featurize", lambda *a, **k: pytest.fail("work"))
    code, _, err = run_cli(evaluate_cli.main, [tmp_path / "real.npz", tmp_path / "fake.npz",
                                               "--metrics", "fid_inf"], capsys)
    assert_one_line(code, err, "--inf-min-n", "6")
    assert not re.search(r"(?<!inf_)min_n", err)  # fid_infinity's argument, not evaluate's


# --- jaxgen.train: config and flag mistakes end in one line, nothing created -----------------

_TRAIN = """
import json, os, sys, traceback
from etils.epath import gpath
sys.modules["gcsfs"] = None  # gs:// as without the gcs extra, whatever is installed here
gpath._is_tf_installed = lambda: False
from jaxgen import cli
from jaxgen.train.__main__ import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    read, write = os.pipe()
    if os.fork() == 0:  # a fresh copy of this process (flags unparsed) runs the entry point
        os.dup2(write, 2)
        sys.argv = ["jaxgen.train", *argv]  # ml_collections reads overrides from sys.argv
        try:
            cli.run(main)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    results[name] = [os.waitstatus_to_exitcode(os.wait()[1]), err]
print(json.dumps(results))
"""


def test_train_cli_mistakes_are_one_line_and_create_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    config = ["--config", "jaxgen/configs/fashion_mnist.py"]
    cases = {
        "unknown key": ([*config, "--config.train.nope=1"], "--config.train.nope", "no field"),
        "unknown section": ([*config, "--config.nope.x=1"], "--config.nope.x", "no field"),
        "wrong type": ([*config, "--config.train.minutes=abc"], "--config.train.minutes=abc"),
        "missing file": (["--config", "jaxgen/configs/nope.py"], "jaxgen/configs/nope.py",
                         "No such file"),
        "unknown flag": ([*config, "--nope"], "--nope"),
        "workdir is a file": ([*config, "--workdir", tmp_path / "file"], "is a file"),
        "no gcsfs": ([*config, "--workdir", "gs://bkt/run"], "pip install 'jaxgen[gcs]'"),
    }
    argvs = {}
    for name, (argv, *_) in cases.items():
        if "--workdir" not in argv:
            argv = [*argv, "--workdir", tmp_path / name]
        argvs[name] = [str(a) for a in argv]
    # One process imports jaxgen.train once (~8 s on a busy CPU); each case runs in a fork.
    proc = subprocess.run([sys.executable, "-c", _TRAIN, json.dumps(argvs)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, *words) in cases.items():
        code, err = results[name]
        assert_one_line(code, err.strip(), *words)
    assert sorted(os.listdir(tmp_path)) == ["file"]
