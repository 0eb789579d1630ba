"""Data sets as numpy arrays (N, C, H, W) float32 in [0, 1] and int64 labels.

Loaders for the data that is real on this machine (scikit-learn's digits, Fashion-MNIST from
the Debian package `dataset-fashion-mnist`) and for the formats a user brings: IDX files,
CIFAR-10 python batches (`cifar.py`), `.npz` arrays and a folder of images per class.
`load_dataset("fashion-mnist")` picks one by a short spec string.
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np

from .dataset import DataError, Dataset, _check_split, _existing_file, _to_unit_float

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)


def load_digits() -> Dataset:
    """scikit-learn's 1 797 8x8 handwritten digits (shipped inside its wheel: no download).

    Returns:
        Dataset "digits": x (1797, 1, 8, 8) float32 in [0, 1], 10 classes. No official test split:
        see edgecl.runtime.scenarios.train_test_split.

    Raises:
        ImportError: scikit-learn is not installed (pip install 'edgecl[data]').
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("the digits data set needs scikit-learn: pip install 'edgecl[data]'") from e
    raw = sk_load_digits()
    x = (raw.images.astype(np.float32) / 16.0)[:, None, :, :]
    return Dataset("digits", x, raw.target.astype(np.int64), 10)


def save_npz(data: Dataset, path) -> None:
    """Write a data set as `.npz` with arrays x, y and the class count (what a board receives)."""
    np.savez(path, x=data.x, y=data.y, num_classes=np.int64(data.num_classes), name=np.array(data.name))


def load_npz(path) -> Dataset:
    """Read an `.npz` holding x (N, C, H, W) or (N, H, W) and integer y (N,); num_classes defaults to max(y) + 1.

    Raises:
        FileNotFoundError: no such file. DataError: the file lacks x or y; x is empty, not 3-D or
            4-D, not real numbers or not finite as float32; y is not N integers in [0, num_classes).
    """
    path = _existing_file(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"data file {str(path)!r} is not a readable .npz: {e}") from e
    missing = {"x", "y"} - arrays.keys()
    if missing:
        raise DataError(f"data file {str(path)!r} lacks arrays {sorted(missing)}; accepted: an .npz with x and y")
    x, y = arrays["x"], arrays["y"]
    if x.ndim not in (3, 4) or x.size == 0 or not (np.issubdtype(x.dtype, np.integer)
                                                   or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"data file {str(path)!r}: x is {x.dtype} {x.shape}; accepted: a non-empty (N, C, H, W) or "
                        "(N, H, W) array of real numbers (integers or floats)")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused just below
        x = (x[:, None] if x.ndim == 3 else x).astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        bad = list(np.argwhere(~finite)[0].tolist())
        raise DataError(f"data file {str(path)!r}: x{bad} is {x[tuple(bad)]} as float32; accepted: finite values")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        low = f" with labels from {y.min()}" if y.shape == (len(x),) and np.issubdtype(y.dtype, np.integer) else ""
        raise DataError(f"data file {str(path)!r}: y is {y.dtype} {y.shape}{low}; accepted: ({len(x)},) integers "
                        ">= 0, one label per row of x")
    k = arrays.get("num_classes", np.int64(y.max() + 1))
    if k.ndim != 0 or not np.issubdtype(k.dtype, np.integer) or not y.max() < k:
        raise DataError(f"data file {str(path)!r}: num_classes is {k.dtype} {k.tolist()} for labels up to "
                        f"{y.max()}; accepted: one integer > every label")
    name = str(arrays["name"]) if "name" in arrays else path.stem
    return Dataset(name, x, y.astype(np.int64), int(k))


