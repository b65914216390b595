# Stages 1-3: the restrictive encoder (images + tokens), the transformer (tokens alone), the
# decoder; and the vanilla encoder, trained only for its ablation. No rule here reads `sample`:
# changing a sampling parameter retrains nothing.


rule encoder:
    input:
        **inputs("encoder", config),
    output:
        STAGES["encoder"].outputs,
    params:
        cfg=sections("encoder"),
        code=code("encoder"),
        shards=lambda w, input: folder(input.prepare),
        tokens=lambda w, input: folder(input.tokens),
        vqgan=lambda w, input: folder(input.vqgan, 2),
        run_dir=lambda w, output: folder(output[0], 2),
    log:
        f"{LOGS}/encoder.log",
    threads: TRAIN_THREADS
    conda:
        ENV
    resources:
        **training("encoder"),
    shell:
        "latent-inpaint train-encoder --quiet --processes {resources.processes} --restart-on-change"
        " --config-json {params.cfg:q} --vqgan {params.vqgan} --shards {params.shards} --tokens {params.tokens}"
        " --run-dir {params.run_dir} 2>&1 | tee {log}"


rule encoder_vanilla:
    input:
        **inputs("encoder_vanilla", config),
    output:
        STAGES["encoder_vanilla"].outputs,
    params:
        cfg=sections("encoder_vanilla"),
        code=code("encoder_vanilla"),
        shards=lambda w, input: folder(input.prepare),
        tokens=lambda w, input: folder(input.tokens),
        vqgan=lambda w, input: folder(input.vqgan, 2),
        run_dir=lambda w, output: folder(output[0], 2),
    log:
        f"{LOGS}/encoder_vanilla.log",
    threads: TRAIN_THREADS
    conda:
        ENV
    resources:
        **training("encoder_vanilla"),
    shell:
        "latent-inpaint train-encoder --quiet --processes {resources.processes} --kind vanilla --restart-on-change"
        " --config-json {params.cfg:q} --vqgan {params.vqgan} --shards {params.shards} --tokens {params.tokens}"
        " --run-dir {params.run_dir} 2>&1 | tee {log}"


rule transformer:
    input:
        **inputs("transformer", config),
    output:
        STAGES["transformer"].outputs,
    params:
        cfg=sections("transformer"),
        code=code("transformer"),
        tokens=lambda w, input: folder(input.tokens),
        vqgan=lambda w, input: folder(input.vqgan, 2),
        run_dir=lambda w, output: folder(output[0], 2),
    log:
        f"{LOGS}/transformer.log",
    threads: TRAIN_THREADS
    conda:
        ENV
    resources:
        **training("transformer"),
    shell:
        "latent-inpaint train-transformer --quiet --processes {resources.processes} --restart-on-change"
        " --config-json {params.cfg:q} --vqgan {params.vqgan} --tokens {params.tokens}"
        " --run-dir {params.run_dir} 2>&1 | tee {log}"


rule decoder:
    input:
        **inputs("decoder", config),
    output:
        STAGES["decoder"].outputs,
    params:
        cfg=sections("decoder"),
        code=code("decoder"),
        shards=lambda w, input: folder(input.prepare),
        tokens=lambda w, input: folder(input.tokens),
        vqgan=lambda w, input: folder(input.vqgan, 2),
        run_dir=lambda w, output: folder(output[0], 2),
    log:
        f"{LOGS}/decoder.log",
    threads: TRAIN_THREADS
    conda:
        ENV
    resources:
        **training("decoder"),
    shell:
        "latent-inpaint train-decoder --quiet --processes {resources.processes} --restart-on-change"
        " --config-json {params.cfg:q} --vqgan {params.vqgan} --shards {params.shards} --tokens {params.tokens}"
        " --run-dir {params.run_dir} 2>&1 | tee {log}"
