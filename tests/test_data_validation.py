"""User data is checked up front: a `Dataset` refuses bad labels, non-finite inputs and empty splits when it
is built, naming the split, the field, the first offending indices and values and what is allowed;
`train_and_evaluate` refuses a batch larger than the training split and states what an epoch leaves out;
the entry points that take labels check them the same way."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from nrnn_jax import NoisyRNN, NRNNConfig, TrainConfig, evaluate, load_dataset, train_and_evaluate
from nrnn_jax.analysis import deepfool, fgsm, hessian_trace, output_margins
from nrnn_jax.data import Dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _with(data: Dataset, field: str, index, value) -> Dataset:
    """A copy of `data` with one field's entries at `index` set to `value` (built anew, so checked anew)."""
    a = getattr(data, field).copy()
    a[index] = value
    return dataclasses.replace(data, **{field: a})


def test_loaded_data_sets_pass(digits):
    digits.validate()  # the embedded split is valid as loaded (the loaders build checked Datasets)
    assert digits.y_train.min() == 0 and digits.y_train.max() == 9


@pytest.mark.parametrize("field, index, value, exc, message", [
    # −1 would otherwise train as the last class: cross_entropy's gather wraps negative indices
    ("y_train", [3, 7], -1, ValueError,
     "Dataset 'digits', train split: y_train has 2 label(s) outside [0, 10) at index(es) [3, 7] (value(s) [-1, -1]); "
     "expected integer class labels in [0, num_classes=10)."),
    ("y_train", slice(0, 8), 10, ValueError,
     "Dataset 'digits', train split: y_train has 8 label(s) outside [0, 10) at index(es) [0, 1, 2, 3, 4] and 3 more "
     "(value(s) [10, 10, 10, 10, 10] and 3 more); expected integer class labels in [0, num_classes=10)."),
    ("y_test", 5, 12, ValueError,
     "Dataset 'digits', test split: y_test has 1 label(s) outside [0, 10) at index(es) [5] (value(s) [12]); "
     "expected integer class labels in [0, num_classes=10)."),
    ("x_train", (2, 3, 1), np.nan, ValueError,
     "Dataset 'digits', train split: x_train has 1 NaN or Inf value(s) in example(s) [2] (first: x_train[2, 3, 1] "
     "= nan); inputs must be finite."),
    ("x_val", (slice(4, 6), 0, 0), np.inf, ValueError,
     "Dataset 'digits', val split: x_val has 2 NaN or Inf value(s) in example(s) [4, 5] (first: x_val[4, 0, 0] = inf); "
     "inputs must be finite."),
])
def test_bad_values_are_named(digits, field, index, value, exc, message):
    with pytest.raises(exc) as e:
        _with(digits, field, index, value)
    assert str(e.value) == message


def test_bad_shapes_and_types_are_named(digits):
    empty = digits.x_train[:0]
    with pytest.raises(ValueError, match=r"^Dataset 'digits': the train split is empty \(x_train has shape \(0, 8, 8\)\); "
                                         r"every split \(train, val, test\) needs at least one example\.$"):
        dataclasses.replace(digits, x_train=empty, y_train=digits.y_train[:0])
    with pytest.raises(ValueError, match=r"the val split is empty"):
        dataclasses.replace(digits, x_val=digits.x_val[:0], y_val=digits.y_val[:0])
    with pytest.raises(TypeError, match=r"^Dataset 'digits': y_val has dtype float32; expected integer class labels "
                                        r"in \[0, num_classes=10\)\.$"):
        dataclasses.replace(digits, y_val=digits.y_val.astype(np.float32))
    with pytest.raises(TypeError, match=r"x_test has dtype bool; expected real"):
        dataclasses.replace(digits, x_test=digits.x_test > 0.5)
    with pytest.raises(ValueError, match=r"x_test has input_dim 4 \(shape \(359, 8, 4\)\); expected the training "
                                         r"split's 8"):
        dataclasses.replace(digits, x_test=digits.x_test[:, :, :4])
    with pytest.raises(TypeError, match=r"y_train is a list; expected an array"):
        dataclasses.replace(digits, y_train=digits.y_train.tolist())
    with pytest.raises(ValueError, match=r"Dataset\.num_classes=0 is invalid: expected an integer >= 1"):
        dataclasses.replace(digits, num_classes=0)
    # one class fewer than the labels use: the largest label is now out of range
    with pytest.raises(ValueError, match=r"train split: y_train has \d+ label\(s\) outside \[0, 9\)"):
        dataclasses.replace(digits, num_classes=9)


