# Sampling and evaluation over the trained parts: these are the only rules that read `sample`,
# so a sampling parameter reruns them and no training. The ablations are variants of the already
# trained parts (the vanilla encoder is the one extra training they need), scored in one job.


rule evaluate:
    input:
        **inputs("evaluate", config),
    output:
        metrics=shown("evaluate", STAGES["evaluate"].done[0]),
        table=shown("evaluate", STAGES["evaluate"].done[1]),
    params:
        cfg=sections("evaluate"),
        code=code("evaluate"),
        shards=lambda w, input: folder(input.prepare),
        masks=lambda w, input: folder(input.masks[0]),
        runs=lambda w, input: runs_folder(input),
    log:
        f"{LOGS}/evaluate.log",
    conda:
        ENV
    resources:
        **job_resources("evaluate"),
    shell:
        "latent-inpaint evaluate --quiet --baseline --config-json {params.cfg:q} --runs {params.runs}"
        " --shards {params.shards} --masks {params.masks} --out {output.metrics} --table {output.table}"
        " 2>&1 | tee {log}"


if ABLATION_FILES:  # one job for every ablation: imports, models and the real images' features loaded once

    rule ablation:
        input:
            **inputs("ablation", config),
        output:
            shown("ablation", ABLATION_FILES),
        params:
            cfg=sections("ablation"),
            code=code("ablation"),
            variants=" ".join(Path(f).stem for f in ABLATION_FILES),
            shards=lambda w, input: folder(input.prepare),
            masks=lambda w, input: folder(input.masks[0]),
            runs=lambda w, input: runs_folder(input),
            out=lambda w, output: folder(output[0]),
        log:
            f"{LOGS}/ablation.log",
        conda:
            ENV
        resources:
            **job_resources("ablation"),
        shell:
            "latent-inpaint ablations --quiet --variants {params.variants} --config-json {params.cfg:q}"
            " --runs {params.runs} --shards {params.shards} --masks {params.masks} --out {params.out} 2>&1 | tee {log}"


rule report:
    input:
        **inputs("report", config),
    output:
        shown("report", RULES["report"].outputs),
    params:
        cfg=sections("report"),
        code=code("report"),
        shards=lambda w, input: folder(input.prepare),
        masks=lambda w, input: folder(input.masks[0]),
        runs=lambda w, input: runs_folder(input),
        results=lambda w, output: folder(output[0]),
        skipped=json.dumps(skipped_ablations(config)),
    log:
        f"{LOGS}/report.log",
    conda:
        ENV
    resources:
        **job_resources("report"),
    shell:
        "latent-inpaint report --quiet --config-json {params.cfg:q} --results {params.results} --runs {params.runs}"
        " --shards {params.shards} --masks {params.masks} --ablations {input.ablation}"
        " --skipped-ablations {params.skipped:q} 2>&1 | tee {log}"
