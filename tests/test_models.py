"""Generators: presets, exact initialisation, conditioning, one-step sampling. CPU only, seconds in all."""

from __future__ import annotations

import io
import math

import pytest
import torch

from drifting.models.dit import GENERATORS, DiT, DiTConfig, build_generator, generator_config
from drifting.models.generate import draw_inputs, generate
from drifting.models.layers import (
    Attention,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rope_positions_1d,
    rope_positions_2d,
    sincos_pos_embed_2d,
    swiglu_hidden_size,
    timestep_embedding,
)
from drifting.models.mlp import MLPConfig, MLPGenerator

# Parameter counts of the authors' code and the paper (official-code-notes.md section 5.6), in millions.
PAPER_PARAMS = {"DiT-B/2": 132.7, "DiT-L/2": 462.9, "DiT-B/16": 133.9, "DiT-L/16": 464.5}
# Shrinks any preset to a few thousand parameters per block while keeping its input size, patch and options.
TINY = dict(hidden_size=32, depth=1, num_heads=2)


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere, so the zero-initialised paths (adaLN, head) carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _inputs(model, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise, style = draw_inputs(model, batch, generator=g)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g)
    return noise, labels, style


def _tiny_mlp(**kw) -> MLPGenerator:
    return MLPGenerator(MLPConfig(dim=3, num_classes=4, hidden=32, depth=2, style_tokens=4, style_codebook=8, **kw))


# ---------------------------------------------------------------------------------------------------------------------
# Presets: parameter counts and shapes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):  # no memory, no init cost
        model = build_generator(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.005, (name, count)


def test_b2_parameter_breakdown():
    """Per block 10.63M; outside the blocks 1.57M of style tables, 0.77M of class table, 0.79M of alpha embedder."""
    with torch.device("meta"):
        model = build_generator("DiT-B/2")
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert numel(model.blocks[0]) == 10_631_040
    assert model.cond_embedder.style_embed.numel() == 32 * 64 * 768
    assert numel(model.cond_embedder.class_embed) == 1000 * 768
    assert numel(model.cond_embedder.alpha_embedder) == 787_968
    assert swiglu_hidden_size(768) == 2048 and swiglu_hidden_size(1024) == 2752


@pytest.mark.parametrize("name", list(GENERATORS))
def test_every_preset_forward_shape_on_meta(name):
    """Full size, shapes only: the meta device runs the forward without memory or arithmetic."""
    with torch.device("meta"):
        model = build_generator(name)
        noise, style = draw_inputs(model, 2)
        labels = torch.zeros(2, dtype=torch.long)
    out = model(noise, labels, 1.5, style)
    assert out.shape == (2, *model.noise_shape) and out.dtype == torch.float32


@pytest.mark.parametrize("name", list(GENERATORS))
def test_every_preset_tiny_forward_backward(name):
    """Each preset's input size, patch and options (bf16, checkpointing) with a tiny width and depth."""
    model = build_generator(name, **TINY)
    noise, labels, style = _inputs(model, batch=2)
    out = model(noise, labels, torch.tensor([1.0, 3.0]), style)
    assert out.shape == (2, *model.noise_shape)
    assert torch.equal(out, torch.zeros_like(out))
    (out - noise).square().mean().backward()
    assert model.final_linear.weight.grad.abs().sum() > 0


def test_generator_config_and_dit_config_reject_bad_values():
    with pytest.raises(ValueError, match="unknown generator"):
        generator_config("DiT-Q/3")
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        generator_config("DiT-B/2", hiden_size=10)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiTConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="rope"):
        DiTConfig(rope="3d")
    assert generator_config("DiT-B/2", rope="2d").rope == "2d"


# ---------------------------------------------------------------------------------------------------------------------
# Initialisation and conditioning
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {}, {"rope": "2d"}, {"style_tokens": 0}, {"in_context_tokens": 0}, {"bf16": True, "attn_fp32": False},
])
def test_dit_output_is_exactly_zero_at_init(options):
    model = build_generator("DiT-tiny", **options)
    noise, labels, style = _inputs(model)
    out = model(noise * 100, labels, torch.tensor([1.0, 2.0, 4.0]), style)
    assert torch.equal(out, torch.zeros_like(out))


