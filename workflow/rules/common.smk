# The grid, run ids, targets and the helper functions of the rules, computed once from the
# validated experiment file. Names are checked by the grid (safe names only); every shell rule
# quotes what it interpolates ({x:q}) and every wildcard constraint escapes what it embeds.
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(
    0, workflow.basedir
)  # the repo root: trainer/, data/, workflow/scripts/

from trainer.contract import RUN_FIGURES
from workflow.scripts.grid import ExperimentError, Grid, coerce_numbers, one_of
from workflow.scripts.plan import plan, report as plan_text
from workflow.scripts.runids import RUN_WILDCARD
from workflow.scripts.summary import summary

coerce_numbers(config)
validate(config, "../schemas/experiment.schema.yaml")
try:
    GRID = Grid(config)
except ExperimentError as err:
    raise WorkflowError(f"experiment file: {err}") from None

LAYOUT = GRID.layout  # every path of results/<experiment>/ (trainer/contract.py)
RUN = LAYOUT.run("{run}")  # the files of one run, with the `run` wildcard
ENV = "../../environment.yml"
PUBLISHED = bool(config.get("published"))
if not PUBLISHED and not GRID.runs:
    raise WorkflowError(
        "experiment file: grids: empty (no runs to train and nothing `published`)"
    )
if not PUBLISHED and "data" not in config:
    raise WorkflowError(
        "experiment file: data: missing (where the shards are, and how to prepare them)"
    )
for _name in GRID.comparisons:
    _absent = [] if PUBLISHED else GRID.absent_members(_name)
    if _absent:
        raise WorkflowError(
            f"experiment file: comparisons.{_name}: no run of the grids is {', '.join(_absent)}"
        )
TABLES = config["tables"]
# runs.csv is in the report too (snakemake --report results/<experiment>/report.html)
RUNS_CSV = report(LAYOUT.runs_csv, category="runs", labels={"file": "runs.csv"})
DATA_META = [] if PUBLISHED else f"{config['data']['dir']}/meta.json"
PUBLISHED_FILES = {p["file"]: p for p in config.get("published") or []}
try:  # extra arguments of data.prepare: split as a shell would, then passed quoted, word by word
    PREPARE_ARGS = (
        []
        if PUBLISHED
        else shlex.split(config["data"].get("prepare", {}).get("args", ""))
    )
except ValueError as err:
    raise WorkflowError(f"experiment file: data.prepare.args: {err}") from None


wildcard_constraints:
    run=RUN_WILDCARD,
    comparison=one_of(GRID.comparisons),
    table=one_of(TABLES),
    figure="[a-z_]+",


# --- targets -------------------------------------------------------------------------------


def figures_of(comparison):
    """The experiment's figures that make sense for this comparison."""
    names = []
    for name in config["figures"]:
        if name == "b_ratio_hist" and not any(
            m.method == "baseline" for m in GRID.comparisons[comparison].members
        ):
            continue  # the histogram is of the baseline member
        if name in RUN_FIGURES and PUBLISHED:
            continue  # published runs have no run directories
        names.append(name)
    return names


def figure_targets():
    return [
        LAYOUT.figure(c, f, ext)
        for c in GRID.comparisons
        for f in figures_of(c)
        for ext in ("pdf", "png")
    ]


def table_targets():
    return [
        LAYOUT.table(c, t, ext)
        for c in GRID.comparisons
        for t in TABLES
        for ext in ("csv", "md", "tex")
    ]


# --- runs ----------------------------------------------------------------------------------


def run_dir(wildcards):
    return LAYOUT.run(wildcards.run).path


def scale_resource(name):
    return lambda wildcards: GRID.resources(GRID.runs[wildcards.run].key.scale)[name]


def train_runtime(wildcards, attempt):
    """Minutes: the scale's runtime, doubled on each retry (the trainer resumes where it stopped)."""
    return GRID.resources(GRID.runs[wildcards.run].key.scale)["runtime"] * 2 ** (
        attempt - 1
    )


def launcher(wildcards, resources):
    """torchrun when a run has several GPUs; locally, gpu_slots gives each job its own devices."""
    gpus = int(resources.gpu)
    python = f"python -m workflow.scripts.gpu_slots --gpus {gpus} -- python"
    if gpus > 1:
        python += f" -m torch.distributed.run --standalone --nproc_per_node {gpus}"
    return python.split()  # words, quoted one by one by the rule


def prepare_arguments(wildcards):
    """The arguments of `python -m data.prepare`, one list item per word (the rule quotes each)."""
    data = config["data"]
    source = (data.get("prepare") or {}).get("source")
    if source is None:
        raise WorkflowError(
            f"{data['dir']}/meta.json is missing and data.prepare says nothing about how to make it"
        )
    tokenizer = (
        []
        if source == "pretokenized"
        else ["--tokenizer", data.get("tokenizer", "gpt2")]
    )
    return [source, "--out", data["dir"], *tokenizer, *PREPARE_ARGS]


# --- analysis ------------------------------------------------------------------------------


def eval_inputs(run_ids):
    """What aggregate reads of each run: its eval.json and train.json."""
    return expand(
        [rules.evaluate.output[0], rules.train_run.output.info], run=list(run_ids)
    )


def comparison_csv(wildcards):
    if PUBLISHED:
        return rules.import_published.output[0]
    return rules.comparison_runs.output[0].format(comparison=wildcards.comparison)


def write_plan(path):
    """Print the plan and keep a copy in the log."""
    text = plan_text(GRID, plan(GRID))
    print(text)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
