# Token shards for the experiment (not for `published`, which trains nothing).
if not PUBLISHED:

    rule prepare_data:
        output:
            DATA_META,
        log:
            LAYOUT.log("prepare_data"),
        localrule: True
        conda:
            ENV
        params:
            arguments=prepare_arguments,
        shell:
            "python -m data.prepare {params.arguments:q} > {log:q} 2>&1"
