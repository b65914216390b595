# Stages 1-3: the restrictive encoder (images + tokens), the transformer (tokens alone), the decoder.
# Sampling parameters are read by no rule here: changing them retrains nothing.


rule encoder:
    input:
        "data/shards/manifest.json",
        "data/tokens/metrics.json",
        "runs/vqgan/final/config.json",
    output:
        "runs/encoder/final/config.json",
    params:
        cfg=sections("encoder", "masks", "train"),
    log:
        "logs/encoder.log",
    threads: PROCESSES * (TRAIN["workers"] + 1)
    resources:
        **job_resources("train", gpus=PROCESSES),
        processes=PROCESSES,
    shell:
        "latent-inpaint train-encoder --quiet --processes {resources.processes} --restart-on-change"
        " --config-json {params.cfg:q} --vqgan runs/vqgan/final --shards data/shards --tokens data/tokens"
        " --run-dir runs/encoder 2>&1 | tee {log}"


rule transformer:
    input:
        "data/tokens/metrics.json",
        "runs/vqgan/final/config.json",
    output:
        "runs/transformer/final/config.json",
    params:
        cfg=sections("transformer", "train"),
    log:
        "logs/transformer.log",
    threads: PROCESSES * (TRAIN["workers"] + 1)
    resources:
        **job_resources("train", gpus=PROCESSES),
        processes=PROCESSES,
    shell:
        "latent-inpaint train-transformer --quiet --processes {resources.processes} --restart-on-change"
        " --config-json {params.cfg:q} --vqgan runs/vqgan/final --tokens data/tokens --run-dir runs/transformer"
        " 2>&1 | tee {log}"


rule decoder:
    input:
        "data/shards/manifest.json",
        "data/tokens/metrics.json",
        "runs/vqgan/final/config.json",
    output:
        "runs/decoder/final/config.json",
    params:
        cfg=sections("decoder", "masks", "train", "weights", "encoder"),
    log:
        "logs/decoder.log",
    threads: PROCESSES * (TRAIN["workers"] + 1)
    resources:
        **job_resources("train", gpus=PROCESSES),
        processes=PROCESSES,
    shell:
        "latent-inpaint train-decoder --quiet --processes {resources.processes} --restart-on-change"
        " --config-json {params.cfg:q} --vqgan runs/vqgan/final --shards data/shards --tokens data/tokens"
        " --run-dir runs/decoder 2>&1 | tee {log}"
