# One run: configure (local) -> train (a GPU job, retried with more time) -> evaluate.
# Rerun triggers: a run's config is a `params` of configure_run, so changing a run-config value
# reruns exactly the runs whose config changed; the trainer is called through `shell` and no
# trainer file is an input, so editing trainer code restarts nothing.
import yaml


def resource(name):
    return lambda wildcards: GRID.resources(scale_of(wildcards))[name]


def train_runtime(wildcards, attempt):
    """Minutes: the scale's runtime, doubled on each retry (the trainer resumes where it stopped)."""
    return GRID.resources(scale_of(wildcards))["runtime"] * 2 ** (attempt - 1)


def launcher(wildcards, resources):
    """torchrun when a run has several GPUs; locally, gpu_slots gives each job its own devices."""
    gpus = int(resources.gpu)
    python = f"python -m workflow.scripts.gpu_slots --gpus {gpus} -- python"
    if gpus > 1:
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node {gpus}"
    return python


rule configure_run:
    output:
        f"{R}/runs/{{run}}/config.yaml",
    params:
        config=lambda wildcards: GRID.run_config(wildcards.run),
    localrule: True
    run:
        Path(output[0]).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(output[0] + ".tmp")
        tmp.write_text(yaml.safe_dump(params.config, sort_keys=False))
        tmp.replace(output[0])


rule train_run:
    input:
        config=f"{R}/runs/{{run}}/config.yaml",
        data=DATA_META,
    output:
        final=f"{R}/runs/{{run}}/final.pt",
        info=f"{R}/runs/{{run}}/train.json",
    params:
        dir=lambda wildcards: run_dir(wildcards.run),
        launcher=launcher,
    resources:
        gpu=resource("gpu"),
        cpus_per_gpu=resource("cpus_per_gpu"),
        mem_mb=resource("mem_mb"),
        runtime=train_runtime,
    retries: 2
    shell:
        # one log per attempt: logs/train.attempt<N>.log
        "mkdir -p {params.dir}/logs; "
        "n=$(find {params.dir}/logs -name 'train.attempt*.log' | wc -l); "
        "{params.launcher} -m trainer.train --config {input.config} --out {params.dir} "
        "--on-config-change restart > {params.dir}/logs/train.attempt$((n + 1)).log 2>&1"


rule evaluate:
    input:
        final=f"{R}/runs/{{run}}/final.pt",
        config=f"{R}/runs/{{run}}/config.yaml",
    output:
        f"{R}/runs/{{run}}/eval.json",
    params:
        dir=lambda wildcards: run_dir(wildcards.run),
    resources:
        gpu=lambda wildcards: min(1, GRID.resources(scale_of(wildcards))["gpu"]),
        cpus_per_gpu=resource("cpus_per_gpu"),
        mem_mb=resource("mem_mb"),
        runtime=lambda wildcards, attempt: 60 * attempt,
    retries: 1
    shell:
        "python -m workflow.scripts.gpu_slots --gpus {resources.gpu} -- "
        "python -m trainer.evaluate --run {params.dir} > {params.dir}/logs/evaluate.log 2>&1"
