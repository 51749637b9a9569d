"""The parts of ``dogbench screen`` that stand alone: LogME against the Gaussian marginal likelihood it maximises
(a hand-checkable known answer), and the shipped zoos (every tag is timm's, every leaky flag what the tag says)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from dogbench.screen.logme import logme
from dogbench.screen.zoo import Family, ZooError, load_zoo, read_zoos


def _direct_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, F F^T / alpha + I / beta) / n: the marginal likelihood of Bayesian linear regression."""
    n = f.shape[0]
    return float(multivariate_normal(mean=np.zeros(n), cov=f @ f.T / alpha + np.eye(n) / beta).logpdf(y)) / n


@pytest.mark.parametrize(("n", "d"), [(12, 4), (5, 8)])  # more images than dimensions, and fewer (rank-deficient)
def test_logme_is_the_marginal_likelihood_at_its_maximum(n: int, d: int) -> None:
    rng = np.random.default_rng(n)
    y = np.arange(n) % 3
    f = rng.normal(size=(n, d))
    f[:, :3] += 1.5 * np.eye(3)[y]  # features that hold the labels: the maximum is inside, not at alpha = inf
    result = logme(f, y)
    assert np.all(np.isfinite(result.evidence))
    assert result.evidence.shape == (3,) and result.score == pytest.approx(result.evidence.mean())
    for c, (alpha, beta, evidence) in enumerate(zip(result.alpha, result.beta, result.evidence, strict=True)):
        target = (y == c).astype(np.float64)
        assert evidence == pytest.approx(_direct_evidence(f, target, alpha, beta), abs=1e-9)
        if n <= d:  # the features fit the target exactly: the maximum lies at beta = inf, held off by the guard
            continue
        for da, db in ((1.05, 1), (1 / 1.05, 1), (1, 1.05), (1, 1 / 1.05)):  # a maximum: every step away is lower
            assert _direct_evidence(f, target, alpha * da, beta * db) < evidence


def test_logme_of_constant_features_is_the_noise_model_not_nan() -> None:
    y = np.arange(10) % 2
    result = logme(np.zeros((10, 5)), y)
    target = (y == 0).astype(np.float64)  # N(y; 0, I / beta) with beta = n / |y|^2, the noise-only evidence
    assert result.evidence[0] == pytest.approx(_direct_evidence(np.zeros((10, 0)), target, 1.0, result.beta[0]))


def test_logme_ranks_features_that_hold_the_labels_above_noise() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    noise = rng.normal(size=(100, 16))
    informative = noise.copy()
    informative[:, :5] += 3 * np.eye(5)[y]
    assert logme(informative, y).score > logme(noise, y).score


def test_the_shipped_zoos_name_timm_tags_with_honest_leaky_flags() -> None:
    import timm

    from dogbench.names import datasets_of_tag

    models, zoos = read_zoos()
    assert {"standard", "small"} <= set(zoos)
    assert {m.family for m in load_zoo("standard")} == set(Family)  # every family the issue names
    for m in models.values():
        assert timm.models.get_pretrained_cfg(m.tag) is not None, m.tag
        assert m.leaky == bool(datasets_of_tag(m.tag.split(".", 1)[1])), m.name


ONE_RESNET = '[models.a]\ntag = "resnet18.tv_in1k"\nfamily = "{family}"\npretraining = "x"\nleaky = true\n'
BAD_ZOO_FILES = (  # (the file, what the one sentence says)
    (ONE_RESNET.format(family="cnn"), "family 'cnn' is not one of vit, deit"),
    (ONE_RESNET.format(family="resnet") + '[zoos]\nz = ["b"]\n', "zoo 'z' names 'b', which has no"),
    ('models = ["a"]\n', "has no \\[models.NAME\\] table"),
    (ONE_RESNET.format(family="resnet") + '[zoos]\nz = "a"\n', "maps each zoo's name to a list"),
)


def test_an_unknown_zoo_or_a_bad_file_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match=r"unknown zoo 'standrd' \(closest: standard\)"):
        load_zoo("standrd")
    bad = tmp_path / "mine.toml"
    for text, says in BAD_ZOO_FILES:
        bad.write_text(text)
        with pytest.raises(ZooError, match=says):
            load_zoo(str(bad))
    with pytest.raises(ZooError, match="does not exist"):
        load_zoo(str(tmp_path / "none.toml"))
