"""Loaders: the real files when present, and every format from small files the tests write."""

import hashlib

import numpy as np
import pytest

from nrnn_jax.data import DataFileError, batches, epoch_order, load_dataset, prefetch
from nrnn_jax.data.ecg5000 import KNOWN_SHA256, read_ucr_arff, read_ucr_text


def test_digits_embedded_split():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (8, 8) and d.num_classes == 10
    assert d.x_train.shape[0] + d.x_val.shape[0] + d.x_test.shape[0] == 1797
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    # the split is fixed: loading twice gives the same arrays
    np.testing.assert_array_equal(load_dataset("digits").x_test, d.x_test)


def test_ecg5000_real_files(shared_data):
    ecg = shared_data / "ecg5000"
    for name, digest in KNOWN_SHA256.items():
        assert hashlib.sha256((ecg / name).read_bytes()).hexdigest() == digest
    d = load_dataset("ecg5000", shared_data)
    assert d.x_train.shape == (500, 140, 1) and d.x_val.shape == (500, 140, 1) and d.x_test.shape == (4000, 140, 1)
    assert np.bincount(d.y_train).tolist() == [292, 208]
    assert (np.bincount(d.y_val) + np.bincount(d.y_test)).tolist() == [2627, 1873]
    # the validation split holds both classes (the stored test file is sorted by label)
    assert 0.3 < d.y_val.mean() < 0.6
    # the UCR text file and the .npz hold the same training rows and labels
    x_txt, y_txt = read_ucr_text(ecg / "ECG5000_TRAIN.txt")
    assert np.bincount(y_txt)[1:].tolist() == [292, 177, 10, 19, 2]
    np.testing.assert_allclose(x_txt.astype(np.float32)[:, :, None], d.x_train)
    first = load_dataset("ecg5000", ecg, val_rows="first")
    assert first.y_val.sum() == 0  # as stored, the first 500 test rows are all normal


def _write_ucr(path, x, y, sep):
    with open(path, "w") as f:
        for row, label in zip(x, y):
            f.write(sep.join([f"{float(label):.7e}"] + [f"{v:.7e}" for v in row]) + "\n")


@pytest.mark.parametrize("sep", ["  ", ",", "\t"])
def test_ucr_text_formats(tmp_path, sep):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 140)), rng.integers(1, 6, 7)
    path = tmp_path / "ECG5000_TRAIN.txt"
    _write_ucr(path, x, y, sep)
    xr, yr = read_ucr_text(path)
    np.testing.assert_allclose(xr, x, rtol=1e-6)
    np.testing.assert_array_equal(yr, y)


def test_ucr_arff(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 140)), rng.integers(1, 6, 4)
    lines = ["@relation ECG5000", *[f"@attribute att{i} numeric" for i in range(140)],
             "@attribute target {1,2,3,4,5}", "@data"]
    lines += [",".join(f"{v:.7e}" for v in row) + f",{label}" for row, label in zip(x, y)]
    path = tmp_path / "ECG5000_TRAIN.arff"
    path.write_text("\n".join(lines) + "\n")
    xr, yr = read_ucr_arff(path)
    np.testing.assert_allclose(xr, x, rtol=1e-6)
    np.testing.assert_array_equal(yr, y)


def test_full_ucr_directory_multiclass(tmp_path):
    rng = np.random.default_rng(2)
    xtr, ytr = rng.standard_normal((500, 140)), rng.integers(1, 6, 500)
    xte, yte = rng.standard_normal((4500, 140)), rng.integers(1, 6, 4500)
    _write_ucr(tmp_path / "ECG5000_TRAIN.txt", xtr, ytr, " ")
    _write_ucr(tmp_path / "ECG5000_TEST.txt", xte, yte, ",")
    d = load_dataset("ecg5000", tmp_path, labels="multiclass", val_rows="first")
    assert d.num_classes == 5
    np.testing.assert_array_equal(d.y_train, ytr - 1)
    np.testing.assert_array_equal(d.y_val, yte[:500] - 1)
    np.testing.assert_allclose(d.x_test[:, :, 0], xte[500:], rtol=1e-6)
    b = load_dataset("ecg5000", tmp_path)  # binary, shuffled validation rows
    assert set(np.unique(b.y_test)) <= {0, 1}


def test_bad_files_are_named(tmp_path):
    with pytest.raises(DataFileError, match="missing"):
        load_dataset("ecg5000", tmp_path)
    bad = tmp_path / "ECG5000_TRAIN.txt"
    bad.write_text("1.0 2.0 3.0\n")
    with pytest.raises(DataFileError, match=r"ECG5000_TRAIN.txt: row 1 has 3 values; expected 141"):
        read_ucr_text(bad)
    bad.write_text("1.0 abc\n")
    with pytest.raises(DataFileError, match="line 1"):
        read_ucr_text(bad)
    npz = tmp_path / "ecg5000_train.npz"
    npz.write_bytes(b"PK\x03\x04 truncated")
    bad.unlink()
    with pytest.raises(DataFileError, match="ecg5000_train.npz"):
        load_dataset("ecg5000", tmp_path)



class _Evaluates:
    """Unpickling it evaluates `source`."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return eval, (self.source,)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    ran = tmp_path / "ran"
    x = np.empty((500, 140), dtype=object)
    x[...] = _Evaluates(f"open({str(ran)!r}, 'w').close()")
    np.savez(tmp_path / "ecg5000_train.npz", x64=x, y=np.ones(500, np.int64))
    with np.load(tmp_path / "ecg5000_train.npz", allow_pickle=True) as f:  # the file is live
        f["x64"]
    assert ran.exists()
    ran.unlink()
    with pytest.raises(DataFileError, match=r"ecg5000_train.npz cannot be read as .npz \(Object arrays cannot be "
                                            "loaded when allow_pickle=False"):
        load_dataset("ecg5000", tmp_path, verify=False)  # verify=False: the file reaches the reader
    assert not ran.exists()

def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset='nope' is invalid"):
        load_dataset("nope")


def test_batches_fixed_shape_and_mask():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1)
    y = np.arange(10, dtype=np.int32)
    got = list(batches(x, y, 4))
    assert [b.x.shape for b in got] == [(4, 1, 1)] * 3
    assert got[-1].mask.tolist() == [1, 1, 0, 0]
    seen = np.concatenate([b.y[b.mask > 0] for b in got])
    np.testing.assert_array_equal(seen, y)
    train = list(batches(x, y, 4, order=epoch_order(10, 0, 1), drop_remainder=True))
    assert len(train) == 2 and all(b.mask.all() for b in train)
    np.testing.assert_array_equal(epoch_order(10, 0, 1), epoch_order(10, 0, 1))
    assert not np.array_equal(epoch_order(10, 0, 1), epoch_order(10, 0, 2))
    # a partial order (a resumed epoch) gives only the batches it holds
    part = list(batches(x, y, 4, order=epoch_order(10, 0, 1)[4:], drop_remainder=True))
    assert len(part) == 1
    np.testing.assert_array_equal(part[0].y, epoch_order(10, 0, 1)[4:8])
    with pytest.raises(ValueError, match="batch_size=0"):
        list(batches(x, y, 0))


def test_prefetch_yields_the_same_batches_on_device():
    import jax

    x = np.arange(40, dtype=np.float32).reshape(10, 2, 2)
    y = np.arange(10, dtype=np.int32)
    plain = list(batches(x, y, 3))
    ahead = list(prefetch(batches(x, y, 3), size=2))
    assert len(ahead) == len(plain) == 4
    for a, b in zip(ahead, plain):
        assert isinstance(a.x, jax.Array)
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.mask, b.mask)
