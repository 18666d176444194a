#!/usr/bin/env python
"""Save the first blocks of a pretrained backbone as a checkpoint of its own: the static baseline for ADNet.

ADNet on a mean of k layers is compared with the same backbone cut to its first k blocks and fine-tuned with the same
recipe (`run_glue_style.py --plain_baseline`, `run_image_classification.py --plain_baseline`):

    python examples/truncate_backbone.py --model_name_or_path path/to/minilm --num_blocks 2 \\
        --output_dir outputs/minilm-2
    python examples/run_glue_style.py --plain_baseline --model_name_or_path outputs/minilm-2 ...

Text backbones (BERT, RoBERTa, GPT-2, Llama-family) keep their first `--num_blocks` transformer layers; a ResNet
keeps its first residual blocks, stage by stage (the stages after the last kept block are dropped). The weights are
the checkpoint's own (Transformers loads the kept blocks by name and reports the dropped ones); the tokenizer or
image processor is saved alongside when the checkpoint has one.
"""

from __future__ import annotations

import argparse
import logging

from transformers import AutoConfig, AutoModel, PretrainedConfig

logger = logging.getLogger(__name__)


def truncated_config(config: PretrainedConfig, num_blocks: int) -> PretrainedConfig:
    """The backbone's config with only its first `num_blocks` blocks."""
    depth = sum(config.depths) if hasattr(config, "depths") else config.num_hidden_layers
    if not 1 <= num_blocks < depth:
        raise ValueError(f"--num_blocks must be between 1 and {depth - 1} (the backbone has {depth}): {num_blocks}.")
    if not hasattr(config, "depths"):
        config.num_hidden_layers = num_blocks  # GPT-2's n_layer through the attribute map
        return config
    depths, remaining = [], num_blocks
    for stage_depth in config.depths:
        if remaining == 0:
            break
        depths.append(min(stage_depth, remaining))
        remaining -= depths[-1]
    values = config.to_dict()
    for derived in ("stage_names", "out_features", "out_indices", "_out_features", "_out_indices"):
        values.pop(derived, None)  # recomputed from the new depths
    values.update(depths=depths, hidden_sizes=config.hidden_sizes[: len(depths)])
    return AutoConfig.for_model(**values)


def save_preprocessor(source: str, output_dir: str) -> None:
    """Copy the checkpoint's tokenizer or image processor, when it has one."""
    from transformers import AutoImageProcessor, AutoTokenizer

    for loader in (AutoTokenizer, AutoImageProcessor):
        try:
            loader.from_pretrained(source).save_pretrained(output_dir)
            return
        except (OSError, ValueError, KeyError):
            continue
    logger.warning("%s has no tokenizer or image processor; only the model is saved.", source)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="The pretrained backbone (a local folder).")
    parser.add_argument("--num_blocks", type=int, required=True, help="How many leading blocks to keep.")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = truncated_config(AutoConfig.from_pretrained(args.model_name_or_path), args.num_blocks)
    model = AutoModel.from_pretrained(args.model_name_or_path, config=config)
    model.save_pretrained(args.output_dir)
    save_preprocessor(args.model_name_or_path, args.output_dir)
    logger.info("Saved the first %d blocks of %s to %s.", args.num_blocks, args.model_name_or_path, args.output_dir)


if __name__ == "__main__":
    main()
