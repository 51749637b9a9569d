"""LogME (You et al., ICML 2021): how well a backbone's frozen features explain the labels, without training.

Per class, a Bayesian linear regression of the one-hot target on the features, its prior precision ``alpha`` and
noise precision ``beta`` set by maximising the marginal likelihood (MacKay's fixed point, Bishop's PRML 3.5.2),
all from one SVD of the features; the score is that maximised log-evidence per sample, averaged over the classes.
Higher is better; scores compare backbones on the same images, not across datasets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ITER = 100  # the fixed point settles in a few steps; the reference implementation stops after 11
TOL = 1e-8  # relative change of alpha / beta that ends the iteration
EPS = 1e-5  # the reference's guard in the updates' denominators: with fewer images than dimensions the features
# can fit a target exactly (zero residual), and the unguarded noise precision would grow without bound


@dataclass(frozen=True)
class LogME:
    """A LogME score and the evidence-maximising precisions of each class's regression."""

    score: float  # the mean over classes of the maximised log-evidence per sample
    evidence: np.ndarray  # (C,) per class
    alpha: np.ndarray  # (C,) prior precision of the weights
    beta: np.ndarray  # (C,) precision of the noise


def logme(features: np.ndarray, labels: np.ndarray) -> LogME:
    """LogME of ``features`` (N, D) for integer ``labels`` (N,) in 0..C-1, in float64.

    The updates are the reference implementation's (thuml/LogME, with its 1e-5 guards), iterated to convergence;
    the evidence is then evaluated exactly at the precisions found. It counts every one of the D weight
    dimensions: when the features have rank k < D (fewer images than dimensions), the D - k null directions each
    add ``log(alpha)`` to ``log|A|``, as the Gaussian marginal likelihood requires."""
    f = np.asarray(features, np.float64)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > 1e-10 * max(1.0, float(s[0]) if len(s) else 1.0)
    u, sigma = u[:, keep], s[keep] ** 2  # eigenvalues of F^T F that are not zero
    classes = np.unique(labels)
    out = np.array([_class_evidence(u, sigma, (labels == c).astype(np.float64), n, d) for c in classes])
    return LogME(float(out[:, 0].mean()), out[:, 0], out[:, 1], out[:, 2])


def _class_evidence(u: np.ndarray, sigma: np.ndarray, y: np.ndarray, n: int, d: int) -> tuple[float, float, float]:
    """(log-evidence / n, alpha, beta) of one class's regression at the marginal likelihood's fixed point."""
    if not len(sigma):  # features without any variation: the weights carry nothing (alpha = inf), noise alone
        beta = n / max(float(y @ y), EPS)
        return (n / 2 * np.log(beta) - beta / 2 * float(y @ y) - n / 2 * np.log(2 * np.pi)) / n, np.inf, beta
    x2 = (u.T @ y) ** 2  # the target's energy along each principal direction
    rest = float(y @ y - x2.sum())  # and outside the features' span
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITER):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())  # the effective number of well-determined weights
        m2 = float((sigma * x2 / (sigma + t) ** 2).sum())  # |m|^2, the posterior mean's squared norm
        res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + rest  # |y - F m|^2
        new_alpha, new_beta = gamma / (m2 + EPS), max(n - gamma, EPS) / (res2 + EPS)
        done = abs(new_alpha - alpha) <= TOL * alpha and abs(new_beta - beta) <= TOL * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    t = alpha / beta
    m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
    res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + rest
    log_det_a = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * np.log(alpha)
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - beta / 2 * res2 - alpha / 2 * m2
                - log_det_a / 2 - n / 2 * np.log(2 * np.pi))
    return evidence / n, alpha, beta
