"""Pretrained-encoder adapters: torchvision ResNet-50 and timm ConvNeXt-V2 names and sizes (full-size models built on
the meta device, so no memory or time), strict save/load round trips, checkpoint prefixes and formats, the authors'
13 ConvNeXt keys with their L and C, the per-location standardisation and the duplicated global_std, preprocessing,
missing files, and a ResNet-50 inside FeatureDriftLoss. Random weights only; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drifting.feature_loss import FeatureDriftLoss
from drifting.features import FeatureConfig, spatial_mean, spatial_std
from drifting.models.adapters import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConvNeXtV2Config,
    ConvNeXtV2Features,
    GlobalResponseNorm,
    ResNet50Config,
    ResNet50Features,
    imagenet_input,
    load_weights_file,
    timm_convnext_state_dict,
)

TINY_RESNET = ResNet50Config(depths=(1, 2, 1, 1), width=4)  # layer2 has a block without downsample
TINY_CONVNEXT = ConvNeXtV2Config(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), image_size=64)


def images(n=2, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1  # generator samples live in [-1, 1]


def randomize_(model: torch.nn.Module, seed=0) -> torch.nn.Module:
    """Give every parameter and BatchNorm statistic a random value (GRN starts at zero, BN at (0, 1) otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g) * 0.1
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else t + r)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# ResNet-50
# ---------------------------------------------------------------------------------------------------------------------


def test_resnet50_has_torchvision_names_shapes_and_size():
    with torch.device("meta"):
        model = ResNet50Features(ResNet50Config(num_classes=1000))
    state = model.state_dict()
    # torchvision's resnet50: 320 state-dict entries; 25,557,032 parameters (ResNet50_Weights docs, num_params)
    assert len(state) == 320
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_mean": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.num_batches_tracked": (),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert "layer1.1.downsample.0.weight" not in state  # only the first block of a stage has a downsample
    # torchvision's "v1.5": the stride sits on the 3x3 conv, not on the first 1x1
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    with torch.device("meta"):
        assert not any(k.startswith("fc.") for k in ResNet50Features().state_dict())  # features only by default


def test_resnet_taps_shapes_and_resize():
    model = ResNet50Features(TINY_RESNET)
    w = TINY_RESNET.width
    taps = model.taps(images(2, 64))
    assert {k: tuple(v.shape) for k, v in taps.items()} == {
        "stem": (2, w, 16, 16), "layer1": (2, 4 * w, 16, 16), "layer2": (2, 8 * w, 8, 8),
        "layer3": (2, 16 * w, 4, 4), "layer4": (2, 32 * w, 2, 2)}
    resized = ResNet50Features(ResNet50Config(depths=(1, 1, 1, 1), width=4, image_size=32))
    assert resized.taps(images(1, 64))["stem"].shape[-1] == 8
    assert model(images(2, 64)).shape == (2, 32 * w)  # pooled features without fc


