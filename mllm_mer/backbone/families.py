"""The backbone families mllm_mer supports, in one table: Qwen2.5-Omni and Qwen3-Omni (their thinkers).

Everything that differs between the families is a field of `BackboneFamily`, and every family-specific
decision in the package reads it from here: which checkpoint `model_type`s belong to a family, the thinker
class and processor class, the names of the special tokens (and of the thinker-config attributes holding
their ids), the chat template the tiny twins ship, and the module paths of the language model, the towers
and their projectors.

Differences that matter to mllm_mer (transformers 5.23):

| | Qwen2.5-Omni | Qwen3-Omni |
|---|---|---|
| thinker | `Qwen2_5OmniThinkerForConditionalGeneration` | `Qwen3OmniMoeThinkerForConditionalGeneration` |
| language model | dense MLP | MoE MLP (`mlp.experts` are 3-D parameters, `mlp.gate` the router) |
| media tokens | `<|AUDIO|> <|VIDEO|> <|IMAGE|>` | `<|audio_pad|> <|video_pad|> <|image_pad|>` |
| markers | `<|audio_bos|> <|audio_eos|>` | `<|audio_start|> <|audio_end|>` |
| | `<|vision_bos|> <|vision_eos|>` | `<|vision_start|> <|vision_end|>` |
| config ids | `audio_token_index`, ... | `audio_token_id`, ... |
| audio projector | `audio_tower.{ln_post, proj}` | `audio_tower.{ln_post, proj1, proj2}` |
| vision projector | `visual.merger` | `visual.merger` + `visual.merger_list` (deepstack) |
| vision patch | 14 | 16 |
| audio stem | `audio_tower.conv1` | `audio_tower.conv2d1` (.. `conv2d3`) |

Deepstack (Qwen3-Omni): the vision tower also returns features of some of its intermediate blocks, each
passed through its own merger (`visual.merger_list`); the language model adds them to the hidden states of
the video/image positions after its first `len(deepstack_visual_indexes)` layers. Anything that caches
what the vision tower produces must therefore cache both the merged output and the deepstack features
(transformers' `mm_encoder_outputs["video"]` carries both: `pooler_output` and `deepstack_features`).

peft (0.21.2) on the MoE language model turns a regex `target_modules` into a set of leaf names, which also
match the audio tower's `q_proj/k_proj/v_proj`; `adapter_exclude` keeps adapters out of the towers for
every family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

TOKEN_ROLES: tuple[str, ...] = (
    "audio", "video", "image", "audio_bos", "audio_eos", "vision_bos", "vision_eos",
)
"""The special tokens `SpecialTokenIds` reads (besides pad and eos), by role."""


@dataclass(frozen=True)
class BackboneFamily:
    """One supported backbone family (see the module docstring for the table of differences).

    Attributes:
        name: the family key, also the tiny builder's `--arch` ("qwen2_5_omni", "qwen3_omni").
        display: human-readable name for messages.
        thinker_model_type: `model_type` of a thinker-only checkpoint.
        full_model_type: `model_type` of the whole Omni checkpoint (thinker + talker); only the thinker loads.
        thinker_class: transformers class name of the thinker.
        processor_class: transformers class name of the processor the loader expects.
        tokens: role (`TOKEN_ROLES`) -> token text, as the processor's tokenizer names them.
        config_ids: role -> thinker-config attribute holding that token's id (read first; the tokenizer
            is the fallback when a checkpoint's config lacks the attribute).
        special_tokens: every special token of the family's tokenizer that the tiny twin needs.
        language_model: module path of the language model inside the thinker.
        audio_tower: module path of the audio encoder inside the thinker.
        vision_tower: module path of the vision encoder inside the thinker.
        audio_projector: children of the audio tower that project into the language model's space.
        vision_projector: children of the vision tower that do so (the patch mergers).
        deepstack: the vision tower feeds intermediate features into early language-model layers.
        vision_patch: the vision tower's patch size (pixels).
        audio_stem: the audio tower's first convolution (its weight's dtype is the tower's input dtype).
    """

    name: str
    display: str
    thinker_model_type: str
    full_model_type: str
    thinker_class: str
    processor_class: str
    tokens: dict[str, str]
    config_ids: dict[str, str]
    special_tokens: tuple[str, ...]
    audio_projector: tuple[str, ...]
    vision_projector: tuple[str, ...]
    deepstack: bool
    vision_patch: int
    audio_stem: str
    language_model: str = "model.language_model"
    audio_tower: str = "model.audio_tower"
    vision_tower: str = "model.visual"

    @property
    def model_types(self) -> tuple[str, str]:
        """(thinker, full) checkpoint model types."""
        return (self.thinker_model_type, self.full_model_type)

    @property
    def language_model_layers(self) -> str:
        """Module path of the decoder layer list inside the thinker."""
        return f"{self.language_model}.layers"

    @property
    def adapter_exclude(self) -> str:
        """peft `exclude_modules` regex that keeps adapters out of the audio and vision towers."""
        towers = "|".join(p.rsplit(".", 1)[-1] for p in (self.audio_tower, self.vision_tower))
        return rf".*({towers}).*"

    def model_class(self) -> type:
        """The transformers thinker class (imported on first use)."""
        return getattr(importlib.import_module("transformers"), self.thinker_class)


QWEN2_5_OMNI = BackboneFamily(
    name="qwen2_5_omni",
    display="Qwen2.5-Omni",
    thinker_model_type="qwen2_5_omni_thinker",
    full_model_type="qwen2_5_omni",
    thinker_class="Qwen2_5OmniThinkerForConditionalGeneration",
    processor_class="Qwen2_5OmniProcessor",
    tokens={
        "audio": "<|AUDIO|>", "video": "<|VIDEO|>", "image": "<|IMAGE|>",
        "audio_bos": "<|audio_bos|>", "audio_eos": "<|audio_eos|>",
        "vision_bos": "<|vision_bos|>", "vision_eos": "<|vision_eos|>",
    },
    config_ids={
        "audio": "audio_token_index", "video": "video_token_index", "image": "image_token_index",
        "audio_bos": "audio_start_token_id", "audio_eos": "audio_end_token_id",
        "vision_bos": "vision_start_token_id", "vision_eos": "vision_end_token_id",
    },
    special_tokens=(
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
        "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
        "<|IMAGE|>", "<|VIDEO|>",
    ),
    audio_projector=("ln_post", "proj"),
    vision_projector=("merger",),
    deepstack=False,
    vision_patch=14,
    audio_stem="conv1",
)

QWEN3_OMNI = BackboneFamily(
    name="qwen3_omni",
    display="Qwen3-Omni",
    thinker_model_type="qwen3_omni_moe_thinker",
    full_model_type="qwen3_omni_moe",
    thinker_class="Qwen3OmniMoeThinkerForConditionalGeneration",
    processor_class="Qwen3OmniMoeProcessor",
    tokens={
        "audio": "<|audio_pad|>", "video": "<|video_pad|>", "image": "<|image_pad|>",
        "audio_bos": "<|audio_start|>", "audio_eos": "<|audio_end|>",
        "vision_bos": "<|vision_start|>", "vision_eos": "<|vision_end|>",
    },
    config_ids={
        "audio": "audio_token_id", "video": "video_token_id", "image": "image_token_id",
        "audio_bos": "audio_start_token_id", "audio_eos": "audio_end_token_id",
        "vision_bos": "vision_start_token_id", "vision_eos": "vision_end_token_id",
    },
    special_tokens=(
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
        "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    ),
    audio_projector=("ln_post", "proj1", "proj2"),
    vision_projector=("merger", "merger_list"),
    deepstack=True,
    vision_patch=16,
    audio_stem="conv2d1",
)

FAMILIES: dict[str, BackboneFamily] = {f.name: f for f in (QWEN2_5_OMNI, QWEN3_OMNI)}
"""Family name -> family."""

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES.values() for t in f.model_types)
"""Every checkpoint `model_type` `load_backbone` accepts."""


def family_for_model_type(model_type: str) -> BackboneFamily:
    """The family a checkpoint `model_type` (thinker or full model) belongs to.

    Raises:
        ValueError: an unsupported model type (the message lists the supported ones).
    """
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ValueError(f"model_type={model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")


def family_of(config: object) -> BackboneFamily:
    """The family of a thinker (or full-model) config, from its `model_type`."""
    return family_for_model_type(getattr(config, "model_type", ""))


def family_named(name: str) -> BackboneFamily:
    """The family called `name` ("qwen2_5_omni" or "qwen3_omni").

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; valid: {sorted(FAMILIES)}")
    return FAMILIES[name]


