# The authors' released models (pretrained.official): imported as runs/*/final in place of every
# training rule; evaluation and report then read them (workflow/dag.py `pipeline`).


rule import_official:
    input:
        **inputs(IMPORT, config),
    output:
        RULES[IMPORT].outputs,
    params:
        cfg=sections(IMPORT),
        code=code(IMPORT),
        checkpoints=lambda w, input: folder(input.checkpoints[0]),
        model=config["pretrained"]["model"],
        runs=lambda w, output: folder(output[0], 3),
    log:
        f"{LOGS}/{IMPORT}.log",
    conda:
        ENV
    resources:
        **job_resources(IMPORT),
    shell:
        "latent-inpaint import-official {params.checkpoints:q} --model {params.model} --config-json {params.cfg:q}"
        " --runs {params.runs} 2>&1 | tee {log}"