def test_resnet_preprocessing_is_imagenet_normalisation():
    x = images(2, 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(ResNet50Features(TINY_RESNET).patchify(x), ((x + 1) / 2 - mean) / std)


def test_resnet_batchnorm_stays_in_eval_mode():
    model = randomize_(ResNet50Features(TINY_RESNET)).train()
    assert not any(m.training for m in model.modules())
    x = images(4)
    with torch.no_grad():  # running statistics: a sample's features do not depend on the rest of its batch
        # (batch statistics would change it by O(1); the tolerance covers batch-size-dependent conv kernels)
        torch.testing.assert_close(model.taps(x)["layer4"][:1], model.taps(x[:1])["layer4"], rtol=1e-4, atol=1e-3)


def test_resnet_state_dict_round_trip_is_strict(tmp_path):
    model = randomize_(ResNet50Features(ResNet50Config(depths=(1, 2, 1, 1), width=4, num_classes=10)))
    torch.save(model.state_dict(), tmp_path / "tv.pth")
    loaded = ResNet50Features.from_file(tmp_path / "tv.pth", model.cfg)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # Default config (no fc): the file's classifier is ignored, the trunk still loads strictly.
    trunk = ResNet50Features.from_file(tmp_path / "tv.pth", ResNet50Config(depths=(1, 2, 1, 1), width=4))
    with torch.no_grad():
        torch.testing.assert_close(trunk.taps(x)["layer4"], model.taps(x)["layer4"], rtol=0, atol=0)
    # A wrong architecture is an error naming the file, not a silent partial load.
    with pytest.raises(ValueError, match="tv.pth"):
        ResNet50Features.from_file(tmp_path / "tv.pth", ResNet50Config(depths=(1, 1, 1, 1), width=4))


def test_resnet_checkpoint_prefixes_are_stripped(tmp_path):
    model = randomize_(ResNet50Features(TINY_RESNET), seed=1)
    other = randomize_(ResNet50Features(TINY_RESNET), seed=2)
    sd, sd_other = model.state_dict(), other.state_dict()

    def check(obj, name, **kw):  # every tensor of the loaded model is the query encoder's
        torch.save(obj, tmp_path / name)
        got = ResNet50Features.from_file(tmp_path / name, TINY_RESNET, **kw).state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)

    # MoCo-v2: query encoder under module.encoder_q. with an MLP fc, momentum encoder and queue beside it
    moco = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    moco |= {f"module.encoder_k.{k}": v for k, v in sd_other.items()}
    moco |= {"module.encoder_q.fc.0.weight": torch.randn(8, 128), "module.encoder_q.fc.2.weight": torch.randn(4, 8),
             "module.queue": torch.randn(4, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    check({"epoch": 200, "arch": "resnet50", "state_dict": moco}, "moco.pth.tar")
    # SimCLR port: encoder. prefix and a projector
    check({f"encoder.{k}": v for k, v in sd.items()} | {"projector.0.weight": torch.randn(4, 4)}, "simclr.pt")
    # MoCo-v3 (module.base_encoder.), and an explicit prefix
    check({"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}}, "mocov3.pth")
    check({f"trunk.{k}": v for k, v in sd.items()}, "custom.pt", prefix="trunk.")
    with pytest.raises(ValueError, match="prefix"):
        check({f"trunk.{k}": v for k, v in sd.items()}, "unknown.pt")


def test_resnet_inside_feature_drift_loss():
    """The ResNet plugs into the existing tap interface unchanged: keys, loss and gradient to the samples."""
    torch.manual_seed(0)
    encoder = ResNet50Features(TINY_RESNET)
    fdl = FeatureDriftLoss(encoder, FeatureConfig(use_global=False))
    gen = images(4, 32, seed=1).requires_grad_()
    loss, info = fdl(gen, images(4, 32, seed=2), num_classes=2)
    loss.backward()
    assert torch.isfinite(loss) and gen.grad is not None and gen.grad.abs().sum() > 0
    # norm_x (3-d input RMS) + 5 taps x (a-d) keys; layer4 is 1x1 and layer3 2x2, so they lack the 4x4 (and 2x2) windows
    assert "norm_x" in info and "stem_mean_4" in info and "layer3_mean_2" in info and "layer3_mean_4" not in info


# ---------------------------------------------------------------------------------------------------------------------
# ConvNeXt-V2
# ---------------------------------------------------------------------------------------------------------------------


def test_convnextv2_base_has_timm_names_shapes_and_size():
    with torch.device("meta"):
        model = ConvNeXtV2Features()
        with_fc = ConvNeXtV2Features(ConvNeXtV2Config(num_classes=1000))
    # timm model cards: convnextv2_base.fcmae 87.7M parameters (no classifier), fcmae_ft_in22k_in1k 88.7M
    assert sum(p.numel() for p in model.parameters()) == 87_692_800
    assert sum(p.numel() for p in with_fc.parameters()) == 88_717_800
    state = with_fc.state_dict()
    expected = {
        "stem.0.weight": (128, 3, 4, 4),
        "stem.1.weight": (128,),
        "stages.0.blocks.0.conv_dw.weight": (128, 1, 7, 7),
        "stages.0.blocks.0.norm.weight": (128,),
        "stages.0.blocks.0.mlp.fc1.weight": (512, 128),
        "stages.0.blocks.0.mlp.grn.weight": (512,),
        "stages.0.blocks.0.mlp.grn.bias": (512,),
        "stages.0.blocks.0.mlp.fc2.weight": (128, 512),
        "stages.1.downsample.0.weight": (128,),
        "stages.1.downsample.1.weight": (256, 128, 2, 2),
        "stages.2.blocks.26.mlp.fc2.bias": (512,),
        "stages.3.blocks.2.mlp.fc1.weight": (4096, 1024),
        "head.norm.weight": (1024,),
        "head.fc.weight": (1000, 1024),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert not any(k.startswith("stages.0.downsample") for k in state)  # stage 0's downsample is an Identity
    assert not any(k.endswith((".gamma", ".beta")) for k in state)  # no layer scale; GRN's are weight/bias
    assert "head.fc.weight" not in model.state_dict()


def test_convnext_13_keys_with_the_authors_L_and_C():
    cfg = ConvNeXtV2Config(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))  # the authors' 224 geometry, tiny widths
    keys = ConvNeXtV2Features(cfg).feature_sets(images(2, 32))  # 32x32 samples are upsampled to 224
    c = cfg.dims
    expected = {
        "convnext_stage_0_mean": (1, c[0]), "convnext_stage_0_std": (1, c[0]),
        "convnext_stage_1": (784, c[1]), "convnext_stage_1_mean": (1, c[1]), "convnext_stage_1_std": (1, c[1]),
        "convnext_stage_2": (196, c[2]), "convnext_stage_2_mean": (1, c[2]), "convnext_stage_2_std": (1, c[2]),
        "convnext_stage_3": (49, c[3]), "convnext_stage_3_mean": (1, c[3]), "convnext_stage_3_std": (1, c[3]),
        "global_mean": (1, c[3]), "global_std": (1, c[3]),
    }
    assert len(keys) == 13
    assert {k: tuple(v.shape) for k, v in keys.items()} == {k: (2, *lc) for k, lc in expected.items()}
    assert all(v.dtype == torch.float32 for v in keys.values())


def test_convnext_standardisation_statistics_and_duplicate_global_std():
    model = randomize_(ConvNeXtV2Features(TINY_CONVNEXT))
    x = images(3, 48)
    with torch.no_grad():
        keys = model.feature_sets(x)
        maps = model.stage_outputs(x)
    for i, y in enumerate(maps):
        # literal: every location standardised over channels, population std, eps 1e-3 outside the root
        mu = y.mean(dim=1, keepdim=True)
        sd = ((y - mu) ** 2).mean(dim=1, keepdim=True).sqrt()
        z = (y - mu) / (sd + 1e-3)
        assert torch.allclose(z.mean(dim=1), torch.zeros(()), atol=1e-5)  # standardised: zero mean per location
        if i > 0:
            torch.testing.assert_close(keys[f"convnext_stage_{i}"], z.permute(0, 2, 3, 1).reshape(3, -1, z.shape[1]))
        else:
            assert "convnext_stage_0" not in keys  # no per-location key for the 56x56 stage
        # the same statistics as features.py's (sqrt(var + 1e-6))
        torch.testing.assert_close(keys[f"convnext_stage_{i}_mean"], spatial_mean(z))
        torch.testing.assert_close(keys[f"convnext_stage_{i}_std"], spatial_std(z))
    # global_std duplicates stage 3's std (the authors' double weighting); global_mean is the pooled embedding
    assert keys["global_std"] is keys["convnext_stage_3_std"]
    norm = model.head.norm
    torch.testing.assert_close(keys["global_mean"][:, 0],
                               F.layer_norm(maps[3].mean(dim=(2, 3)), (64,), norm.weight, norm.bias, 1e-6))
    with torch.no_grad():
        torch.testing.assert_close(keys["global_mean"][:, 0], model(x))


def test_convnext_preprocessing_and_stem_input():
    x = images(2, 96)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    manual = F.interpolate(((x + 1) / 2 - mean) / std, size=(64, 64), mode="bilinear", antialias=True)
    torch.testing.assert_close(imagenet_input(x, 64), manual)
    model = randomize_(ConvNeXtV2Features(TINY_CONVNEXT))
    with torch.no_grad():
        torch.testing.assert_close(model.stage_outputs(x)[0], model.stages[0](model.stem(manual)))
    assert imagenet_input(x, 96).shape == x.shape  # same size: no resize
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        imagenet_input(x[:, :1], 64)


def test_convnext_runs_in_its_weights_dtype_under_autocast():
    model = randomize_(ConvNeXtV2Features(TINY_CONVNEXT))
    x = images(2, 32)
    with torch.no_grad():
        ref = model.feature_sets(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.feature_sets(x.bfloat16())
    for k in ref:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], ref[k], atol=0.05, rtol=0.05)  # only the bf16 input rounding differs


def test_grn_is_the_convnext_v2_formula():
    grn = GlobalResponseNorm(6)
    with torch.no_grad():
        grn.weight.normal_(), grn.bias.normal_()
    x = torch.randn(2, 4, 5, 6)  # (N, H, W, C)
    g = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), grn.weight * (x * n) + grn.bias + x)


def test_convnext_state_dict_round_trip_is_strict(tmp_path):
    model = randomize_(ConvNeXtV2Features(TINY_CONVNEXT))
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    x = images(2, 32)
    with torch.no_grad():
        ref = model.feature_sets(x)
        got = ConvNeXtV2Features.from_file(tmp_path / "timm.pth", TINY_CONVNEXT).feature_sets(x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="timm.pth"):  # other widths: a strict mismatch, naming the file
        ConvNeXtV2Features.from_file(tmp_path / "timm.pth", ConvNeXtV2Config(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)))