def test_dit_initialisation_follows_the_code():
    model = build_generator("DiT-B/4", depth=2)
    cond = model.cond_embedder
    for table in (cond.class_embed.weight, cond.style_embed, model.context_embed):
        assert abs(table.std().item() - 0.02) < 0.002 and abs(table.mean().item()) < 1e-3
    assert torch.equal(model.pos_embed, sincos_pos_embed_2d(768, 8))
    for layer in (model.blocks[0].attn.qkv, model.blocks[1].mlp.w2, model.x_embedder, model.context_proj):
        bound = math.sqrt(6 / sum(layer.weight.shape))  # Xavier-uniform
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert abs(cond.alpha_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    for layer in (model.blocks[0].adaLN_modulation, model.final_adaLN, model.final_linear):
        assert not layer.weight.any() and not layer.bias.any()


def _train_steps(model, steps: int) -> None:
    """`steps` Adam steps on a regression onto random targets with random conditioning."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    noise, labels, style = _inputs(model, batch=8, seed=1)
    alpha = 1 + 3 * torch.rand(8, generator=torch.Generator().manual_seed(2))
    target = torch.randn(noise.shape[0], *model.noise_shape, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        opt.zero_grad()
        (model(noise, labels, alpha, style) - target).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("make", [lambda: build_generator("DiT-tiny"), _tiny_mlp], ids=["dit", "mlp"])
def test_conditioning_reaches_the_output_after_the_second_step(make):
    """adaLN-zero: the first step only moves the zero head (every other gradient passes through it), so the output
    ignores class and alpha; from the second step on, both change it."""
    model = make()
    noise, _, style = _inputs(model, batch=2)
    labels_a, labels_b = torch.tensor([0, 1]), torch.tensor([2, 3])

    def outputs():
        with torch.no_grad():
            return (model(noise, labels_a, 1.0, style), model(noise, labels_b, 1.0, style),
                    model(noise, labels_a, 3.0, style))

    _train_steps(model, 1)
    base, other_class, other_alpha = outputs()
    assert base.abs().max() > 0
    assert torch.equal(base, other_class) and torch.equal(base, other_alpha)
    _train_steps(model, 1)
    base, other_class, other_alpha = outputs()
    assert (base - other_class).abs().max() > 1e-4
    assert (base - other_alpha).abs().max() > 1e-6


def test_mlp_generator_zero_init_and_options():
    model = _tiny_mlp(noise_dim=5)
    noise, labels, style = _inputs(model, batch=4)
    assert noise.shape == (4, 5)
    out = model(noise, labels, 2.0, style)
    assert out.shape == (4, 3) and torch.equal(out, torch.zeros_like(out))
    plain = MLPGenerator(MLPConfig(dim=2))  # unconditional, no style tokens: style is None
    assert plain(torch.randn(6, 2), torch.zeros(6, dtype=torch.long), 1.0).shape == (6, 2)
    with pytest.raises(ValueError, match="noise_dim"):
        MLPConfig(noise_dim=0)


def test_condition_vector_is_class_plus_styles_plus_scaled_alpha():
    model = _perturb(build_generator("DiT-tiny"))
    cond = model.cond_embedder
    labels, alpha = torch.tensor([3, 7]), torch.tensor([1.0, 2.5])
    style = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(0))
    expected = cond.class_embed.weight[labels].clone()
    for i in range(4):  # token i reads its own table
        expected += cond.style_embed[i, style[:, i]]
    expected += 0.02 * cond.alpha_norm(cond.alpha_embedder(alpha))
    assert torch.allclose(cond(labels, alpha, style), expected, atol=1e-6)


def test_style_indices_change_the_output():
    model = _perturb(build_generator("DiT-tiny"))
    noise, labels, style = _inputs(model)
    with torch.no_grad():
        assert (model(noise, labels, 1.0, style) - model(noise, labels, 1.0, (style + 1) % 8)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Options: bf16, activation checkpointing, RoPE, compile
# ---------------------------------------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    plain = _perturb(build_generator("DiT-tiny"))
    ckpt = build_generator("DiT-tiny", activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    noise, labels, style = _inputs(plain)
    grads = []
    for model in (plain, ckpt):
        out = model(noise, labels, 2.0, style)
        out.square().sum().backward()
        grads.append((out, [p.grad for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("attn_fp32", [True, False])
def test_bf16_forward_is_close_to_fp32(attn_fp32):
    fp32 = _perturb(build_generator("DiT-tiny"))
    bf16 = build_generator("DiT-tiny", bf16=True, attn_fp32=attn_fp32)
    bf16.load_state_dict(fp32.state_dict())
    noise, labels, style = _inputs(fp32)
    with torch.no_grad():
        ref, out = fp32(noise, labels, 2.0, style), bf16(noise, labels, 2.0, style)
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 0.03


def test_rmsnorm_keeps_dtype_and_uses_fp32_statistics():
    x = (torch.randn(4, 64) * 1e3).bfloat16()
    out = RMSNorm(64)(x)
    assert out.dtype == torch.bfloat16
    ref = x.float() / x.float().square().mean(-1, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(out.float(), ref, rtol=1e-2)


def test_rope_1d_scores_depend_only_on_relative_position():
    """<R(m) q, R(n) k> depends on m - n only: the defining property of rotary embeddings."""
    head_dim = 16
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    cos, sin = rope_cos_sin(rope_positions_1d(grid=4, prefix=4), head_dim)  # 20 positions
    seq = lambda v: v.expand(1, 1, 20, head_dim)  # noqa: E731
    scores = apply_rope(seq(q), cos, sin)[0, 0] @ apply_rope(seq(k), cos, sin)[0, 0].T  # (20, 20)
    for shift in (1, 5):
        assert torch.allclose(scores.diagonal(shift), scores.diagonal(shift)[:1].expand(20 - shift), atol=1e-4)
    assert torch.allclose(apply_rope(seq(q), cos, sin).norm(dim=-1), q.norm().expand(1, 1, 20))


def _attention_written_out(attn: Attention, x, rope):
    """Attention by its definition, in the (B, H, L, Dh) layout throughout: qkv, QK-norm (RMSNorm over Dh, gain
    shared by the heads), rotate-half RoPE per axis, softmax(q k^T / sqrt(Dh)) v, output projection."""
    b, length, dim = x.shape
    heads, dh = attn.num_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(b, length, 3, heads, dh).permute(2, 0, 3, 1, 4)

    def norm(t, gain):
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6) * gain

    def rotate(t, cos, sin):  # t (B, H, L, Dh), cos and sin (L, A, n)
        t = t.unflatten(-1, cos.shape[-2:])
        first, second = t.chunk(2, dim=-1)
        return (t * cos + torch.cat([-second, first], dim=-1) * sin).flatten(-2)

    q, k = norm(q, attn.q_norm.weight), norm(k, attn.k_norm.weight)
    if rope is not None:
        q, k = rotate(q, *rope), rotate(k, *rope)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(dh)).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(b, length, dim)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("axes", [None, 1, 2])
def test_attention_equals_its_written_out_definition_forward_and_gradient(axes):
    """The layer's layout (norm and rotation on (B, L, H, Dh), attention on transposed views) changes nothing."""
    torch.manual_seed(0)
    attn = _perturb(Attention(dim=24, num_heads=3), std=0.3)
    x = torch.randn(2, 7, 24, requires_grad=True)
    rope = None
    if axes is not None:
        positions = rope_positions_1d(grid=2, prefix=3) if axes == 1 else rope_positions_2d(grid=2, prefix=3)
        rope = rope_cos_sin(positions, attn.head_dim)
    out, ref = attn(x, rope), _attention_written_out(attn, x, rope)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    params = [x, *attn.parameters()]
    got = torch.autograd.grad(out, params, upstream)
    want = torch.autograd.grad(ref, params, upstream)
    for (name, _), a, b in zip([("x", x), *attn.named_parameters()], got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    grads = dict(zip(["x", *(name for name, _ in attn.named_parameters())], got))
    assert grads["q_norm.weight"].abs().max() > 0 and grads["k_norm.weight"].abs().max() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp32", [False, True])
def test_attention_on_cuda_under_bf16_matches_its_definition(fp32):
    """On a GPU, attention reads q, k, v as transposed views (cuDNN or flash attention, whichever PyTorch picks):
    under bf16 autocast the layer stays within bf16 rounding of the fp32 definition, forward and gradient."""
    torch.manual_seed(0)
    attn = _perturb(Attention(dim=768, num_heads=12, fp32=fp32), std=0.02).cuda()
    x = torch.randn(4, 272, 768, device="cuda", requires_grad=True)
    rope = tuple(t.cuda() for t in rope_cos_sin(rope_positions_1d(grid=16, prefix=16), attn.head_dim))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(x.bfloat16(), rope)
    ref = _attention_written_out(attn, x, rope)
    upstream = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(out.float(), x, upstream)
    (grad_ref,) = torch.autograd.grad(ref, x, upstream)
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert (grad - grad_ref).abs().max() <= 2e-2 * grad_ref.abs().max()


def test_rope_frequencies_and_positions():
    cos, sin = rope_cos_sin(torch.tensor([[3.0]]), head_dim=64)
    angles = 3.0 * 1e4 ** (-torch.arange(32) / 32)  # the code's 10^4^(-j/32), duplicated for rotate-half
    assert torch.allclose(cos[0, 0], torch.cat([angles, angles]).cos()) and sin.shape == (1, 1, 64)
    positions = rope_positions_2d(grid=3, prefix=2)
    assert positions.tolist()[:3] == [[0, 0], [0, 1], [1, 0]] and positions.tolist()[-1] == [3, 2]
    assert rope_positions_1d(grid=16, prefix=16).squeeze(-1).tolist() == list(range(272))


@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_dit_rope_tables_are_built_once_exact_and_not_saved(rope):
    """The forward reads fp32 cos/sin buffers equal to the tables computed afresh; they are not in the state dict,
    survive a meta build + to_empty + reset_parameters, and a cast module computes them afresh in fp32."""
    model = _perturb(build_generator("DiT-tiny", rope=rope))
    fresh = model.rope_tables(torch.device("cpu"))
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(model.rope(), fresh))
    assert not any("rope" in key for key in model.state_dict())
    noise, labels, style = _inputs(model)
    per_call = build_generator("DiT-tiny", rope=rope)
    per_call.load_state_dict(model.state_dict())
    per_call.rope = lambda: per_call.rope_tables(noise.device)  # the tables of every call built afresh, as before
    assert torch.equal(model(noise, labels, 2.0, style), per_call(noise, labels, 2.0, style))
    with torch.device("meta"):
        meta = build_generator("DiT-tiny", rope=rope)
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(meta.rope(), fresh))
    cos, sin = model.half().rope()
    assert cos.dtype == sin.dtype == torch.float32 and torch.equal(cos, fresh[0]) and torch.equal(sin, fresh[1])


