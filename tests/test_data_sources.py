"""Image sources: every spec form, the mode rule, Fashion-MNIST, and every bad input."""

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxgen import data
from jaxgen.data.sources import fashion_mnist, folders
from jaxgen.errors import InputError
from jaxgen.metrics.eval_parts import iterate_eval


def _rgb(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_idx(path: Path, array: np.ndarray) -> None:
    raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Six RGB PNGs in two class folders plus a nested one, in a known sorted order."""
    root = tmp_path / "imgs"
    images = {}
    for i, rel in enumerate(["cat/b.png", "cat/a.png", "dog/x/c.png", "dog/a.png", "cat/c.PNG"]):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        images[rel] = _rgb(i)
        Image.fromarray(images[rel]).save(path, format="PNG")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    return root, images


def test_folder_reads_sorted_recursive_and_exact(folder):
    root, images = folder
    src = data.open_source(str(root))
    order = ["cat/a.png", "cat/b.png", "cat/c.PNG", "dog/a.png", "dog/x/c.png"]
    assert [p.relative_to(root).as_posix() for p in src.files] == order
    assert len(src) == 5 and src.image_shape == (8, 8, 3) and src.labels is None
    got = src.read(np.array([4, 0, 2]))
    assert got.dtype == np.uint8 and got.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(got, np.stack([images[order[i]] for i in (4, 0, 2)]))
    assert src.read([]).shape == (0, 8, 8, 3)


def test_folder_labels_from_top_level_subfolders(folder):
    root, _ = folder
    src = data.open_source(str(root), labels_from_folders=True)
    assert src.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 1])
    _, labels = src.read_with_labels(np.array([3, 1]))
    np.testing.assert_array_equal(labels, [1, 0])


def test_labels_from_folders_refuses_loose_files(folder):
    root, _ = folder
    Image.fromarray(_rgb(9)).save(root / "loose.png")
    with pytest.raises(InputError, match=r"loose\.png"):
        data.open_source(str(root), labels_from_folders=True)


def test_folder_decodes_lazily(folder, monkeypatch):
    root, _ = folder
    decoded = []
    real = folders.decode_image
    monkeypatch.setattr(folders, "decode_image", lambda *a: decoded.append(a[0]) or real(*a))
    src = data.open_source(str(root))
    assert decoded == []
    src.read([1])
    assert len(decoded) == 1


def test_mode_rule(tmp_path):
    rgb = _rgb(0)
    rgba = np.concatenate([rgb, np.full((8, 8, 1), 7, np.uint8)], axis=2)
    gray = rgb[:, :, 0]
    g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.stack([gray, gray], 2), "LA").save(tmp_path / "la.png")
    Image.fromarray(g16).save(tmp_path / "g16.png")  # 16-bit gray PNG
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    src = data.open_source(str(tmp_path))
    names = [p.name for p in src.files]
    assert names == ["cmyk.jpg", "g16.png", "la.png", "p.png", "rgba.png"]
    assert src.image_shape == (8, 8, 3)
    x = src.read(np.arange(5))
    np.testing.assert_array_equal(x[4], rgb)  # alpha dropped, colour kept
    np.testing.assert_array_equal(
        x[3], np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))
    )
    np.testing.assert_array_equal(x[2], np.repeat(gray[:, :, None], 3, 2))  # gray repeated
    want16 = (g16 >> 8).astype(np.uint8)
    np.testing.assert_array_equal(x[1], np.repeat(want16[:, :, None], 3, 2))
    assert np.abs(x[0].astype(int) - rgb).mean() < 8  # through CMYK JPEG


def test_all_gray_folder_keeps_one_channel(tmp_path):
    gray = _rgb(1)[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "a.png")
    Image.fromarray(np.stack([gray, gray], 2), "LA").save(tmp_path / "b.png")
    Image.fromarray(gray).convert("1").save(tmp_path / "c.bmp")
    src = data.open_source(str(tmp_path))
    assert src.image_shape == (8, 8, 1)
    x = src.read([0, 1, 2])
    np.testing.assert_array_equal(x[0, :, :, 0], gray)
    np.testing.assert_array_equal(x[1, :, :, 0], gray)
    assert set(np.unique(x[2])) <= {0, 255}


def test_mixed_sizes_need_a_resize_rule(tmp_path):
    Image.fromarray(_rgb(0, 8, 8)).save(tmp_path / "a.png")
    Image.fromarray(_rgb(1, 6, 10)).save(tmp_path / "b.webp", lossless=True)
    with pytest.raises(InputError, match=r"a\.png is 8x8, b\.webp is 10x6.*resolution"):
        data.open_source(str(tmp_path))
    src = data.open_source(str(tmp_path), resolution=4, resize_method="bicubic")
    assert src.image_shape == (4, 4, 3) and src.read([0, 1]).shape == (2, 4, 4, 3)
    with pytest.raises(InputError, match="resize method"):
        data.open_source(str(tmp_path), resolution=4, resize_method="cubic")


def test_center_crop_resize_rule():
    x = np.zeros((6, 10, 1), np.uint8)
    x[:, 2:8] = 200  # the centered 6x6 square
    out = data.center_crop_resize(x, 3, "box")
    assert out.shape == (3, 3, 1) and (out == 200).all()
    np.testing.assert_array_equal(data.center_crop_resize(x[:, 2:8], 3, "nearest"), out)
    same = _rgb(3)
    assert data.center_crop_resize(same, 8) is same


def test_corrupt_files_in_folder_are_named_or_skipped(folder):
    root, _ = folder
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match=r"broken\.png.*skip_corrupt"):
        data.open_source(str(root))
    with pytest.warns(UserWarning, match=r"broken\.png"):
        src = data.open_source(str(root), skip_corrupt=True)
    assert len(src) == 5


def test_truncated_image_fails_on_read_by_name_or_is_skipped(tmp_path):
    Image.fromarray(_rgb(0, 32, 32)).save(tmp_path / "good.png")
    buf = tmp_path / "cut.png"
    Image.fromarray(_rgb(1, 32, 32)).save(buf)
    buf.write_bytes(buf.read_bytes()[:200])
    src = data.open_source(str(tmp_path))  # headers are fine: detected on read
    with pytest.raises(InputError, match=r"cut\.png: cannot decode"):
        src.read([0, 1])
    with pytest.warns(UserWarning, match=r"cut\.png"):
        src = data.open_source(str(tmp_path), skip_corrupt=True)
    assert [p.name for p in src.files] == ["good.png"]


def test_folder_with_only_bad_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(InputError, match="every image file"):
        data.open_source(str(tmp_path), skip_corrupt=True)


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no image files"):
        data.open_source(str(tmp_path))
    with pytest.raises(InputError, match="no such file or folder"):
        data.open_source(str(tmp_path / "absent"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(InputError, match="unknown file type"):
        data.open_source(str(tmp_path / "x.csv"))


def test_npz_adm_layout_with_labels(tmp_path):
    x = np.stack([_rgb(i) for i in range(4)])
    np.savez(tmp_path / "samples.npz", x, np.array([3, 1, 0, 2]))
    src = data.open_source(str(tmp_path / "samples.npz"))
    assert len(src) == 4 and src.image_shape == (8, 8, 3)
    np.testing.assert_array_equal(src.read([2, 0]), x[[2, 0]])
    np.testing.assert_array_equal(src.labels, [3, 1, 0, 2])
    src = data.open_source(str(tmp_path / "samples.npz"), resolution=4)
    assert src.read([0]).shape == (1, 4, 4, 3)


def test_npy_gray_nhw_is_memory_mapped(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    src = data.open_source(str(tmp_path / "x.npy"))
    assert src.image_shape == (6, 6, 1) and src.labels is None
    assert isinstance(src._images.base, np.memmap)
    np.testing.assert_array_equal(src.read([4, 1])[..., 0], x[[4, 1]])


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((2, 4, 4, 3), np.float32), "dtype float32.*astype"),
        (np.full((2, 4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((2, 4, 4, 3), np.int64), "dtype int64"),
        (np.zeros((4, 4), np.uint8), r"shape \(4, 4\)"),
        (np.zeros((2, 4, 4, 4), np.uint8), "drop alpha"),
        (np.zeros((2, 3, 4, 4), np.uint8), "channels-first"),
        (np.zeros((2, 4, 4, 2), np.uint8), "2 channels"),
        (np.zeros((0, 4, 4, 3), np.uint8), "no images"),
    ],
)
def test_bad_arrays(tmp_path, array, match):
    np.save(tmp_path / "x.npy", array)
    np.savez(tmp_path / "x.npz", array)
    for name in ("x.npy", "x.npz"):
        with pytest.raises(InputError, match=rf"x\.np[yz].*{match}"):
            data.open_source(str(tmp_path / name))


def test_statistics_npz_is_not_an_image_source(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(InputError, match="statistics file"):
        data.open_source(str(tmp_path / "ref.npz"))
    np.savez(tmp_path / "other.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(InputError, match="no arr_0"):
        data.open_source(str(tmp_path / "other.npz"))


def test_corrupt_and_truncated_npz_npy(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "t.npz", x)
    raw = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "g.npz").write_bytes(b"garbage" * 10)
    np.save(tmp_path / "t.npy", x)
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) // 2])
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    for name in ("t.npz", "g.npz", "t.npy", "o.npy"):
        with pytest.raises(InputError, match=rf"{name}: not a readable"):
            data.open_source(str(tmp_path / name))


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_with_sibling_labels(tmp_path, suffix):
    x = np.random.default_rng(0).integers(0, 256, (7, 5, 4), dtype=np.uint8)
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", x)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(7) % 3)
    src = data.open_source(str(tmp_path / f"train-images-idx3-ubyte{suffix}"))
    assert src.image_shape == (5, 4, 1)
    np.testing.assert_array_equal(src.read(np.arange(7))[..., 0], x)
    np.testing.assert_array_equal(src.labels, np.arange(7) % 3)


def test_bad_idx_files(tmp_path):
    x = np.zeros((7, 5, 4), np.uint8)
    _write_idx(tmp_path / "a-images-idx3-ubyte", x)
    path = tmp_path / "a-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(InputError, match=r"a-images-idx3-ubyte: IDX file has .*truncated"):
        data.open_source(str(path))
    (tmp_path / "b-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(100))
    with pytest.raises(InputError, match="bad magic"):
        data.open_source(str(tmp_path / "b-images-idx3-ubyte"))
    _write_idx(tmp_path / "c-images-idx3-ubyte.gz", x)
    raw = (tmp_path / "c-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "c-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"c-images-idx3-ubyte\.gz: corrupt or truncated"):
        data.open_source(str(tmp_path / "c-images-idx3-ubyte.gz"))
    _write_idx(tmp_path / "d-images-idx3-ubyte", x)
    _write_idx(tmp_path / "d-labels-idx1-ubyte", np.zeros(6))
    with pytest.raises(InputError, match="same split"):
        data.open_source(str(tmp_path / "d-images-idx3-ubyte"))


# Pinned once from Debian's dataset-fashion-mnist (the original Zalando files):
# count, pixel sum, sha256 prefixes of the image bytes (NHWC, in file order) and labels.
FASHION_MNIST = {
    "train": (60000, 3431114169, "2e487a6c89124f78", "657fbd221bfc9f41"),
    "test": (10000, 573469082, "c867c93ff9536059", "3d0e6c6ea990b53b"),
}


@pytest.mark.parametrize(
    ("spec", "split"),
    [
        ("fashion_mnist", "train"),
        ("fashion_mnist:test", "test"),
        ("tfds:fashion_mnist:test", "test"),
    ],
)
def test_fashion_mnist_debian_counts_and_checksum(spec, split):
    src = data.open_source(spec)
    assert src.name == f"fashion_mnist:{split} (Debian copy at {data.FASHION_MNIST_DIR})"
    n, pixel_sum, image_sha, label_sha = FASHION_MNIST[split]
    x = src.read(np.arange(len(src)))
    assert x.shape == (n, 28, 28, 1) and int(x.sum(dtype=np.int64)) == pixel_sum
    assert hashlib.sha256(x.tobytes()).hexdigest()[:16] == image_sha
    assert hashlib.sha256(src.labels.astype(np.uint8).tobytes()).hexdigest()[:16] == label_sha
    np.testing.assert_array_equal(np.bincount(src.labels), [n // 10] * 10)
    with pytest.raises(InputError, match="Debian copy has splits"):
        data.open_source("fashion_mnist:validation")


def test_fashion_mnist_falls_back_to_tfds_without_debian_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(InputError, match=r"tfds:fashion_mnist:test: not prepared in .*tfds build"):
        data.open_source("fashion_mnist:test", tfds_data_dir=str(tmp_path), tfds_download=False)


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    """A 5+3 image TFDS dataset prepared offline as array_record in a temporary data dir."""
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    splits = {
        "train": rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8),
        "test": rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
    }
    for x in splits.values():
        x[:, 0, 0, 0] = np.arange(len(x))

    class JaxgenTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {k: self._generate_examples(k) for k in splits}

        def _generate_examples(self, split):
            for i, x in enumerate(splits[split]):
                # PIL images are PNG-encoded without TensorFlow.
                yield i, {"image": Image.fromarray(x), "label": i % 3}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    JaxgenTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir, splits


def _by_first_pixel(images: np.ndarray) -> np.ndarray:
    """TFDS stores examples in hashed-key order; pixel [0, 0, 0] holds the example index."""
    return images[np.argsort(images[:, 0, 0, 0])]


def test_tfds_source_reads_array_record_offline(tiny_tfds):
    data_dir, splits = tiny_tfds
    src = data.open_source("tfds:jaxgen_tiny_images:test", tfds_data_dir=data_dir)
    assert src.name.startswith("tfds:jaxgen_tiny_images:test (TFDS at ")
    assert len(src) == 3 and src.image_shape == (8, 8, 3)
    images, labels = src.read_with_labels(np.array([2, 0, 1]))
    np.testing.assert_array_equal(_by_first_pixel(images), splits["test"])
    np.testing.assert_array_equal(labels, images[:, 0, 0, 0] % 3)
    assert src.has_labels and src._labels is None  # read lazily
    np.testing.assert_array_equal(src.labels[[2, 0, 1]], labels)
    np.testing.assert_array_equal(src.read([1, 2]), images[[2, 0]])
    train = data.open_source("tfds:jaxgen_tiny_images", tfds_data_dir=data_dir, resolution=4)
    assert len(train) == 5 and train.read([0, 4]).shape == (2, 4, 4, 3)
    full = data.open_source("tfds:jaxgen_tiny_images:1.0.0:train", tfds_data_dir=data_dir)
    sliced = data.open_source("tfds:jaxgen_tiny_images:1.0.0:train[1:3]", tfds_data_dir=data_dir)
    np.testing.assert_array_equal(sliced.read([0, 1]), full.read([1, 2]))


def test_tfds_source_feeds_the_training_iterator(tiny_tfds):
    data_dir, splits = tiny_tfds
    src = data.open_source("tfds:jaxgen_tiny_images:train", tfds_data_dir=data_dir)
    it = data.TrainIterator(src, 5, seed=0, with_labels=True, flip=True, pad_to=10)
    batch = next(it)
    assert batch["image"].shape == (5, 10, 10, 3)
    center = batch["image"][:, 1:9, 1:9]
    train = splits["train"]
    ids = [
        next(j for j in range(5) if (x == train[j]).all() or (x[:, ::-1] == train[j]).all())
        for x in center
    ]
    np.testing.assert_array_equal(np.sort(ids), np.arange(5))
    np.testing.assert_array_equal(batch["label"], np.array(ids) % 3)


def test_tfds_bad_names_and_splits(tiny_tfds, tmp_path):
    data_dir, _ = tiny_tfds
    with pytest.raises(InputError, match=r"validation.*pick one of"):
        data.open_source("tfds:jaxgen_tiny_images:validation", tfds_data_dir=data_dir)
    with pytest.raises(InputError, match=r"train\[5:\].*split is empty"):
        data.open_source("tfds:jaxgen_tiny_images:train[5:]", tfds_data_dir=data_dir)
    with pytest.raises(InputError, match=r"tfds:no_such_dataset_xyz:train: no TFDS dataset"):
        data.open_source("tfds:no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
    with pytest.raises(InputError, match="not prepared"):
        data.open_source("tfds:mnist:test", tfds_data_dir=str(tmp_path), tfds_download=False)
    with pytest.raises(InputError, match=r"expected tfds:NAME\[:SPLIT\]"):
        data.open_source("tfds:")


def test_iterate_eval_yields_each_image_once_in_order():
    x = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1)
    src = data.ArraySource(x, "ramp", labels=np.arange(23))
    batches = list(iterate_eval(src, 5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(batches), x)
    parts = [list(iterate_eval(src, 4, process_index=p, process_count=3)) for p in range(3)]
    seen = np.concatenate([b for part in parts for b in part]).ravel()
    np.testing.assert_array_equal(seen, np.arange(23))
    pairs = list(iterate_eval(src, 10, with_labels=True, prefetch=0))
    np.testing.assert_array_equal(pairs[2][1], [20, 21, 22])
    with pytest.raises(InputError, match="process_index"):
        list(iterate_eval(src, 4, process_index=3, process_count=3))


def test_iterate_eval_reraises_read_errors(tmp_path):
    Image.fromarray(_rgb(0, 32, 32)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes()[:100])
    src = data.open_source(str(tmp_path))
    with pytest.raises(InputError, match=r"b\.png: cannot decode"):
        list(iterate_eval(src, 1))


def test_every_process_runs_the_steps_of_the_largest_part():
    from jaxgen.metrics.eval_parts import eval_part, largest_part

    # Process 0's part is the smallest (parts n*i//count): 13 over 2 is 6 + 7, so with
    # 2 images a step process 1 needs 4 steps where process 0's part gives 3.
    assert [len(eval_part(13, i, 2)) for i in range(2)] == [6, 7]
    assert largest_part(13, 2) == 7
    for n in range(0, 40):
        for count in range(1, 6):
            sizes = [len(eval_part(n, i, count)) for i in range(count)]
            assert sum(sizes) == n and largest_part(n, count) == max(sizes) <= -(-n // count)
