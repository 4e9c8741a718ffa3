"""Each method's defining property, and that the logged loss is always the plain cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from trainer.config import MethodConfig, ModelConfig
from trainer.contract import METHODS
from trainer.methods import build_method
from trainer.model import GPT

CONFIGS = {
    "baseline": MethodConfig("baseline"),
    "zloss": MethodConfig("zloss", lambda_=0.5),
    "muloss": MethodConfig("muloss", lambda_=0.5),
    "mucentering": MethodConfig("mucentering"),
    "softcap": MethodConfig("softcap", cap=2.0),
}


def model_for(name: str, tied: bool = False, vocab: int = 64) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=vocab, seq_len=16, tied=tied)
    return GPT(cfg, build_method(CONFIGS[name]))


def batch(vocab: int = 64):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (3, 16), generator=g), torch.randint(0, vocab, (3, 16), generator=g)


def test_every_registered_method_is_covered():
    assert set(METHODS) == set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_logged_loss_is_plain_cross_entropy_of_the_output_logits(name):
    model = model_for(name)
    x, y = batch()
    ce, _ = model(x, y)
    logits = model(x)  # the model's output (capped for softcap)
    assert torch.allclose(ce, F.cross_entropy(logits.view(-1, 64), y.view(-1)), atol=1e-6)


def test_zloss_adds_exactly_lambda_mean_lse_squared():
    model = model_for("zloss")
    x, y = batch()
    ce, total = model(x, y)
    raw = model.lm_head(model.hidden(x))
    expected = 0.5 * torch.logsumexp(raw, dim=-1).pow(2).mean()
    assert torch.allclose(total - ce, expected, rtol=1e-5)


def test_muloss_adds_exactly_lambda_mu_norm_squared_over_all_rows():
    model = model_for("muloss")
    with torch.no_grad():
        model.lm_head.weight[-5:] += 3.0  # padding-like rows that no target uses still count
    x, y = batch()
    ce, total = model(x, y)
    E = model.lm_head.weight
    mu = E.sum(dim=0) / E.shape[0]
    assert torch.allclose(total - ce, 0.5 * (mu @ mu), rtol=1e-5)
    # and its gradient w.r.t. E is 2 lambda mu / V on every row
    model.zero_grad()
    (total - ce).backward()
    assert torch.allclose(model.lm_head.weight.grad, (2 * 0.5 * mu / E.shape[0]).expand_as(E), atol=1e-7)


def test_softcap_keeps_every_logit_within_the_cap():
    model = model_for("softcap")
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    x, _ = batch()
    logits = model(x)
    raw = model.lm_head(model.hidden(x))
    assert raw.abs().max() > 2.0  # the cap is active
    assert logits.abs().max() <= 2.0
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0))


@pytest.mark.parametrize("tied", [False, True])
def test_mucentering_zeroes_the_row_mean_after_a_step(tied):
    model = model_for("mucentering", tied=tied, vocab=50304)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch()
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # a large offset to remove
    model(x, y)[1].backward()
    opt.step()
    model.method.after_step(model.output_embedding)
    E = model.lm_head.weight
    assert E.dtype == torch.float32
    assert E.mean(dim=0).abs().max().item() < 1e-6
    if tied:  # the input side is the same storage, so it is centred too
        assert model.wte.weight.mean(dim=0).abs().max().item() < 1e-6


@pytest.mark.parametrize("name", ["baseline", "zloss", "muloss", "softcap"])
def test_other_methods_leave_weights_alone_after_a_step(name):
    model = model_for(name)
    before = model.lm_head.weight.clone()
    model.method.after_step(model.output_embedding)
    assert torch.equal(before, model.lm_head.weight)
