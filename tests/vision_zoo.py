"""Every image-classification architecture transformers can build, as a tiny random model.

The list is transformers' own (MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES), not a hand-picked
one: a model type that a new transformers release adds fails tests/test_vision_zoo.py until it
has a row here. Each row shrinks the type's default config to a few thousand weights at 32x32
pixels and keeps everything that decides how it trains: its dropout, drop path and norms stay
at their defaults.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForImageClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

PIXELS = 32
LABELS = 3
VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
           image_size=PIXELS, patch_size=8)
SWIN = dict(image_size=PIXELS, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
            window_size=4)
TWO_TOWERS = dict(vision_config=dict(**VIT), text_config=dict(hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2,
                                                             intermediate_size=32))
# Per model type, the config fields that make it tiny (everything else stays the default).
TINY: dict[str, dict] = {
    "beit": VIT,
    "bit": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2,
                out_features=None, out_indices=None, stage_names=None),
    "clip": TWO_TOWERS,
    "convnext": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=PIXELS),
    "convnextv2": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=PIXELS),
    "cvt": dict(embed_dim=[8, 16], num_heads=[1, 2], depth=[1, 2], patch_sizes=[7, 3],
                patch_stride=[4, 2], patch_padding=[2, 1], mlp_ratio=[4.0, 4.0],
                attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.1],
                qkv_bias=[True, True], cls_token=[False, True],
                qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1],
                stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1]),
    "data2vec-vision": VIT,
    "deit": VIT,
    "dinat": dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], kernel_size=3,
                  dilations=[[1], [1]], out_features=None, out_indices=None, stage_names=None),
    "dinov2": dict(VIT, mlp_ratio=2),
    "dinov2_with_registers": dict(VIT, mlp_ratio=2),
    "donut-swin": SWIN,
    "efficientnet": dict(image_size=PIXELS, hidden_dim=320, num_hidden_layers=4,
                         in_channels=[8, 8], out_channels=[8, 16], kernel_sizes=[3, 3],
                         strides=[1, 2], num_block_repeats=[1, 1], expand_ratios=[1, 2],
                         width_coefficient=0.25, depth_coefficient=0.5),
    "focalnet": dict(image_size=PIXELS, embed_dim=8, hidden_sizes=[8, 16], depths=[1, 1],
                     focal_levels=[2, 2], focal_windows=[3, 3], out_features=None,
                     out_indices=None, stage_names=None),
    "hgnet_v2": dict(embedding_size=8, depths=[1, 1], hidden_sizes=[16, 32],
                     stem_channels=[3, 8, 8], stage_in_channels=[8, 16],
                     stage_mid_channels=[8, 8], stage_out_channels=[16, 32],
                     stage_num_blocks=[1, 1], stage_downsample=[False, True],
                     stage_downsample_strides=[2, 2], stage_light_block=[False, True],
                     stage_kernel_size=[3, 3], stage_numb_of_layers=[2, 2],
                     out_features=None, out_indices=None, stage_names=None),
    "hiera": dict(embed_dim=8, image_size=[PIXELS, PIXELS], patch_size=[3, 3], patch_stride=[2, 2],
                  patch_padding=[1, 1], depths=[1, 1], num_heads=[1, 2], num_query_pool=1,
                  masked_unit_size=[4, 4], masked_unit_attention=[True, False],
                  out_features=None, out_indices=None, stage_names=None),
    "ijepa": VIT,
    "imagegpt": dict(n_embd=16, n_layer=2, n_head=2, n_positions=64),
    "levit": dict(image_size=PIXELS, hidden_sizes=[16, 24], num_attention_heads=[1, 2],
                  depths=[1, 1], key_dim=[8, 8], mlp_ratio=[2, 2], attention_ratio=[2, 2],
                  down_ops=[["Subsample", 8, 1, 2, 2, 2]], patch_size=16),
    "metaclip_2": TWO_TOWERS,
    "mobilenet_v1": dict(image_size=PIXELS, depth_multiplier=0.25, min_depth=4),
    "mobilenet_v2": dict(image_size=PIXELS, depth_multiplier=0.25, min_depth=4,
                         depth_divisible_by=4),
    "mobilevit": dict(image_size=PIXELS, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8,
                      8, 8, 8, 16], num_attention_heads=2, patch_size=2),
    "mobilevitv2": dict(image_size=PIXELS, width_multiplier=0.25, output_stride=8,
                        n_attn_blocks=[1, 1, 1], base_attn_unit_dims=[16, 16, 16]),
    "perceiver": dict(num_latents=4, d_latents=16, d_model=16, num_self_attends_per_block=1,
                      num_self_attention_heads=2, num_cross_attention_heads=1,
                      image_size=PIXELS),
    "poolformer": dict(depths=[1, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
                       padding=[2, 1], num_encoder_blocks=2),
    "pp_lcnet": dict(block_configs=[[[3, 8, 8, 1, False]], [[3, 8, 16, 2, False]],
                                    [[3, 16, 16, 2, False]], [[3, 16, 32, 2, False]],
                                    [[3, 32, 32, 2, True]]],
                     stem_channels=8, class_expand=32, out_features=None, out_indices=None,
                     stage_names=None),
    "pvt": dict(image_size=PIXELS, num_encoder_blocks=2, depths=[1, 1],
                sequence_reduction_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[4, 2],
                strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
    "pvt_v2": dict(image_size=[PIXELS, PIXELS], num_encoder_blocks=2, depths=[1, 1],
                   sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
                   num_attention_heads=[1, 2], mlp_ratios=[2, 2], out_features=None,
                   out_indices=None, stage_names=None),
    "regnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8),
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=None,
                   out_indices=None, stage_names=None),
    "segformer": dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                      patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                      mlp_ratios=[2, 2], decoder_hidden_size=16),
    "shieldgemma2": dict(vision_config=dict(VIT, num_hidden_layers=1), mm_tokens_per_image=4,
                         text_config=dict(hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          intermediate_size=32, head_dim=8)),
    "siglip": TWO_TOWERS,
    "siglip2": TWO_TOWERS,
    "swiftformer": dict(image_size=PIXELS, depths=[1, 1, 1, 1], embed_dims=[8, 8, 16, 16]),
    "swin": SWIN,
    "swinv2": SWIN,
    "textnet": dict(stem_out_channels=8, image_size=[PIXELS, PIXELS],
                    conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]], [[3, 3]], [[3, 3]]],
                    conv_layer_strides=[[1], [2], [2], [2]], hidden_sizes=[8, 8, 8, 16, 16],
                    depths=[1, 1, 1, 1], out_features=None, out_indices=None, stage_names=None),
    "timm_wrapper": dict(),
    "vit": VIT,
    "vit_msn": VIT,
}


def model_types() -> list[str]:
    """Every model type transformers builds an image classifier for."""
    return sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def classifiers() -> list[str]:
    """Every image-classifier class of those types (DeiT and LeViT have one with a
    distillation head too, Perceiver three), by class name."""
    return sorted(name for names in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values()
                  for name in ((names,) if isinstance(names, str) else names))


def model_type_of(class_name: str) -> str:
    return next(model_type for model_type, names in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
                .items() if class_name in ((names,) if isinstance(names, str) else names))


def tiny_model(class_name: str, seed: int = 0) -> torch.nn.Module:
    """The image classifier from its type's tiny config, random weights drawn from `seed`, in
    eval mode (a test puts it in the mode it trains in)."""
    model_type = model_type_of(class_name)
    # the auto class picks among a type's classes by the config's architectures, as a
    # checkpoint's config.json names them
    config = AutoConfig.for_model(model_type, num_labels=LABELS, architectures=[class_name],
                                  **TINY[model_type])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForImageClassification.from_config(config).eval()