def test_sincos_pos_embed_and_timestep_embedding_formulas():
    emb = sincos_pos_embed_2d(8, grid=3)  # token (r, c) = (1, 2) is index 5
    omega = 1e4 ** (-torch.arange(2) / 2.0)
    expected = torch.cat([(2 * omega).sin(), (2 * omega).cos(), (1 * omega).sin(), (1 * omega).cos()])
    assert torch.allclose(emb[5], expected)
    t = timestep_embedding(torch.tensor([2.0]), dim=8)
    freqs = torch.exp(-math.log(1e4) * torch.arange(4) / 4)
    assert torch.allclose(t[0], torch.cat([(2 * freqs).cos(), (2 * freqs).sin()]))


def test_patchify_order_and_round_trip():
    model = build_generator("DiT-tiny")
    x = torch.randn(2, 3, 8, 8)
    patches = model.patchify(x)  # (2, 16, 12)
    # Token 1 is the patch at row 0, column 1; features in (row in patch, col in patch, channel) order.
    assert torch.equal(patches[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(12))
    assert torch.equal(model.unpatchify(patches), x)


def test_compile_fullgraph_matches_eager():
    """No graph break in the forward (fullgraph=True); aot_eager traces forward and backward without a compiler."""
    model = _perturb(build_generator("DiT-tiny", rope="2d"))
    noise, labels, style = _inputs(model)
    alpha = torch.tensor([1.0, 2.0, 3.5])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(noise, labels, alpha, style)
    assert torch.allclose(out, model(noise, labels, alpha, style), atol=1e-5)
    out.sum().backward()


@pytest.mark.slow
def test_compile_inductor_fullgraph():
    model = _perturb(build_generator("DiT-tiny"))
    noise, labels, style = _inputs(model)
    out = torch.compile(model, fullgraph=True)(noise, labels, torch.full((3,), 2.0), style)
    assert torch.allclose(out, model(noise, labels, 2.0, style), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling, determinism, checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: build_generator("DiT-tiny"), _tiny_mlp], ids=["dit", "mlp"])
