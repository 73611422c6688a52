"""FlashInfer's fused-MoE kernels behind qmoe's protocol, all through one compat module.

    cutlass.py   flashinfer_cutlass: SM90 CUTLASS W4A16 (MXFP4 weights, bf16 activations); checked on an H100
    trtllm.py    flashinfer_trtllm: trtllm-gen MXFP4 / int4 W4A16 on SM100 / SM12x; experimental
    cutedsl.py   flashinfer_cutedsl: CuTe-DSL NVFP4 W4A16 on SM100; experimental
    compat.py    everything version-dependent: probing, keyword-only calls, layouts stamped with the
                 version that made them, the known-defect table and its one override

Experimental paths are gated until qmoe has checked them against its reference on such a GPU
(QMOE_FLASHINFER_FORCE=1 runs them anyway).
"""
