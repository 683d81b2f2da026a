"""The model engine shared by the prefill and decode workers.

    arch.py           ModelArch: a Llama/Qwen2 config.json, parsed
    model.py          LlamaModel: the decoder over the paged KV cache (rope.py, cpu_linear.py)
    hf_loader.py      load_hf_checkpoint: config.json + *.safetensors -> (ModelArch, LlamaModel)
    paged_cache.py    PagedKVCache: the block pool, export_blocks / import_blocks
    block_manager.py  BlockManager: the one owner of the pool's blocks (free list,
                      reference counts, hash registry for prefix reuse)
    runner.py         ModelRunner: prefill() and decode_step() (sequence.py: Sequence)
    sampling.py       greedy / seeded sampling, stop conditions
    llm_engine.py     LLMEngine: the continuous-batching loop
    tiny.py           write_tiny_model: deterministic random tiny models for tests
"""
