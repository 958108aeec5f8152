"""Text encoder parity: our :class:`~kandinsky.text_encoders.MultilingualCLIP` against diffusers 0.42.1
``pipelines.kandinsky.text_encoder.MultilingualCLIP`` with the same random weights, at a tiny and a
moderate XLM-RoBERTa configuration, and at the full M-CLIP (XLM-R large) configuration.

The CLIP towers are ``transformers`` models used as they are (nothing of ours to compare).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import torch

from kandinsky.parity import Row, compare
from kandinsky.testing import randomize_
from kandinsky.text_encoders import MultilingualCLIP

_COMMON = {"type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "layer_norm_eps": 1e-5,
           "hidden_act": "gelu", "max_position_embeddings": 514}
CONFIGS = {
    "tiny": {**_COMMON, "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "transformerDimensions": 32, "numDims": 24},
    "moderate": {**_COMMON, "vocab_size": 5000, "hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 8,
                 "intermediate_size": 1024, "transformerDimensions": 256, "numDims": 128},
    # kandinsky-community/kandinsky-2-1 text_encoder/config.json
    "full": {**_COMMON, "vocab_size": 250002, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
             "intermediate_size": 4096, "transformerDimensions": 1024, "numDims": 768},
}


def diffusers_pair(values: dict, seed: int = 0) -> tuple[MultilingualCLIP, torch.nn.Module]:
    """(ours with seeded random weights, diffusers' MultilingualCLIP with the same weights), eval mode."""
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig
    from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP as DiffusersMCLIP

    ours = randomize_(MultilingualCLIP.from_config(values), seed).eval()
    rest = {k: v for k, v in values.items() if k not in ("transformerDimensions", "numDims")}
    config = MCLIPConfig(transformerDimSize=values["transformerDimensions"], imageDimSize=values["numDims"], **rest)
    with torch.device("meta"):  # skip transformers' own initialisation: every weight is overwritten
        theirs = DiffusersMCLIP(config)
    theirs.load_state_dict(ours.state_dict(), assign=True, strict=False)
    # non-persistent buffers (position ids) are not in the state dict: copy them too
    for name, buffer in ours.named_buffers():
        module_name, _, attr = name.rpartition(".")
        setattr(theirs.get_submodule(module_name), attr, buffer.clone())
    if any(t.is_meta for t in [*theirs.parameters(), *theirs.buffers()]):
        raise RuntimeError("diffusers MultilingualCLIP: some tensors were not filled")
    return ours, theirs.eval()


def token_inputs(vocab_size: int, batch: int = 2, length: int = 77, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with prefix masks of 5, 12, ... real tokens (<s> first, </s> last, <pad> = 1 after)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=generator)
    valid = torch.tensor([5 + 7 * i for i in range(batch)]).clamp(max=length)
    mask = (torch.arange(length)[None] < valid[:, None]).long()
    ids[:, 0] = 0
    ids[torch.arange(batch), valid - 1] = 2
    return ids.masked_fill(mask == 0, 1), mask


def checks() -> Iterator[Row]:
    for name, values in CONFIGS.items():
        ours, theirs = diffusers_pair(values)
        ids, mask = token_inputs(values["vocab_size"])
        with torch.no_grad():
            embeds, hidden = ours(ids, mask)
            ref_embeds, ref_hidden = theirs(input_ids=ids, attention_mask=mask)
        # same weights and math; ours runs transformers' SDPA attention, diffusers' M-CLIP the eager one
        # (its config class opts out of SDPA): float32 rounding differences only
        yield compare("text_encoder", f"M-CLIP {name}: text_embeds", embeds, ref_embeds, 1e-5)
        yield compare("text_encoder", f"M-CLIP {name}: text_hidden_states", hidden, ref_hidden, 1e-5)
        del ours, theirs
        gc.collect()