def thinker_classes() -> tuple[type, ...]:
    """Every supported thinker class (for isinstance checks)."""
    return tuple(f.model_class() for f in FAMILIES.values())


BACKBONE_PARTS: tuple[str, ...] = (
    "language_model", "audio_tower", "audio_projector", "vision_tower", "vision_projector",
)
"""The backbone's parts, as `backbone_part` names them (and `model.freeze.*` switches them)."""


def backbone_part(name: str) -> str | None:
    """Which backbone part a parameter belongs to, from its full name (any family, any wrapper prefix).

    The tower and language-model paths are the same in every family; a tower's projector children are
    matched against the union of the families' names (they do not collide: Qwen2.5-Omni's audio tower has
    no `proj1`/`proj2`, Qwen3-Omni's no `proj`).

    Returns:
        "audio_projector", "audio_tower", "vision_projector", "vision_tower", "language_model", or None
        when the name lies in none of them.
    """
    dotted = f".{name}"
    families = FAMILIES.values()
    for part, towers, children in (
        ("audio", {f.audio_tower for f in families}, {c for f in families for c in f.audio_projector}),
        ("vision", {f.vision_tower for f in families}, {c for f in families for c in f.vision_projector}),
    ):
        for tower in towers:
            if f".{tower}." in dotted:
                projector = any(f".{tower}.{child}." in dotted for child in children)
                return f"{part}_projector" if projector else f"{part}_tower"
    if any(f".{f.language_model}." in dotted for f in families):
        return "language_model"
    if name.endswith("lm_head.weight") or ".lm_head." in dotted:
        return "language_model"
    return None


