"""Data loaders on small files the tests write: values, shapes, and a clear error for each malformed input."""

from __future__ import annotations

import codecs
import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime.cifar import load_cifar10
from edgecl.runtime.data import (
    FASHION_MNIST_ROOT, DataError, Dataset, load_dataset, load_digits, load_fashion_mnist,
    load_idx, load_image_folder, save_npz,
)

# --- writers of the real formats -------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file: magic 0x000008<ndim>, big-endian dimensions, then the uint8 payload."""
    magic = 0x0800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fashion_root(root: Path, n_train: int = 6, n_test: int = 4) -> Path:
    """The Debian package's four gzip files, with tiny content: 28x28 images, labels cycling 0..9."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = (np.arange(n * 28 * 28) % 256).reshape(n, 28, 28)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, compress=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, compress=True)
    return root


def cifar_batch(n: int, first_label: int = 0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake", b"labels": [(first_label + i) % 10 for i in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"f.png"] * n}


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def python2_cpickle(batch: dict) -> bytes:
    """Opcode for opcode what Python 2 cPickle (protocol 2) wrote for the real CIFAR-10 archive:
    byte strings, numpy.core.multiarray._reconstruct and an ndarray state tuple (labels must be < 256)."""
    data, labels = batch[b"data"], batch[b"labels"]
    dtype = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + _py2_str(b"b")
             + b"\x87R" + b"(K\x01" + b"M" + struct.pack("<H", data.shape[0]) + b"M" + struct.pack("<H", data.shape[1])
             + b"\x86" + dtype + b"\x89" + _py2_str(data.tobytes()) + b"tb")
    items = b"".join(b"K" + bytes([v]) for v in labels)
    return b"\x80\x02}(" + _py2_str(b"labels") + b"](" + items + b"e" + _py2_str(b"data") + array + b"u."


PICKLERS = {
    "numpy2": pickle.dumps,  # protocol 5: numpy._core.numeric._frombuffer
    "python3-protocol2": lambda obj: pickle.dumps(obj, protocol=2).replace(b"numpy._core", b"numpy.core"),
    "python2-cpickle": python2_cpickle,
}


def write_cifar_batches(folder: Path, n: int = 3, style: str = "numpy2") -> dict[str, dict]:
    """data_batch_1..5 (n images each) and test_batch (n + 1) in `folder`; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(n, i, seed=i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n + 1, 7, seed=9)
    for name, batch in batches.items():
        (folder / name).write_bytes(PICKLERS[style](batch))
    return batches


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


# --- Dataset ---------------------------------------------------------------------------------------


