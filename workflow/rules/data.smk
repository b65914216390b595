# Data: embedded default photographs -> WebDataset shards -> fixed evaluation masks.


rule default_data:
    output:
        directory(STAGES["default_data"].done[0]),
    params:
        images=config["data"]["default_count"],
        size=config["data"]["size"],
        seed=config["data"]["default_seed"],
        code=code("default_data"),
    log:
        f"{LOGS}/default_data.log",
    conda:
        ENV
    resources:
        **job_resources("default_data"),
    shell:
        "latent-inpaint default-data --count {params.images} --size {params.size}"
        " --seed {params.seed} --out {output} 2>&1 | tee {log}"


rule prepare:
    input:
        **inputs("prepare", config),
    output:
        STAGES["prepare"].done,
    params:
        cfg=sections("prepare"),
        code=code("prepare"),
        shards=lambda w, output: folder(output[0]),
    log:
        f"{LOGS}/prepare.log",
    threads: config["data"]["workers"]
    conda:
        ENV
    resources:
        **job_resources("prepare"),
    shell:
        "latent-inpaint prepare --quiet --config-json {params.cfg:q} --set data.workers={threads}"
        " --source {input.source} --out {params.shards} 2>&1 | tee {log}"


rule masks:
    input:
        **inputs("masks", config),
    output:
        shown("masks", STAGES["masks"].done),
    params:
        cfg=sections("masks"),
        code=code("masks"),
        shards=lambda w, input: folder(input.prepare),
        masks=lambda w, output: folder(output[0]),
    log:
        f"{LOGS}/masks.log",
    conda:
        ENV
    resources:
        **job_resources("masks"),
    shell:
        "latent-inpaint masks --quiet --config-json {params.cfg:q} --shards {params.shards} --out {params.masks}"
        " 2>&1 | tee {log}"
