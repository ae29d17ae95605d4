"""torch.compile and CUDA graphs: SLA is one custom op with an exact fake implementation, so graphs never break."""

import pytest
import torch

import sagesla
from sagesla import metrics, ops
from sagesla.wan_shapes import run_wan, tiny_wan_transformer, wan_inputs

CPU_OK = {"backend": "torch"}


def _qkv(shape, dtype=torch.bfloat16, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("exact", [False, True], ids=["no-exact", "exact-keys"])
def test_opcheck(layout, quantized, exact):
    """Schema, fake (meta) implementation and dispatch of the custom op pass torch.library.opcheck."""
    q, k, v = _qkv((1, 2, 150, 64) if layout == "HND" else (1, 150, 2, 64))
    proj = (torch.randn(64, 64) * 0.05, torch.randn(64) * 0.05)
    extra = (None, None, None)
    if exact:
        extra = (*_qkv((1, 2, 7, 64) if layout == "HND" else (1, 7, 2, 64), seed=1)[:2], torch.rand(1, 7) < 0.5)
    settings = (0.3, quantized, "softmax", "all", 64, 64, 0.125, layout, torch.bfloat16, "fp8", "torch")
    torch.library.opcheck(ops.sparse_linear_attn_op, (q, k, v, *proj, *extra, *settings))


def test_fake_output_matches_real():
    q, k, v = _qkv((2, 150, 3, 64), dtype=torch.float16)
    real = sagesla.sparse_linear_attn(q, k, v, topk=0.5, tensor_layout="NHD", **CPU_OK)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        fake = sagesla.sparse_linear_attn(fq, fk, fv, topk=0.5, tensor_layout="NHD", **CPU_OK)
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())


def test_functional_compiles_without_graph_breaks():
    q, k, v = _qkv((1, 2, 200, 64))
    weight = torch.randn(64, 64) * 0.05

    def attend(q, k, v):
        return sagesla.sparse_linear_attn(q, k, v, topk=0.3, proj_weight=weight, **CPU_OK) * 2.0

    explained = torch._dynamo.explain(attend)(q, k, v)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), rtol=0, atol=0)


def test_exact_keys_compile_without_graph_breaks():
    """Joint text + video attention: the exact keys and their mask travel through the op, one graph."""
    q, k, v = _qkv((1, 200, 2, 64))
    k_x, v_x = _qkv((1, 9, 2, 64), seed=1)[:2]
    mask = torch.arange(9)[None] < 6

    def attend(q, k, v, k_x, v_x, mask):
        return sagesla.sparse_linear_attn(
            q, k, v, topk=0.3, tensor_layout="NHD", exact_kv=(k_x, v_x), exact_mask=mask, **CPU_OK
        )

    explained = torch._dynamo.explain(attend)(q, k, v, k_x, v_x, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, k_x, v_x, mask), attend(q, k, v, k_x, v_x, mask), rtol=0, atol=0)


def test_calls_needing_gradients_bypass_the_op():
    """Calls that need gradients bypass the op (it has no autograd formula) and stay differentiable."""
    q, k, v = (x.float().requires_grad_() for x in _qkv((1, 1, 128, 64)))
    out = sagesla.sparse_linear_attn(q, k, v, topk=0.5, quantized=False, **CPU_OK)
    out.square().sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))


@pytest.mark.slow
def test_patched_wan_compiles_fullgraph_and_matches_eager():
    """A patched tiny Wan under torch.compile(fullgraph=True) (inductor): no graph break, eager's output."""
    model = tiny_wan_transformer()
    inputs = wan_inputs()
    sagesla.patch(model, topk=0.5, backend="torch")
    eager = run_wan(model, inputs)

    def step(*inputs):
        return model(*inputs, return_dict=False)[0]

    with torch.no_grad():
        explained = torch._dynamo.explain(step)(*inputs)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(step, fullgraph=True)(*inputs)
    # Inductor fuses the model's own norms and projections differently; a last-bit change of q or k can move an
    # INT8 rounding step, so a few outputs move by up to 1e-4 (measured rel-L1 5e-7).
    assert metrics.rel_l1(compiled, eager) < 1e-5


@pytest.mark.gpu
def test_cuda_graph_replay_follows_the_data():
    """Capture one SageSLA call on the Triton backend, change the inputs in place, replay: eager's output exactly."""
    q, k, v = _qkv((1, 4, 4100, 128), device="cuda")
    weight = torch.randn(128, 128, device="cuda") * 0.02

    def attend():
        return sagesla.sparse_linear_attn(q, k, v, topk=0.1, proj_weight=weight, backend="triton")

    attend()  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attend()
    for seed in (1, 2):
        for x, new in zip((q, k, v), _qkv(q.shape, device="cuda", seed=seed), strict=True):
            x.copy_(new)
        graph.replay()
        expected = attend()
        assert torch.equal(captured, expected), seed
    assert not torch.equal(captured, _qkv(q.shape, device="cuda", seed=0)[0])


