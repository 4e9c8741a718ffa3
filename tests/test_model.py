import math

import pytest
import torch

from trainer.config import ModelConfig
from trainer.model import GPT, parameter_count, swiglu_hidden

PAPER_SCALES = {  # layers, width, SwiGLU hidden, exact non-embedding parameters (docs/protocol.md "Model")
    "16M": (6, 224, 768, 4_304_384),
    "29M": (9, 320, 1024, 12_541_280),
    "57M": (12, 480, 1280, 33_192_480),
    "109M": (15, 640, 1792, 76_210_240),
    "221M": (21, 832, 2304, 178_957_792),
}


@pytest.mark.parametrize("scale", PAPER_SCALES)
def test_paper_scales_have_the_exact_parameter_counts(scale):
    n_layer, n_embd, hidden, non_embedding = PAPER_SCALES[scale]
    assert swiglu_hidden(n_embd) == hidden
    with torch.device("meta"):
        model = GPT(ModelConfig(n_layer=n_layer, n_embd=n_embd))
    assert model.non_embedding_params() == non_embedding
    assert model.lm_head.weight.shape == (50304, n_embd)
    nominal = {"16M": 16e6, "29M": 29e6, "57M": 57e6, "109M": 109e6, "221M": 221e6}[scale]
    assert abs(non_embedding + 50304 * n_embd - nominal) / nominal < 0.03  # nominal N of the tables


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 64, "seq_len": 16, **kw})


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_embd=256, vocab_size=4096, seq_len=32)
    model = GPT(cfg)
    H = 256
    assert abs(model.wte.weight.std().item() - 1 / math.sqrt(H)) < 0.002
    xavier = math.sqrt(2 / (H + 3 * H))
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - xavier) < 0.002
    proj = 0.02 / math.sqrt(2 * 4)
    assert abs(model.blocks[0].attn.proj.weight.std().item() - proj) < 0.0005
    assert abs(model.lm_head.weight.std().item() - math.sqrt(2 / (4096 + H))) < 0.001
    assert all(not (isinstance(m, torch.nn.LayerNorm) and m.bias is not None) for m in model.modules())
    assert all(not (isinstance(m, torch.nn.Linear) and m.bias is not None) for m in model.modules())


def test_tied_embeddings_share_storage_and_end_xavier_normal():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_embd=256, vocab_size=4096, seq_len=8, tied=True))
    assert model.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert abs(model.wte.weight.std().item() - math.sqrt(2 / (4096 + 256))) < 0.001
    untied = GPT(ModelConfig(n_layer=1, n_embd=256, vocab_size=4096, seq_len=8))
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - sum(p.numel() for p in model.parameters()) == 4096 * 256


def test_model_is_causal():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tied": True},
        {"mlp": "gelu"},
        {"mlp": "gelu", "tied": True, "qk_norm": False},
        {"n_layer": 3, "n_embd": 48, "n_head": 6, "vocab_size": 100, "qk_norm": False},
    ],
)
def test_parameter_count_from_the_config_is_the_built_model_s(kw):
    cfg = tiny(**kw)
    with torch.device("meta"):
        model = GPT(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scale", PAPER_SCALES)
def test_parameter_count_of_the_paper_scales(scale):
    n_layer, n_embd, _, non_embedding = PAPER_SCALES[scale]
    assert parameter_count(ModelConfig(n_layer=n_layer, n_embd=n_embd)) == non_embedding + 2 * 50304 * n_embd


def test_a_sequence_longer_than_seq_len_is_refused():
    model = GPT(tiny())
    model(torch.zeros(1, 16, dtype=torch.long))  # seq_len itself is fine
    with pytest.raises(ValueError, match=r"^17 tokens per sequence: longer than model.seq_len=16$"):
        model(torch.zeros(1, 17, dtype=torch.long))
