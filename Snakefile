# The experiment pipeline: experiment file -> run configs -> training -> evaluation -> runs.csv
# -> the paper's tables and figures. See README.md; every experiment key: config/README.md.
from snakemake.utils import min_version

min_version("8.0")


# The demo is the default; --configfile config/X.yaml replaces it (rather than being merged into it).
if not workflow.overwrite_configfiles:

    configfile: "config/demo.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/analysis.smk"


rule all:
    default_target: True
    input:
        LAYOUT.runs_csv,
        figure_targets(),
        table_targets(),


rule train:
    input:
        expand(rules.train_run.output.final, run=list(GRID.runs)),


rule figures:
    input:
        figure_targets(),


rule tables:
    input:
        table_targets(),


onsuccess:
    print(summary(LAYOUT, list(GRID.comparisons)))
