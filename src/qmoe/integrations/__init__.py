"""qmoe inside other libraries' models.

    qmoe.integrations.transformers    patch / unpatch Hugging Face transformers models: their MoE
                                      blocks (GPT-OSS, Qwen3-MoE, DeepSeek-V3 / Kimi-K2, DeepSeek-V4)
                                      run on qmoe (the `qmoe[transformers]` extra; transformers itself
                                      is never imported by qmoe)

Import the submodule you use; this package imports nothing.
"""
