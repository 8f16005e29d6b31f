"""Developer tools, apart from the user's benchmark entry points in benchmarks/.

    python tools/cost_model.py       the GPU cost model of one LM-head step per phase (docs/cost_model.md)
    python tools/tile_sweep.py       the forward and d_logits kernels under other tile configurations (GPU)
    python tools/sparsity_sweep.py   how grad_tolerance's kept fraction and speed move with the inputs (CPU)
    python tools/contention.py       the CPU path's step time beside busy processes
    python tools/dw_accumulation.py  dW's error when a 16-bit gradient accumulates the fused pass's groups
    python tools/fused_pass.py       FastDPOLoss's fused route against its two-pass path: time and error (CPU)
"""
