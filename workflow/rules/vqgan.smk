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
    threads: TRAIN["workers"] + 1
    resources:
        mem_mb=16000,
        runtime=2880,
        gpu=1,
    shell:
        "latent-inpaint train-vqgan --quiet --restart-on-change --config-json {params.cfg:q}"
        " --shards data/shards --run-dir runs/vqgan 2>&1 | tee {log}"


rule tokens:
    input:
        "data/shards/manifest.json",
        "runs/vqgan/final/config.json",
    output:
        "data/tokens/metrics.json",
    log:
        "logs/tokens.log",
    resources:
        mem_mb=8000,
        runtime=600,
        gpu=1,
    shell:
        "latent-inpaint tokenize --quiet --vqgan runs/vqgan/final"
        " --shards data/shards --out data/tokens 2>&1 | tee {log}"
