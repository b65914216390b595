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
    threads: TRAIN["workers"] + 1
    resources:
        mem_mb=16000,
        runtime=2880,
        gpu=1,
    shell:
        "latent-inpaint train-encoder --quiet --restart-on-change --config-json {params.cfg:q} --vqgan runs/vqgan/final"
        " --shards data/shards --tokens data/tokens --run-dir runs/encoder 2>&1 | tee {log}"


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
    threads: 2
    resources:
        mem_mb=32000,
        runtime=4320,
        gpu=1,
    shell:
        "latent-inpaint train-transformer --quiet --restart-on-change --config-json {params.cfg:q} --vqgan runs/vqgan/final"
        " --tokens data/tokens --run-dir runs/transformer 2>&1 | tee {log}"


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
    threads: TRAIN["workers"] + 1
    resources:
        mem_mb=16000,
        runtime=2880,
        gpu=1,
    shell:
        "latent-inpaint train-decoder --quiet --restart-on-change --config-json {params.cfg:q}"
        " --vqgan runs/vqgan/final --shards data/shards --tokens data/tokens --run-dir runs/decoder 2>&1 | tee {log}"