def _fb_names(state):
    """Our (timm) names -> the original FB ConvNeXt-V2 names (written here independently of the adapter's rules)."""
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if p[0] == "stem":
            k = f"downsample_layers.0.{p[1]}.{p[2]}"
        elif p[0] == "stages" and p[2] == "downsample":
            k = f"downsample_layers.{p[1]}.{p[3]}.{p[4]}"
        elif p[0] == "stages":
            i, j, rest = p[1], p[3], ".".join(p[4:])
            rest = {"conv_dw": "dwconv", "norm": "norm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}.get(
                ".".join(p[4:-1]), None)
            if rest is None:  # mlp.grn.weight/bias -> grn.gamma/beta, stored [1, 1, 1, C]
                k, v = f"stages.{i}.{j}.grn.{'gamma' if p[-1] == 'weight' else 'beta'}", v.reshape(1, 1, 1, -1)
            else:
                k = f"stages.{i}.{j}.{rest}.{p[-1]}"
        elif k.startswith("head.norm."):
            k = "norm." + p[-1]
        elif k.startswith("head.fc."):
            k = "head." + p[-1]
        out[k] = v
    return out


def _hf_names(state):
    """Our (timm) names -> HF transformers ConvNextV2ForImageClassification names (GRN stored [1, 1, 1, C])."""
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if p[0] == "stem":
            k = f"convnextv2.embeddings.{'patch_embeddings' if p[1] == '0' else 'layernorm'}.{p[2]}"
        elif p[0] == "stages" and p[2] == "downsample":
            k = f"convnextv2.encoder.stages.{p[1]}.downsampling_layer.{p[3]}.{p[4]}"
        elif p[0] == "stages":
            sub = {"conv_dw": "dwconv", "norm": "layernorm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2",
                   "mlp.grn": "grn"}[".".join(p[4:-1])]
            k = f"convnextv2.encoder.stages.{p[1]}.layers.{p[3]}.{sub}.{p[-1]}"
            v = v.reshape(1, 1, 1, -1) if sub == "grn" else v
        elif k.startswith("head.norm."):
            k = "convnextv2.layernorm." + p[-1]
        elif k.startswith("head.fc."):
            k = "classifier." + p[-1]
        out[k] = v
    return out


