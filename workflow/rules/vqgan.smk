# Stage 0: train the VQGAN (or import a taming-transformers checkpoint), then tokenize every split.


rule vqgan:
    input:
        **inputs("vqgan", config),
    output:
        STAGES["vqgan"].outputs,
    params:
        cfg=sections("vqgan"),
        code=code("vqgan"),
        shards=lambda w, input: folder(input.prepare),
        run_dir=lambda w, output: folder(output[0], 2),
    log:
        f"{LOGS}/vqgan.log",
    threads: TRAIN_THREADS
    conda:
        ENV
    resources:
        **training("vqgan"),
    shell:
        "latent-inpaint train-vqgan --quiet --processes {resources.processes} --restart-on-change"
        " --config-json {params.cfg:q} --shards {params.shards} --run-dir {params.run_dir} 2>&1 | tee {log}"


rule tokens:
    input:
        **inputs("tokens", config),
    output:
        STAGES["tokens"].outputs,
    params:
        code=code("tokens"),
        shards=lambda w, input: folder(input.prepare),
        vqgan=lambda w, input: folder(input.vqgan, 2),
        tokens=lambda w, output: folder(output[0]),
    log:
        f"{LOGS}/tokens.log",
    conda:
        ENV
    resources:
        **job_resources("tokens"),
    shell:
        "latent-inpaint tokenize --quiet --vqgan {params.vqgan} --shards {params.shards} --out {params.tokens}"
        " 2>&1 | tee {log}"
