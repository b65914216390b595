# Sampling and evaluation over the trained parts: these are the only rules that read `sample`,
# so a sampling parameter reruns them and no training. Ablations are wildcards over already
# trained parts (the vanilla encoder is the one extra training they need).

FINALS = expand("runs/{stage}/final/config.json", stage=["vqgan", "encoder", "transformer", "decoder"])
ABLATIONS = config["evaluate"]["ablations"]


rule encoder_vanilla:
    input:
        "data/shards/manifest.json",
        "data/tokens/metrics.json",
        "runs/vqgan/final/config.json",
    output:
        "runs/encoder_vanilla/final/config.json",
    params:
        cfg=sections("encoder", "masks", "train"),
    log:
        "logs/encoder_vanilla.log",
    threads: PROCESSES * (TRAIN["workers"] + 1)
    resources:
        **job_resources("train", gpus=PROCESSES),
        processes=PROCESSES,
    shell:
        "latent-inpaint train-encoder --quiet --processes {resources.processes} --kind vanilla --restart-on-change"
        " --config-json {params.cfg:q} --vqgan runs/vqgan/final --shards data/shards --tokens data/tokens"
        " --run-dir runs/encoder_vanilla"
        " 2>&1 | tee {log}"


rule evaluate:
    input:
        FINALS,
        "data/masks/manifest.json",
    output:
        "results/metrics.json",
        "results/table1.md",
    params:
        cfg=sections("sample", "evaluate", "weights"),
    log:
        "logs/evaluate.log",
    resources:
        **job_resources("infer"),
    shell:
        "latent-inpaint evaluate --quiet --baseline --config-json {params.cfg:q}"
        " --out results/metrics.json --table results/table1.md 2>&1 | tee {log}"


rule ablation:
    input:
        FINALS,
        "data/masks/manifest.json",
        lambda wc: ["runs/encoder_vanilla/final/config.json"] if wc.variant == "vanilla_encoder" else [],
    output:
        "results/ablations/{variant}.json",
    params:
        cfg=sections("sample", "evaluate", "weights"),
    log:
        "logs/ablation_{variant}.log",
    resources:
        **job_resources("infer"),
    shell:
        "latent-inpaint evaluate --quiet --variant {wildcards.variant} --kinds box --no-diversity"
        " --config-json {params.cfg:q} --out {output} 2>&1 | tee {log}"


rule report:
    input:
        FINALS,
        "results/metrics.json",
        ablations=expand("results/ablations/{variant}.json", variant=ABLATIONS),
    output:
        "results/report.md",
        "results/samples.png",
    params:
        cfg=sections("sample"),
    log:
        "logs/report.log",
    resources:
        **job_resources("light", gpus=0),
    shell:
        "latent-inpaint report --quiet --config-json {params.cfg:q} --ablations {input.ablations} 2>&1 | tee {log}"