@pytest.mark.parametrize("fmt", ["fb", "hf", "timm_grn_4d", "module_prefix"])
def test_convnext_loads_fb_hf_and_other_timm_layouts(tmp_path, fmt):
    cfg = ConvNeXtV2Config(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), image_size=64, num_classes=5)
    model = randomize_(ConvNeXtV2Features(cfg))
    sd = model.state_dict()
    obj = {
        "fb": lambda: {"model": _fb_names(sd)},  # FB checkpoints wrap the weights in "model"
        "hf": lambda: _hf_names(sd),
        "timm_grn_4d": lambda: {k: v.reshape(1, 1, 1, -1) if ".grn." in k else v for k, v in sd.items()},
        "module_prefix": lambda: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[fmt]()
    torch.save(obj, tmp_path / "w.pt")
    assert timm_convnext_state_dict(load_weights_file(tmp_path / "w.pt")).keys() == sd.keys()
    x = images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(ConvNeXtV2Features.from_file(tmp_path / "w.pt", cfg)(x), model(x), rtol=0, atol=0)


def test_convnext_needs_the_final_norm(tmp_path):
    sd = {k: v for k, v in ConvNeXtV2Features(TINY_CONVNEXT).state_dict().items() if not k.startswith("head.")}
    torch.save(sd, tmp_path / "fcmae.pt")  # FCMAE pre-training weights have no head.norm
    with pytest.raises(ValueError, match="head.norm"):
        ConvNeXtV2Features.from_file(tmp_path / "fcmae.pt", TINY_CONVNEXT)


# ---------------------------------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ResNet50Features, ConvNeXtV2Features])
def test_missing_weights_file_names_the_path(tmp_path, cls):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=str(path)):
        cls.from_file(path)


def test_safetensors_files_load(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = randomize_(ResNet50Features(TINY_RESNET))
    safetensors.save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = ResNet50Features.from_file(tmp_path / "model.safetensors", TINY_RESNET)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.taps(x)["layer4"], model.taps(x)["layer4"], rtol=0, atol=0)
