# runs.csv, per-comparison run lists, tables, figures and the plan (all local and cheap).


rule experiment_file:
    # The analysis steps read scales, vocabulary and comparisons from this resolved copy.
    output:
        LAYOUT.experiment_file,
    log:
        LAYOUT.log("experiment_file"),
    localrule: True
    conda:
        ENV
    params:
        config={
            **{
                k: config[k]
                for k in ("experiment", "scales", "comparisons", "protocol")
                if k in config
            },
            "axes": GRID.axes,
        },
    script:
        "../scripts/configure_run.py"


if not PUBLISHED:

    rule aggregate:
        input:
            runs=eval_inputs(GRID.runs),
            experiment=rules.experiment_file.output[0],
        output:
            RUNS_CSV,
        log:
            LAYOUT.log("aggregate"),
        localrule: True
        conda:
            ENV
        params:
            runs_dir=lambda wildcards: LAYOUT.runs_dir,
            ids=list(GRID.runs),
        shell:
            "python -m workflow.scripts.aggregate --experiment {input.experiment:q} "
            "--runs-dir {params.runs_dir:q} --runs {params.ids:q} --out {output:q} > {log:q} 2>&1"

    rule comparison_runs:
        # Only the runs a comparison needs: one figure or table trains only its comparison.
        input:
            runs=lambda wildcards: eval_inputs(GRID.members_runs(wildcards.comparison)),
            experiment=rules.experiment_file.output[0],
        output:
            LAYOUT.comparison_csv("{comparison}"),
        log:
            LAYOUT.log("comparison_runs", "{comparison}"),
        localrule: True
        conda:
            ENV
        params:
            runs_dir=lambda wildcards: LAYOUT.runs_dir,
            ids=lambda wildcards: GRID.members_runs(wildcards.comparison),
        shell:
            "python -m workflow.scripts.aggregate --experiment {input.experiment:q} "
            "--runs-dir {params.runs_dir:q} --runs {params.ids:q} --out {output:q} > {log:q} 2>&1"

else:

    rule fetch_published:
        # The paper's CSVs: from --config published_dir=..., else downloaded once from pinned URLs.
        output:
            "resources/published/{file}",
        log:
            "resources/published/{file}.log",
        wildcard_constraints:
            file=one_of(PUBLISHED_FILES),
        localrule: True
        conda:
            ENV
        params:
            entry=lambda wildcards: PUBLISHED_FILES[wildcards.file],
            local=config.get("published_dir"),
            unverified=config["published_unverified"],
        script:
            "../scripts/fetch_published.py"

    rule import_published:
        input:
            csv=[f"resources/published/{f}" for f in PUBLISHED_FILES],
            experiment=rules.experiment_file.output[0],
        output:
            RUNS_CSV,
        log:
            LAYOUT.log("import_published"),
        localrule: True
        conda:
            ENV
        shell:
            "python -m workflow.scripts.import_published --csv {input.csv:q} "
            "--experiment {input.experiment:q} --out {output:q} > {log:q} 2>&1"


rule table:
    input:
        runs=comparison_csv,
        experiment=rules.experiment_file.output[0],
    output:
        csv=report(
            LAYOUT.table("{comparison}", "{table}", "csv"),
            category="{comparison}",
            subcategory="tables",
            labels={"table": "{table}"},
        ),
        md=LAYOUT.table("{comparison}", "{table}", "md"),
        tex=LAYOUT.table("{comparison}", "{table}", "tex"),
    log:
        LAYOUT.log("table", "{comparison}-{table}"),
    localrule: True
    conda:
        ENV
    params:
        out_dir=lambda wildcards: LAYOUT.tables_dir(wildcards.comparison),
    shell:
        "python -m workflow.scripts.tables --runs {input.runs:q} --experiment {input.experiment:q} "
        "--comparison {wildcards.comparison:q} --out-dir {params.out_dir:q} "
        "--only {wildcards.table:q} > {log:q} 2>&1"


rule figure:
    input:
        runs=comparison_csv,
        experiment=rules.experiment_file.output[0],
    output:
        pdf=LAYOUT.figure("{comparison}", "{figure}", "pdf"),
        png=report(
            LAYOUT.figure("{comparison}", "{figure}", "png"),
            caption="../report/figure.rst",
            category="{comparison}",
            subcategory="figures",
            labels={"figure": "{figure}"},
        ),
    log:
        LAYOUT.log("figure", "{comparison}-{figure}"),
    localrule: True
    conda:
        ENV
    params:
        out_dir=lambda wildcards: LAYOUT.figures_dir(wildcards.comparison),
        runs_dir=[] if PUBLISHED else ["--runs-dir", LAYOUT.runs_dir],
    shell:
        # --placeholder: a figure the data cannot give is a page that says why (the run goes on)
        "python -m workflow.scripts.figures --runs {input.runs:q} --experiment {input.experiment:q} "
        "--comparison {wildcards.comparison:q} --out-dir {params.out_dir:q} "
        "--only {wildcards.figure:q} --placeholder {params.runs_dir:q} > {log:q} 2>&1"


rule plan:
    # `snakemake plan`: jobs left per rule and scale, GPU-hours, finished runs (printed and logged).
    log:
        LAYOUT.plan_log,
    localrule: True
    conda:
        ENV
    run:
        write_plan(log[0])
