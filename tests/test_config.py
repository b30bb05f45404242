import math

import pytest

from nrnn_jax import NRNNConfig, TrainConfig

BAD = [
    ("input_dim", 0), ("input_dim", 1.5), ("hidden", 0), ("hidden", True), ("num_classes", 1),
    ("dt", 0.0), ("dt", -0.1), ("dt", math.nan), ("dt", "0.1"), ("alpha", math.inf),
    ("beta", -0.1), ("beta", 1.5), ("gamma_a", -1.0), ("gamma_w", -1e-3), ("eps_add", -0.1),
    ("eps_mult", math.nan), ("init_std", -1.0), ("convention", "torch"), ("noise_kind", "full"),
    ("solver", "rk4"), ("backend", "torch"), ("dtype", "float16"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_each_bad_field_is_named(field, value):
    with pytest.raises(ValueError) as e:
        NRNNConfig(**{field: value})
    msg = str(e.value)
    assert f"NRNNConfig.{field}=" in msg and repr(value) in msg and ("expected" in msg or "use" in msg)


@pytest.mark.parametrize("kw,field", [
    (dict(convention="reference", eps_mult=1.5), "eps_mult"),
    (dict(convention="reference", noise_kind="scalar"), "noise_kind"),
    (dict(convention="reference", solver="milstein"), "solver"),
    (dict(noise_kind="scalar", eps_add=0.1, solver="milstein"), "solver"),
])
def test_inconsistent_combinations(kw, field):
    with pytest.raises(ValueError, match=f"NRNNConfig.{field}="):
        NRNNConfig(**kw)


def test_noise_dim_and_roundtrip():
    assert NRNNConfig(hidden=8).noise_dim == 8
    assert NRNNConfig(hidden=8, noise_kind="scalar").noise_dim == 9
    assert NRNNConfig(hidden=8, convention="reference").noise_dim == 16
    cfg = NRNNConfig(hidden=8, eps_add=0.2)
    assert NRNNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="no field"):
        cfg.replace(hiden=3)
    with pytest.raises(Exception):
        cfg.hidden = 3  # frozen


@pytest.mark.parametrize("field,value", [("mode", "noisy"), ("epochs", -1), ("lr", 0.0), ("optimizer", "rmsprop"),
                                         ("reg_method", "mc"), ("num_probes", 0), ("grad_clip", -1.0),
                                         ("lr_decay_epochs", (0,)), ("eval_white_noise", (-1.0,))])
def test_train_config_errors(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}="):
        TrainConfig(**{field: value})