def test_generate_is_reproducible_with_a_seeded_generator(make):
    model = _perturb(make())
    labels = torch.tensor([0, 1, 2, 3])
    first = generate(model, labels, 1.5, generator=torch.Generator().manual_seed(7))
    again = generate(model, labels, 1.5, generator=torch.Generator().manual_seed(7))
    other = generate(model, labels, 1.5, generator=torch.Generator().manual_seed(8))
    assert first.shape == (4, *model.noise_shape)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-4
    # The same as one forward pass on the documented draws: noise first, then style indices.
    noise, style = draw_inputs(model, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(first, model(noise, labels, torch.full((4,), 1.5), style))
    assert not first.requires_grad


def test_generate_accepts_lists_and_per_sample_alpha():
    model = _perturb(build_generator("DiT-tiny"))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = generate(model, [1, 2], torch.tensor([1.0, 2.0]), generator=g())
    b = generate(model, torch.tensor([1, 2]), torch.tensor([1.0, 2.0]), generator=g())
    assert torch.equal(a, b)
    assert torch.equal(generate(model, [1, 2], 2, generator=g()), generate(model, [1, 2], torch.tensor(2.0),
                                                                          generator=g()))


@pytest.mark.parametrize("labels, alpha, match", [
    (torch.tensor([0, 10]), 1.0, r"labels: expected class indices in \[0, 10\), got 10"),
    (torch.tensor([-1, 3]), 1.0, "got -1"),
    (torch.tensor([[0, 1]]), 1.0, "labels: expected shape"),
    (torch.tensor([], dtype=torch.long), 1.0, "B >= 1"),
    (torch.tensor([0.0, 1.0]), 1.0, "integer tensor"),
    ("cat", 1.0, "labels"),
    ([0, 1], 0.5, "alpha: expected a finite guidance scale >= 1"),
    ([0, 1], float("nan"), "finite"),
    ([0, 1], float("inf"), "finite"),
    ([0, 1], True, "alpha"),
    ([0, 1], torch.tensor([1.0, 0.9]), ">= 1"),
    ([0, 1], torch.tensor([1.0, float("nan")]), "finite"),
    ([0, 1], torch.tensor([1.0, 2.0, 3.0]), r"shape \[2\]"),
    ([0, 1], "2", "alpha"),
])
def test_generate_rejects_bad_inputs_before_any_work(labels, alpha, match):
    model = build_generator("DiT-tiny")
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=match):
        generate(model, labels, alpha, generator=torch.Generator().manual_seed(0))
    assert not calls


