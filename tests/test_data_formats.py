"""MNIST IDX, CIFAR-10 pickle and MNIST-1D: tiny files in the exact formats, bad files, real files."""

import gzip
import hashlib
import os
import pickle
import shlex
import subprocess
import sys
import warnings

import numpy as np
import pytest

from nrnn_jax.data import DataFileError, DataFileWarning, PaddedSequences, batches, load_dataset
from nrnn_jax.data import cifar10 as cifar_mod
from nrnn_jax.data import mnist as mnist_mod


def _idx_bytes(a: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    return header + a.astype(np.uint8).tobytes()


def _write_mnist(directory, n_train=60000, n_test=10000, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        data = _idx_bytes(a)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


def test_idx_reader_roundtrip_and_errors(tmp_path):
    a = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    (tmp_path / "x.gz").write_bytes(gzip.compress(_idx_bytes(a)))
    np.testing.assert_array_equal(mnist_mod.read_idx(tmp_path / "x.gz"), a)
    (tmp_path / "short").write_bytes(_idx_bytes(a)[:-5])
    with pytest.raises(DataFileError, match=r"short holds \d+ bytes of IDX data; its header \(2, 28, 28\) needs"):
        mnist_mod.read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(DataFileError, match="bad magic number"):
        mnist_mod.read_idx(tmp_path / "bad")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(_idx_bytes(a))[:30])
    with pytest.raises(DataFileError, match="trunc.gz cannot be read"):
        mnist_mod.read_idx(tmp_path / "trunc.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_views_from_written_files(tmp_path, gz):
    arrays = _write_mnist(tmp_path / "mnist", gz=gz)
    # our gzip files are not the published ones: skip the md5 check for them
    rows = load_dataset("mnist_rows", tmp_path, verify=False)
    train_idx, val_idx = mnist_mod.validation_split()
    assert rows.x_train.shape == (58000, 28, 28) and rows.x_val.shape == (2000, 28, 28)
    assert set(train_idx).isdisjoint(val_idx) and len(set(train_idx) | set(val_idx)) == 60000
    np.testing.assert_allclose(rows.x_val[0], arrays["train-images-idx3-ubyte"][val_idx[0]] / 255.0, rtol=1e-6)
    pix = load_dataset("mnist_pixel", tmp_path, verify=False)
    np.testing.assert_array_equal(pix.x_test[:, :, 0], rows.x_test.reshape(-1, 784))
    perm = load_dataset("mnist_permuted", tmp_path, verify=False)
    np.testing.assert_array_equal(perm.x_test[:, :, 0], pix.x_test[:, mnist_mod.permutation(), 0])
    assert 0.0 <= pix.x_train.min() and pix.x_train.max() <= 1.0


def test_mnist_checksum_and_missing_errors(tmp_path):
    _write_mnist(tmp_path, n_train=60000, n_test=10000)
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte.gz has \d+ bytes; expected 9912422"):
        load_dataset("mnist_rows", tmp_path)  # verify=True: the size / md5 of the published file
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataFileError, match="t10k-labels-idx1-ubyte.gz .* is missing"):
        load_dataset("mnist_rows", tmp_path, verify=False)


def test_permutation_is_fixed_across_processes():
    code = "from nrnn_jax.data.mnist import permutation; print(permutation()[:20].tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(mnist_mod.permutation()[:20].tolist())
    p = mnist_mod.permutation()
    assert sorted(p.tolist()) == list(range(784)) and not np.array_equal(p, np.arange(784))


def test_real_mnist(shared_data):
    x_tr, y_tr, x_te, y_te = mnist_mod.load_mnist_arrays(shared_data, verify=True)
    assert np.bincount(y_tr).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(y_te).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert x_tr.mean() == pytest.approx(33.3184, abs=5e-5)
    assert x_te.mean() == pytest.approx(33.7912, abs=5e-5)


def _write_cifar(directory, n_per_batch=20, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    out = {}
    for name in (*cifar_mod.TRAIN_FILES, "test_batch"):
        data = rng.integers(0, 256, (n_per_batch, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        out[name] = (data, labels)
    return out


def test_cifar10_views(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    rows = load_dataset("cifar10_rows", tmp_path)
    assert rows.x_train.shape[1:] == (32, 96) and rows.x_train.shape[0] + rows.x_val.shape[0] == 100
    data, labels = written["test_batch"]
    img = data[3].reshape(3, 32, 32)  # R, G, B planes
    np.testing.assert_allclose(rows.x_test[3, 5, :3], img[:, 5, 0] / 255.0, rtol=1e-6)  # row 5, pixel 0: RGB
    pixel = load_dataset("cifar10_pixel", tmp_path)
    np.testing.assert_allclose(pixel.x_test[3, 5 * 32 + 7], img[:, 5, 7] / 255.0, rtol=1e-6)
    assert rows.y_test.tolist() == labels
    padded = load_dataset("cifar10_noise_padded", tmp_path)
    assert isinstance(padded.x_test, PaddedSequences) and padded.x_test.shape == (20, 1000, 96)
    b = next(batches(padded.x_test, padded.y_test, 8))
    assert b.x.shape == (8, 1000, 96)
    np.testing.assert_allclose(b.x[:, :32], rows.x_test[:8])
    np.testing.assert_array_equal(b.x[0, 32:], b.x[7, 32:])  # the same fixed noise for every image
    again = load_dataset("cifar10_noise_padded", tmp_path)
    np.testing.assert_array_equal(again.x_test.pad, padded.x_test.pad)


def test_cifar10_bad_files(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    _write_cifar(directory)
    (directory / "data_batch_3").write_bytes((directory / "data_batch_3").read_bytes()[:100])
    with pytest.raises(DataFileError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        load_dataset("cifar10_rows", tmp_path)
    (directory / "data_batch_3").unlink()
    with pytest.raises(DataFileError, match="data_batch_3 is missing"):
        load_dataset("cifar10_rows", tmp_path)


def _short(b: bytes) -> bytes:
    """A Python 2 str (SHORT_BINSTRING / BINSTRING): what cPickle wrote for every str of the batches."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + len(b).to_bytes(4, "little") + b


def _int(n: int) -> bytes:
    return b"K" + bytes([n]) if n < 256 else b"M" + n.to_bytes(2, "little") if n < 65536 else \
        b"J" + n.to_bytes(4, "little", signed=True)


def _py2_batch(data: np.ndarray, labels: list[int], batch_label: bytes, filenames: list[bytes]) -> bytes:
    """A batch in the byte format of the official files, written opcode by opcode: Python 2 cPickle, protocol
    2, the array as numpy.core.multiarray._reconstruct(ndarray, (0,), "b") with the state (1, shape,
    dtype("u1") with its state, False, raw bytes)."""
    return b"".join([
        b"\x80\x02}(", _short(b"data"),
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n", _int(0), b"\x85", _short(b"b"), b"\x87R",
        b"(", _int(1), _int(data.shape[0]), _int(data.shape[1]), b"\x86",
        b"cnumpy\ndtype\n", _short(b"u1"), _int(0), _int(1), b"\x87R",
        b"(", _int(3), _short(b"|"), b"NNN", b"J\xff\xff\xff\xffJ\xff\xff\xff\xff", _int(0), b"tb",
        b"\x89", _short(data.tobytes()), b"tb",
        _short(b"labels"), b"](", *[_int(v) for v in labels], b"e",
        _short(b"batch_label"), _short(batch_label),
        _short(b"filenames"), b"](", *[_short(f) for f in filenames], b"e",
        b"u.",
    ])


def _as_before(raw: bytes):
    """The batch as the unrestricted reader gives it: pickle.load(encoding="bytes"), then the same layout."""
    d = pickle.loads(raw, encoding="bytes")
    return (np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
            np.asarray(d[b"labels"], np.int64))


def test_cifar10_genuine_batches_load_as_before(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (6, 3072)).astype(np.uint8)
    labels = rng.integers(0, 10, 6).tolist()
    images = data.reshape(6, 3, 32, 32).transpose(0, 2, 3, 1)  # R, G, B planes -> (N, 32, 32, 3)
    entry = {b"batch_label": b"testing batch 1 of 1", b"filenames": [b"a_%d.png" % i for i in range(6)]}
    files = {"official_format": _py2_batch(data, labels, entry[b"batch_label"], entry[b"filenames"])}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # re-pickled copies, Python 3 / NumPy 2
        files[f"protocol{protocol}"] = pickle.dumps({b"data": data, b"labels": labels, **entry}, protocol=protocol)
    files["fortran_and_label_array"] = pickle.dumps(
        {b"data": np.asfortranarray(data), b"labels": np.array(labels, ">i4"), **entry}, protocol=2)
    assert b"cnumpy.core.multiarray\n_reconstruct" in files["official_format"]
    assert b"_frombuffer" in files[f"protocol{pickle.HIGHEST_PROTOCOL}"]
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        x, y = cifar_mod.read_batch(tmp_path / name, verify=False)
        x_before, y_before = _as_before(raw)
        np.testing.assert_array_equal(x, x_before, err_msg=name)
        np.testing.assert_array_equal(y, y_before, err_msg=name)
        np.testing.assert_array_equal(x, images, err_msg=name)
        assert y.tolist() == labels and x.dtype == np.uint8 and y.dtype == np.int64, name
    # a whole data set in the official format: the same data set as from the Python 3 pickles
    official, repickled = tmp_path / "a" / "cifar-10-batches-py", tmp_path / "b"
    written = _write_cifar(repickled / "cifar-10-batches-py")
    official.mkdir(parents=True)
    for name, (d, lab) in written.items():
        (official / name).write_bytes(_py2_batch(d, lab, name.encode(), [b"x.png"] * len(lab)))
    a, b = load_dataset("cifar10_rows", official.parent, verify=False), load_dataset("cifar10_rows", repickled,
                                                                                        verify=False)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split(split)[0], b.split(split)[0])
        np.testing.assert_array_equal(a.split(split)[1], b.split(split)[1])


_PROBE_MODULE = "nrnn_jax_probe_module"


def _call_entry(module: str, name: str, arg: str | None, opcode: str) -> bytes:
    """Opcodes of one more key and value of the dict being built (b"extra": module.name(arg), which unpickling
    calls); the name by the GLOBAL opcode (protocols 0-3) or by STACK_GLOBAL (protocols 4-5)."""
    if opcode == "GLOBAL":
        ref = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    else:
        ref = b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93"
    args = b")" if arg is None else b"X" + len(arg.encode()).to_bytes(4, "little") + arg.encode() + b"\x85"
    return _short(b"extra") + ref + args + b"R"


@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("payload", ["os.system", "eval", "import"])
def test_cifar10_batches_that_would_run_code_are_refused(tmp_path, monkeypatch, payload, opcode):
    directory = tmp_path / "cifar-10-batches-py"
    written = _write_cifar(directory)
    ran = tmp_path / "ran"
    if payload == "os.system":
        module, name, arg = os.system.__module__, "system", f"touch {shlex.quote(str(ran))}"
    elif payload == "eval":
        module, name, arg = "builtins", "eval", f"open({str(ran)!r}, 'w').close()"
    else:  # importing the module runs its code
        (tmp_path / "modules").mkdir()
        (tmp_path / "modules" / f"{_PROBE_MODULE}.py").write_text(
            f"open({str(ran)!r}, 'w').close()\n\ndef f():\n    return None\n")
        monkeypatch.syspath_prepend(str(tmp_path / "modules"))
        module, name, arg = _PROBE_MODULE, "f", None
    data, labels = written["data_batch_2"]
    genuine = _py2_batch(data, labels, b"training batch 2 of 5", [b"x.png"] * len(labels))
    raw = genuine[:-2] + _call_entry(module, name, arg, opcode) + b"u."  # one more entry before SETITEMS, STOP
    (directory / "data_batch_2").write_bytes(raw)
    # the file is live: the unrestricted reader runs its code
    assert b"extra" in pickle.loads(raw, encoding="bytes") and ran.exists()
    ran.unlink()
    sys.modules.pop(_PROBE_MODULE, None)
    with pytest.raises(DataFileError, match=rf"data_batch_2 holds a reference to the Python object "
                                            rf"{module}\.{name}, which a CIFAR-10 batch does not; refused"):
        load_dataset("cifar10_rows", tmp_path, verify=False)
    assert not ran.exists() and _PROBE_MODULE not in sys.modules


class _Evaluates:
    """Unpickling it evaluates `source`."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return eval, (self.source,)


@pytest.mark.parametrize("kind", ["object", "float"])
def test_cifar10_arrays_other_than_integers_are_refused(tmp_path, kind):
    ran = tmp_path / "ran"
    if kind == "object":  # an object array: its elements are unpickled as Python objects
        data = np.array([_Evaluates(f"open({str(ran)!r}, 'w').close()")] * 3072, dtype=object).reshape(1, 3072)
    else:
        data = np.zeros((1, 3072))
    raw = pickle.dumps({b"data": data, b"labels": [0]}, protocol=2)
    (tmp_path / "test_batch").write_bytes(raw)
    if kind == "object":
        pickle.loads(raw, encoding="bytes")
        assert ran.exists()
        ran.unlink()
    spec = data.dtype.__reduce__()[1][0]  # how the pickle names the dtype ('O8', 'f8')
    with pytest.raises(DataFileError, match=rf"test_batch holds a NumPy array of dtype '{spec}', which a CIFAR-10 "
                                            "batch does not; refused"):
        cifar_mod.read_batch(tmp_path / "test_batch", verify=False)
    assert not ran.exists()
    # the shape and the bytes of an integer array must agree
    (tmp_path / "test_batch").write_bytes(_py2_batch(np.zeros((1, 3072), np.uint8), [0], b"b", [b"f"])
                                          .replace(_int(3072), _int(3000), 1))
    with pytest.raises(DataFileError, match=r"a NumPy array of shape \(1, 3000\) and dtype uint8 stored in 3072 bytes"):
        cifar_mod.read_batch(tmp_path / "test_batch", verify=False)


def test_cifar10_checksums(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    _write_cifar(directory)
    with pytest.warns(DataFileWarning) as record:
        rows = load_dataset("cifar10_rows", tmp_path)
    md5 = {name: hashlib.md5((directory / name).read_bytes()).hexdigest() for name in cifar_mod.OFFICIAL_MD5}
    assert len(record) == 6
    for w, name in zip(record, (*cifar_mod.TRAIN_FILES, "test_batch")):
        assert f"{directory / name} has md5 {md5[name]}; the official CIFAR-10 {name} has " \
               f"{cifar_mod.OFFICIAL_MD5[name]}" in str(w.message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = load_dataset("cifar10_rows", tmp_path, verify=False)
    np.testing.assert_array_equal(quiet.x_train, rows.x_train)  # read all the same
    # a file whose md5 is the official one gives no warning
    official = dict(cifar_mod.OFFICIAL_MD5, test_batch=md5["test_batch"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.MonkeyPatch.context() as m:
            m.setattr(cifar_mod, "OFFICIAL_MD5", official)
            cifar_mod.read_batch(directory / "test_batch")
    with pytest.raises(ValueError, match="verify='no' is invalid: expected True or False"):
        load_dataset("cifar10_rows", tmp_path, verify="no")


def test_mnist1d_generated_offline():
    d = load_dataset("mnist1d")
    assert d.x_train.shape == (3500, 40, 1) and d.x_test.shape == (1000, 40, 1) and d.num_classes == 10
    np.testing.assert_array_equal(load_dataset("mnist1d").x_test, d.x_test)  # deterministic


def test_public_permutation_embedded_and_applied(tmp_path, shared_data):
    import hashlib
    from importlib import resources

    embedded = resources.files("nrnn_jax.data").joinpath(mnist_mod.PUBLIC_PERMUTATION_FILE).read_bytes()
    shared = (shared_data / "mnist" / mnist_mod.PUBLIC_PERMUTATION_FILE).read_bytes()
    assert hashlib.sha256(embedded).hexdigest() == hashlib.sha256(shared).hexdigest() == mnist_mod.PUBLIC_PERMUTATION_SHA256
    p = mnist_mod.permutation("public")
    assert p[:10].tolist() == [91, 97, 471, 426, 157, 451, 312, 198, 117, 454] and int(p.sum()) == 306936
    assert sorted(p.tolist()) == list(range(784))
    assert np.array_equal(mnist_mod.permutation(), p)  # the default is the public one
    assert mnist_mod.permutation("numpy").tolist() == np.random.RandomState(12008).permutation(784).tolist()
    with pytest.raises(ValueError, match=r"permutation='torch' is invalid: expected one of 'public', 'numpy'"):
        mnist_mod.permutation("torch")
    # load_mnist(view="permuted") applies it to the pixel columns of a written IDX file; pixel_scale="raw" keeps bytes
    arrays = _write_mnist(tmp_path / "mnist")
    raw_test = arrays["t10k-images-idx3-ubyte"].reshape(10000, 784).astype(np.float32)
    pix = load_dataset("mnist_pixel", tmp_path, verify=False)
    np.testing.assert_array_equal(pix.x_test[:, :, 0], raw_test / 255.0)
    for kind in ("public", "numpy"):
        for scale, divisor in (("unit", 255.0), ("raw", 1.0)):
            perm = load_dataset("mnist_permuted", tmp_path, verify=False, permutation=kind, pixel_scale=scale)
            np.testing.assert_array_equal(perm.x_test[:, :, 0], raw_test[:, mnist_mod.permutation(kind)] / divisor)
    np.testing.assert_array_equal(load_dataset("mnist_permuted", tmp_path, verify=False).x_test[:, :, 0],
                                  raw_test[:, p] / 255.0)
    with pytest.raises(ValueError, match=r"pixel_scale='byte' is invalid: expected one of 'unit', 'raw'"):
        load_dataset("mnist_pixel", tmp_path, verify=False, pixel_scale="byte")
