"""Tiny random-weight diffusers models for the accelerate tests, built from configs as diffusers' own tests build
them, with one input batch each: ``MODELS[name]() -> (model, run)`` where ``run(model)`` is the output tensor."""

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from torch import nn

CROSS_DIM = 32


def unet_2d(time_embedding_norm: str = "default"):
    """The DDPM-style UNet2DModel of diffusers' tests (attention blocks with an input GroupNorm)."""
    torch.manual_seed(0)
    model = UNet2DModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=3,
                        out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                        resnet_time_scale_shift=time_embedding_norm).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 700])
    return model, lambda m: m(x, t).sample


def unet_sd15():
    """An SD-1.5-like UNet2DConditionModel (cross attention on prompt embeddings)."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
                                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=CROSS_DIM,
                                 norm_num_groups=32).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(501)
    emb = torch.randn(2, 7, CROSS_DIM, generator=g)
    return model, lambda m: m(x, t, encoder_hidden_states=emb).sample


def unet_sdxl():
    """An SDXL-like UNet2DConditionModel: text_time added conditioning, linear projections, 2 transformer layers."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
                                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                 use_linear_projection=True, addition_embed_type="text_time",
                                 addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                 projection_class_embeddings_input_dim=6 * 8 + CROSS_DIM,
                                 cross_attention_dim=CROSS_DIM, norm_num_groups=32).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3.0, 901.0])
    emb = torch.randn(2, 5, CROSS_DIM, generator=g)
    added = {"text_embeds": torch.randn(2, CROSS_DIM, generator=g),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)}
    return model, lambda m: m(x, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample


def vae():
    """AutoencoderKL with a mid-block attention: encode + decode."""
    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                          down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                          latent_channels=4, norm_num_groups=32, sample_size=16).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, lambda m: m.decode(m.encode(x).latent_dist.mode()).sample


MODELS = {"unet_2d": unet_2d, "unet_2d_scale_shift": lambda: unet_2d("scale_shift"), "unet_sd15": unet_sd15,
          "unet_sdxl": unet_sdxl, "vae": vae}

def block_counts(report) -> dict:
    """``report.patched`` as {class: count}, without the CPU's packed-weight Conv2d / Linear entries (which
    :func:`assert_packed_every_plain_layer` checks)."""
    return {k: len(v) for k, v in report.patched.items() if k not in ("Conv2d", "Linear")}


def assert_packed_every_plain_layer(report, model, prefix="") -> None:
    """On the CPU, accelerate gives every plain Conv2d / Linear the packed-weight forward (fastdiff.prepack)."""
    from fastdiff.prepack import packed_types

    for cls in (nn.Conv2d, nn.Linear):
        want = sorted(".".join(p for p in (prefix, path) if p) for path, m in model.named_modules()
                      if type(m) is cls and cls in packed_types(report.dtype))
        assert sorted(report.patched.get(cls.__name__, [])) == want, cls.__name__


# how many modules of each patched class the models hold
EXPECTED = {
    "unet_2d": {"ResnetBlock2D": 12, "AttnProcessor2_0": 6, "UNet2DModel": 1},
    "unet_2d_scale_shift": {"ResnetBlock2D": 12, "AttnProcessor2_0": 6, "UNet2DModel": 1},
    "unet_sd15": {"ResnetBlock2D": 12, "AttnProcessor2_0": 12, "Transformer2DModel": 6, "UNet2DConditionModel": 1},
    "unet_sdxl": {"ResnetBlock2D": 12, "AttnProcessor2_0": 24, "Transformer2DModel": 6, "UNet2DConditionModel": 1},
    "vae": {"ResnetBlock2D": 10, "AttnProcessor2_0": 2, "Encoder": 1, "Decoder": 1},
}