def read_idx(path, magic: int) -> np.ndarray:
    """Read one IDX file (plain or gzip, told apart by content) as a uint8 array of its header's shape.

    Args:
        path: the file. magic: the expected magic number (0x00000803 images, 0x00000801 labels).

    Returns:
        uint8 array with the big-endian dimensions of the header.

    Raises:
        FileNotFoundError: no such file.
        DataError: a corrupt gzip stream, a wrong magic number, or a payload whose size is not the
            product of the header's dimensions (truncated or trailing bytes).
    """
    path = _existing_file(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"IDX file {str(path)!r} is not a readable gzip stream: {e}") from e
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = f"0x{int.from_bytes(raw[:4], 'big'):08x}" if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DataError(f"IDX file {str(path)!r} starts with {found}; accepted: magic number 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(path)!r} is truncated: {len(raw)} bytes, the header alone takes {header}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"IDX file {str(path)!r}: header says {shape} = {expected} bytes of data, "
                        f"the file holds {len(raw) - header} (truncated or trailing bytes)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_idx(images_path, labels_path, num_classes: int | None = None, name: str | None = None) -> Dataset:
    """Read an IDX image file (N, H, W) and an IDX label file (N,), plain or gzip (the MNIST format).

    Args:
        num_classes: the class count; None: max(label) + 1. name: None: the image file's name.

    Returns:
        Dataset with x (N, 1, H, W) float32 = bytes / 255 and y int64.

    Raises:
        FileNotFoundError: a file is missing. DataError: a malformed file (see read_idx), or label
            and image counts differ.
    """
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(labels) != len(images):
        raise DataError(f"{str(labels_path)!r} holds {len(labels)} labels but {str(images_path)!r} holds "
                        f"{len(images)} images; accepted: one label per image")
    k = num_classes if num_classes is not None else int(labels.max(initial=0)) + 1
    name = name if name is not None else Path(images_path).name.split(".")[0]
    return Dataset(name, _to_unit_float(images[:, None]), labels.astype(np.int64), k)


def load_fashion_mnist(root=FASHION_MNIST_ROOT, split: str = "train") -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60 000 train / 10 000 test 28x28 grey images, 10 classes.

    Args:
        root: folder of the four IDX files (`train-images-idx3-ubyte.gz`, `t10k-...`; `.gz` optional),
            where the Debian package dataset-fashion-mnist installs them by default.
        split: "train" or "test".

    Returns:
        Dataset "fashion-mnist-<split>", x (N, 1, 28, 28) float32 in [0, 1].

    Raises:
        ValueError: an unknown split. FileNotFoundError: the files are absent (with how to install
            them). DataError: a malformed file.
    """
    _check_split(split)
    prefix = "train" if split == "train" else "t10k"
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [Path(root) / f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(f"Fashion-MNIST file {str(candidates[0])!r} does not exist; install the data "
                                    f"with `apt-get install dataset-fashion-mnist` or pass root= a folder holding it")
        paths.append(found[0])
    return load_idx(*paths, num_classes=10, name=f"fashion-mnist-{split}")


def load_image_folder(root, size: int | tuple[int, int] | None = None, grayscale: bool = False) -> Dataset:
    """Images in root/<class_name>/*.png|jpg|jpeg; class i is the i-th class folder sorted by name.

    Args:
        root: the folder of class folders. size: (height, width) or one int for a square; every
            image is resized to it (bilinear); None: images must already share one size.
        grayscale: True: 1 channel (Pillow "L"); False: 3 channels (RGB).

    Returns:
        Dataset named after root, x (N, C, H, W) float32 in [0, 1], files in name order per class.

    Raises:
        ImportError: Pillow is not installed (pip install 'edgecl[data]').
        FileNotFoundError: root is not a folder. ValueError: a size below 1. DataError: no class
            folders (hidden ones are skipped), a class folder without images, an unreadable image, an
            image over Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS), or images of
            different sizes with size=None.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise ImportError("load_image_folder needs Pillow: pip install 'edgecl[data]'") from e
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {str(root)!r} has no class folders; accepted: root/<class_name>/*.png|jpg")
    hw = (size, size) if isinstance(size, int) else size
    if hw is not None and (len(hw) != 2 or min(hw) < 1):
        raise ValueError(f"size={size!r}; accepted: None, an int >= 1 or (height, width) ints >= 1")
    images, labels = [], []
    for label, folder in enumerate(classes):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name[0] != ".")
        if not files:
            raise DataError(f"class folder {str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        for file in files:
            try:
                with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS Pillow only warns; refuse it as well
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(file) as im:
                        im = im.convert("L" if grayscale else "RGB")
                        if hw is not None:
                            im = im.resize((hw[1], hw[0]), Image.BILINEAR)
                        array = np.asarray(im, np.uint8)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise DataError(f"image {str(file)!r} is refused as a possible decompression bomb ({e}); accepted: "
                                f"images of at most {Image.MAX_IMAGE_PIXELS} pixels") from e
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"image {str(file)!r} is not readable: {e}") from e
            if images and array.shape != images[0].shape:
                raise DataError(f"image {str(file)!r} is {array.shape[1]}x{array.shape[0]}, the first image is "
                                f"{images[0].shape[1]}x{images[0].shape[0]}; pass size= to resize them all")
            images.append(array)
            labels.append(label)
    x = np.stack(images)
    x = x[:, None] if grayscale else x.transpose(0, 3, 1, 2)
    return Dataset(root.name, _to_unit_float(x), np.array(labels, np.int64), len(classes))


DATASET_SPECS = ("digits", "fashion-mnist", "fashion-mnist:ROOT", "cifar10:PATH", "npz:PATH",
                 "idx:IMAGES,LABELS", "folder:PATH")


def load_dataset(spec: str, split: str = "train") -> Dataset:
    """Load a data set named by a short spec, e.g. "digits", "cifar10:/data/cifar-10-batches-py".

    Args:
        spec: one of DATASET_SPECS. split: "train" or "test"; "test" only for the sources with an
            official test split (fashion-mnist, cifar10).

    Raises:
        ValueError: an unknown spec (the message lists the accepted forms), a missing path, or
            split="test" for a source without a test split. Plus whatever the loader raises.
    """
    _check_split(split)
    kind, _, arg = spec.partition(":")
    path_optional, path_needed = {"fashion-mnist"}, {"cifar10", "npz", "idx", "folder"}
    if not (kind == "digits" and not arg or kind in path_optional or kind in path_needed and arg):
        raise ValueError(f"data set spec {spec!r} is unknown; accepted: {', '.join(DATASET_SPECS)}")
    if kind == "fashion-mnist":
        return load_fashion_mnist(arg or FASHION_MNIST_ROOT, split)
    if kind == "cifar10":
        from .cifar import load_cifar10

        return load_cifar10(arg, split)
    if split != "train":
        raise ValueError(f"data set {spec!r} has no official test split (split={split!r}); accepted: "
                         f"split='train', then edgecl.runtime.scenarios.train_test_split")
    if kind == "digits":
        return load_digits()
    if kind == "npz":
        return load_npz(arg)
    if kind == "folder":
        return load_image_folder(arg)
    images, comma, labels = arg.partition(",")
    if not comma or not images or not labels:
        raise ValueError(f"data set spec {spec!r} needs two paths; accepted: idx:IMAGES,LABELS")
    return load_idx(images, labels)
