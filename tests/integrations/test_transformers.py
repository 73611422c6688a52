"""qmoe.integrations.transformers on tiny random models built with transformers' own config
classes: logits patched vs unpatched (the unpatched model holding the dequantized weights, so only
the kernel's error remains), each family's routing against the model's own router, torch.compile
(fullgraph, one graph for two lengths), checkpoints read directly, MXFP4 re-quantization, unpatch;
on the GPU the patched model under a CUDA graph."""

import copy
import time

import pytest
import torch

import qmoe
from qmoe.nn import hf
from qmoe.weights import save_compressed_tensors, save_gpt_oss, save_modelopt_nvfp4

T = pytest.importorskip("transformers")
from qmoe.integrations.transformers import QmoeBlock, find_blocks, patch, unpatch  # noqa: E402

VOCAB = 128
_ATTN = {"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128}


def gpt_oss(layers=2):
    cfg = T.GptOssConfig(**_ATTN, intermediate_size=64, num_hidden_layers=layers, num_key_value_heads=2, head_dim=16,
                         num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return T.GptOssForCausalLM(cfg)


def qwen3_moe(norm_topk_prob=True):
    cfg = T.Qwen3MoeConfig(**_ATTN, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                           num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                           norm_topk_prob=norm_topk_prob)
    return T.Qwen3MoeForCausalLM(cfg)


def deepseek_v3(n_group=4, topk_group=2, scaling=2.5):
    """n_group=1, topk_group=1: Kimi-K2's routing (its text model is DeepSeek-V3)."""
    cfg = T.DeepseekV3Config(**_ATTN, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                             first_k_dense_replace=1, num_key_value_heads=4, n_routed_experts=8,
                             num_experts_per_tok=2, n_group=n_group, topk_group=topk_group, n_shared_experts=1,
                             routed_scaling_factor=scaling, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=16)
    m = T.DeepseekV3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(5)
    for mod in m.modules():  # a correction bias that matters (transformers initializes it to 0)
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.copy_(torch.randn(mod.e_score_correction_bias.shape, generator=g) * 0.05)
    return m


def deepseek_v4():
    cfg = T.DeepseekV4Config(**{**_ATTN, "max_position_embeddings": 256}, moe_intermediate_size=32,
                             num_hidden_layers=2, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
                             n_routed_experts=8, num_experts_per_tok=2, mlp_layer_types=["hash_moe", "moe"],
                             sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16,
                             index_topk=4, hc_mult=2, num_nextn_predict_layers=0)
    m = T.DeepseekV4ForCausalLM(cfg)
    g = torch.Generator().manual_seed(6)
    for mod in m.modules():
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.05)
        if hasattr(mod, "tid2eid"):  # a hash table naming distinct experts per token
            mod.tid2eid.copy_(torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(VOCAB)]))
    return m