_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}{{ '@vision_bos@@video@@vision_eos@' }}"
    "{% elif content['type'] == 'image' %}{{ '@vision_bos@@image@@vision_eos@' }}"
    "{% elif content['type'] == 'audio' %}{{ '@audio_bos@@audio@@audio_eos@' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template(family: BackboneFamily) -> str:
    """Qwen-style chat template (video / audio / image / text content items) with the family's tokens.

    What the tiny twins ship; real checkpoints bring their own (same layout for these items).
    """
    template = _CHAT_TEMPLATE
    for role, token in family.tokens.items():
        template = template.replace(f"@{role}@", token)
    return template


def find_thinker(model: nn.Module) -> PreTrainedModel:
    """The thinker inside `model` (the model itself, a peft wrapper around it, or a `MerModel`), any family.

    Raises:
        TypeError: `model` contains no thinker of a supported family (`mllm_mer.backbone.families`).
    """
    classes = thinker_classes()
    for module in model.modules():
        if isinstance(module, classes):
            return module
    names = ", ".join(c.__name__ for c in classes)
    raise TypeError(
        f"{type(model).__name__} contains no thinker ({names}); give the thinker, a peft-wrapped thinker or "
        "a MerModel"
    )


def text_attention_modules(thinker: PreTrainedModel) -> list[nn.Module]:
    """The self-attention module of every language-model layer, in layer order (L entries)."""
    layers = thinker.get_submodule(family_of(thinker.config).language_model_layers)
    return [layer.self_attn for layer in layers]