def test_batch_larger_than_the_training_split_is_refused_before_work(digits, tmp_path):
    small = dataclasses.replace(digits, x_train=digits.x_train[:20], y_train=digits.y_train[:20])
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^TrainConfig\.batch_size=64 is invalid: expected at most the 20 examples of "
                                         r"the training split of 'digits' \(each step takes a full batch\)\.$"):
        train_and_evaluate(NRNNConfig(input_dim=8, num_classes=10, hidden=4), TrainConfig(epochs=1, batch_size=64),
                           run, data=small, progress=False, log=None)
    assert not run.exists()  # refused before the run directory was made


def test_the_examples_an_epoch_leaves_out_are_stated(digits):
    lines = []
    mcfg = NRNNConfig(input_dim=8, num_classes=10, hidden=4, backend="scan")
    train_and_evaluate(mcfg, TrainConfig(epochs=0, batch_size=700, eval_white_noise=()), data=digits, progress=False,
                       log=lines.append)
    n = digits.x_train.shape[0]
    assert n == 1258
    assert lines[0] == ("each epoch trains on 700 of the 1258 training examples: 1 batch(es) of 700 from the epoch's "
                        "shuffled order, whose last 558 sit that epoch out (others in each epoch)")
    lines.clear()
    train_and_evaluate(mcfg, TrainConfig(epochs=0, batch_size=629, eval_white_noise=()), data=digits, progress=False,
                       log=lines.append)
    assert not any("each epoch trains on" in line for line in lines)  # 2 × 629 = 1258: nothing left out


def test_entry_points_name_the_offending_labels_and_examples():
    model = NoisyRNN(NRNNConfig(input_dim=2, hidden=4, num_classes=3), rngs=nnx.Rngs(0))
    x = np.zeros((4, 5, 2), np.float32)
    y = np.array([0, 3, 1, -1])
    labels = (r"y has labels in \[-1, 3\]; expected labels in \[0, 3\) \(2 label\(s\) outside \[0, 3\) at index\(es\) "
              r"\[1, 3\] \(value\(s\) \[3, -1\]\)\)\.")
    for call in (lambda: evaluate(model, x, y), lambda: output_margins(model, x, y),
                 lambda: fgsm(model, x, y, 0.1), lambda: hessian_trace(model, x, y, num_samples=1)):
        with pytest.raises(ValueError, match=labels):
            call()
    bad = x.copy()
    bad[2, 1, 0] = np.nan
    for call in (lambda: model(bad), lambda: deepfool(model, bad)):
        with pytest.raises(ValueError, match=r"^x contains 1 NaN or Inf value\(s\) in example\(s\) \[2\] "
                                             r"\(first: x\[2, 1, 0\] = nan\); inputs must be finite\.$"):
            call()


@pytest.mark.parametrize("levels, detail", [
    ((-0.5, 0), " (eps_add=-0.5)"), ((0.1, -1e-3), " (eps_mult=-0.001)"), ((0.1, float("nan")), " (eps_mult=nan)"),
    ((0.1,), ""), (0.3, ""), ((True, 0.1), " (eps_add=True)"),
])
def test_noise_levels_are_checked(levels, detail):
    """`noise_levels=(eps_add, eps_mult)` of a model call and of the explicit regularizer: finite and >= 0."""
    import jax
    import jax.numpy as jnp

    from nrnn_jax import explicit_regularizer

    model = NoisyRNN(NRNNConfig(input_dim=2, hidden=4, num_classes=3, eps_add=0.1, eps_mult=0.1), rngs=nnx.Rngs(0))
    x, y, key = np.ones((2, 5, 2), np.float32), np.array([0, 2]), jax.random.PRNGKey(0)
    message = (f"noise_levels={levels!r} is invalid: expected a pair (eps_add, eps_mult) of finite real numbers >= 0"
               f"{detail}.")
    for call in (lambda: model(x, key=key, noise_levels=levels),
                 lambda: explicit_regularizer(model, x, y, noise_levels=levels)):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message
    # valid levels are used: zero levels give the noise-free output; traced levels (a vmapped sweep) pass
    np.testing.assert_array_equal(model(x, key=key, noise_levels=(0.0, 0)), model(x))
    stacked = jax.vmap(lambda lv: model(x, key=key, noise_levels=lv))(jnp.asarray([[0.0, 0.0], [0.1, 0.1]]))
    np.testing.assert_array_equal(stacked[0], model(x))
