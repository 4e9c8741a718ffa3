# Token shards for the experiment (not for `published`, which trains nothing).
DATA_META = f"{config['data']['dir']}/meta.json" if not PUBLISHED else []


def prepare_arguments(wildcards):
    data = config["data"]
    prepare = data.get("prepare") or {}
    source = prepare.get("source")
    if source is None:
        raise WorkflowError(f"{data['dir']}/meta.json is missing and data.prepare says nothing about how to make it")
    tokenizer = "" if source == "pretokenized" else f"--tokenizer {data.get('tokenizer', 'gpt2')}"
    return f"{source} --out {data['dir']} {tokenizer} {prepare.get('args', '')}"


if not PUBLISHED:

    rule prepare_data:
        output:
            DATA_META,
        params:
            arguments=prepare_arguments,
        log:
            f"{R}/logs/prepare_data.log",
        localrule: True
        shell:
            "python -m data.prepare {params.arguments} > {log} 2>&1"
