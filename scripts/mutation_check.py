"""Plant known bugs in a copy of the package, one at a time, and check that the tests catch every one.

    python scripts/mutation_check.py                    # every mutation, two at a time
    python scripts/mutation_check.py variance_from_unconditional_half prior_causal_mask_missing
    python scripts/mutation_check.py --patterns-only    # only check that every mutation still applies
    python scripts/mutation_check.py --list

Each mutation replaces one piece of text, which must occur exactly once, in one file of a fresh temporary
copy of the repository (kandinsky/, tests/, configs/, pyproject.toml; the test fixtures are linked), then
runs only the tests chosen to catch it (``pytest -x``) with the copy first on PYTHONPATH; a plugin checks
that the tests import the copy, not the installed package. The tests are first run once on an unmutated
copy, so that a failure under a mutation means the mutation was caught.

Exit status 1 when a mutation survives, when its text is not found exactly once (the code moved: update
the mutation to the new code), when the chosen tests fail without any mutation, or when a run ends in
anything but a pass or a test failure (an import error, a timeout).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("kandinsky", "tests", "configs", "pyproject.toml")
LINKED = ("tests/fixtures",)  # large and read-only
GUARD = "_mutation_guard"
WRONG_IMPORT = 3  # the guard's exit status


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest ids, relative to the repository root


PIPELINE = "tests/test_pipeline.py::"
PRIOR_PREFIX = "tests/test_prior.py::test_text_prefix_gives_the_full_forward_at_every_step"
SCHEDULERS = "tests/test_schedulers.py::"
COMPONENTS = "tests/test_components.py::"
BATCH = "tests/test_batch.py::"
IMAGES = "tests/test_images.py::"
SCHEDULER_CONFIGS = "tests/test_convert_scheduler.py::"
TRAINER = "tests/test_training_trainer.py::"
TRAINING_DATA = "tests/test_training_data.py::"
OPS = "tests/test_ops.py::"

MUTATIONS = (
    # ---- pipeline: guidance and its batch order
    Mutation("variance_from_unconditional_half", "kandinsky/pipeline/common.py",
             "cond[:, :guided_channels], cond[:, guided_channels:]",
             "cond[:, :guided_channels], uncond[:, guided_channels:]",
             (PIPELINE + "test_decoder_sampler_matches_diffusers_pipeline[ddpm]",
              PIPELINE + "test_p_sampler_is_diffusers_ddpm_on_the_respaced_timesteps")),
    Mutation("decoder_guidance_roles_swapped", "kandinsky/pipeline/common.py",
             "[uncond + guidance_scale * (cond_guided - uncond), cond_rest]",
             "[cond_guided + guidance_scale * (uncond - cond_guided), cond_rest]",
             (PIPELINE + "test_guidance_batch_order_is_uncond_then_cond",
              PIPELINE + "test_decode_matches_decoder_pipeline")),
    Mutation("prior_guidance_roles_swapped", "kandinsky/pipeline/common.py",
             "return uncond + guidance_scale * (cond - uncond)", "return cond + guidance_scale * (uncond - cond)",
             (PIPELINE + "test_prior_matches_diffusers[4.0-None]",
              PIPELINE + "test_prior_list_of_prompts_with_negatives")),
    Mutation("decoder_text_hidden_states_order_swapped", "kandinsky/pipeline/k21.py",
             "torch.cat([uncond_hidden, text_hidden_states])", "torch.cat([text_hidden_states, uncond_hidden])",
             (PIPELINE + "test_guidance_batch_order_is_uncond_then_cond",
              PIPELINE + "test_img2img_matches_diffusers[strength0.3]")),
    Mutation("decoder_text_embeds_order_swapped", "kandinsky/pipeline/k21.py",
             "torch.cat([uncond_embeds, text_embeds])", "torch.cat([text_embeds, uncond_embeds])",
             (PIPELINE + "test_guidance_batch_order_is_uncond_then_cond",
              PIPELINE + "test_img2img_matches_diffusers[strength0.3]")),
    Mutation("decoder_image_embeds_order_swapped", "kandinsky/pipeline/k21.py",
             "torch.cat([negative_image_embeds, image_embeds])", "torch.cat([image_embeds, negative_image_embeds])",
             (PIPELINE + "test_guidance_batch_order_is_uncond_then_cond",
              PIPELINE + "test_decode_matches_decoder_pipeline")),
    Mutation("prior_text_order_swapped", "kandinsky/pipeline/k21.py",
             "(torch.cat([u, c]) for u, c in", "(torch.cat([c, u]) for u, c in",
             (PIPELINE + "test_prior_matches_diffusers[4.0-None]",)),
    # ---- pipeline: tasks
    Mutation("mask_convention_inverted", "kandinsky/pipeline/k21.py",
             'keep = 1 - mask if call.settings.mask_convention == "repaint" else mask',
             'keep = mask if call.settings.mask_convention == "repaint" else 1 - mask',
             (PIPELINE + "test_inpaint_seed_example_matches_diffusers",
              PIPELINE + "test_inpaint_legacy_mask_equals_diffusers_with_inverted_mask")),
    Mutation("img2img_noise_timestep_off_by_one", "kandinsky/pipeline/k21.py",
             "num_train_timesteps * strength) - 2", "num_train_timesteps * strength) - 1",
             (PIPELINE + "test_img2img_matches_diffusers[strength0.3]",)),
    Mutation("interpolate_weights_ignored", "kandinsky/pipeline/k21.py",
             "embeds = weight * embeds.to(self.device)", "embeds = embeds.to(self.device)",
             (PIPELINE + "test_interpolate_and_mix_match_diffusers",
              PIPELINE + "test_mix_is_interpolate_then_the_decoder_as_in_diffusers")),
    Mutation("decoder_start_noise_fixed", "kandinsky/pipeline/common.py",
             "width // factor), generator, self.device)",
             "width // factor), torch.Generator().manual_seed(0), self.device)",
             (PIPELINE + "test_decode_matches_decoder_pipeline",)),
    Mutation("p_sampler_x0_clamp_widened", "kandinsky/pipeline/common.py",
             "x0 = x0.clamp(-2, 2)", "x0 = x0.clamp(-3, 3)",
             (PIPELINE + "test_p_sampler_clamps_x0_as_the_original",
              PIPELINE + "test_p_sampler_is_diffusers_ddpm_on_the_respaced_timesteps")),
    Mutation("cli_legacy_mask_flag_inverted", "kandinsky/cli.py",
             'values["mask_convention"] = "legacy" if args.legacy_mask else "repaint"',
             'values["mask_convention"] = "repaint" if args.legacy_mask else "legacy"',
             ("tests/test_cli.py::test_img2img_inpaint_and_mix_match_the_api",)),
    # ---- samplers
    Mutation("noise_generator_fixed", "kandinsky/schedulers/samplers.py",
             "randn(like.shape, generator, like.device, like.dtype)",
             "randn(like.shape, torch.Generator().manual_seed(0), like.device, like.dtype)",
             (SCHEDULERS + "test_sampler_matches_diffusers[ddpm.]",
              PIPELINE + "test_decoder_sampler_matches_diffusers_pipeline[ddpm]")),
    Mutation("learned_range_fraction_inverted", "kandinsky/schedulers/samplers.py",
             "frac = (variance_value + 1) / 2", "frac = (1 - variance_value) / 2",
             (SCHEDULERS + "test_sampler_matches_original[p_sample.plain.]",
              SCHEDULERS + "test_sampler_matches_diffusers[ddpm.]",
              PIPELINE + "test_decoder_sampler_matches_diffusers_pipeline[ddpm]")),
    Mutation("x0_fn_after_the_threshold", "kandinsky/schedulers/samplers.py",
             "                x0 = x0_fn(x0, tb)\n            return x0 if x0_process is None else x0_process(x0)",
             "                return x0_fn(x0 if x0_process is None else x0_process(x0), tb)\n"
             "            return x0 if x0_process is None else x0_process(x0)",
             (SCHEDULERS + "test_p_sampler_x0_fn_is_applied_before_the_threshold",)),
    Mutation("unclip_float64_by_default", "kandinsky/schedulers/samplers.py",
             'x0_fn=None, arithmetic="float32"):', 'x0_fn=None, arithmetic="float64"):',
             (SCHEDULERS + "test_sampler_matches_diffusers[unclip.]",
              PIPELINE + "test_text2img_with_the_prior_matches_the_combined_pipeline")),
    # ---- pipeline: hardening
    Mutation("integer_mask_scaled_by_255", "kandinsky/images.py",
             "integer = mask_image.dtype.kind in \"biu\"", "integer = False\n            mask_image = mask_image / 255",
             (PIPELINE + "test_integer_masks_are_binarised_as_diffusers_does",)),
    Mutation("nan_input_image_accepted", "kandinsky/images.py",
             'image = check_finite("image", image.detach().float().cpu())', "image = image.detach().float().cpu()",
             (PIPELINE + "test_bad_values_name_their_argument",)),
    # ---- the components store and LoRA adapters
    Mutation("lora_alpha_ignored_when_loading", "kandinsky/lora.py",
             'add_lora(model, meta["rank"], meta["alpha"], meta["targets"], adapter=adapter)',
             'add_lora(model, meta["rank"], None, meta["targets"], adapter=adapter)',
             (COMPONENTS + "test_stacked_adapters_fuse_to_the_closed_form",)),
    Mutation("lora_scale_ignored_when_loading", "kandinsky/lora.py",
             "set_lora_scale(model, scale, adapter=adapter)", "set_lora_scale(model, 1.0, adapter=adapter)",
             (COMPONENTS + "test_stacked_adapters_fuse_to_the_closed_form",)),
    Mutation("stacked_adapter_left_inactive", "kandinsky/lora.py",
             "        model = inject_adapter_in_model(config, model, adapter_name=adapter)\n    _activate_all(model)",
             "        model = inject_adapter_in_model(config, model, adapter_name=adapter)",
             (COMPONENTS + "test_stacked_adapters_fuse_to_the_closed_form",)),
    Mutation("lora_shape_check_inverted", "kandinsky/lora.py",
             "if tuple(weights[key].shape) != shape:", "if tuple(weights[key].shape) == shape:",
             (COMPONENTS + "test_a_failed_load_leaves_the_store_as_it_was",)),
    Mutation("plain_copy_drops_adapters", "kandinsky/components.py",
             "return (lora.fuse_lora(module) if lora.has_lora(module) else module).cpu()",
             "return (lora.remove_lora(module) if lora.has_lora(module) else module).cpu()",
             (COMPONENTS + "test_stacked_adapters_fuse_to_the_closed_form",)),
    Mutation("saving_drops_adapters", "kandinsky/components.py",
             "return lora.fuse_lora(copy.deepcopy(module)) if lora.has_lora(module) else module",
             "return lora.remove_lora(copy.deepcopy(module)) if lora.has_lora(module) else module",
             (COMPONENTS + "test_saving_writes_the_adapters_fused",)),
    Mutation("lora_run_adapter_not_loaded", "kandinsky/components.py",
             "if seed is None and adapter.is_file():", "if seed is not None and adapter.is_file():",
             (COMPONENTS + "test_a_lora_training_folder_loads_with_its_adapter",)),
    Mutation("offload_drops_adapted_module", "kandinsky/components.py",
             "if name in self._loaders and not any(a.component == name for a in self.adapters):",
             "if name in self._loaders:",
             (COMPONENTS + "test_offload_never_drops_a_module_that_carries_an_adapter",)),
    Mutation("store_dtype_check_inverted", "kandinsky/components.py",
             "(first.is_floating_point() and first.dtype != self.dtype)",
             "(first.is_floating_point() and first.dtype == self.dtype)",
             (COMPONENTS + "test_module_is_ready_and_the_source_is_recorded",)),
    Mutation("png_adapters_not_recorded", "kandinsky/png.py",
             "adapters=list(adapters),", "adapters=[],",
             (COMPONENTS + "test_images_record_their_adapters",)),
    # ---- settings, validation, the command line
    Mutation("bounds_check_without_low", "kandinsky/validation.py",
             "if not low <= number <= high:", "if not number <= high:",
             ("tests/test_cli.py::test_bad_arguments_are_one_line_usage_errors",
              BATCH + "test_bad_prompt_files_fail_before_any_work_naming_the_line")),
    Mutation("strength_zero_accepted", "kandinsky/settings.py",
             "if not 0 < strength <= 1:", "if not 0 <= strength <= 1:",
             (PIPELINE + "test_img2img_bad_strength",)),
    Mutation("from_png_seed_dropped", "kandinsky/cli.py",
             'seed=stored["seed"])', "seed=None)",
             ("tests/test_cli.py::test_tiny_weights_from_the_command_line_and_a_png_regenerates_itself",)),
    Mutation("tiny_seed_ignored", "kandinsky/hub.py",
             "return None if match is None else int(match.group(1) or 0)", "return None if match is None else 0",
             ("tests/test_cli.py::test_tiny_weights_from_the_command_line_and_a_png_regenerates_itself",
              COMPONENTS + "test_tiny_source_matches_from_config")),
    # ---- batch generation
    Mutation("batch_rerun_with_another_seed_accepted", "kandinsky/batch.py",
             'expected = {"prompt": item.prompt, "seed": str(item.seed), "negative_prompt"',
             'expected = {"prompt": item.prompt, "negative_prompt"',
             (BATCH + "test_rerun_skips_finished_images_and_refuses_other_settings",)),
    Mutation("batch_manifest_keeps_stale_places", "kandinsky/batch.py",
             'records[item.index] = {**record, "index": item.index, "line": item.line}',
             "records[item.index] = record",
             (BATCH + "test_the_manifest_follows_an_edited_prompt_file",)),
    Mutation("batch_paths_not_resolved", "kandinsky/batch.py",
             "if not allow_outside and not file.resolve().is_relative_to(path.parent.resolve()):",
             "if not allow_outside and not file.is_relative_to(path.parent.resolve()):",
             (BATCH + "test_bad_prompt_files_fail_before_any_work_naming_the_line",
              BATCH + "test_csv_with_a_byte_order_mark_and_outside_paths_when_allowed")),
    Mutation("batch_csv_bom_kept", "kandinsky/batch.py",
             'text = path.read_text(encoding="utf-8-sig")', 'text = path.read_text(encoding="utf-8")',
             (BATCH + "test_csv_with_a_byte_order_mark_and_outside_paths_when_allowed",)),
    Mutation("batch_users_manifest_replaced", "kandinsky/batch.py",
             "if (output / MANIFEST).exists() and not marker.exists():", "if not marker.exists() and False:",
             (BATCH + "test_a_folder_is_written_by_one_run_at_a_time_and_a_users_manifest_is_kept",)),
    # ---- images
    Mutation("sixteen_bit_read_as_eight", "kandinsky/images.py",
             'top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0',
             'top = 255.0',
             (IMAGES + "test_sixteen_bit_grey_is_scaled_not_clipped",)),
    Mutation("alpha_composited_on_black", "kandinsky/images.py",
             "BACKGROUND = (255, 255, 255)", "BACKGROUND = (0, 0, 0)",
             (IMAGES + "test_transparency_is_composited_on_white",)),
    # ---- diffusers scheduler configs
    Mutation("ddim_steps_offset_ignored", "kandinsky/convert/scheduler.py",
             'return ours, values["steps_offset"] if offset_applies else 0', "return ours, 1 if offset_applies else 0",
             (SCHEDULER_CONFIGS + "test_steps_offset_is_honoured_not_assumed",)),
    Mutation("ddim_previous_timestep_listed", "kandinsky/convert/scheduler.py",
             "options, prev_stride=True)", "options, prev_stride=False)",
             (SCHEDULER_CONFIGS + "test_ddim_configs_give_diffusers_images[linspace]",
              SCHEDULER_CONFIGS + "test_ddim_configs_give_diffusers_images[trailing]")),
    Mutation("scaled_linear_betas_not_squared", "kandinsky/convert/scheduler.py",
             "torch.linspace(start, end, steps, dtype=torch.float64) ** 2",
             "torch.linspace(start, end, steps, dtype=torch.float64)",
             (SCHEDULER_CONFIGS + "test_ddim_configs_give_diffusers_images[scaled_linear]",)),
    Mutation("unclip_clip_range_ignored", "kandinsky/convert/scheduler.py",
             '"clip_sample_range": float(values["clip_sample_range"]) if values["clip_sample"] else None}',
             '"clip_sample_range": 10.0 if values["clip_sample"] else None}',
             (SCHEDULER_CONFIGS + "test_prior_scheduler_config_is_honoured",)),
    Mutation("pipeline_sampler_default_fixed", "kandinsky/pipeline/k21.py",
             'values = {**values, "sampler": self.decoder_sampling.sampler}', 'values = {**values, "sampler": "ddim"}',
             (SCHEDULER_CONFIGS + "test_the_ddpm_scheduler_of_the_hub_repo",)),
    Mutation("movq_encoder_groups_fixed", "kandinsky/convert/movq.py",
             'norm_groups=value("norm_num_groups"), decoder_norm_groups=32,', "norm_groups=32, decoder_norm_groups=32,",
             ("tests/test_movq.py::test_diffusers_encoder_norm_groups_other_than_32",)),
    # ---- export
    Mutation("onnx_new_weights_deleted", "kandinsky/export.py",
             'if stale.name != f"{path.name}.{token}.data":', 'if stale.name == f"{path.name}.{token}.data":',
             ("tests/test_export.py::test_an_onnx_graph_and_its_weights_are_one_output",)),
    Mutation("original_clip_stats_swapped", "kandinsky/convert/prior.py",
             'stats = [state.pop(name, None) for name in ("clip_mean", "clip_std")]',
             'stats = [state.pop(name, None) for name in ("clip_std", "clip_mean")]',
             ("tests/test_layouts.py::test_an_original_export_is_what_the_original_code_loads[prior]",)),
    Mutation("original_export_configs_not_read", "kandinsky/hub.py",
             'if layout == "original" and original_configs is None and local.is_dir():',
             'if layout == "original" and original_configs is not None and local.is_dir():',
             ("tests/test_layouts.py::test_the_tiny_pipeline_reads_back_from_the_original_layout",)),
    # ---- training
    Mutation("ema_decay_inverted", "kandinsky/training/loop.py",
             "self.average[name].lerp_(p.detach().float(), 1 - self.decay)",
             "self.average[name].lerp_(p.detach().float(), self.decay)",
             (TRAINER + "test_ema_after_k_steps_is_the_closed_form",)),
    Mutation("dropout_probabilities_swapped", "kandinsky/training/data.py",
             "bool(uniforms[0] < text_dropout), bool(uniforms[1] < image_dropout)",
             "bool(uniforms[0] < image_dropout), bool(uniforms[1] < text_dropout)",
             (TRAINING_DATA + "test_conditioning_dropout_frequencies_match_their_probabilities_drawn_independently",)),
    Mutation("dropout_drawn_jointly", "kandinsky/training/data.py",
             "bool(uniforms[0] < text_dropout), bool(uniforms[1] < image_dropout)",
             "bool(uniforms[0] < text_dropout), bool(uniforms[0] < image_dropout)",
             (TRAINING_DATA + "test_conditioning_dropout_frequencies_match_their_probabilities_drawn_independently",)),
    Mutation("training_timesteps_include_1000", "kandinsky/training/data.py",
             "timestep = int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=generator))",
             "timestep = int(torch.randint(1, NUM_TRAIN_TIMESTEPS + 1, (1,), generator=generator))",
             (TRAINING_DATA + "test_training_timesteps_cover_0_to_999_and_never_1000",)),
    Mutation("inpaint_mask_polarity_inverted", "kandinsky/training/losses.py",
             "model_input = torch.cat([x_t, inpaint_image.float() * mask, mask], dim=1)",
             "model_input = torch.cat([x_t, inpaint_image.float() * (1 - mask), mask], dim=1)",
             (TRAINER + "test_inpainting_unet_gets_the_masked_latents_known_where_the_mask_is_1",)),
    Mutation("lora_alpha_ignored_in_training", "kandinsky/training/loop.py",
             "add_lora(model, config.lora_rank, config.lora_alpha)", "add_lora(model, config.lora_rank)",
             (TRAINER + "test_lora_alpha_scales_the_adapter_by_alpha_over_rank_in_training_and_loading",)),
    Mutation("ddp_syncs_every_micro_batch", "kandinsky/training/loop.py",
             "distributed.gradient_sync(self.wrapped, index == config.grad_accum - 1)",
             "distributed.gradient_sync(self.wrapped, True)",
             (TRAINER + "test_ddp_synchronises_gradients_only_on_the_last_micro_batch",)),
    Mutation("training_paths_not_resolved", "kandinsky/training/data.py",
             "if not allow_outside and not path.resolve().is_relative_to(folder.resolve()):",
             "if not allow_outside and not path.is_relative_to(folder.resolve()):",
             (TRAINING_DATA + "test_data_paths_stay_inside_their_folder",)),
    # ---- evaluation
    Mutation("clip_score_on_the_fid_squares", "kandinsky/eval.py",
             "for files, _, images in _batches(captioned, size, batch_size, full=True):",
             "for files, images, _ in _batches(captioned, size, batch_size, full=True):",
             ("tests/test_eval.py::test_clip_score_is_torchmetrics_on_the_full_images",)),
    # ---- the web UI's handlers
    Mutation("ui_mask_threshold_off_by_one", "kandinsky/ui/handlers.py",
             "painted |= alpha >= 128", "painted |= alpha >= 64",
             ("tests/test_ui.py::test_the_painted_layer_is_the_mask",)),
    Mutation("ui_random_seed_not_drawn", "kandinsky/ui/handlers.py",
             "if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == -1):",
             "if value is None:",
             ("tests/test_ui.py::test_seeds",)),
    Mutation("ui_adapter_scale_lost", "kandinsky/ui/handlers.py",
             "            adapters.append((path, value))", "            adapters.append((path, 1.0))",
             ("tests/test_ui.py::test_adapters_field",)),
    # ---- models and converters
    Mutation("spatial_norm_epsilon_1e-5", "kandinsky/models/movq.py",
             "self.norm = GroupNorm32(groups, channels, eps=1e-6)", "self.norm = GroupNorm32(groups, channels, eps=1e-5)",
             ("tests/test_movq.py::test_diffusers_tiny",)),
    Mutation("spatial_norm_scale_shift_swapped", "kandinsky/models/movq.py",
             "scale, shift = self.to_scale_shift(zq)", "shift, scale = self.to_scale_shift(zq)",
             ("tests/test_movq.py::test_original_decode",)),
    Mutation("qkv_rows_not_reordered", "kandinsky/convert/core.py",
             "unflatten(0, (heads, parts, -1)).transpose(0, 1)", "unflatten(0, (heads, parts, -1))",
             ("tests/test_prior.py::test_original_fixture_forward",)),
    Mutation("prior_projection_swapped", "kandinsky/models/prior.py",
             "self.text_embed_proj(text_embeds.to(dtype))", "self.image_embed_proj(text_embeds.to(dtype))",
             ("tests/test_prior.py::test_original_fixture_forward",)),
    Mutation("prior_causal_mask_missing", "kandinsky/models/prior.py",
             "torch.ones(length, length, dtype=torch.bool, device=device).tril()",
             "torch.ones(length, length, dtype=torch.bool, device=device)",
             ("tests/test_prior.py::test_original_fixture_forward",)),
    Mutation("prior_mlp_norm_input_swapped", "kandinsky/models/prior.py",
             "x + self.mlp(self.norm2(x))", "x + self.mlp(self.norm1(x))",
             ("tests/test_prior.py::test_original_fixture_forward",)),
    Mutation("winograd_padding_columns_not_zeroed", "kandinsky/ops/cpu.py",
             "    padded[:, 1:-1, 0::width + 1].zero_()  # the first and last columns\n", "",
             ("tests/test_ops.py::test_padded_channels_last_zeroes_the_border_in_reused_memory",)),
    Mutation("gemm_conv_copies_a_contiguous_kernel", "kandinsky/ops/cpu.py",
             "    if weight.is_contiguous():\n        kernel = weight.view",
             "    if False:\n        kernel = weight.view",
             ("tests/test_ops.py::test_gemm_path_under_autograd_keeps_no_copy_of_the_kernel",)),
    Mutation("prior_prefix_step_positions_wrong", "kandinsky/models/prior.py",
             "self.positional_embedding[:, -NUM_STEP_TOKENS:]", "self.positional_embedding[:, :NUM_STEP_TOKENS]",
             (PRIOR_PREFIX,)),
    Mutation("prior_prefix_padding_unmasked", "kandinsky/models/prior.py",
             "TextPrefix(caches, attn_mask[..., prefix:, :])",
             "TextPrefix(caches, torch.ones_like(attn_mask[..., prefix:, :]))",
             (PRIOR_PREFIX,)),
    Mutation("prior_prefix_cache_grows", "kandinsky/models/prior.py",
             "        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)",
             "        self.keys, self.values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)\n"
             "        return self.keys, self.values",
             (PRIOR_PREFIX,)),
    Mutation("last_query_block_ignores_prefix", "kandinsky/ops/generic.py",
             "            k, v = cache.extend(k, v)", "            pass",
             (PRIOR_PREFIX,)),
    Mutation("padding_free_prior_drops_what_one_row_reads", "kandinsky/ops/generic.py",
             "text_positions = text_mask.any(dim=0).nonzero()[:, 0]",
             "text_positions = text_mask.all(dim=0).nonzero()[:, 0]",
             (OPS + "test_padding_free_prior_runs_only_the_positions_some_row_reads[prompts]",)),
    Mutation("prior_positions_of_kept_text_shifted", "kandinsky/models/prior.py",
             "positional = torch.cat([positional[:, text_positions], positional[:, self.config.text_ctx:]], dim=1)",
             "positional = positional[:, :len(text_positions) + NUM_EXTRA_TOKENS]",
             (OPS + "test_padding_free_prior_runs_only_the_positions_some_row_reads[holes]",)),
    Mutation("prior_padding_kept_by_optimize", "kandinsky/ops/generic.py",
             "            swap(sub, PaddingFreePrior)\n", "",
             (OPS + "test_optimize_swaps_in_place_sharing_every_tensor[prior]",)),
    Mutation("pipeline_prior_without_prefix", "kandinsky/pipeline/k21.py",
             "return prior(x_in.to(dtype), timesteps, text_prefix=text_prefix)",
             "return prior(x_in.to(dtype), timesteps, text_embeds=text_embeds, "
             "text_hidden_states=text_hidden_states, text_mask=text_mask)",
             (PIPELINE + "test_prior_runs_the_text_through_the_blocks_once",)),
    Mutation("unet_scale_without_one", "kandinsky/models/unet.py",
             "self.norm2(h), 1 + scale)", "self.norm2(h), scale)",
             ("tests/test_unet.py::test_original_fixture_forward[unet]",)),
    # ---- Kandinsky 2.2 weights: siblings, the decoder's scheduler config, DDPM fixed_small
    Mutation("ddpm_fixed_small_ignored", "kandinsky/schedulers/samplers.py",
             'if variance == "fixed_small":', 'if variance == "fixed_small_never":',
             (SCHEDULER_CONFIGS + "test_ddpm_fixed_small_steps_as_diffusers",)),
    Mutation("k22_inpaint_sibling_misnamed", "kandinsky/hub.py",
             '"inpaint": base + "-inpaint", "controlnet"', '"inpaint": stem + "-inpaint", "controlnet"',
             ("tests/test_hub.py::test_22_hub_repositories_load_lazily_and_sample_with_the_decoder_scheduler",)),
    Mutation("k22_scheduler_config_ignored", "kandinsky/pipeline/k22.py",
             "decoder_sampling=None if config is None else sampling_from_diffusers(config))",
             "decoder_sampling=None)",
             ("tests/test_k22.py::test_saved_store_loads_back",)),
    Mutation("k22_export_scheduler_dropped", "kandinsky/layouts.py",
             'scheduler = components[SCHEDULER]() if model == "2.2" and SCHEDULER in components else None',
             "scheduler = None",
             ("tests/test_hub.py::test_22_local_diffusers_folders_and_the_cli",)),
    # ---- training: Kandinsky 2.2 and the data loader
    Mutation("k22_objective_original_by_default", "kandinsky/training/config.py",
             'DEFAULT_OBJECTIVE = {"2.1": "original", "2.2": "eps"}',
             'DEFAULT_OBJECTIVE = {"2.1": "original", "2.2": "original"}',
             (TRAINER + "test_k22_decoder_from_tiny_trains_from_the_command_line_loads_in_kandinsky22_and_generates",)),
    Mutation("k22_dropped_image_not_the_zero_image", "kandinsky/training/data.py",
             '        if self.task != "prior":\n            out["image_embeds"] = zero_image_embeds(',
             '        if self.task == "decoder":\n            out["image_embeds"] = zero_image_embeds(',
             (TRAINING_DATA + "test_cache_holds_what_the_encoders_compute[decoder_22]",)),
    Mutation("loader_share_ignores_the_rank", "kandinsky/training/data.py",
             "start = self.rank * self.per_process + index * micro", "start = index * micro",
             (TRAINING_DATA + "test_step_batches_give_each_process_its_share_in_any_worker",)),
    Mutation("idle_fraction_of_the_inputs", "kandinsky/training/profiling.py",
             '"idle_fraction": totals[DATA_WAIT] / wall if wall > 0 else None,',
             '"idle_fraction": totals[INPUTS] / wall if wall > 0 else None,',
             (TRAINER + "test_idle_fraction_is_the_data_wait_over_the_step_time",)),
    Mutation("training_output_not_locked", "kandinsky/training/loop.py",
             "self.lock = lock_output(self.out)", "self.lock = None",
             (TRAINER + "test_a_folder_is_written_by_one_run_at_a_time",)),
    Mutation("training_lock_file_makes_a_folder_foreign", "kandinsky/training/checkpoints.py",
             "not any(p.name != LOCK_FILE for p in out.iterdir())", "not any(True for p in out.iterdir())",
             (TRAINER + "test_a_folder_is_written_by_one_run_at_a_time",)),
    # ---- batch: Kandinsky 2.2 and ControlNet rows
    Mutation("batch_hint_size_not_in_the_batch_key", "kandinsky/batch.py",
             "                self.image_size, self.hint_size)", "                self.image_size)",
             (BATCH + "test_22_tasks_and_controlnet_rows_match_the_pipeline",)),
    Mutation("batch_rerun_ignores_the_model", "kandinsky/batch.py",
             '"model": weights.get("model", "2.1"),', '"model": item.settings.model,',
             (BATCH + "test_22_tasks_and_controlnet_rows_match_the_pipeline",)),
    Mutation("batch_controlnet_image_and_hint_swapped", "kandinsky/batch.py",
             "pipe.controlnet_img2img(prompts, images, hints,", "pipe.controlnet_img2img(prompts, hints, images,",
             (BATCH + "test_22_tasks_and_controlnet_rows_match_the_pipeline",)),
    Mutation("batch_22_img2img_guidance_of_21", "kandinsky/batch.py",
             'object.__setattr__(self, "guidance", default_guidance(self.task, self.model))',
             'object.__setattr__(self, "guidance", default_guidance(self.task))',
             (BATCH + "test_22_argument_and_row_errors_are_one_line_before_any_work",)),
    # ---- CPU convolutions under autograd (training): the differentiable Winograd path
    Mutation("winograd_input_grad_kernel_not_rotated", "kandinsky/ops/cpu.py",
             "        gg = gg.flip(1)", "        gg = gg",  # the channels-last kernels' transform (torch)
             (OPS + "test_winograd_function_gradients_match_the_direct_convolution[compiled-channels_last-4-shape0-8e-05]",)),
    Mutation("torch_kernel_transform_not_rotated", "kandinsky/ops/cpu.py",  # contiguous kernels, no compiler
             "torch.mm(gg.flip(1) if transposed else gg,", "torch.mm(gg,",
             (OPS + "test_winograd_function_gradients_match_the_direct_convolution[torch-contiguous-4-shape0-8e-05]",)),
    Mutation("winograd_bias_grad_of_the_first_sample", "kandinsky/ops/cpu.py",
             "grad_b = grad_y.sum((0, 2, 3))", "grad_b = grad_y[0].sum((1, 2))",
             (OPS + "test_winograd_function_gradients_match_the_direct_convolution[compiled-contiguous-4-shape0-8e-05]",)),
    Mutation("winograd_weight_grad_bands_overwritten", "kandinsky/ops/cpu.py",
             "            grad_u.baddbmm_(m, v)", "            torch.bmm(m, v, out=grad_u)",
             # (2, 24, 16, 72, 36): F(4x4, 3x3) in two bands of tile rows; one band would not tell
             (OPS + "test_winograd_function_gradients_match_the_direct_convolution[compiled-contiguous-4-shape1-8e-05]",)),
    # ---- the compiled Winograd transforms (kandinsky/ops/winograd.c, rebuilt for the mutated source)
    Mutation("compiled_input_transform_coefficient", "kandinsky/ops/winograd.c",
             "o[5][x] = 4.0f * d1 - 5.0f * d3 + d5;", "o[5][x] = 4.0f * d1 - 4.0f * d3 + d5;",
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-channels_last-True-winograd43_conv3x3-shape7-2e-05]",)),
    Mutation("compiled_output_transform_drops_a_term", "kandinsky/ops/winograd.c",
             "o[1][x] = m[1][x] - m[2][x] - m[3][x];", "o[1][x] = m[1][x] - m[2][x];",
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-channels_last-True-winograd_conv3x3-shape0-5e-06]",)),
    Mutation("compiled_output_without_bias", "kandinsky/ops/winograd.c", "        if (bias)\n", "        if (0)\n",
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-channels_last-True-winograd43_conv3x3-shape7-2e-05]",)),
    Mutation("compiled_adjoint_coefficient", "kandinsky/ops/winograd.c",
             "float r = y[0][x] + 4.0f * y[2][x]", "float r = y[0][x] + 2.0f * y[2][x]",
             (OPS + "test_winograd_function_gradients_match_the_direct_convolution[compiled-contiguous-4-shape0-8e-05]",)),
    Mutation("compiled_left_border_not_zero", "kandinsky/ops/winograd.c", "x < 0 || x >= width", "x < -1 || x >= width",
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-channels_last-True-winograd43_conv3x3-shape7-2e-05]",)),
    Mutation("compiled_bands_all_from_the_first_row", "kandinsky/ops/cpu.py",
             "native.input_tiles(x, tile, r0, n, tiles, activation)", "native.input_tiles(x, tile, 0, n, tiles, activation)",
             # (2, 24, 24, 72, 36): several bands of tile rows
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-channels_last-True-winograd43_conv3x3-shape10-2e-05]",)),
    Mutation("compiled_transforms_never_used", "kandinsky/ops/cpu.py",
             'return x.dtype == torch.float32 and x.device.type == "cpu" and native.library() is not None',
             "return False",
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-channels_last-True-winograd43_conv3x3-shape7-2e-05]",)),
    # ---- the norms folded into the Winograd input transform (FusedUNetResBlock, FusedMoVQResBlock)
    Mutation("compiled_activation_on_the_zero_border", "kandinsky/ops/winograd.c",
             "if (scale && d[j] != zeros) {", "if (scale) {",
             (OPS + "test_activated_convolution_is_the_convolution_of_the_activated_map[compiled-4-shape0-None]",)),
    Mutation("compiled_exp_coefficient", "kandinsky/ops/winograd.c",
             "p = p * r + 5.0000001201e-1f;", "p = p * r + 4.0000001201e-1f;",
             (OPS + "test_activated_convolution_is_the_convolution_of_the_activated_map[compiled-4-shape0-None]",)),
    Mutation("compiled_spatial_blocks_transposed", "kandinsky/ops/winograd.c",
             "y / block_height) * scale_width + x / block_width)", "y / block_width) * scale_width + x / block_height)",
             (OPS + "test_activated_convolution_is_the_convolution_of_the_activated_map[compiled-2-shape5-blocks5]",)),
    Mutation("fused_spatial_norm_without_the_latent_shift", "kandinsky/ops/cpu.py",
             "torch.addcmul(latent_shift, latent_scale, b[:, :, None, None])", "latent_scale * b[:, :, None, None]",
             (OPS + "test_optimized_model_matches_the_plain_one[compiled-movq-4]",)),
    Mutation("compiled_columns_taps_reversed", "kandinsky/ops/winograd.c",
             "o[(c0 + c) * 9 + k] = s[c];", "o[(c0 + c) * 9 + 8 - k] = s[c];",
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-contiguous-True-gemm_conv3x3-shape4-5e-06]",)),
    Mutation("compiled_columns_for_channels_last_kernels", "kandinsky/ops/cpu.py",
             "    if weight.is_contiguous():\n        kernel = weight.view(weight.shape[0], c * 9)\n        if _native(x)",
             "    if True:\n        kernel = weight.reshape(weight.shape[0], c * 9)\n        if _native(x)",
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-channels_last-True-gemm_conv3x3-shape4-5e-06]",)),
    Mutation("compiled_kernel_transform_ignores_the_flip", "kandinsky/ops/winograd.c",
             "taps[flip ? 8 - j : j][c] = w[c * 9 + j];", "taps[j][c] = w[c * 9 + j];",
             (OPS + "test_winograd_function_gradients_match_the_direct_convolution[compiled-contiguous-4-shape0-8e-05]",)),
    Mutation("compiled_kernel_transform_streams_a_wrong_column", "kandinsky/ops/winograd.c",
             "g2 = _mm256_set1_ps(g[3 * b + 2]);", "g2 = _mm256_set1_ps(g[3 * b + 1]);",
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-contiguous-True-winograd43_conv3x3-shape11-2e-05]",)),
    Mutation("kernel_transform_by_torch_only", "kandinsky/ops/cpu.py",
             "        if _native(weight):\n            native.winograd_kernel(", "        if False:\n            native.winograd_kernel(",
             (OPS + "test_fast_convolutions_match_the_direct_one[compiled-contiguous-True-winograd_conv3x3-shape0-5e-06]",)),
    Mutation("profile_misses_the_fused_blocks_convolutions", "kandinsky/benchmark/profile.py",
             'if kind == "conv3x3" and hasattr(module, "convolve_activated"):', "if False:",
             ("tests/test_benchmark.py::test_profile_tells_the_winograd_convolution_from_attention[True]",)),
    Mutation("channels_last_file_keeps_permuted_strides", "kandinsky/weights.py",
             "state[key] = kernel.flatten().view(kernel.shape)", "state[key] = kernel",
             ("tests/test_weights.py::test_folders_written_by_earlier_versions_load_to_the_same_weights[channels-last file]",)),
    Mutation("read_ahead_one_willneed_for_the_whole_file", "kandinsky/weights.py",
             "        for offset in range(0, os.fstat(fd).st_size, READ_AHEAD_CHUNK):\n"
             "            os.posix_fadvise(fd, offset, READ_AHEAD_CHUNK, os.POSIX_FADV_WILLNEED)",
             "        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)",
             ("tests/test_weights.py::test_load_converted_has_the_kernel_read_the_whole_file_first",
              "tests/test_weights.py::test_the_read_ahead_brings_the_whole_file_into_the_page_cache")),
    Mutation("channels_last_copies_every_kernel", "kandinsky/ops/generic.py",
             "                if getattr(layer, \"any_kernel_layout\", False):", "                if False:",
             (OPS + "test_optimize_copies_out_of_weight_files_only_the_kernels_it_must_re_lay_out[unet]",)),
    Mutation("channels_last_skips_the_other_kernels", "kandinsky/ops/generic.py",
             "                    if param.dim() == 4 and not", "                    if False and not",
             (OPS + "test_optimize_copies_out_of_weight_files_only_the_kernels_it_must_re_lay_out[movq]",)),
    Mutation("compiled_moments_of_one_thread", "kandinsky/ops/winograd.c",
             "sum[c] += local[c];", "sum[c] = local[c];",
             (OPS + "test_compiled_kernels_on_several_threads[2]",)),
    Mutation("group_norm_shift_without_the_mean", "kandinsky/ops/cpu.py",
             "shift = -mean.repeat_interleave(per_group, dim=1) * scale", "shift = 0 * scale",
             (OPS + "test_group_norm_scale_shift_is_the_norm[True-memory_format0]",)),
    Mutation("fused_unet_block_drops_the_timestep_scale", "kandinsky/ops/cpu.py",
             "torch.addcmul(emb_shift, shift, 1 + emb_scale)", "torch.addcmul(emb_shift, shift, emb_scale)",
             (OPS + "test_optimized_model_matches_the_plain_one[compiled-unet-4]",)),
    Mutation("fused_movq_block_without_the_second_norm", "kandinsky/ops/cpu.py",
             "h = self.conv2.convolve_activated(h, *self._activation(self.norm2, h, zq))",
             "h = self.conv2(F.silu(h))",
             (OPS + "test_optimized_model_matches_the_plain_one[compiled-movq-4]",)),
    Mutation("training_without_the_winograd_convolution", "kandinsky/training/loop.py",
             'if torch.device(device).type == "cpu":', 'if torch.device(device).type == "cuda":',
             (TRAINER + "test_trainer_and_benchmark_swap_the_convolutions_on_the_cpu_only",
              TRAINER + "test_cpu_training_runs_the_winograd_convolutions")),
    Mutation("movq_attention_projection_left_on_mkl", "kandinsky/ops/cpu.py",
             "        return block.qkv, block.proj\n", "        return (block.qkv,)\n",
             (OPS + "test_movq_attention_projections_go_through_onednn_where_it_has_the_dtype",)),
    # ---- kandinsky bench train: the bf16 step against our float32 step
    Mutation("bench_train_bf16_step_against_diffusers", "kandinsky/benchmark/train.py",
             '[t + adamw_s for t in times["ours bf16"]], ours_step,',
             '[t + adamw_s for t in times["ours bf16"]], times["diffusers"],',
             ("tests/test_benchmark_train.py::test_bf16_step_against_our_float32_step_where_the_cpu_has_bf16",)),
    Mutation("bench_train_bf16_step_without_autocast", "kandinsky/benchmark/train.py",
             'cases["ours bf16"] = backward(ours, BF16_AUTOCAST)', 'cases["ours bf16"] = backward(ours)',
             ("tests/test_benchmark_train.py::test_bf16_step_against_our_float32_step_where_the_cpu_has_bf16",)),
)

GUARD_SOURCE = f'''"""pytest plugin of scripts/mutation_check.py: stop unless kandinsky is imported from the copy."""
import os

import pytest


def pytest_sessionstart(session):
    import kandinsky

    copy = os.path.realpath(os.environ["MUTATION_COPY"])
    where = os.path.realpath(kandinsky.__file__)
    if not where.startswith(copy + os.sep):
        pytest.exit(f"kandinsky imported from {{where}}, not from the copy {{copy}}", returncode={WRONG_IMPORT})
'''


def copy_repository(destination: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        linked = [Path(p).relative_to(name) for p in LINKED if Path(p).parts[0] == name]
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", *[str(p) for p in linked])
            shutil.copytree(source, destination / name, ignore=ignore)
        else:
            shutil.copy2(source, destination / name)
    for name in LINKED:
        (destination / name).symlink_to(ROOT / name, target_is_directory=True)
    (destination / f"{GUARD}.py").write_text(GUARD_SOURCE)


def pattern_problem(mutation: Mutation) -> str | None:
    path = ROOT / mutation.file
    if not path.is_file():
        return f"{mutation.file} does not exist"
    count = path.read_text().count(mutation.old)
    return None if count == 1 else f"its text occurs {count} times in {mutation.file} (expected once): {mutation.old!r}"


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    """(exit status, pytest's output, seconds) of the tests in ``copy``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(copy), MUTATION_COPY=str(copy), PYTHONDONTWRITEBYTECODE="1")
    # -n 0: one process per run (several runs go at once, --jobs)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", "-p", GUARD, *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        return -1, output + f"\ntimed out after {timeout:.0f} s", time.perf_counter() - start
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def check(mutation: Mutation, copy: Path, timeout: float) -> tuple[str, str, float, str]:
    """(name, verdict, seconds, detail) of one mutation, applied to a fresh copy in ``copy``."""
    copy_repository(copy)
    path = copy / mutation.file
    text = path.read_text()
    if text.count(mutation.old) != 1:  # the file changed since the first check
        return mutation.name, "PATTERN", 0.0, f"its text occurs {text.count(mutation.old)} times in {mutation.file}"
    path.write_text(text.replace(mutation.old, mutation.new))
    code, output, seconds = run_tests(copy, mutation.tests, timeout)
    shutil.rmtree(copy)
    if code == 1 and failed_tests(output):
        return mutation.name, "caught", seconds, "by " + ", ".join(failed_tests(output))
    if code == 0:
        return mutation.name, "SURVIVED", seconds, f"{len(mutation.tests)} tests passed"
    return mutation.name, "ERROR", seconds, f"exit {code}:\n" + tail(output)


def failed_tests(output: str) -> list[str]:
    return re.findall(r"^FAILED (\S+)", output, flags=re.MULTILINE)


def tail(output: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in output.strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, then stop")
    parser.add_argument("--patterns-only", action="store_true", help="only check that every mutation applies")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default: 600)")
    parser.add_argument("--jobs", type=int, default=2, help="pytest runs at a time (default: 2; each uses one "
                                                            "thread, see tests/conftest.py)")
    args = parser.parse_args(argv)

    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutations {unknown}; see --list")
    mutations = [known[n] for n in args.names] if args.names else list(MUTATIONS)
    if args.list:
        for m in mutations:
            print(f"{m.name}  ({m.file})\n  - {m.old!r}\n  + {m.new!r}\n" + "".join(f"    {t}\n" for t in m.tests))
        return 0

    problems = {m.name: p for m in mutations if (p := pattern_problem(m)) is not None}
    for name, problem in problems.items():
        print(f"PATTERN   {name}: {problem}")
    if args.patterns_only:
        print(f"{len(mutations) - len(problems)} of {len(mutations)} mutations apply")
        return 1 if problems else 0

    start = time.perf_counter()
    runnable = [m for m in mutations if m.name not in problems]
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as temporary:
        baseline = Path(temporary) / "baseline"
        copy_repository(baseline)
        tests = tuple(dict.fromkeys(t for m in runnable for t in m.tests))
        code, output, seconds = run_tests(baseline, tests, args.timeout)
        print(f"baseline  {len(tests)} tests on the unmutated copy: exit {code} ({seconds:.0f} s)", flush=True)
        if code != 0:
            print("the chosen tests must pass without mutations:\n" + tail(output))
            return 1
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = [pool.submit(check, mutation, Path(temporary) / f"m{index}", args.timeout)
                       for index, mutation in enumerate(runnable)]
            for future in as_completed(futures):
                name, verdict, seconds, detail = future.result()
                print(f"{verdict:9} {name} ({seconds:.0f} s) {detail}", flush=True)
        results = [future.result() for future in futures]  # in the order of MUTATIONS

    print(f"\n{'mutation':42} {'result':9} {'time':>5}  tests that catch it (pytest -x: the first to fail)")
    for name, verdict, seconds, detail in results:
        print(f"{name:42} {verdict:9} {seconds:4.0f}s  {detail.splitlines()[0]}")
    for name in problems:
        print(f"{name:42} {'PATTERN':9} {'':5}  not applied: {problems[name]}")
    caught = sum(verdict == "caught" for _, verdict, _, _ in results)
    total = len(results) + len(problems)
    print(f"\n{caught} of {total} mutations caught, {time.perf_counter() - start:.0f} s")
    return 0 if caught == total else 1


if __name__ == "__main__":
    sys.exit(main())
