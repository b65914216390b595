# Data: embedded default photographs -> WebDataset shards -> fixed evaluation masks.

DATA = config["data"]
SOURCE = "data/default" if DATA["source"] == "default" else DATA["source"]


rule default_data:
    output:
        directory("data/default"),
    params:
        images=DATA["default_count"],
        size=DATA["size"],
        seed=DATA["default_seed"],
    log:
        "logs/default_data.log",
    resources:
        **job_resources("light", gpus=0),
    shell:
        "latent-inpaint default-data --count {params.images} --size {params.size}"
        " --seed {params.seed} --out {output} 2>&1 | tee {log}"


rule prepare:
    input:
        SOURCE,
    output:
        "data/shards/manifest.json",
    params:
        cfg=sections("data"),
    log:
        "logs/prepare.log",
    threads: DATA["workers"]
    resources:
        **job_resources("light", gpus=0),
    shell:
        "latent-inpaint prepare --quiet --config-json {params.cfg:q} --set data.workers={threads}"
        " --source {input} --out data/shards 2>&1 | tee {log}"


rule masks:
    input:
        "data/shards/manifest.json",
    output:
        "data/masks/manifest.json",
        "data/masks/masks.png",
    params:
        cfg=sections("masks"),
    log:
        "logs/masks.log",
    resources:
        **job_resources("light", gpus=0),
    shell:
        "latent-inpaint masks --quiet --config-json {params.cfg:q}"
        " --shards data/shards --out data/masks 2>&1 | tee {log}"