def test_dataset_rejects_labels_outside_the_classes_and_float_labels():
    x = np.zeros((2, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"labels span \[0, 3\]; accepted: \[0, 2\]"):
        Dataset("d", x, np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="accepted: \\(2,\\) integers"):
        Dataset("d", x, np.array([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="num_classes=0"):
        Dataset("d", x[:0], np.zeros(0, np.int64), 0)


def test_digits_are_unit_float_images():
    d = load_digits()
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == np.float32 and d.y.dtype == np.int64
    assert d.x.min() == 0 and d.x.max() == 1 and d.num_classes == 10


# --- IDX / Fashion-MNIST ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_reads_plain_and_gzip(tmp_path, compress):
    images = np.array([[[0, 255], [1, 2]], [[3, 4], [5, 6]], [[7, 8], [9, 10]]], np.uint8)
    write_idx(tmp_path / "imgs.idx", images, compress)
    write_idx(tmp_path / "labels.idx", np.array([0, 2, 1]), compress)
    d = load_idx(tmp_path / "imgs.idx", tmp_path / "labels.idx")
    assert d.x.shape == (3, 1, 2, 2) and d.x.dtype == np.float32
    np.testing.assert_array_equal(d.x[:, 0], images / np.float32(255))
    assert d.y.tolist() == [0, 2, 1] and d.y.dtype == np.int64
    assert d.num_classes == 3 and d.name == "imgs"


def _good_idx(tmp_path):
    return (write_idx(tmp_path / "i", np.zeros((2, 3, 3))), write_idx(tmp_path / "l", np.array([0, 1])))


@pytest.mark.parametrize("corrupt, match", [
    (lambda i, l: i.write_bytes(idx_bytes(np.zeros((2, 3, 3)), magic=0x801)),
     "starts with 0x00000801; accepted: magic number 0x00000803"),
    (lambda i, l: l.write_bytes(idx_bytes(np.zeros(2), magic=0x0D01)), "starts with 0x00000d01"),
    (lambda i, l: i.write_bytes(i.read_bytes()[:-1]), r"header says \(2, 3, 3\) = 18 bytes .* holds 17"),
    (lambda i, l: i.write_bytes(i.read_bytes() + b"\0"), "holds 19 \\(truncated or trailing bytes\\)"),
    (lambda i, l: i.write_bytes(i.read_bytes()[:9]), "truncated: 9 bytes, the header alone takes 16"),
    (lambda i, l: i.write_bytes(b"\x08"), "starts with 1 bytes"),
    (lambda i, l: i.write_bytes(gzip.compress(i.read_bytes())[:-6]), "not a readable gzip stream"),
    (lambda i, l: write_idx(l, np.array([0, 1, 1])), "holds 3 labels but .* holds 2 images"),
])
def test_load_idx_names_what_is_malformed(tmp_path, corrupt, match):
    images, labels = _good_idx(tmp_path)
    load_idx(images, labels)  # the unaltered pair loads
    corrupt(images, labels)
    with pytest.raises(DataError, match=match):
        load_idx(images, labels)


def test_load_idx_missing_file(tmp_path):
    images, _ = _good_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        load_idx(images, tmp_path / "nope")


@pytest.mark.parametrize("split, n", [("train", 6), ("test", 4)])
def test_fashion_mnist_reads_the_debian_file_names(tmp_path, split, n):
    d = load_fashion_mnist(write_fashion_root(tmp_path / "fm"), split)
    assert d.name == f"fashion-mnist-{split}" and d.num_classes == 10
    assert d.x.shape == (n, 1, 28, 28) and d.y.tolist() == list(range(n))
    assert d.x[0, 0, 0, 1] == np.float32(1 / 255)


def test_fashion_mnist_absent_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="split='val'; accepted: 'train', 'test'"):
        load_fashion_mnist(tmp_path, "val")


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_the_installed_fashion_mnist():
    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(train.y).tolist() == [6000] * 10 and np.bincount(test.y).tolist() == [1000] * 10
    assert train.x.min() == 0 and train.x.max() == 1


# --- CIFAR-10 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(PICKLERS))
def test_cifar10_reads_batches_in_order_as_rgb_planes(tmp_path, style):
    written = write_cifar_batches(tmp_path / "cifar-10-batches-py", style=style)
    train = load_cifar10(tmp_path / "cifar-10-batches-py", "train")
    test = load_cifar10(tmp_path, "test")  # the parent of cifar-10-batches-py works too
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    assert train.name == "cifar10-train" and train.num_classes == 10 and train.y.dtype == np.int64
    data = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert train.y.tolist() == sum((written[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    # pixel (row 5, col 7) of the green plane of image 4 is byte 1024 + 5 * 32 + 7 of its row
    assert train.x[4, 1, 5, 7] == np.float32(data[4, 1024 + 5 * 32 + 7]) / np.float32(255)
    np.testing.assert_array_equal(test.x.reshape(4, -1) * 255, written["test_batch"][b"data"].astype(np.float32))


class _Calls:
    """A pickle that, if unpickled naively, calls `function(*args)` (what an attacker's payload does)."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


@pytest.mark.parametrize("function, args, named", [
    (open, ("pwned", "w"), "open"),
    (exec, ("open('pwned', 'w')",), "exec"),
    (Path.touch, (Path("pwned"),), "Path.touch"),  # the module varies by Python version
])
def test_cifar10_refuses_a_pickle_that_calls_anything_else(tmp_path, monkeypatch, function, args, named):
    monkeypatch.chdir(tmp_path)
    batch = cifar_batch(3)
    batch[b"labels"] = _Calls(function, *args)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=rf"references [\w.]+\.{named}, which a CIFAR-10 batch never needs; accepted: "
                                        r"_codecs.encode, builtins.dict, builtins.list, "):
        load_cifar10(tmp_path, "test")
    assert not (tmp_path / "pwned").exists()


def test_cifar10_codecs_encode_only_for_latin1(tmp_path):
    class Rot13:
        def __reduce__(self):
            return (codecs.encode, ("abc", "rot13"))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Rot13()}, protocol=2))
    with pytest.raises(DataError, match="encoding 'rot13'; accepted: 'latin1'"):
        load_cifar10(tmp_path, "test")


@pytest.mark.parametrize("batch, match", [
    ([1, 2], "holds a list; accepted: a dict"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"shape \(2, 3072\) dtype float32; accepted"),
    ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "accepted: \\(N, 3072\\) uint8"),
    ({b"labels": [0, 1]}, "data is NoneType"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "holds 2 images but labels of shape \\(1,\\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels span \[0, 10\]; accepted: 0..9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "labels are not integers"),
])
def test_cifar10_malformed_batches(tmp_path, batch, match):
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=match):
        load_cifar10(tmp_path, "test")


def test_cifar10_truncated_or_missing_batch(tmp_path):
    write_cifar_batches(tmp_path)
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:100])
    with pytest.raises(DataError, match="test_batch' is not a readable pickle"):
        load_cifar10(tmp_path, "test")
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3' does not exist"):
        load_cifar10(tmp_path, "train")


# --- image folders ---------------------------------------------------------------------------------


def test_image_folder_sorts_classes_and_keeps_pixels(tmp_path):
    red = np.zeros((2, 3, 3), np.uint8)
    red[..., 0] = 255
    ramp = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    write_png(tmp_path / "cat" / "b.png", red)
    write_png(tmp_path / "cat" / "a.png", ramp)
    write_png(tmp_path / "ant" / "x.PNG", ramp)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    d = load_image_folder(tmp_path)
    assert d.num_classes == 2 and d.y.tolist() == [0, 1, 1] and d.name == tmp_path.name
    assert d.x.shape == (3, 3, 2, 3) and d.x.dtype == np.float32
    np.testing.assert_array_equal(d.x[1], ramp.transpose(2, 0, 1) / np.float32(255))  # cat/a.png before b.png
    assert d.x[2, 0].min() == 1 and d.x[2, 1:].max() == 0

    grey = load_image_folder(tmp_path, size=4, grayscale=True)
    assert grey.x.shape == (3, 1, 4, 4) and 0 <= grey.x.min() and grey.x.max() <= 1
    assert load_image_folder(tmp_path, size=(5, 7)).x.shape == (3, 3, 5, 7)


def test_image_folder_reads_jpeg(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(tmp_path / "a" / "p.jpg")
    d = load_image_folder(tmp_path)
    assert d.x.shape == (1, 3, 3, 4) and abs(float(d.x[0, 0].mean()) - 200 / 255) < 0.05


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="has no class folders"):
        load_image_folder(tmp_path)
    write_png(tmp_path / "a" / "1.png", np.zeros((2, 2, 3)))
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="class folder .*b' holds no .png/.jpg/.jpeg images"):
        load_image_folder(tmp_path)
    write_png(tmp_path / "b" / "1.png", np.zeros((3, 2, 3)))
    with pytest.raises(DataError, match="is 2x3, the first image is 2x2; pass size="):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=2).x.shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"size=\(2, 0\); accepted: None, an int >= 1"):
        load_image_folder(tmp_path, size=(2, 0))
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes
    assert load_image_folder(tmp_path, size=2).num_classes == 2
    (tmp_path / "b" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="2.png' is not readable"):
        load_image_folder(tmp_path, size=2)


def test_image_folder_without_pillow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"needs Pillow: pip install 'edgecl\[data\]'"):
        load_image_folder(tmp_path)


# --- load_dataset ----------------------------------------------------------------------------------


def test_load_dataset_dispatches_every_form(tmp_path):
    assert load_dataset("digits").name == "digits"
    save_npz(Dataset("toy", np.zeros((2, 1, 2, 2), np.float32), np.array([0, 1]), 2), tmp_path / "t.npz")
    assert load_dataset(f"npz:{tmp_path / 't.npz'}").name == "toy"
    images, labels = _good_idx(tmp_path)
    assert load_dataset(f"idx:{images},{labels}").x.shape == (2, 1, 3, 3)
    write_png(tmp_path / "imgs" / "c" / "1.png", np.zeros((2, 2, 3)))
    assert load_dataset(f"folder:{tmp_path / 'imgs'}").x.shape == (1, 3, 2, 2)
    write_cifar_batches(tmp_path / "cifar")
    assert load_dataset(f"cifar10:{tmp_path / 'cifar'}", split="test").name == "cifar10-test"
    assert load_dataset(f"fashion-mnist:{write_fashion_root(tmp_path / 'fm')}", "test").x.shape == (4, 1, 28, 28)


@pytest.mark.parametrize("spec", ["mnist", "digits:extra", "cifar10", "npz:", "folder", "", "idx"])
def test_load_dataset_unknown_spec_lists_the_accepted_forms(spec):
    with pytest.raises(ValueError, match=r"accepted: digits, fashion-mnist, fashion-mnist:ROOT, cifar10:PATH, "
                                         r"npz:PATH, idx:IMAGES,LABELS, folder:PATH"):
        load_dataset(spec)


def test_load_dataset_split_and_path_errors(tmp_path):
    with pytest.raises(ValueError, match="has no official test split"):
        load_dataset("digits", split="test")
    with pytest.raises(ValueError, match="split='dev'"):
        load_dataset("digits", split="dev")
    with pytest.raises(ValueError, match="needs two paths; accepted: idx:IMAGES,LABELS"):
        load_dataset("idx:only-one")
    with pytest.raises(FileNotFoundError):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")


# --- hostile files -----------------------------------------------------------------------------------


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height 1-bit pixels, with next to no data: a decompression bomb."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_image_folder_refuses_a_decompression_bomb_naming_the_file(tmp_path):
    write_png(tmp_path / "a" / "ok.png", np.zeros((2, 2, 3)))
    bomb_png(tmp_path / "a" / "bomb.png", 20_000, 20_000)  # 4e8 pixels: over twice Pillow's limit, an error
    with pytest.raises(DataError, match=r"bomb.png' is refused as a possible decompression bomb .*accepted: images "
                                        r"of at most \d+ pixels"):
        load_image_folder(tmp_path)


def test_image_folder_refuses_an_image_over_the_pixel_limit_that_pillow_only_warns_about(tmp_path, monkeypatch):
    from PIL import Image

    write_png(tmp_path / "a" / "big.png", np.zeros((11, 11, 3)))  # 121 pixels: over 100, under 2 x 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="big.png' is refused as a possible decompression bomb"):
        load_image_folder(tmp_path)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


X4 = np.zeros((4, 1, 2, 2), np.float32)
Y4 = np.array([0, 1, 0, 1])


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((0, 1, 2, 2), np.float32), "y": np.zeros(0, np.int64)}, r"x is float32 \(0, 1, 2, 2\); accepted: a non-empty"),
    ({"x": np.zeros((4, 4), np.float32), "y": Y4}, r"x is float32 \(4, 4\); accepted: a non-empty \(N, C, H, W\)"),
    ({"x": np.zeros((4, 1, 1, 2, 2), np.float32), "y": Y4}, r"x is float32 \(4, 1, 1, 2, 2\)"),
    ({"x": X4.astype(np.complex64), "y": Y4}, "x is complex64 .*accepted: .*real numbers"),
    ({"x": np.zeros((4, 1, 2, 2), bool), "y": Y4}, "x is bool .*accepted: .*real numbers"),
    ({"x": np.full((4, 1, 2, 2), "a"), "y": Y4}, "x is <U1 .*real numbers"),
    ({"x": np.where(np.arange(16).reshape(4, 1, 2, 2) == 5, np.nan, 0.0), "y": Y4},
     r"x\[1, 0, 0, 1\] is nan as float32; accepted: finite values"),
    ({"x": np.full((4, 1, 2, 2), 1e39), "y": Y4}, r"x\[0, 0, 0, 0\] is inf as float32"),  # float64 beyond float32
    ({"x": X4, "y": Y4.astype(np.float32)}, r"y is float32 \(4,\); accepted: \(4,\) integers >= 0"),
    ({"x": X4, "y": np.array([0, -1, 0, 1])}, r"y is int64 \(4,\) with labels from -1; accepted"),
    ({"x": X4, "y": Y4[:3]}, r"y is int64 \(3,\); accepted: \(4,\) integers"),
    ({"x": X4, "y": Y4, "num_classes": np.int64(1)}, "num_classes is int64 1 for labels up to 1; accepted: one "
                                                      "integer > every label"),
    ({"x": X4, "y": Y4, "num_classes": np.float64(2.0)}, "num_classes is float64 2.0"),
    ({"x": X4, "y": Y4, "num_classes": np.array([2, 2])}, r"num_classes is int64 \[2, 2\]"),
])
def test_load_npz_refuses_malformed_arrays_naming_the_file_and_the_array(tmp_path, arrays, match):
    path = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=rf"data file '.*d.npz': {match}"):
        load_dataset(f"npz:{path}")


def test_load_npz_accepts_integer_pixels_and_three_dimensional_x(tmp_path):
    d = load_dataset(f"npz:{_npz(tmp_path / 'd.npz', x=np.ones((4, 2, 2), np.uint8), y=Y4)}")
    assert d.x.shape == (4, 1, 2, 2) and d.x.dtype == np.float32 and d.num_classes == 2
