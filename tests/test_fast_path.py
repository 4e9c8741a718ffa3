"""The fast training path (compile, large micro-batch, loss kernels) against the plain one, and
the memory rule behind micro_batch "auto"."""

import pytest
import torch

from trainer.config import micro_batch_size
from trainer.model import GPT
from trainer.tools import parity
from trainer.tools.bench import paper_config
from trainer.train import micro_tokens_for_memory

H200, H100 = 143_771 * 2**20, 81_559 * 2**20  # bytes, as nvidia-smi reports them


@pytest.mark.parametrize("method", ["baseline", "softcap"])
@pytest.mark.slow
def test_fast_path_mean_loss_of_steps_181_200_is_within_0_01_of_plain(tmp_path, method):
    parity.bigram_stream(tmp_path, vocab=512)
    plain, fast = parity.compare(parity.tiny_config(str(tmp_path), method), 200, tmp_path / "runs")
    assert plain < 2.5  # the stream was learned (ln 512 = 6.24 at the start, ln 4 = 1.39 at best)
    assert abs(plain - fast) <= 0.01


def test_parity_cli_reports_and_passes(tmp_path, capsys):
    assert parity.main(["--method", "zloss", "--steps", "40"]) == 0
    assert "mean loss over steps 21-40" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("scale", "memory", "expected"),
    [("16M", H200, 64), ("221M", H200, 64), ("16M", H100, 64), ("221M", H100, 32)],
)
def test_auto_micro_batch_follows_gpu_memory(scale, memory, expected):
    # On an H200: 16M x 64 used 22.0 GB, 221M x 32 60.6 GB and 221M x 64 115.1 GB (of 150.8); on
    # an H100 (85.5 GB) 221M x 32 fits with 25 GB to spare, 221M x 64 would not
    cfg = paper_config(scale, "baseline", "unused")
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(cfg.model).parameters())
    assert micro_batch_size(cfg, 1, micro_tokens_for_memory(cfg, memory, n_params)) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of bench; a GPU times --scale")
def test_bench_on_a_cpu_refuses_paper_scales_and_times_a_run_config(tmp_path, tiny_data, capsys):
    from conftest import tiny_config, write_config
    from trainer.tools import bench

    with pytest.raises(SystemExit):
        bench.main(["--scale", "16M"])
    assert "needs a GPU; on a CPU, time a small run config with --config" in capsys.readouterr().err
    config = write_config(tmp_path / "config.yaml", tiny_config(tiny_data))
    bench.main(["--config", str(config), "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "warning: --warmup 1 may time compilation too" in out and "tiny | 8 |" in out