@pytest.mark.gpu
def test_patched_wan_compiles_on_gpu():
    model = tiny_wan_transformer().cuda()
    inputs = tuple(x.cuda() for x in wan_inputs(frames=8, size=32))
    sagesla.patch(model, topk=0.5, backend="triton")
    eager = run_wan(model, inputs)

    def step(*inputs):
        return model(*inputs, return_dict=False)[0]

    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True)(*inputs)
    assert metrics.rel_l1(compiled, eager) < 1e-3


def _train_case(device):
    q, k, v = (x.requires_grad_() for x in _qkv((1, 2, 150, 64), dtype=torch.float16, device=device))
    weight = (torch.randn(64, 64, device=device) * 0.05).requires_grad_()
    bias = (torch.randn(64, device=device) * 0.05).requires_grad_()
    return q, k, v, weight, bias


def _train_step(q, k, v, weight, bias):
    o = sagesla.sparse_linear_attn(
        q, k, v, topk=0.5, quantized=False, proj_weight=weight, proj_bias=bias, block_q=32, block_k=32, backend="triton"
    )
    return o.float().square().mean()


def _grads(fn, leaves):
    for x in leaves:
        x.grad = None
    fn(*leaves).backward()
    return [x.grad.clone() for x in leaves]


@pytest.mark.parametrize("op", ["select", "forward", "backward"])
def test_trainable_ops_opcheck(op):
    """The trainable path's kernels are custom ops (schema, fake, autograd registration) that opcheck accepts."""
    from sagesla.kernels import sla_train

    q, k, v, weight, bias = (x.detach() for x in _train_case("cpu"))
    lut, kv, ksum = sla_train.select_op(q, k, v, 0.5, 32, 32, "softmax")
    settings = (32, 32, 0.125, "softmax", "all")
    if op == "select":
        torch.library.opcheck(sla_train.select_op, (q, k, v, 0.5, 32, 32, "softmax"))
    elif op == "forward":
        leaves = [x.clone().requires_grad_() for x in (q, k, v, weight, bias)]
        torch.library.opcheck(sla_train.forward_op, (*leaves, lut, kv, ksum, *settings))
    else:
        out, lse = sla_train.forward_op(q, k, v, weight, bias, lut, kv, ksum, *settings)
        args = (q, k, v, out, lse, torch.randn_like(out), weight, bias, lut, kv, ksum, *settings, True)
        torch.library.opcheck(sla_train.backward_op, args)


def test_trainable_triton_path_compiles_with_its_backward():
    """fullgraph compile of a training step on the Triton path (interpreter on CPU): eager's gradients exactly."""
    leaves = _train_case("cuda" if torch.cuda.is_available() else "cpu")
    explained = torch._dynamo.explain(_train_step)(*leaves)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = _grads(_train_step, leaves)
    compiled = _grads(torch.compile(_train_step, fullgraph=True, backend="aot_eager"), leaves)
    for name, a, b in zip(("q", "k", "v", "weight", "bias"), eager, compiled, strict=True):
        assert torch.equal(a, b), name
        assert a.abs().sum() > 0, name


def test_patched_wan_on_the_triton_backend_traces_without_graph_breaks():
    """The processor's per-call fallback checks and the kernels (interpreted on CPU) stay inside one graph, with
    grad mode on too (frozen weights: SageSLA is inference-only, so nothing may require grad)."""
    model = tiny_wan_transformer().requires_grad_(False)  # conftest runs Triton's interpreter without CUDA
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    sagesla.patch(model, topk=0.5, backend="triton")
    inputs = [x.to(device) for x in wan_inputs()]
    explained = torch._dynamo.explain(lambda *x: model(*x, return_dict=False)[0])(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_quantized_call_needing_gradients_raises_at_the_forward():
    """Compiled, the refusal of gradients through SageSLA still stops the forward with its own message."""
    model = tiny_wan_transformer()  # parameters require grad, so q, k and v do
    sagesla.patch(model, topk=0.5, backend="torch")
    step = torch.compile(lambda *x: model(*x, return_dict=False)[0], fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"quantized=True \(SageSLA\) is inference-only"):
        step(*wan_inputs())
