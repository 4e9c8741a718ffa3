"""Each metric against a direct computation on a small random E and h."""

import math

import numpy as np
import pytest
import torch

from trainer.metrics import LogitStatistics, embedding_geometry


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(3)
    E = torch.randn(7, 4, generator=g) + 0.3  # an offset, so mu is not ~0
    h = torch.randn(2, 5, 4, generator=g)  # 10 positions
    return E, h


def test_geometry_by_hand(small):
    E, _ = small
    e = E.double().numpy()
    mu = e.sum(axis=0) / 7
    got = embedding_geometry(E)
    assert got["mu_norm"] == pytest.approx(math.sqrt(sum(m * m for m in mu)), rel=1e-5)
    norms = [math.sqrt(sum(x * x for x in row)) for row in e]
    assert got["emb_norm_max"] == pytest.approx(max(norms), rel=1e-5)
    assert got["emb_norm_mean"] == pytest.approx(sum(norms) / 7, rel=1e-5)
    assert got["emb_norm_min"] == pytest.approx(min(norms), rel=1e-5)
    eig = np.linalg.eigvalsh(e.T @ e)  # singular values are the roots of E^T E's eigenvalues
    assert got["smax"] == pytest.approx(math.sqrt(eig.max()), rel=1e-5)
    assert got["smin"] == pytest.approx(math.sqrt(eig.min()), rel=1e-4)
    centred = max(abs(float((row - mu) @ mu)) for row in e)
    raw = max(abs(float(row @ mu)) for row in e)
    assert got["b_ratio"] == pytest.approx(centred / raw, rel=1e-5)


def test_b_ratio_limits():
    E = torch.randn(50, 8)
    # centred: e_i - mu ~ e_i, so the ratio is ~1; undefined (NaN) when mu is exactly 0
    assert embedding_geometry(E - E.mean(dim=0))["b_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert math.isnan(embedding_geometry(torch.zeros(5, 3))["b_ratio"])
    assert embedding_geometry(E + 100.0)["b_ratio"] < 0.1  # the shared offset dominates e_i . mu


def test_logit_statistics_by_hand(small):
    E, h = small
    stats = LogitStatistics(torch.device("cpu"))
    stats.update(h, E)
    got = stats.result(E)
    hs = h.reshape(-1, 4).double().numpy()
    e = E.double().numpy()
    rows = [[float(ht @ ej) for ej in e] for ht in hs]  # l_tj

    def mean(xs):
        return sum(xs) / len(xs)

    def std(xs):
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))

    means = [mean(r) for r in rows]
    stds = [std(r) for r in rows]
    lse = [math.log(sum(math.exp(x) for x in r)) for r in rows]
    expected = {
        "logit_mean": mean(means),
        "logit_std": mean(stds),
        "logit_mean_std": std(means),
        "logit_std_std": std(stds),
        "logit_absmean": mean([mean([abs(x) for x in r]) for r in rows]),
        "logit_absmax": mean([max(abs(x) for x in r) for r in rows]),
        "lse2": mean([x * x for x in lse]),
    }
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    mu = e.mean(axis=0)
    hbar = hs.mean(axis=0)
    assert got["mu_h_dot"] == pytest.approx(float(mu @ hbar), rel=1e-5)
    cos = float(mu @ hbar) / (np.linalg.norm(mu) * np.linalg.norm(hbar))
    assert got["mu_h_cos"] == pytest.approx(cos, rel=1e-5)


def test_chunked_statistics_equal_unchunked():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(300, 16, generator=g)
    h = torch.randn(3, 40, 16, generator=g)
    whole = LogitStatistics(torch.device("cpu"), chunk_positions=10_000)
    whole.update(h, E)
    chunked = LogitStatistics(torch.device("cpu"), chunk_positions=7)
    for part in h:  # several updates, chunks that do not divide the positions
        chunked.update(part, E)
    a, b = whole.result(E), chunked.result(E)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key  # fp32 matmuls of other shapes


def test_centred_embedding_gives_zero_mean_logit():
    g = torch.Generator().manual_seed(1)
    E = torch.randn(64, 8, generator=g) + 2.0
    E = E - E.mean(dim=0)
    stats = LogitStatistics(torch.device("cpu"))
    stats.update(torch.randn(20, 8, generator=g), E)
    got = stats.result(E)
    assert abs(got["logit_mean"]) < 1e-6 and got["logit_mean_std"] < 1e-6
    assert embedding_geometry(E)["mu_norm"] < 1e-6
