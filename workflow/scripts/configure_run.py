"""Snakemake script of rules configure_run and experiment_file: write params.config as YAML, atomically."""

from pathlib import Path

import yaml

from trainer.files import write_atomic


def write_run_config(config: dict, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, yaml.safe_dump(config, sort_keys=False))


if "snakemake" in globals():  # run by Snakemake's script directive
    write_run_config(snakemake.params.config, snakemake.output[0])  # noqa: F821
