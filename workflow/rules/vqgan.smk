# Stage 0: train the VQGAN (or import a taming-transformers checkpoint), then tokenize every split.

TRAIN = config["train"]


rule vqgan:
    input:
        "data/shards/manifest.json",
    output:
        "runs/vqgan/final/config.json",
    params:
        cfg=sections("vqgan", "train", "weights"),
    log:
        "logs/vqgan.log",
    threads: PROCESSES * (TRAIN["workers"] + 1)
    resources:
        **job_resources("train", gpus=PROCESSES),
        processes=PROCESSES,
    shell:
        "latent-inpaint train-vqgan --quiet --processes {resources.processes} --restart-on-change"
        " --config-json {params.cfg:q} --shards data/shards --run-dir runs/vqgan 2>&1 | tee {log}"


rule tokens:
    input:
        "data/shards/manifest.json",
        "runs/vqgan/final/config.json",
    output:
        "data/tokens/metrics.json",
    log:
        "logs/tokens.log",
    resources:
        **job_resources("infer"),
    shell:
        "latent-inpaint tokenize --quiet --vqgan runs/vqgan/final"
        " --shards data/shards --out data/tokens 2>&1 | tee {log}"
