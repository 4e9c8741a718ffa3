# One run: configure (local) -> train (a GPU job, retried with more time) -> evaluate.
# Rerun triggers: a run's config is a `params` of configure_run, so changing a run-config value
# reruns exactly the runs whose config changed; the trainer is called through `shell` and no
# trainer file is an input, so editing trainer code restarts nothing.


rule configure_run:
    output:
        RUN.config,
    log:
        LAYOUT.log("configure_run", "{run}"),
    localrule: True
    conda:
        ENV
    params:
        config=lambda wildcards: GRID.run_config(wildcards.run),
    script:
        "../scripts/configure_run.py"


rule train_run:
    input:
        config=rules.configure_run.output[0],
        data=DATA_META,
    output:
        final=RUN.final,
        info=RUN.train_info,
    log:
        # the trainer's own output goes to RUN/logs/train.attempt<N>.log, one per attempt
        LAYOUT.log("train_run", "{run}"),
    retries: 2
    conda:
        ENV
    resources:
        gpu=scale_resource("gpu"),
        cpus_per_gpu=scale_resource("cpus_per_gpu"),
        mem_mb=scale_resource("mem_mb"),
        runtime=train_runtime,
    params:
        dir=run_dir,
        launcher=launcher,
    shell:
        "(mkdir -p {params.dir:q}/logs; "
        "n=$(find {params.dir:q}/logs -name 'train.attempt*.log' | wc -l); "
        "echo attempt $((n + 1)); "
        "{params.launcher:q} -m trainer.train --config {input.config:q} --out {params.dir:q} "
        "--on-config-change restart > {params.dir:q}/logs/train.attempt$((n + 1)).log 2>&1) > {log:q} 2>&1"


rule evaluate:
    input:
        final=rules.train_run.output.final,
        config=rules.configure_run.output[0],
    output:
        RUN.evaluation,
    log:
        f"{RUN.logs}/evaluate.log",
    retries: 1
    conda:
        ENV
    resources:
        gpu=lambda wildcards: min(
            1, GRID.resources(GRID.runs[wildcards.run].key.scale)["gpu"]
        ),
        cpus_per_gpu=scale_resource("cpus_per_gpu"),
        mem_mb=scale_resource("mem_mb"),
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        dir=run_dir,
    shell:
        "python -m workflow.scripts.gpu_slots --gpus {resources.gpu:q} -- "
        "python -m trainer.evaluate --run {params.dir:q} > {log:q} 2>&1"