FAMILIES = {  # name: (model maker, format, MoE block names)
    "gpt_oss": (gpt_oss, "mxfp4", ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "qwen3_moe": (qwen3_moe, "nvfp4", ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "deepseek_v3": (deepseek_v3, "int4", ["model.layers.1.mlp", "model.layers.2.mlp"]),
    "kimi_k2": (lambda: deepseek_v3(1, 1, 2.827), "int4", ["model.layers.1.mlp", "model.layers.2.mlp"]),
    "deepseek_v4": (deepseek_v4, "mxfp4", ["model.layers.0.mlp", "model.layers.1.mlp"]),
}


def build(family, seed=0):
    torch.manual_seed(seed)
    make, fmt, names = FAMILIES[family]
    return make().eval(), fmt, names


def tokens(n=7, batch=2, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dequantized_twin(model, patched, replaced):
    """A copy of the unpatched model whose experts hold the patched layers' dequantized weights."""
    twin = copy.deepcopy(model)
    for name in replaced:
        w = patched.get_submodule(name).moe.weights
        hf.write_experts(twin.get_submodule(name), qmoe.dequantize(w.w13), qmoe.dequantize(w.w2), w.b13, w.b2)
    return twin


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_logits_match_the_model_on_the_same_weights(family):
    model, fmt, names = build(family)
    ids = tokens()
    float_logits = logits(model, ids)
    original = copy.deepcopy(model)
    replaced = patch(model, fmt, backend="reference")
    assert list(replaced) == names
    twin = dequantized_twin(original, model, replaced)
    got, want = logits(model, ids), logits(twin, ids)
    err = rel(got, want)
    assert err < 1e-5, err  # fp32 reference backend on the same weights: only summation order differs
    assert rel(float_logits, want) > 100 * max(err, 1e-7)  # quantization is visible: the check can fail


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routing_is_the_models(family):
    """qmoe.route on the layer's logits picks the model router's experts with its weights."""
    model, fmt, names = build(family)
    blocks = {n: model.get_submodule(n) for n in names}
    patch(model, fmt, backend="reference")
    for name, block in blocks.items():
        layer = model.get_submodule(name).moe
        x = torch.randn(33, layer.spec.hidden_size, generator=torch.Generator().manual_seed(2))
        router = block.router if family == "gpt_oss" else block.gate
        with torch.no_grad():
            if getattr(block, "is_hash", False):
                tok = torch.randint(0, VOCAB, (33,), generator=torch.Generator().manual_seed(3))
                _, hw, hid = router(x, tok)
                assert torch.equal(hid, router.tid2eid[tok])
                continue  # hash layers keep the model's router (the experts op takes its choice)
            _, hw, hid = router(x)
            ids, w = qmoe.route(layer.spec, layer.router_logits(x), layer.correction_bias)
        order_h, order_q = hid.argsort(dim=1), ids.long().argsort(dim=1)
        assert torch.equal(hid.gather(1, order_h), ids.long().gather(1, order_q))
        torch.testing.assert_close(w.gather(1, order_q), hw.float().gather(1, order_h), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compile_fullgraph_one_graph_for_two_lengths(family):
    import torch._dynamo.testing

    torch._dynamo.reset()
    model, fmt, _ = build(family)
    patch(model, fmt, backend="reference")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for n in (5, 9):
        ids = tokens(n, batch=1)
        torch._dynamo.mark_dynamic(ids, 1)
        with torch.no_grad():
            got = compiled(ids, use_cache=False).logits
        torch.testing.assert_close(got, logits(model, ids), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_compile_inductor_on_the_cpu():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gpt_oss(layers=1).eval()
    patch(model, "mxfp4", backend="reference")
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    ids = tokens(6, batch=1)
    with torch.no_grad():
        got = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(got, logits(model, ids), rtol=1e-4, atol=1e-4)


def test_patch_with_triton_under_the_interpreter():
    """The same model on qmoe's own kernels (TRITON_INTERPRET on a CPU): the kernel's error only."""
    model, fmt, _ = build("qwen3_moe")
    original = copy.deepcopy(model)
    replaced = patch(model, fmt, backend="triton")
    twin = dequantized_twin(original, model, replaced)
    ids = tokens(4, batch=1)
    assert rel(logits(model, ids), logits(twin, ids)) < 1e-2


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "deepseek_v4"])
def test_read_and_write_experts_are_inverses(family):
    model, _, names = build(family)
    block = model.get_submodule(names[0])
    w13, w2, b13, b2 = (None if t is None else t.clone() for t in hf.read_experts(block))
    g = torch.Generator().manual_seed(4)
    new = [torch.randn(t.shape, generator=g) if t is not None else None for t in (w13, w2, b13, b2)]
    hf.write_experts(block, *new)
    for a, b in zip(hf.read_experts(block), new):
        assert (a is None and b is None) or torch.equal(a, b)
    if family == "gpt_oss":  # the checkpoint's interleaved columns: gate at even, up at odd
        I = w13.shape[1] // 2
        assert torch.equal(block.experts.gate_up_proj[:, :, 0::2], new[0][:, :I].transpose(1, 2))
        assert torch.equal(block.experts.gate_up_proj[:, :, 1::2], new[0][:, I:].transpose(1, 2))


def test_unpatch_restores_the_originals_and_the_rest_is_untouched():
    model, fmt, names = build("deepseek_v3")
    ids = tokens()
    before = logits(model, ids)
    originals = {n: model.get_submodule(n) for n in names}
    params = {n: p for n, p in model.named_parameters() if not any(n.startswith(b + ".") for b in names)}
    replaced = patch(model, fmt, backend="reference")
    assert all(replaced[n] is originals[n] for n in names)
    assert all(isinstance(model.get_submodule(n), QmoeBlock) for n in names)
    after = dict(model.named_parameters())
    for n, p in params.items():
        assert after[n] is p  # attention, norms, embeddings, dense MLPs: the very same tensors
    shared = model.get_submodule(names[0]).moe.shared_experts
    assert shared is originals[names[0]].shared_experts  # the model's own shared experts keep running
    assert not torch.equal(logits(model, ids), before)
    with pytest.raises(ValueError, match="model: already patched by qmoe"):
        patch(model, fmt)
    unpatch(model, replaced)
    assert all(model.get_submodule(n) is originals[n] for n in names)
    assert torch.equal(logits(model, ids), before)
    with pytest.raises(ValueError, match=r"replaced: model\.layers\.1\.mlp is DeepseekV3MoE in the model, not a "
                                         r"qmoe block"):
        unpatch(model, replaced)


def test_unknown_moe_classes_are_named():
    cfg = T.MixtralConfig(**_ATTN, intermediate_size=32, num_hidden_layers=1, num_key_value_heads=2,
                          num_local_experts=4, num_experts_per_tok=2)
    model = T.MixtralForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"model: MoE modules qmoe does not know: MixtralSparseMoeBlock \(at "
                                         r"model\.layers\.0\.mlp\)"):
        patch(model, "mxfp4")
    assert type(model.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"
    with pytest.raises(ValueError, match="model: no MoE block qmoe knows in Linear"):
        patch(torch.nn.Linear(4, 4), "mxfp4")
    with pytest.raises(ValueError, match="format: expected one of"):
        patch(gpt_oss(1), "fp8")
    with pytest.raises(ValueError, match="model: GptOssMLP is itself a MoE block"):
        patch(gpt_oss(1).model.layers[0].mlp, "mxfp4")


def test_a_block_qmoe_cannot_express_is_refused_by_name():
    model, _, names = build("qwen3_moe")
    model.get_submodule(names[1]).experts.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp \(Qwen3MoeSparseMoeBlock\): block: "
                                         r"Qwen3MoeSparseMoeBlock\.experts uses activation GELU"):
        patch(model, "nvfp4", backend="reference")
    assert [n for n, _ in find_blocks(model)[0]] == names  # nothing was replaced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requantizing_dequantized_mxfp4_is_exact(dtype):
    """A GPT-OSS model loaded from an MXFP4 checkpoint by transformers holds the dequantized values;
    qmoe's rule (block exponent ceil(log2(amax / 6))) gives them back exactly: the same values
    always, and the same bytes whenever a block's largest magnitude is the code for 4 or 6 (other
    blocks are stored with a smaller exponent and doubled codes: the same values)."""
    model = gpt_oss(1).to(dtype)
    block = model.model.layers[0].mlp
    E, H, I = 4, 64, 64
    g = torch.Generator().manual_seed(7)

    def codes(*shape, full=True):
        c = torch.randint(0, 16, shape, generator=g)
        if full:  # every block of 32 holds a +-6: its bytes must come back exactly
            c.view(*shape[:-1], -1, 32)[..., 0] = 7 + 8 * torch.randint(0, 2, (*shape[:-1], shape[-1] // 32),
                                                                         generator=g)
        return c.to(torch.uint8)

    def q(c, shape):
        data = (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)
        scales = torch.randint(110, 140, (*shape[:-1], shape[-1] // 32), generator=g, dtype=torch.uint8)
        return qmoe.QuantizedTensor("mxfp4", shape, data, scales)

    for full in (True, False):
        w13, w2 = q(codes(E, 2 * I, H, full=full), (E, 2 * I, H)), q(codes(E, H, I, full=full), (E, H, I))
        b13, b2 = torch.randn(E, 2 * I).to(dtype).float(), torch.randn(E, H).to(dtype).float()
        hf.write_experts(block, qmoe.dequantize(w13), qmoe.dequantize(w2), b13, b2)
        replaced = patch(model, "mxfp4", backend="reference")
        got = model.model.layers[0].mlp.moe.weights
        for a, b in ((got.w13, w13), (got.w2, w2)):
            assert torch.equal(qmoe.dequantize(a), qmoe.dequantize(b))
            if full:
                assert torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)
        assert torch.equal(got.b13, b13) and torch.equal(got.b2, b2)
        unpatch(model, replaced)


def test_gpt_oss_checkpoint_bytes_are_read_directly(tmp_path):
    model, _, names = build("gpt_oss")
    spec = qmoe.MoESpec(4, 2, 64, 64, qmoe.SwiGLU(1.702, 1.0, 7.0), bias=True)
    layers = {i: (qmoe.random_weights(spec, "mxfp4", seed=i), torch.randn(4, 64), torch.randn(4))
              for i in range(2)}
    save_gpt_oss(tmp_path / "ck", layers)
    patch(model, "mxfp4", backend="reference", checkpoint=tmp_path / "ck")
    for i in range(2):
        got, want = model.get_submodule(names[i]).moe.weights, layers[i][0]
        assert torch.equal(got.w13.data, want.w13.data) and torch.equal(got.w2.scales, want.w2.scales)
        assert torch.equal(got.b13, want.b13.bfloat16().float())  # GPT-OSS stores biases in bf16


@pytest.mark.parametrize("family, fmt, save", [("qwen3_moe", "nvfp4", save_modelopt_nvfp4),
                                               ("kimi_k2", "int4", save_compressed_tensors)])
def test_quantized_checkpoints_are_read_directly(tmp_path, family, fmt, save):
    model, _, names = build(family)
    layer0 = model.get_submodule(names[0])
    E, two_i, H = layer0.experts.gate_up_proj.shape
    spec = qmoe.MoESpec(E, 2, H, two_i // 2)
    weights = {n: qmoe.random_weights(spec, fmt, seed=i) for i, n in enumerate(names)}
    save(tmp_path / "ck.safetensors", {n + ".experts": w for n, w in weights.items()})
    patch(model, fmt, backend="reference", checkpoint=tmp_path / "ck.safetensors")
    for n, want in weights.items():
        got = model.get_submodule(n).moe.weights
        assert torch.equal(got.w13.data, want.w13.data) and torch.equal(got.w2.data, want.w2.data)
    ids = tokens(4)
    assert torch.isfinite(logits(model, ids)).all()


def test_checkpoint_mismatches_are_refused(tmp_path):
    model, _, _ = build("qwen3_moe")
    other = qmoe.random_weights(qmoe.MoESpec(8, 2, 64, 64), "int4")  # I = 64, the model's is 32
    save_compressed_tensors(tmp_path / "ck.safetensors", {"model.layers.0.mlp.experts": other,
                                                          "model.layers.1.mlp.experts": other})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(Qwen3MoeSparseMoeBlock\): checkpoint: experts of "
                                         r"model\.layers\.0\.mlp have \(E, H, I\) = \(8, 64, 64\), the model's block "
                                         r"\(8, 64, 32\)"):
        patch(model, "int4", checkpoint=tmp_path / "ck.safetensors")
    with pytest.raises(ValueError, match="MXFP4 checkpoints are read in the GPT-OSS layout"):
        patch(model, "mxfp4", checkpoint=tmp_path / "ck.safetensors")


# --- GPU --------------------------------------------------------------------------------------------
def _gpt_oss_20b_like(layers=2):
    """gpt-oss-20b's MoE shapes (E=32, k=4, H=I=2880) in a 2-layer model with a small vocabulary."""
    cfg = T.GptOssConfig(vocab_size=1024, hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers,
                         num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                         num_experts_per_tok=4, sliding_window=128, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    return T.GptOssForCausalLM(cfg)


def _time(fn, n=20):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_patched_model_under_a_cuda_graph(num_tokens):
    """The patched model's forward captured in a CUDA graph and replayed: the same logits as eager;
    prints the time per forward beside the unpatched model's (eager: its expert loop syncs the host,
    so it cannot be captured) and the patched model's eager time."""
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialized on the GPU: 1.6 G parameters
        model = _gpt_oss_20b_like().to(torch.bfloat16).eval()
    ids = torch.randint(0, 1024, (1, num_tokens), device="cuda")
    with torch.no_grad():
        t_unpatched = _time(lambda: model(ids, use_cache=False))
        original = copy.deepcopy(model)
        replaced = patch(model, "mxfp4")  # backend auto
        twin = dequantized_twin(original, model, replaced)
        want = twin(ids, use_cache=False).logits.float()
        del original, twin
        # the causal mask made before capture: transformers' eager mask makes a scalar CUDA tensor
        # from the host (torch.tensor(0.0, device=...)), which a CUDA-graph capture refuses; a 4-D
        # mask given by the caller is used as it is
        causal = torch.full((num_tokens, num_tokens), float("-inf"), device="cuda").triu(1)
        mask = causal.to(torch.bfloat16)[None, None]

        def forward():
            return model(ids, attention_mask=mask, use_cache=False)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the kernels of this token count
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = forward().logits
        graph.replay()
        torch.cuda.synchronize()
        eager = forward().logits
        assert rel(static.float(), eager.float()) < 1e-3  # the replay computes what eager does
        err = rel(static.float(), want)
        t_graph = _time(graph.replay)
        t_eager = _time(forward)
    layer = model.model.layers[0].mlp.moe
    print(f"\ngpt-oss-20b shapes, 2 layers, M={num_tokens}: unpatched eager {t_unpatched:.0f} us, patched "
          f"eager {t_eager:.0f} us, patched CUDA graph {t_graph:.0f} us per forward; "
          f"{layer.explain(num_tokens).splitlines()[0]}; logits rel. error vs the dequantized model {err:.2e}")
    assert err < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_fullgraph_on_the_gpu():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gpt_oss().to("cuda", torch.bfloat16).eval()
    patch(model, "mxfp4", backend="triton")
    compiled = torch.compile(model, fullgraph=True)
    for n in (5, 9):
        ids = torch.randint(0, VOCAB, (1, n), device="cuda")
        torch._dynamo.mark_dynamic(ids, 1)
        with torch.no_grad():
            got = compiled(ids, use_cache=False).logits
            want = model(ids, use_cache=False).logits
        assert rel(got.float(), want.float()) < 1e-2