def test_generate_rejects_a_model_without_the_interface():
    with pytest.raises(ValueError, match="generator interface"):
        generate(torch.nn.Linear(2, 2), [0])


def test_forward_rejects_wrong_shapes():
    model = build_generator("DiT-tiny")
    noise, labels, style = _inputs(model)
    with pytest.raises(ValueError, match="noise: expected shape"):
        model(noise[:, :2], labels, 1.0, style)
    with pytest.raises(ValueError, match="style: expected indices"):
        model(noise, labels, 1.0, None)


@pytest.mark.parametrize("make", [lambda: build_generator("DiT-tiny"), _tiny_mlp], ids=["dit", "mlp"])
def test_state_dict_round_trip(make):
    model = _perturb(make())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buffer, weights_only=True))  # strict: same keys, same shapes
    labels = torch.tensor([0, 1, 2])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(generate(model, labels, 2.0, generator=g()), generate(restored, labels, 2.0, generator=g()))


def test_build_on_meta_then_materialise():
    """The FSDP pattern: build without memory, allocate with to_empty, then initialise; same as a direct build."""
    with torch.device("meta"):
        model = build_generator("DiT-tiny")
    model.to_empty(device="cpu")
    model.reset_parameters()
    noise, labels, style = _inputs(model)
    assert torch.equal(model(noise, labels, 1.0, style), torch.zeros_like(noise))
    assert isinstance(model, DiT) and torch.equal(model.pos_embed, build_generator("DiT-tiny").pos_embed)


def test_sample_throughput_benchmark_smoke(tmp_path):
    """The benchmark script runs end to end on CPU with a tiny preset and writes its JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sample_throughput.py"
    spec = importlib.util.spec_from_file_location("sample_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "throughput.json"
    bench.main(["--device", "cpu", "--presets", "DiT-tiny", "--batch-sizes", "2", "--warmup", "0", "--iters", "1",
                "--fp32", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["results"][0]["preset"] == "DiT-tiny" and record["results"][0]["samples_per_s"] > 0
