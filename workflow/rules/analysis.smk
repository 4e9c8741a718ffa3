# runs.csv, per-comparison run lists, tables and figures (all local, cheap).
import hashlib
import re
import shutil
import urllib.request
import warnings


rule experiment_file:
    # The analysis steps read scales, vocabulary and comparisons from this resolved copy.
    output:
        f"{R}/experiment.yaml",
    params:
        experiment={k: config.get(k) for k in ("experiment", "scales", "comparisons", "protocol")},
    localrule: True
    run:
        Path(output[0]).parent.mkdir(parents=True, exist_ok=True)
        Path(output[0]).write_text(yaml.safe_dump(params.experiment, sort_keys=False))


def eval_inputs(run_ids):
    return [f"{R}/runs/{r}/{name}" for r in run_ids for name in ("eval.json", "train.json")]


if not PUBLISHED:

    rule aggregate:
        input:
            runs=eval_inputs(GRID.runs),
            experiment=f"{R}/experiment.yaml",
        output:
            f"{R}/runs.csv",
        params:
            ids=" ".join(GRID.runs),
        localrule: True
        shell:
            "python -m workflow.scripts.aggregate --experiment {input.experiment} "
            "--runs-dir {R}/runs --runs {params.ids} --out {output}"

    rule comparison_runs:
        # Only the runs a comparison needs: one figure or table trains only its comparison.
        input:
            runs=lambda wildcards: eval_inputs(GRID.members_runs(wildcards.comparison)),
            experiment=f"{R}/experiment.yaml",
        output:
            f"{R}/comparisons/{{comparison}}.csv",
        params:
            ids=lambda wildcards: " ".join(GRID.members_runs(wildcards.comparison)),
        localrule: True
        shell:
            "python -m workflow.scripts.aggregate --experiment {input.experiment} "
            "--runs-dir {R}/runs --runs {params.ids} --out {output}"

else:

    PUBLISHED_FILES = {p["file"]: p for p in config["published"]}

    rule fetch_published:
        # The paper's CSVs: from --config published_dir=..., else downloaded once from pinned URLs.
        output:
            "resources/published/{file}",
        params:
            entry=lambda wildcards: PUBLISHED_FILES[wildcards.file],
            local=config.get("published_dir"),
        wildcard_constraints:
            file="|".join(re.escape(f) for f in PUBLISHED_FILES),
        localrule: True
        run:
            entry = params.entry
            Path(output[0]).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(output[0] + ".tmp")
            if params.local:
                shutil.copyfile(Path(params.local) / entry["file"], tmp)
            else:
                urllib.request.urlretrieve(entry["url"], tmp)
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            if digest != entry["sha256"]:
                message = f"{entry['file']}: sha256 {digest}, expected {entry['sha256']}"
                if entry.get("exact", True):
                    tmp.unlink()
                    raise WorkflowError(message)
                warnings.warn(message + " (a reconstructed copy; used anyway)")
            tmp.replace(output[0])

    rule import_published:
        input:
            csv=[f"resources/published/{f}" for f in PUBLISHED_FILES],
            experiment=f"{R}/experiment.yaml",
        output:
            f"{R}/runs.csv",
        localrule: True
        shell:
            "python -m workflow.scripts.import_published --csv {input.csv} "
            "--experiment {input.experiment} --out {output}"


def comparison_csv(wildcards):
    return f"{R}/runs.csv" if PUBLISHED else f"{R}/comparisons/{wildcards.comparison}.csv"


rule table:
    input:
        runs=comparison_csv,
        experiment=f"{R}/experiment.yaml",
    output:
        multiext(f"{R}/tables/{{comparison}}/{{table}}", ".csv", ".md", ".tex"),
    localrule: True
    shell:
        "python -m workflow.scripts.tables --runs {input.runs} --experiment {input.experiment} "
        "--comparison {wildcards.comparison} --out-dir {R}/tables/{wildcards.comparison} "
        "--only {wildcards.table}"


rule figure:
    input:
        runs=comparison_csv,
        experiment=f"{R}/experiment.yaml",
    output:
        pdf=f"{R}/figures/{{comparison}}/{{figure}}.pdf",
        png=report(
            f"{R}/figures/{{comparison}}/{{figure}}.png",
            caption="../report/figure.rst",
            category="{comparison}",
            subcategory="{figure}",
        ),
    params:
        runs_dir="" if PUBLISHED else f"--runs-dir {R}/runs",
    localrule: True
    shell:
        "python -m workflow.scripts.figures --runs {input.runs} --experiment {input.experiment} "
        "--comparison {wildcards.comparison} --out-dir {R}/figures/{wildcards.comparison} "
        "--only {wildcards.figure} {params.runs_dir}"
